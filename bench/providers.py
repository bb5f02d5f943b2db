"""The benchmarked providers: each builds a loss function ``fn(hidden, weight, labels)``.

A provider that cannot run here raises :class:`Unavailable` from ``build`` (the harness records a
row with status "unavailable" and the reason); any other exception becomes an "error: ..." row.
Third-party packages are imported inside ``build``, so a missing one costs only its own rows.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tofu_kernels import fused_linear_tofu_loss
from tofu_kernels.linear_tofu import LINEAR_IMPLS
from tofu_kernels.reference import tofu_loss_published

# (gamma, beta): TOFU as the paper tunes it, and the settings that make TOFU exactly cross-entropy.
LOSS_PARAMS = {"tofu": (3.0, 0.8), "ce": (0.0, 1.0)}
IGNORE_INDEX = -100

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]


class Unavailable(Exception):
    """The provider cannot run in this environment (package missing, no CUDA, torch too old)."""


@dataclass(frozen=True)
class CaseInfo:
    """What a provider may need to know about the case it is built for."""

    mode: str  # "fwd" or "fwd_bwd"
    weight_grad: bool
    device: str  # "cuda" or "cpu"


@dataclass(frozen=True)
class Provider:
    name: str
    losses: tuple[str, ...]
    build: Callable[[CaseInfo, str], LossFn]
    # False for gemm_floor: no loss value, no autograd; one measurement serves every loss.
    has_loss: bool = True


def _tofu_kernels(impl: str, **options) -> Callable[[CaseInfo, str], LossFn]:
    def build(case: CaseInfo, loss: str) -> LossFn:
        gamma, beta = LOSS_PARAMS[loss]

        def fn(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return fused_linear_tofu_loss(h, w, y, gamma=gamma, beta=beta, impl=impl, **options)

        return fn

    return build


def _liger(accum_fp32: bool) -> Callable[[CaseInfo, str], LossFn]:
    def build(case: CaseInfo, loss: str) -> LossFn:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import (
                LigerFusedLinearCrossEntropyLoss,
            )
        except ImportError as e:
            raise Unavailable(f"liger-kernel not importable ({e})") from None
        kwargs = {}
        if accum_fp32:
            if "accum_dtype" not in inspect.signature(LigerFusedLinearCrossEntropyLoss).parameters:
                raise Unavailable("this liger-kernel has no accum_dtype option")
            kwargs["accum_dtype"] = torch.float32
        module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, **kwargs)

        def fn(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return module(w, h, y)  # Liger takes the weight first

        return fn

    return build


def _cce(case: CaseInfo, loss: str) -> LossFn:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Unavailable(f"cut-cross-entropy not importable ({e})") from None
    if case.device != "cuda":
        # Its kernels need CUDA: under the Triton interpreter they fail on CPU tensors.
        raise Unavailable("cut-cross-entropy needs a CUDA device")

    def fn(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX)

    return fn


def _torch_native(case: CaseInfo, loss: str) -> LossFn:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
    # Default options: the chunked path, chunk size and accumulation chosen by torch ("auto").
    options = torch.nn.LinearCrossEntropyOptions()

    def fn(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, options=options)

    return fn


def _eager_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Materialized logits in the input dtype, upcast to fp32 by the loss (as transformers does)."""
    logits = h @ w.t()
    if loss == "ce":
        return F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
    gamma, beta = LOSS_PARAMS[loss]
    return tofu_loss_published(logits, y, gamma, beta, IGNORE_INDEX)


def _torch_eager(case: CaseInfo, loss: str) -> LossFn:
    return lambda h, w, y: _eager_loss(h, w, y, loss)


_COMPILED: dict[str, Callable] = {}


def _torch_compile(case: CaseInfo, loss: str) -> LossFn:
    # One compiled function for every case, with dynamic shapes: one compile per graph (with and
    # without weight grad, forward only) instead of one per shape, which the GPU run's time
    # budget could not afford. On CPU, inductor's C++ build takes ~25 s on 2 cores: aot_eager
    # keeps the smoke run short while still going through dynamo and AOTAutograd.
    backend = "inductor" if case.device == "cuda" else "aot_eager"
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_eager_loss, backend=backend, dynamic=True)
    compiled = _COMPILED[backend]
    return lambda h, w, y: compiled(h, w, y, loss)


def _gemm_floor(case: CaseInfo, loss: str) -> LossFn:
    """The GEMMs any design must run: logits, then grad_hidden and grad_weight from them."""

    def fn(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
        z = h @ w.t()  # (N, V): the logits (reused as their own gradient)
        if case.mode == "fwd_bwd":
            z @ w  # grad_hidden (N, H)
            if case.weight_grad:
                z.t() @ h  # grad_weight (V, H)

    return fn


def all_providers() -> list[Provider]:
    """Every provider, ours first; ``tofu_kernels/<impl>`` for each impl but "auto"."""
    ours = [
        Provider(f"tofu_kernels/{impl}", ("tofu", "ce"), _tofu_kernels(impl))
        for impl in LINEAR_IMPLS
        if impl != "auto"
    ]
    # The impls' memory/speed knobs, to choose defaults from measurements: grad_weight
    # accumulated in bf16 (Liger's default), and chunks twice the GPU default's 2048 rows.
    ours += [
        Provider(
            "tofu_kernels/chunked-bf16acc", ("tofu",), _tofu_kernels("chunked", accum_dtype=None)
        ),
        Provider(
            "tofu_kernels/chunked-c4096", ("tofu",), _tofu_kernels("chunked", chunk_size=4096)
        ),
        # vocab_chunked over token slabs: grad_weight rounded to bf16 once per slab (a quarter
        # of the tokens, at most 2048)
        Provider(
            "tofu_kernels/vocab_chunked-bf16acc",
            ("tofu",),
            _tofu_kernels("vocab_chunked", accum_dtype=None),
        ),
        # the fused impl's grad_weight summed by bf16 atomics into the gradient: CCE's memory
        Provider("tofu_kernels/fused-bf16acc", ("tofu",), _tofu_kernels("fused", accum_dtype=None)),
    ]
    return ours + [
        Provider("liger", ("ce",), _liger(accum_fp32=False)),
        Provider("liger_fp32", ("ce",), _liger(accum_fp32=True)),
        Provider("cce", ("ce",), _cce),
        Provider("gemm_floor", ("tofu", "ce"), _gemm_floor, has_loss=False),
        Provider("torch_native", ("ce",), _torch_native),
        Provider("torch_eager", ("tofu", "ce"), _torch_eager),
        Provider("torch_compile", ("tofu",), _torch_compile),
    ]
