"""Test setup: without a GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is set here, first. With a CUDA
device the same tests run the compiled kernels on it instead.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_bulk_reduce() -> None:
    """Give the interpreter the tensor-descriptor add it lacks (TMA's bulk reduction; triton 3.9
    has none), as an atomic add of the box's in-bounds entries, so that the fused backward's
    ``TMA_REDUCE`` branch runs on CPU too (``fused_tofu.bulk_reduce_ok`` checks for it)."""
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder

    if hasattr(InterpreterBuilder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"descriptor reduction {kind}")
        ptrs, mask = desc.materialize_pointers(indices)
        op, sem = ir.ATOMIC_OP.FADD, ir.MEM_SEMANTIC.RELAXED
        return self.create_atomic_rmw(op, ptrs, value, mask, sem, ir.MEM_SYNC_SCOPE.GPU)

    InterpreterBuilder.create_descriptor_reduce = create_descriptor_reduce


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _interpreter_bulk_reduce()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # Different random inputs in every test, the same in every run (crc32, not the salted hash());
    # TOFU_TEST_SEED shifts them all, to draw fresh inputs on purpose.
    offset = int(os.environ.get("TOFU_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + offset) % (2**31))
