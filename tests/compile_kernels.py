"""Compile every Triton kernel of the package for real GPU targets, on a machine with no GPU.

The interpreter forgives what the compiler does not (types of loop-carried values, constexpr
misuse, unsupported ops); this catches it, checks shared memory against each card's limit and
that the fused kernels' K loops are software-pipelined, and prints each variant's registers and
spilled bytes (ptxas). Run without TRITON_INTERPRET: ``python tests/compile_kernels.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tofu_kernels import tofu
from tofu_kernels.utils import LAUNCH_OPTIONS

TARGETS = (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 86, 32), GPUTarget("cuda", 90, 32))
# Shared memory a block may use (A100: 163 KiB, A10/L4/RTX: 99 KiB, H100: 227 KiB); a launch
# beyond it fails.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
# At a launch, Triton specializes every pointer and integer argument that is a multiple of 16 as
# such; only with that does it vectorize the tile loads and pipeline the K loops (cp.async/TMA).
# These integer arguments are multiples of 16 at LLM shapes (H 4096, V 128256, N 8192), so each
# kernel is compiled as it runs there ("aligned"), and with no such facts (odd shapes).
ALIGNED_INTS = {
    "N", "V", "H", "C", "stride_xn", "stride_wv", "stride_zn", "stride_logits", "stride_grad",
    "cols_per_split", "stride_rt",
}  # fmt: skip
PIPELINED = ("fused_fwd", "fused_bwd")  # kernels whose tl.dot K loops must be pipelined, aligned
# Spilled bytes per thread beyond which ptxas has given up on registers rather than run short
# (the fp32 fused backward got 32 registers and 23 KB for sm_90 with BLOCK_K 32 and 3 stages
# under triton 3.9); the variants that compile well spill at most ~2 KB.
SPILL_LIMIT = 4096


def kernel_specs():
    """(name, kernel, signature, constexprs, compile options) for each kernel variant."""
    for logits_ty in ("*fp32", "*bf16", "*fp16"):
        for softcap in (False, True):
            for grad in (False, True):
                signature = {
                    "logits_ptr": logits_ty,
                    "labels_ptr": "*i64",
                    "loss_ptr": "*fp32",
                    "stats_ptr": "*fp32",
                    "grad_ptr": logits_ty,
                    "grad_scale_ptr": "*fp32",
                    "err_ptr": "*fp32",
                    "row_norm_ptr": "*fp32",
                    "stride_logits": "i64",
                    "stride_grad": "i64",
                    "stride_stats": "i32",
                    "stride_grad_scale": "i32",
                    "V": "i32",
                    "gamma": "fp32",
                    "beta": "fp32",
                    "softcap": "fp32",
                    "ignore_index": "i32",
                    "HAS_SOFTCAP": "constexpr",
                    "COMPUTE_GRAD": "constexpr",
                    "HAS_GRAD_SCALE": "constexpr",
                    "HAS_ERR": "constexpr",
                    "HAS_ROW_NORM": "constexpr",
                    "LOG2_ROOM": "constexpr",
                    "BLOCK_V": "constexpr",
                }
                constexprs = {
                    "HAS_SOFTCAP": softcap,
                    "COMPUTE_GRAD": grad,
                    "HAS_GRAD_SCALE": grad,
                    "HAS_ERR": grad and logits_ty != "*fp32",
                    # tofu_loss on fp16 logits: rows over their own powers of two
                    "HAS_ROW_NORM": grad and logits_ty == "*fp16",
                    "LOG2_ROOM": 8.0 if logits_ty == "*fp16" else 0.0,
                    "BLOCK_V": 4096,
                }
                name = f"tofu_fwd[{logits_ty} softcap={softcap} grad={grad}]"
                options = {"num_warps": tofu.launch_config(constexprs["BLOCK_V"])[1]}
                yield name, tofu._tofu_fwd_kernel, signature, constexprs, options


def fused_kernel_specs(capability: tuple[int, int]):
    """The fully fused LM-head kernels with the launch configs of ``capability``, in each dtype
    with and without bias/softcap/gradients."""
    from tofu_kernels import fused_tofu

    def split(config):  # (constexprs, compile options)
        options = ("num_warps", "num_stages")
        return ({k: v for k, v in config.items() if k not in options},
                {k: v for k, v in config.items() if k in options})  # fmt: skip

    dtypes = {"*fp32": torch.float32, "*bf16": torch.bfloat16, "*fp16": torch.float16}
    # every dtype with every feature on; the lighter variants in bf16 only (compiles are slow)
    for ty, extras in (("*fp32", True), ("*bf16", True), ("*fp16", True), ("*bf16", False)):
        fwd_cfg, fwd_opts = split(
            fused_tofu.fused_config(fused_tofu.FWD_CONFIGS, capability, dtypes[ty])
        )
        bwd_cfg, bwd_opts = split(
            fused_tofu.fused_config(fused_tofu.BWD_CONFIGS, capability, dtypes[ty])
        )
        flags = {"HAS_BIAS": extras, "HAS_SOFTCAP": extras, "UPCAST": False}
        flags["IEEE"] = ty == "*fp32"
        signature = {
            "x_ptr": ty, "w_ptr": ty, "b_ptr": ty, "labels_ptr": "*i64", "part_ptr": "*fp32",
            "N": "i32", "V": "i32", "H": "i32", "stride_xn": "i64", "stride_wv": "i64",
            "n_splits": "i32", "cols_per_split": "i32", "beta": "fp32", "softcap": "fp32",
            "ignore_index": "i32",
        }  # fmt: skip
        signature.update({k: "constexpr" for k in (*flags, *fwd_cfg)})
        name = f"fused_fwd[{ty} bias/softcap={extras}]"
        yield name, fused_tofu._fused_fwd_kernel, signature, {**flags, **fwd_cfg}, fwd_opts
        # (grads asked for, grad_weight accumulator): fp32, or the weight's dtype (atomics in
        # bf16/fp16: accum_dtype=None)
        variants = [((True, True, True), "*fp32", False)]
        if ty != "*fp32" and extras:
            variants.append(((True, True, True), ty, False))
        if ty == "*bf16" and extras:
            variants += [((True, False, False), "*fp32", False), ((False, True, False), ty, False)]
        if capability[0] >= 9 and extras:  # bulk tensor reductions: TMA, sm_90 on
            variants += [(grads, gw_ty, True) for grads, gw_ty, _ in variants[:2]]
        for grads, gw_ty, tma in variants:
            signature = {
                "x_ptr": ty, "w_ptr": ty, "b_ptr": ty, "labels_ptr": "*i64",
                "rowterm_ptr": "*fp32", "scale_ptr": "*fp32", "ref_ptr": "*fp32",
                "gx_ptr": "*fp32", "gw_ptr": gw_ty, "gb_ptr": "*fp32", "err_ptr": "*fp32",
                "gx_desc": "constexpr", "gw_desc": "constexpr",
                "N": "i32", "V": "i32", "H": "i32", "stride_xn": "i64", "stride_wv": "i64",
                "stride_rt": "i32", "stride_scale": "i32", "beta": "fp32", "softcap": "fp32",
                "ignore_index": "i32", "filter_eps": "fp32", "gw_gain": "fp32",
            }  # fmt: skip
            gflags = dict(zip(("GRAD_X", "GRAD_W", "GRAD_B"), grads, strict=True))
            gflags["ROW_ERR"] = grads[0] and ty != "*fp32"
            gflags["TMA_REDUCE"] = tma
            descs = {"gx_desc": None, "gw_desc": None}
            if tma:  # the launcher's boxes: (BLOCK_N or BLOCK_V, BLOCK_K) accumulator tiles
                k = bwd_cfg["BLOCK_K"]
                signature["gx_desc"] = f"tensordesc<fp32[{bwd_cfg['BLOCK_N']},{k}]>"
                signature["gw_desc"] = f"tensordesc<{gw_ty[1:]}[{bwd_cfg['BLOCK_V']},{k}]>"
                descs = {}
            signature.update({k: "constexpr" for k in (*flags, *gflags, *bwd_cfg)})
            name = f"fused_bwd[{ty} bias/softcap={extras} grads={grads} gw={gw_ty}"
            name += " tma]" if tma else "]"
            constexprs = {**descs, **flags, **gflags, **bwd_cfg}
            yield name, fused_tofu._fused_bwd_kernel, signature, constexprs, bwd_opts
    signature = {
        "part_ptr": "*fp32", "labels_ptr": "*i64", "loss_ptr": "*fp32", "stats_ptr": "*fp32",
        "rowterm_ptr": "*fp32", "N": "i32", "V": "i32", "n_splits": "i32", "gamma": "fp32",
        "beta": "fp32", "softcap": "fp32", "ignore_index": "i32", "HAS_SOFTCAP": "constexpr",
        "BLOCK_N": "constexpr",
    }  # fmt: skip
    merge = fused_tofu._fused_merge_kernel
    for softcap in (False, True):
        constexprs = {"HAS_SOFTCAP": softcap, "BLOCK_N": 128}
        yield f"fused_merge[softcap={softcap}]", merge, signature, constexprs, {}


def vocab_chunked_specs():
    """The vocabulary-chunked impl's two kernels over a chunk's logits, per dtype."""
    from tofu_kernels import vocab_chunked

    for ty, softcap in (("*fp32", True), ("*bf16", True), ("*bf16", False), ("*fp16", True)):
        for name, kernel, cfg in (
            ("partials", vocab_chunked._chunk_partials_kernel, vocab_chunked.PARTIALS_CONFIG),
            ("grad", vocab_chunked._chunk_grad_kernel, vocab_chunked.GRAD_CONFIG),
        ):
            if name == "partials":
                signature = {
                    "z_ptr": ty, "labels_ptr": "*i64", "part_ptr": "*fp32", "N": "i32",
                    "C": "i32", "col0": "i32", "stride_zn": "i64", "split": "i32",
                    "n_splits": "i32",
                }  # fmt: skip
            else:
                signature = {
                    "z_ptr": ty, "labels_ptr": "*i64", "rowterm_ptr": "*fp32",
                    "scale_ptr": "*fp32", "err_ptr": "*fp32", "N": "i32", "C": "i32", "col0": "i32",
                    "stride_zn": "i64", "stride_rt": "i32", "stride_scale": "i32",
                }  # fmt: skip
            signature.update(beta="fp32", softcap="fp32", ignore_index="i32")
            blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
            flags = {"HAS_SOFTCAP": softcap}
            if name == "grad":
                flags["HAS_ERR"] = ty != "*fp32"
            signature.update({k: "constexpr" for k in (*flags, *blocks)})
            options = {"num_warps": cfg["num_warps"]}
            label = f"vocab_chunked_{name}[{ty} softcap={softcap}]"
            yield label, kernel, signature, {**flags, **blocks}, options


def scale_specs():
    """The chunked backward's scaling pass (skipped in-kernel where its factor is 1), per dtype."""
    from tofu_kernels import linear_tofu

    for ty in ("*fp32", "*bf16", "*fp16"):
        signature = {"g_ptr": ty, "factor_ptr": "*fp32", "n": "i64", "BLOCK": "constexpr"}
        cfg = linear_tofu.SCALE_CONFIG
        yield (
            f"scale_unless_one[{ty}]", linear_tofu._scale_unless_one_kernel, signature,
            {"BLOCK": cfg["BLOCK"]}, {"num_warps": cfg["num_warps"]},
        )  # fmt: skip


def all_specs(capability: tuple[int, int]):
    fused = list(fused_kernel_specs(capability))
    if capability == (8, 6):  # the fused kernels' configs differ; the others compile as for 8.0
        return fused
    return [*kernel_specs(), *fused, *vocab_chunked_specs(), *scale_specs()]


def compile_one(job: tuple[int, int, bool]) -> tuple[str, str | None]:
    """Compile spec number ``job[0]`` for target number ``job[1]``, aligned or not (``job[2]``):
    (a resource line: registers, spilled bytes, shared memory; the error text or None)."""
    target = TARGETS[job[1]]
    name, fn, signature, constexprs, options = all_specs(divmod(target.arch, 10))[job[0]]
    aligned = job[2]
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (arg, ty) in enumerate(signature.items())
        if aligned and (ty.startswith("*") or arg in ALIGNED_INTS)
    }
    label = f"{name} sm_{target.arch}{' aligned' if aligned else ''}"
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: ptxas -v goes to stdout
            kernel = triton.compile(
                ASTSource(fn, signature, constexprs, attrs),
                target=target,
                options={**options, **LAUNCH_OPTIONS},  # as the launches compile them
            )
    except Exception as exc:  # report every failure, then fail
        return label, f"FAIL {label}: {type(exc).__name__}: {exc}"
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    line = (
        f"{label}: {regs.group(1) if regs else '?'} registers, "
        f"{spills.group(1) if spills else '?'} B spilled, {kernel.metadata.shared} B shared"
    )
    if spills and int(spills.group(1)) > SPILL_LIMIT:
        return line, f"FAIL {label}: {spills.group(1)} B spilled per thread"
    # the kernels compiled for sm_80 only (not for sm_86) must fit both cards' shared memory
    limit = SHARED_LIMIT[target.arch]
    if target.arch == 80 and not name.startswith("fused"):
        limit = min(limit, SHARED_LIMIT[86])
    if kernel.metadata.shared > limit:
        return line, f"FAIL {label}: {kernel.metadata.shared} B of shared memory"
    if "tma]" in name and "cp.reduce.async.bulk.tensor" not in kernel.asm["ptx"]:
        return line, f"FAIL {label}: TMA_REDUCE compiled without bulk tensor reductions"
    if aligned and name.startswith(PIPELINED) and "cp.async" not in kernel.asm["ptx"]:
        # unpipelined, every K step waits on its loads: the GEMM would run at a fraction of peak
        return line, f"FAIL {label}: K loop not pipelined (no cp.async)"
    return line, None


def main() -> int:
    # compile afresh (a cached kernel would skip ptxas and its resource log)
    os.environ.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
    jobs = [
        (i, t, aligned)
        for t, target in enumerate(TARGETS)
        for i in range(len(all_specs(divmod(target.arch, 10))))
        for aligned in (True, False)
    ]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, jobs))
    for line, _ in results:
        print(line)
    failures = [failure for _, failure in results if failure is not None]
    for failure in failures:
        print(failure)
    print(f"compiled {len(jobs) - len(failures)}/{len(jobs)} kernel variants")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
