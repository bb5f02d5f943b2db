"""Sweep apply_tofu_kernel over every causal-LM architecture of the installed transformers.

Each architecture runs in its own subprocess (``--worker``) under a timeout: a tiny random model
(fp32, CPU, fixed seed, train mode, dropout 0) is checked against the oracle, the published TOFU
loss on the unpatched model's logits with transformers' causal shift (plus ``coef * aux_loss``
where the forward returns a router loss), and against autograd through it. See README.md.

    PYTHONPATH=. python tools/hf_sweep/sweep.py --only llama,gpt2 --out /tmp/sw.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from archs import Arch

GAMMA, BETA = 3.0, 0.8
SEED = 0
VOCAB = 256
BATCH, SEQ = 2, 8
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3
# --bf16: both sides round through a bf16 network, differently (the patch's chunked GEMM and
# fp32 loss against the unpatched logits upcast): loose enough for that, tight enough for a
# missing logit scale, softcap or shift (errors of order 1)
BF16_LOSS_RTOL = 2e-2
BF16_GRAD_RTOL = 0.1
BF16_GRAD_FLOOR = 0.1  # attention key biases' bf16 noise reached ~1.9e-3 of the largest
GRAD_FLOOR = 1e-2

HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
# Generic tiny sizes, by config attribute name; set where a (sub-)config has the attribute with a
# value of the same kind (numbers for numbers, bools for bools; None and lists stay).
_TINY_GROUPS: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("hidden_size", "n_embd", "n_embed", "d_model", "dim", "embed_dim", "hidden_dim"), 32),
    (("model_dim", "embedding_size", "word_embed_proj_dim", "d_embed"), 32),
    (("hidden_size_global",), 32),  # BLT's local models: the global transformer's width
    (("dim_model_base",), 32),  # MiniCPM3's muP base width: logits / (hidden_size / it)
    (("intermediate_size", "n_inner", "ffn_dim", "d_ff", "d_inner", "mlp_dim"), 64),
    (("decoder_ffn_dim", "encoder_ffn_dim", "ffn_hidden_size", "intermediate_dim"), 64),
    (("feed_forward_size",), 64),
    (("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers"), 2),
    (("encoder_layers", "num_decoder_layers", "num_encoder_layers"), 2),
    (HEADS + ("decoder_attention_heads", "encoder_attention_heads"), 4),
    (KV_HEADS, 2),  # grouped-query attention where the default config has it (see _tiny_kwargs)
    (("head_dim", "d_head", "attention_head_dim", "kv_channels", "d_kv", "rotary_dim"), 8),
    (("attention_head_size",), 8),
    (("vocab_size",), VOCAB),
    # multi-head latent attention (DeepSeek-style)
    (("q_lora_rank", "kv_lora_rank"), 16),
    (("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"), 8),
    # mixture of experts
    (("moe_intermediate_size", "shared_expert_intermediate_size"), 32),
    (("expert_intermediate_size", "moe_ffn_hidden_size"), 32),
    (("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    (("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k", "moe_k"), 2),
    (("n_shared_experts", "num_shared_experts", "n_group", "topk_group"), 1),
    (("first_k_dense_replace", "num_dense_layers"), 1),  # then 1 MoE layer of the 2
    # state-space layers: expand 1 and 4 heads of 8 match the 32-wide hidden state
    (("state_size", "mamba_d_state", "ssm_state_size"), 8),
    (("conv_kernel", "mamba_d_conv"), 4),
    (("expand", "mamba_expand", "n_groups", "mamba_n_groups"), 1),
    (("mamba_n_heads", "mamba_num_heads", "n_mamba_heads"), 4),
    (("mamba_d_head", "mamba_headdim", "mamba_head_dim"), 8),
    (("chunk_size", "mamba_chunk_size"), 8),
    (("mamba_d_ssm",), 32),
    (("use_mamba_kernels", "use_cache"), False),
    (("num_kv_shared_layers",), 0),  # Gemma-3n: the shared layers must follow all layer types
    (("is_decoder",), True),  # BERT-like *ForCausalLM: causal attention
    # large weights: peaked, non-uniform predictions
    (("initializer_range", "init_std"), 0.5),
    (("pad_token_id",), 0),
    (("bos_token_id",), 1),
    (("eos_token_id",), 2),
)
TINY: dict[str, Any] = {name: value for names, value in _TINY_GROUPS for name in names}
# Substrings of the names of dropout-like settings (set to 0: both forwards must be equal).
DROPOUT = ("dropout", "pdrop", "drop_rate", "layerdrop", "drop_path", "jitter")
# Per-architecture overrides on top of TINY (model_type -> config kwargs).
EXTRA: dict[str, dict[str, Any]] = {
    # axial position embeddings must factor the sequence (8) and sum to the hidden size (32)
    "reformer": {
        "axial_pos_shape": (2, 4),
        "axial_pos_embds_dim": (16, 16),
        "local_attn_chunk_length": 4,
        "lsh_attn_chunk_length": 4,
        "hash_seed": 0,
    },
    "deepseek_v2": {"num_experts_per_tok": 2},  # None by default (a checkpoint sets it)
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},  # ditto
    # rotary settings per layer type (the default config has none)
    "cohere_compass_text": {
        "rope_parameters": {
            kind: {"rope_type": "default", "rope_theta": 1e4}
            for kind in ("full_attention", "sliding_attention")
        }
    },
    # DBRX's attention reads both and fails on their defaults (none; None): the checkpoint's
    "dbrx": {"attn_config": {"rope_theta": 5e5, "clip_qkv": 8.0}},
    # validators: NVFP4 keys need head_dim % 16 == 0, index heads <= query heads per key head;
    # one indexed-attention and one MoE layer (the default 2-layer layout has neither)
    "kolibri1_1": {
        "head_dim": 16,
        "index_num_heads": 2,
        "layer_types": ["sliding_attention", "indexed_attention"],
        "mlp_only_layers": [0],
    },
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # None by default, and required
    # the first 2 layers of the default layout have no (learned-router) MoE layer
    "beam": {"mlp_layer_types": ["dense", "sparse"]},
    "deepseek_v4": {"mlp_layer_types": ["hash_moe", "moe"]},
    "flint": {"mlp_only_layers": [0]},
    # input_ids are (batch * codebooks, length): the codebooks must divide the batch (2)
    "musicgen": {"decoder": {"num_codebooks": 2}},
    "musicgen_melody": {"decoder": {"num_codebooks": 2}},
    "xmod": {"default_language": "en_XX"},  # else the forward needs lang_ids
    "zaya": {"num_experts_per_tok": 1},  # its validator: top-1 routing only
}
# Architectures whose forward needs inputs this sweep cannot make, or that cannot be built here
# (model_type -> why).
SKIP: dict[str, str] = {
    "gemma3n": "its vision tower needs the timm library, which is not installed",
    "gemma4_assistant": "a draft model: needs inputs_embeds and shared_kv_states of its target",
    "gemma4_unified_assistant": "a draft model: needs inputs_embeds and shared_kv_states",
}


# ---------------------------------------------------------------------------------------------
# Worker: one architecture, in its own process
# ---------------------------------------------------------------------------------------------


def _stage(name: str) -> None:
    """Tell the parent where the worker is (a timeout is blamed on the stage it hit)."""
    print(f"@stage {name}", flush=True)


def _why(e: BaseException) -> str:
    """``Type: first line of message (at innermost file:line)``, for the report."""
    lines = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {lines[0] if lines else ''}"
    if e.__cause__ is not None:  # e.g. a config validator's error under huggingface_hub's
        cause = str(e.__cause__).strip().splitlines()
        msg += f" <- {type(e.__cause__).__name__}: {cause[0] if cause else ''}"
    msg = msg[:300]
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        f = frames[-1]
        msg += f" (at {'/'.join(f.filename.split('/')[-2:])}:{f.lineno})"
    return msg


def _same_kind(old: Any, new: Any) -> bool:
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    return isinstance(old, (int, float)) and isinstance(new, (int, float))


def _tiny_kwargs(default: Any, extra: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """Constructor kwargs that shrink one config (sub-configs: see tiny_config).

    Also returns the names of the per-layer lists that were cut to the new depth.
    """
    attrs = {k: v for k, v in vars(default).items() if not k.startswith("_")}
    # a TINY name may be an alias (attribute_map) of the attribute the config stores
    alias_of: dict[str, str] = {}
    for alias, real in (getattr(type(default), "attribute_map", None) or {}).items():
        if alias in TINY:
            alias_of.setdefault(real, alias)
    kwargs: dict[str, Any] = {}
    for name, old in attrs.items():
        tiny = name if name in TINY else alias_of.get(name)
        if tiny is not None and _same_kind(old, TINY[tiny]):
            kwargs[name] = TINY[tiny]
        elif any(s in name for s in DROPOUT) and _same_kind(old, 0.0):
            kwargs[name] = type(old)(0)
        elif name == "eos_token_id" and isinstance(old, list):
            kwargs[name] = [TINY[name]]
        elif name.endswith(("_token_id", "_token_index")) and _same_kind(old, 0) and old >= VOCAB:
            kwargs[name] = 2
    heads = next((n for n in HEADS if n in kwargs), None)
    if heads:
        for name in KV_HEADS:
            # None: as many as the query heads (what the configs that resolve it do);
            # no grouped-query attention where the default has none (latent attention needs it)
            if name in attrs and (attrs[name] is None or attrs[name] == attrs[heads]):
                kwargs[name] = kwargs[heads]
        # a None head_dim that the model reads as a number (HunYuan, Ministral): hidden / heads
        if "head_dim" in attrs and attrs["head_dim"] is None:
            kwargs["head_dim"] = TINY["head_dim"]
    # per-layer lists and patterns follow the new depth (their first layers; sizes from TINY)
    layer_names = ("num_hidden_layers", "n_layer", "num_layers")
    depths = [
        (attrs[n], kwargs[n]) for n in layer_names if n in kwargs and isinstance(attrs[n], int)
    ]
    cut: set[str] = set()
    if depths:
        old_depth, depth = depths[0]
        for name, old in attrs.items():
            per_layer = isinstance(old, (list, tuple)) or (
                isinstance(old, str) and "pattern" in name
            )
            if not per_layer or name in kwargs or len(old) != old_depth or old_depth <= depth:
                continue
            if name in TINY and all(_same_kind(v, TINY[name]) for v in old):
                kwargs[name] = [TINY[name]] * depth  # e.g. Gemma-3n's intermediate_size
            else:
                kwargs[name] = old[:depth]
                cut.add(name)
    kwargs.update(extra)
    return kwargs, cut - extra.keys()


def tiny_config(config_cls: type, extra: dict[str, Any], router: bool) -> Any:
    """A tiny instance of ``config_cls``, its sub-configs (text, vision, ...) shrunk as well.

    ``extra`` overrides kwargs; for a sub-config, a dict of overrides of that sub-config.
    """
    default = config_cls()
    subs = [
        name
        for name in getattr(default, "sub_configs", None) or {}
        if hasattr(getattr(default, name, None), "to_dict")
    ]
    kwargs, cut = _tiny_kwargs(default, {k: v for k, v in extra.items() if k not in subs})
    if router and hasattr(default, "output_router_logits"):
        kwargs["output_router_logits"] = True
    for name in subs:
        kwargs[name] = tiny_config(type(getattr(default, name)), extra.get(name, {}), router)
    # A per-layer list that the config derives itself when it is None (its field's default) is
    # left to it, if it derives one for the new depth (e.g. OLMo-Hybrid's last layer is full
    # attention): it knows the layout better than the first layers of the default one.
    fields = {f.name: f.default for f in dataclasses.fields(config_cls)}
    derived = {n: kwargs.pop(n) for n in sorted(cut) if n in fields and fields[n] is None}
    if derived:
        with contextlib.suppress(Exception):  # else: the cut lists
            config = config_cls(**kwargs)
            if all(len(getattr(config, n) or ()) == len(v) for n, v in derived.items()):
                return config
        kwargs.update(derived)
    return config_cls(**kwargs)


def build(arch: Arch, router: bool) -> Any:
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


def _grad_error(
    actual: dict[str, Any], expected: dict[str, Any], floor: float = GRAD_FLOOR
) -> tuple[float, str]:
    """Worst relative max error over parameters; inf if the sets of gradients differ.

    Each parameter's scale is its largest |gradient|, floored at ``floor`` of the largest of all:
    gradients that are 0 in exact arithmetic (attention key biases) are rounding noise.
    """
    if actual.keys() != expected.keys():
        missing = sorted(expected.keys() - actual.keys())
        extra = sorted(actual.keys() - expected.keys())
        return math.inf, f"missing grads {missing[:3]}, extra grads {extra[:3]}"
    top = max((float(g.abs().max()) for g in expected.values() if g.numel()), default=0.0)
    worst, where = 0.0, ""
    for name, g in expected.items():
        if not g.numel():
            continue
        scale = max(float(g.abs().max()), floor * top, 1e-30)
        err = float((actual[name] - g).abs().max()) / scale
        if not err <= worst:  # NaN counts as worst
            worst, where = err, name
    return worst, where


def run_arch(arch: Arch, router: bool, bf16: bool = False) -> dict[str, Any]:
    """Check one architecture (its model cast to bf16 with ``bf16``); returns its record."""
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
        if bf16:
            model = model.to(torch.bfloat16)
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
        if ref_error:  # the model's own forward fails too: the tiny config is at fault
            return result("BUILD_FAIL", f"{ref_error}; apply_tofu_kernel refused it")
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

    err, where = _grad_error(grads, ref_grads, BF16_GRAD_FLOOR if bf16 else GRAD_FLOOR)
    numbers = {"loss": float(loss), "ref_loss": float(ref), "grad_err": err}
    if aux_term is not None:
        numbers["aux_term"] = float(aux_term)
    problems = []
    if out.get("logits") is not None:
        problems.append("patched training forward returned logits")
    loss_rtol, grad_rtol = (BF16_LOSS_RTOL, BF16_GRAD_RTOL) if bf16 else (LOSS_RTOL, GRAD_RTOL)
    if not math.isclose(float(loss), float(ref), rel_tol=loss_rtol, abs_tol=1e-12):
        problems.append(f"loss {float(loss):.7g} != oracle {float(ref):.7g}")
    if not err < grad_rtol:
        problems.append(f"grad relative error {err:.3g} ({where})")
    if problems:
        return result("WRONG", "; ".join(problems), **numbers)
    return result("OK", f"loss {float(loss):.6g}, grad err {err:.1e}", **numbers)


def worker(model_type: str, router: bool, threads: int, bf16: bool) -> None:
    import warnings

    import torch
    import transformers
    from archs import causal_lm_archs

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    arch = next(a for a in causal_lm_archs() if a.model_type == model_type)
    record = run_arch(arch, router, bf16)
    print("@result " + json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver: one subprocess per architecture
# ---------------------------------------------------------------------------------------------

# A worker that times out or dies: its stage says whose failure it is.
_STAGE_STATUS = {
    "start": "BUILD_FAIL",
    "build": "BUILD_FAIL",
    "reference": "BUILD_FAIL",
    "patch": "CRASH",
    "patched": "CRASH",
}


def _text(b: str | bytes | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _parse(stdout: str) -> tuple[str, dict[str, Any] | None]:
    stage, record = "start", None
    for line in stdout.splitlines():
        if line.startswith("@stage "):
            stage = line.split(" ", 1)[1]
        elif line.startswith("@result "):
            record = json.loads(line.split(" ", 1)[1])
    return stage, record


def check(
    arch: Arch, router: bool, timeout: float, threads: int, bf16: bool = False
) -> dict[str, Any]:
    """Run one architecture's worker; its record, with the architecture and the time taken."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", arch.model_type]
    cmd += ["--threads", str(threads)] + (["--router"] if router else [])
    cmd += ["--bf16"] if bf16 else []
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
        "bf16": bf16,
        **record,
        "seconds": round(time.monotonic() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write one JSON line per architecture here")
    parser.add_argument("--only", help="comma-separated model types (default: all)")
    parser.add_argument(
        "--router", action="store_true", help="MoE architectures only, output_router_logits=True"
    )
    parser.add_argument(
        "--bf16", action="store_true", help="the model cast to bf16 (looser loss/grad tolerances)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per architecture")
    parser.add_argument("--jobs", type=int, default=1, help="architectures run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.router, args.threads, args.bf16)
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
        futures = [
            pool.submit(check, a, args.router, args.timeout, args.threads, args.bf16) for a in archs
        ]
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
