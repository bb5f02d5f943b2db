"""Tables, plots and published copies of a benchmark run's rows (see bench/run.py)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from pathlib import Path

# Providers the headline divides by: the state of the art, and the floor of any design.
BASELINES = (("liger", "ce"), ("cce", "ce"), ("gemm_floor", "ce"))


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def card_slug(device: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``; ``"cpu"`` stays."""
    name = re.sub(r"^nvidia\s+", "", device.strip().lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _describe(row: dict) -> str:
    grads = "weight grad" if row["weight_grad"] else "frozen weight"
    if row["mode"] == "fwd":
        grads = "no grad"
    ignored = f", {row['ignored']:.0%} ignored" if row["ignored"] else ""
    return (
        f"{row['case']}, {row['tokens']} tokens (H={row['hidden']}, V={row['vocab']}, "
        f"{row['dtype']}, {row['mode']}, {grads}{ignored})"
    )


# What impl="auto" may pick: the impls, with their default options.
AUTO_CANDIDATES = ("chunked", "vocab_chunked", "fused")


def latest_rows(rows: list[dict]) -> list[dict]:
    """One row per (provider, loss, case, tokens): the last, where a run was completed by
    ``run.py --cases`` (its rows appended), in the place of the first."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["provider"], r["loss"], r["case"], r["tokens"])] = r
    return list(latest.values())


def auto_choice(rows: list[dict]) -> dict | None:
    """impl="auto"'s picks on this run's card: per regime ("train": with grad_weight, "frozen":
    a LoRA head), the candidate with the least total time over the forward+backward TOFU cases
    that chunked ran. A candidate that failed a case (error, oom) or has no row for one is out;
    a case that some candidate did not reach ("unavailable": the time budget ran out) is left
    out of the comparison instead. None without a GPU's capability (a CPU run) or without
    chunked rows."""
    if not rows or rows[0].get("versions", {}).get("capability") is None:
        return None
    choice = {}
    for regime, weight_grad in (("train", True), ("frozen", False)):
        # the last row of each (candidate, case) counts: a run completed with --cases adds rows
        last: dict[str, dict] = {impl: {} for impl in AUTO_CANDIDATES}
        for r in rows:
            provider, _, impl = r["provider"].partition("/")
            if (
                provider == "tofu_kernels"
                and impl in last
                and r["loss"] == "tofu"
                and r["mode"] == "fwd_bwd"
                and r["weight_grad"] == weight_grad
            ):
                last[impl][(r["case"], r["tokens"])] = r
        status = {impl: {c: r["status"] for c, r in by.items()} for impl, by in last.items()}
        skipped = {c for by in status.values() for c, st in by.items() if st == "unavailable"}
        cases = {c for c, st in status["chunked"].items() if st == "ok"} - skipped
        ran = {
            impl: {c: last[impl][c]["ms"] for c in cases}
            for impl, by in status.items()
            if cases
            and all(st in ("ok", "unavailable") for st in by.values())
            and all(by.get(c) == "ok" for c in cases)
        }
        if ran:
            choice[regime] = min(ran, key=lambda impl: sum(ran[impl].values()))
    if not choice:
        return None
    return {"capability": rows[0]["versions"]["capability"], "device": rows[0]["device"], **choice}


def headline_table(rows: list[dict], headline: tuple[str, int]) -> str:
    """The headline case: ms and peak MB per provider, ratios to Liger, CCE and the GEMM floor."""
    name, tokens = headline
    sel = [r for r in rows if r["case"] == name and r["tokens"] == tokens]
    if not sel:
        return f"Headline: no rows for {name} at {tokens} tokens."
    env = sel[0]
    base = {}
    for provider, loss in BASELINES:
        match = [r for r in sel if r["provider"] == provider and r["loss"] == loss]
        base[provider] = match[0] if match and match[0]["status"] == "ok" else None

    def ref(provider: str, key: str) -> float | None:
        return base[provider][key] if base[provider] else None

    lines = [
        f"Headline: {_describe(env)}",
        f"on {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}",
        "",
        "| provider | loss | ms | peak MB | ms / liger | ms / cce | ms / gemm_floor "
        "| MB / liger | MB / cce | status |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in sel:
        ms, mb = r["ms"], r["peak_mem_mb"]
        lines.append(
            f"| {r['provider']} | {r['loss']} | {_fmt(ms)} | {_fmt(mb, 0)} "
            f"| {_ratio(ms, ref('liger', 'ms'))} | {_ratio(ms, ref('cce', 'ms'))} "
            f"| {_ratio(ms, ref('gemm_floor', 'ms'))} | {_ratio(mb, ref('liger', 'peak_mem_mb'))} "
            f"| {_ratio(mb, ref('cce', 'peak_mem_mb'))} | {r['status'].replace('|', '/')} |"
        )
    lines.append("")
    lines.extend(goal_lines(sel, base["liger"]))
    return "\n".join(lines)


def goal_lines(sel: list[dict], liger: dict | None) -> list[str]:
    """The issue's goal: TOFU fwd+bwd no slower than Liger's CE and no more peak memory."""
    ours = [r for r in sel if r["provider"].startswith("tofu_kernels/") and r["loss"] == "tofu"]
    if liger is None:
        return ["Goal (TOFU <= Liger CE in time and memory): not measurable, no ok Liger row."]
    out = []
    for r in ours:
        if r["status"] != "ok":
            out.append(f"Goal, {r['provider']}: not measured ({r['status']}).")
            continue
        fast = r["ms"] <= liger["ms"]
        mem_ok = None
        if r["peak_mem_mb"] is not None and liger["peak_mem_mb"] is not None:
            mem_ok = r["peak_mem_mb"] <= liger["peak_mem_mb"]
        if mem_ok is None:
            verdict = "time met, memory not measured" if fast else "NOT met"
        else:
            verdict = "met" if fast and mem_ok else "NOT met"
        out.append(
            f"Goal, {r['provider']} TOFU vs Liger CE: time {_ratio(r['ms'], liger['ms'])}, "
            f"peak memory {_ratio(r['peak_mem_mb'], liger['peak_mem_mb']) or 'n/a'}: {verdict}."
        )
    return out


def case_tables(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["tokens"]), []).append(r)
    out = []
    for group in groups.values():
        out += [
            f"### {_describe(group[0])}",
            "",
            "| provider | loss | ms (p20 - p80) | peak MB | loss value | status | note |",
            "|---|---|--:|--:|--:|---|---|",
        ]
        for r in group:
            spread = f" ({_fmt(r['ms_p20'])} - {_fmt(r['ms_p80'])})" if r["ms"] is not None else ""
            value = "" if r["loss_value"] is None else f"{r['loss_value']:.5g}"
            note, status = r["note"].replace("|", "/"), r["status"].replace("|", "/")
            out.append(
                f"| {r['provider']} | {r['loss']} | {_fmt(r['ms'])}{spread} "
                f"| {_fmt(r['peak_mem_mb'], 0)} | {value} | {status} | {note} |"
            )
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], headline: tuple[str, int], out: Path) -> list[Path]:
    """Time and peak memory against tokens, one line per provider, per token sweep and loss."""
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: rebuild later with --report-only
        return []
    matplotlib.use("Agg")  # headless; set before pyplot is imported
    import matplotlib.pyplot as plt

    tokens_of: dict[str, set[int]] = {}
    for r in rows:
        tokens_of.setdefault(r["case"], set()).add(r["tokens"])
    names = [name for name, tokens in tokens_of.items() if len(tokens) > 1] or [headline[0]]
    paths = []
    for name in names:
        for loss in ("tofu", "ce"):
            sel = [r for r in rows if r["case"] == name and r["loss"] == loss]
            if not sel:
                continue
            if loss == "tofu":  # the goal compares TOFU with the others' cross-entropy
                sel += [
                    {**r, "provider": f"{r['provider']} (ce)"}
                    for r in rows
                    if r["case"] == name and (r["provider"], r["loss"]) in BASELINES[:2]
                ]
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
            any_mem = False
            for provider in dict.fromkeys(r["provider"] for r in sel):
                pts = sorted(
                    (r["tokens"], r["ms"], r["peak_mem_mb"])
                    for r in sel
                    if r["provider"] == provider and r["status"] == "ok"
                )
                if not pts:
                    continue
                x = [p[0] for p in pts]
                style = {"gemm_floor": "--"}.get(provider, ":" if "(ce)" in provider else "-")
                ax_t.plot(x, [p[1] for p in pts], style, marker="o", label=provider)
                mem = [(p[0], p[2]) for p in pts if p[2] is not None]
                if mem:
                    any_mem = True
                    ax_m.plot(*zip(*mem, strict=True), style, marker="o", label=provider)
            first = sel[0]
            title = f"{name} {loss}: H={first['hidden']}, V={first['vocab']}, {first['dtype']}"
            ax_t.set(xlabel="tokens", ylabel="ms (median)", title=f"{title}, {first['mode']}")
            ax_m.set(xlabel="tokens", ylabel="peak MB above inputs", title=first["device"])
            if not any_mem:
                ax_m.text(0.5, 0.5, "no allocator stats on CPU", ha="center",
                          transform=ax_m.transAxes)  # fmt: skip
            ticks = sorted({r["tokens"] for r in sel})
            for ax in (ax_t, ax_m):
                ax.set_xscale("log", base=2)
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
                ax.grid(True, alpha=0.3)
            ax_t.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"{_slug(name)}-{loss}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def write_reports(
    rows: list[dict], env: dict, headline: tuple[str, int], out: Path, preset: str
) -> str:
    """Write results.md and the plots into ``out``; return the headline table."""
    rows = latest_rows(rows)
    plots = plot(rows, headline, out)
    head = headline_table(rows, headline)
    extra = env["versions"]
    versions = ", ".join(
        f"{name} {extra.get(key) or 'not installed'}"
        for name, key in (
            ("liger-kernel", "liger_kernel"),
            ("cut-cross-entropy", "cut_cross_entropy"),
        )
    )
    interp = " (Triton under TRITON_INTERPRET=1)" if extra.get("interpreter") else ""
    timing = (
        "median of `triton.testing.do_bench` (CUDA events, L2 flushed between runs), "
        "p20 - p80 in brackets; peak memory: `torch.cuda.max_memory_allocated` above the inputs"
        if env["device"] != "cpu"
        else "median of wall-clock runs (`time.perf_counter`); no memory stats on CPU"
    )
    failing = [r for r in rows if r["status"] != "ok"]
    md = [
        "# TOFU LM-head loss benchmark",
        "",
        f"- card: **{env['device']}**{interp}",
        f"- torch {env['torch']}, triton {env['triton']}, {versions}, python {extra.get('python')}",
        f"- date: {env['date']}; preset `{preset}`: `python bench/run.py --preset {preset}`",
        f"- timing: {timing}",
        "- losses: `tofu` is gamma 3, beta 0.8; `ce` is cross-entropy (gamma 0, beta 1 for ours)",
        "",
        "## Headline",
        "",
        head,
        "",
        "## All cases",
        "",
        case_tables(rows),
        f"{len(failing)} of {len(rows)} rows are not ok (see status and note).",
        "",
        "## Plots",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        *(
            []
            if plots
            else [
                "No plots: matplotlib is not installed where this ran. Draw them with "
                f"`python bench/run.py --preset {preset} --out DIR --report-only`."
            ]
        ),
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    return head


def _measured(rows: list[dict]) -> set:
    return {
        (r["provider"], r["loss"], r["case"], r["tokens"], r["mode"], r["weight_grad"], r["ms"])
        for r in rows
        if r["status"] == "ok"
    }


def publish(src: Path, dest: Path) -> list[Path]:
    """Copy a run's files from ``src`` as ``dest/<card>-<yyyymmdd>.{json,md}`` and ``-<plot>.png``.

    The card and the date come from the rows, so copies made later keep the run's own. Another
    run on the same card and day gets ``<card>-<yyyymmdd>-2`` (``-3``, ...): published results
    are never overwritten, except by the same run again (every measurement of the published
    copy still in it, e.g. completed by ``run.py --cases``).
    """
    rows = json.loads((src / "results.json").read_text())
    if not rows:
        raise ValueError(f"{src / 'results.json'} has no rows")
    base = f"{card_slug(rows[0]['device'])}-{rows[0]['date'].replace('-', '')}"
    prefix, n, measured = base, 1, _measured(rows)
    while (dest / f"{prefix}.json").exists() and not (
        _measured(json.loads((dest / f"{prefix}.json").read_text())) <= measured
    ):
        n += 1
        prefix = f"{base}-{n}"
    dest.mkdir(parents=True, exist_ok=True)
    paths = [dest / f"{prefix}.json"]
    shutil.copyfile(src / "results.json", paths[0])
    md = (src / "results.md").read_text()
    for png in sorted(src.glob("*.png")):
        target = dest / f"{prefix}-{png.name}"
        shutil.copyfile(png, target)
        md = md.replace(f"]({png.name})", f"]({target.name})")
        paths.append(target)
    paths.insert(1, dest / f"{prefix}.md")
    paths[1].write_text(md)
    return paths
