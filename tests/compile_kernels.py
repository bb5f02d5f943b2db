"""Compile every Triton kernel of the package for real GPU targets, on a machine with no GPU.

The interpreter forgives what the compiler does not (types of loop-carried values, constexpr
misuse, unsupported ops); this catches it. Run without TRITON_INTERPRET:
``python tests/compile_kernels.py``.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tofu_kernels import tofu

TARGETS = (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32))


def kernel_specs():
    """(name, kernel, signature, constexprs) for each kernel and constexpr variant."""
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
                    "BLOCK_V": "constexpr",
                }
                constexprs = {
                    "HAS_SOFTCAP": softcap,
                    "COMPUTE_GRAD": grad,
                    "HAS_GRAD_SCALE": grad,
                    "BLOCK_V": 4096,
                }
                name = f"tofu_fwd[{logits_ty} softcap={softcap} grad={grad}]"
                yield name, tofu._tofu_fwd_kernel, signature, constexprs


def main() -> int:
    failures = 0
    count = 0
    for name, fn, signature, constexprs in kernel_specs():
        for target in TARGETS:
            count += 1
            try:
                triton.compile(ASTSource(fn, signature, constexprs), target=target)
            except Exception as exc:  # report every failure, then fail
                failures += 1
                print(f"FAIL {name} sm_{target.arch}: {type(exc).__name__}: {exc}")
    print(f"compiled {count - failures}/{count} kernel variants")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
