"""Sweep apply_tofu_kernel over every causal-LM architecture of the installed transformers.

Each architecture runs in its own subprocess (``--worker``) under a timeout: a tiny random model
(fp32, CPU, fixed seed, train mode, dropout 0) is checked against the oracle, the published TOFU
loss on the unpatched model's logits with transformers' causal shift (plus ``coef * aux_loss``
where the forward returns a router loss), and against autograd through it. See README.md.

    PYTHONPATH=/tmp/wk python tools/hf_sweep/sweep.py --only llama,gpt2 --out /tmp/sw.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

GAMMA, BETA = 3.0, 0.8
SEED = 0
VOCAB = 256
BATCH, SEQ = 2, 8
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3

# Generic tiny sizes, by config attribute name; set where a (sub-)config has the attribute with a
# value of the same kind (numbers for numbers, bools for bools; None and lists stay).
TINY: dict[str, Any] = {
    **dict.fromkeys(
        ("hidden_size", "n_embd", "n_embed", "d_model", "dim", "embed_dim", "hidden_dim",
         "model_dim", "embedding_size", "word_embed_proj_dim", "d_embed"),
        32,
    ),
    **dict.fromkeys(
        ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "d_inner", "decoder_ffn_dim",
         "encoder_ffn_dim", "ffn_hidden_size", "mlp_dim", "intermediate_dim"),
        64,
    ),
    **dict.fromkeys(
        ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
         "moe_ffn_hidden_size"),
        32,
    ),
    **dict.fromkeys(
        ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers",
         "encoder_layers", "num_decoder_layers", "num_encoder_layers"),
        2,
    ),
    **dict.fromkeys(
        ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
         "encoder_attention_heads"),
        4,
    ),
    **dict.fromkeys(
        ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"), 2
    ),
    **dict.fromkeys(("head_dim", "d_head", "attention_head_dim", "kv_channels", "d_kv"), 8),
    "rotary_dim": 8,
    "vocab_size": VOCAB,
    # multi-head latent attention (DeepSeek-style)
    **{"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
       "v_head_dim": 8},
    # mixture of experts
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "n_group", "topk_group"), 1),
    "first_k_dense_replace": 1,
    # state-space layers: expand 1 and 4 heads of 8 match the 32-wide hidden state
    **dict.fromkeys(("state_size", "mamba_d_state", "ssm_state_size"), 8),
    **dict.fromkeys(("conv_kernel", "mamba_d_conv"), 4),
    **dict.fromkeys(("expand", "mamba_expand", "n_groups", "mamba_n_groups"), 1),
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads"), 4),
    **dict.fromkeys(("mamba_d_head", "mamba_headdim", "mamba_head_dim"), 8),
    **dict.fromkeys(("chunk_size", "mamba_chunk_size"), 8),
    "mamba_d_ssm": 32,
    "use_mamba_kernels": False,
    # large weights: peaked, non-uniform predictions
    **dict.fromkeys(("initializer_range", "init_std"), 0.5),
    "use_cache": False,
    **{"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
}  # fmt: skip
# Substrings of the names of dropout-like settings (set to 0: both forwards must be equal).
DROPOUT = ("dropout", "pdrop", "drop_rate", "layerdrop", "drop_path", "jitter")
# Per-architecture overrides on top of TINY (model_type -> config kwargs).
EXTRA: dict[str, dict[str, Any]] = {}
# Architectures whose forward needs inputs this sweep cannot make (model_type -> why).
SKIP: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------
# Worker: one architecture, in its own process
# ---------------------------------------------------------------------------------------------


def _stage(name: str) -> None:
    """Tell the parent where the worker is (a timeout is blamed on the stage it hit)."""
    print(f"@stage {name}", flush=True)


def _why(e: BaseException) -> str:
    """``Type: first line of message (at innermost file:line)``, for the report."""
    lines = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        f = frames[-1]
        msg += f" (at {'/'.join(f.filename.split('/')[-2:])}:{f.lineno})"
    return msg


def _same_kind(old: Any, new: Any) -> bool:
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    return isinstance(old, (int, float)) and isinstance(new, (int, float))


def _tiny_kwargs(default: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """Constructor kwargs that shrink one config (sub-configs: see tiny_config)."""
    attrs = {k: v for k, v in vars(default).items() if not k.startswith("_")}
    kwargs: dict[str, Any] = {}
    for name, old in attrs.items():
        if name in TINY and _same_kind(old, TINY[name]):
            kwargs[name] = TINY[name]
        elif any(s in name for s in DROPOUT) and _same_kind(old, 0.0):
            kwargs[name] = type(old)(0)
        elif name == "eos_token_id" and isinstance(old, list):
            kwargs[name] = [TINY[name]]
        elif name.endswith(("_token_id", "_token_index")) and _same_kind(old, 0) and old >= VOCAB:
            kwargs[name] = 2
    # per-layer lists and patterns follow the new depth (their first layers)
    depths = [(attrs[n], kwargs[n]) for n in ("num_hidden_layers", "n_layer", "num_layers")
              if n in kwargs and isinstance(attrs[n], int)]  # fmt: skip
    if depths:
        old_depth, depth = depths[0]
        for name, old in attrs.items():
            per_layer = isinstance(old, (list, tuple)) or (
                isinstance(old, str) and "pattern" in name
            )
            if per_layer and name not in kwargs and len(old) == old_depth > depth:
                kwargs[name] = old[:depth]
    kwargs.update(extra)
    return kwargs


def tiny_config(config_cls: type, extra: dict[str, Any], router: bool) -> Any:
    """A tiny instance of ``config_cls``, its sub-configs (text, vision, ...) shrunk as well."""
    default = config_cls()
    kwargs = _tiny_kwargs(default, extra)
    if router and hasattr(default, "output_router_logits"):
        kwargs["output_router_logits"] = True
    for name in getattr(default, "sub_configs", None) or {}:
        sub = getattr(default, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[name] = tiny_config(type(sub), {}, router)
    return config_cls(**kwargs)


def build(arch: Any, router: bool) -> Any:
    """The tiny model of ``arch``: fp32, CPU, seeded weights, train mode."""
    import torch
    from archs import resolve, text_config

    config_cls = resolve(arch.model_type, arch.config_class)
    config = tiny_config(config_cls, EXTRA.get(arch.model_type, {}), router)
    model_cls = resolve(arch.model_type, arch.model_class)
    own = getattr(model_cls, "config_class", None)
    if isinstance(own, type) and not isinstance(config, own):
        # the class takes the text decoder's config (e.g. Musicgen's decoder)
        if isinstance(text_config(config), own):
            config = text_config(config)
    torch.manual_seed(SEED)
    return model_cls(config).float().train()


def _aux_coef(model: Any) -> float:
    """The router-loss weight, looked up as the oracle's definition says."""
    from archs import text_config

    owners = (model, model.config, text_config(model.config))
    for name in ("router_aux_loss_coef", "aux_loss_coef"):  # the latter: JetMoe's
        for owner in owners:
            coef = getattr(owner, name, None)
            if coef is not None:
                return float(coef)
    raise ValueError("the forward returns aux_loss but no router_aux_loss_coef/aux_loss_coef found")


def _grads(model: Any) -> dict[str, Any]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _grad_error(actual: dict[str, Any], expected: dict[str, Any]) -> tuple[float, str]:
    """Worst relative max error over parameters (the scale is floored at 1e-6 of the largest
    gradient, so parameters with ~0 gradients do not blow it up); inf if the sets differ."""
    if actual.keys() != expected.keys():
        missing = sorted(expected.keys() - actual.keys())
        extra = sorted(actual.keys() - expected.keys())
        return math.inf, f"missing grads {missing[:3]}, extra grads {extra[:3]}"
    top = max((float(g.abs().max()) for g in expected.values() if g.numel()), default=0.0)
    worst, where = 0.0, ""
    for name, g in expected.items():
        if not g.numel():
            continue
        scale = max(float(g.abs().max()), 1e-6 * top, 1e-30)
        err = float((actual[name] - g).abs().max()) / scale
        if not err <= worst:  # NaN counts as worst
            worst, where = err, name
    return worst, where


def run_arch(arch: Any, router: bool) -> dict[str, Any]:
    """Check one architecture; returns its report record."""
    import torch

    from tofu_kernels.hf import UnsupportedModelError, apply_tofu_kernel, shift_labels
    from tofu_kernels.reference import tofu_loss_published

    def result(status: str, detail: str = "", **extra: Any) -> dict[str, Any]:
        return {"status": status, "detail": detail, **extra}

    if arch.model_type in SKIP:
        return result("SKIP", SKIP[arch.model_type])
    _stage("build")
    try:
        model = build(arch, router)
    except Exception as e:
        return result("BUILD_FAIL", f"build: {_why(e)}")

    from archs import text_config

    vocab = min(VOCAB, int(getattr(text_config(model.config), "vocab_size", VOCAB) or VOCAB))
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding

    # The oracle: unpatched forward (same train mode), published loss, autograd grads.
    _stage("reference")
    ref_error, aux_term = None, None
    try:
        torch.manual_seed(SEED)
        out = model(input_ids=ids)
        ref = tofu_loss_published(out["logits"], shift_labels(labels), GAMMA, BETA)
        aux = out.get("aux_loss")
        if aux is not None:
            aux_term = _aux_coef(model) * aux
            ref = ref + aux_term
        if not torch.isfinite(ref):
            raise FloatingPointError(f"reference loss is {float(ref)}")
        ref.backward()
        ref_grads = _grads(model)
    except Exception as e:
        ref_error = f"reference forward: {_why(e)}"
        model.zero_grad(set_to_none=True)

    _stage("patch")
    try:
        apply_tofu_kernel(model, gamma=GAMMA, beta=BETA, impl="torch")
    except UnsupportedModelError as e:
        return result("REFUSED", str(e).strip().splitlines()[0])
    except Exception as e:
        if ref_error:
            return result("BUILD_FAIL", f"{ref_error}; apply_tofu_kernel: {_why(e)}")
        return result("CRASH", f"apply_tofu_kernel: {_why(e)}")
    if ref_error:
        return result("BUILD_FAIL", f"{ref_error} (apply_tofu_kernel accepted the model)")

    _stage("patched")
    try:
        torch.manual_seed(SEED)
        out = model(input_ids=ids, labels=labels)
        loss = out["loss"]
        loss.backward()
        grads = _grads(model)
    except Exception as e:
        return result("CRASH", f"patched forward: {_why(e)}")

    numbers = {"loss": float(loss), "ref_loss": float(ref)}
    if aux_term is not None:
        numbers["aux_term"] = float(aux_term)
    if out.get("logits") is not None:
        return result("WRONG", "patched training forward returned logits", **numbers)
    if not math.isclose(float(loss), float(ref), rel_tol=LOSS_RTOL, abs_tol=1e-12):
        return result("WRONG", f"loss {float(loss):.7g} != oracle {float(ref):.7g}", **numbers)
    err, where = _grad_error(grads, ref_grads)
    numbers["grad_err"] = err
    if not err < GRAD_RTOL:
        return result("WRONG", f"grad relative error {err:.3g} ({where})", **numbers)
    return result("OK", f"loss {float(loss):.6g}, grad err {err:.1e}", **numbers)


def worker(model_type: str, router: bool, threads: int) -> None:
    import warnings

    import torch
    import transformers
    from archs import causal_lm_archs

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    arch = next(a for a in causal_lm_archs() if a.model_type == model_type)
    record = run_arch(arch, router)
    print("@result " + json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver: one subprocess per architecture
# ---------------------------------------------------------------------------------------------

# A worker that times out or dies: its stage says whose failure it is.
_STAGE_STATUS = {"build": "BUILD_FAIL", "reference": "BUILD_FAIL", "patch": "CRASH",
                 "patched": "CRASH"}  # fmt: skip


def _text(b: str | bytes | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _parse(stdout: str) -> tuple[str, dict[str, Any] | None]:
    stage, record = "build", None
    for line in stdout.splitlines():
        if line.startswith("@stage "):
            stage = line.split(" ", 1)[1]
        elif line.startswith("@result "):
            record = json.loads(line.split(" ", 1)[1])
    return stage, record


def check(arch: Any, router: bool, timeout: float, threads: int) -> dict[str, Any]:
    """Run one architecture's worker; its record, with the architecture and the time taken."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", arch.model_type,
           "--threads", str(threads)] + (["--router"] if router else [])  # fmt: skip
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, failure = proc.stdout, proc.stderr, f"worker exited with {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        stdout, stderr, failure = _text(e.stdout), _text(e.stderr), f"timed out after {timeout:g} s"
    stage, record = _parse(stdout)
    if record is None:
        tail = [s for s in stderr.strip().splitlines() if s.strip()][-1:]
        why = f"{failure} in stage {stage}" + (f": {tail[0][:300]}" if tail else "")
        record = {"status": _STAGE_STATUS.get(stage, "CRASH"), "detail": why}
    return {
        "arch": arch.model_type,
        "model_class": arch.model_class,
        "config_class": arch.config_class,
        "router": router,
        **record,
        "seconds": round(time.monotonic() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write one JSON line per architecture here")
    parser.add_argument("--only", help="comma-separated model types (default: all)")
    parser.add_argument("--router", action="store_true",
                        help="MoE architectures only, with output_router_logits=True")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per architecture")
    parser.add_argument("--jobs", type=int, default=1, help="architectures run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.router, args.threads)
        return

    from archs import causal_lm_archs, moe_archs

    archs = list(causal_lm_archs())
    if args.only:
        wanted = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = wanted - {a.model_type for a in archs}
        if unknown:
            parser.error(f"not a causal-LM model type here: {', '.join(sorted(unknown))}")
        archs = [a for a in archs if a.model_type in wanted]
    if args.router:
        moe = set(moe_archs())
        archs = [a for a in archs if a.model_type in moe]
    counts: dict[str, int] = {}
    with (
        open(args.out, "w") if args.out else contextlib.nullcontext() as out,
        ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool,
    ):
        futures = [pool.submit(check, a, args.router, args.timeout, args.threads) for a in archs]
        for future in as_completed(futures):
            rec = future.result()
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
            name = rec["arch"] + ("[router]" if rec["router"] else "")
            print(
                f"{rec['status']:10} {name:28} {rec['seconds']:6.1f}s  {rec['detail']}", flush=True
            )
            if out:
                out.write(json.dumps(rec) + "\n")
                out.flush()
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())) + f" (of {len(archs)})")


if __name__ == "__main__":
    main()
