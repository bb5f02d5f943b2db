"""Options, input checks and reductions shared by every TOFU op."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "torch")
# Dtypes the Triton kernels read; the torch path also takes float64.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# dtypes whose logit gradients round coarsely enough to need utils.cancel_rounding
HALF_DTYPES = (torch.bfloat16, torch.float16)
TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)
# Compile options of every kernel launch. FMA contraction is stated, not left to Triton's
# default: triton 3.9 warns at each first compile that the default (on) turns off in 3.10, and
# the kernels are tested and tuned with it on. A TRITON_DEFAULT_FP_FUSION set in the
# environment is the user's choice, and stays in force.
LAUNCH_OPTIONS = (
    {} if os.environ.get("TRITON_DEFAULT_FP_FUSION") is not None else {"enable_fp_fusion": True}
)


@dataclass(frozen=True)
class TOFUParams:
    """Every non-tensor option of a TOFU op: travels to the autograd Function as one value."""

    gamma: float = 3.0
    beta: float = 0.8
    ignore_index: int = -100
    reduction: str = "mean"
    softcap: float | None = None
    impl: str = "auto"

    def __post_init__(self) -> None:
        for name in ("gamma", "beta", "softcap", "ignore_index"):  # NumPy scalars, say
            object.__setattr__(self, name, _builtin_number(getattr(self, name)))
        for name, lower, strict in (("gamma", 0.0, False), ("beta", 0.0, True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
            if not _finite(value):
                raise ValueError(f"{name} must be finite, got {value}")
            if value < lower or (strict and value == lower):
                op = ">" if strict else ">="
                raise ValueError(f"{name} must be {op} {lower}, got {value}")
            _check_fp32(name, value, inverse=strict)
            object.__setattr__(self, name, float(value))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if self.softcap is not None:
            if isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float)):
                raise TypeError(f"softcap must be a real number or None, got {self.softcap!r}")
            if not (_finite(self.softcap) and self.softcap > 0):
                raise ValueError(f"softcap must be a finite number > 0, got {self.softcap}")
            _check_fp32("softcap", self.softcap, inverse=True)
            object.__setattr__(self, "softcap", float(self.softcap))


_FP32_MAX = torch.finfo(torch.float32).max


def _builtin_number(value: object) -> object:
    """A real number that is not a Python one (``numpy.float32(3)``, ``numpy.int64(-100)``) as
    the Python int or float of the same value; anything else unchanged, for the checks to judge."""
    if isinstance(value, (int, float)) or value is None:  # bool is an int
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _finite(value: float) -> bool:
    """``math.isfinite`` by comparisons (NaN fails both): dynamo cannot trace ``math.isfinite``
    on the symbolic floats that ``torch.compile(dynamic=True)`` makes of every float."""
    return -math.inf < value < math.inf


def _check_fp32(name: str, value: float, inverse: bool) -> None:
    """The kernels compute in fp32: ``value`` (and ``1 / value``, which they divide by where
    ``inverse``) must be finite there, or finite logits would give inf or NaN."""
    if abs(value) > _FP32_MAX or (inverse and 1.0 / value > _FP32_MAX):
        also = f" (1/{name} too)" if inverse else ""
        raise ValueError(f"{name} must be finite in fp32{also}, got {value}")


_ADDMM_OUT_DTYPE = True  # torch.addmm(..., out_dtype=float32) on CUDA; off after one failure


def accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha * (a @ b)`` with ``acc`` possibly fp32 while ``a, b`` are half precision;
    the product is never rounded to half precision before ``alpha`` applies."""
    global _ADDMM_OUT_DTYPE
    if acc.dtype == a.dtype:
        acc.addmm_(a, b, alpha=alpha)
        return
    if a.is_cuda and _ADDMM_OUT_DTYPE:
        try:  # no (V, H) half-precision temporary: cuBLAS writes fp32 directly
            torch.addmm(acc, a, b, alpha=alpha, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _ADDMM_OUT_DTYPE = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), alpha=alpha)


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of half-precision ``a, b`` in fp32, summed in fp32 throughout, so a correction
    (:func:`cancel_rounding`) applies before the result's one rounding; a product written in
    half precision would also let cuBLAS add its split-K partial sums in half precision (torch's
    default ``allow_{fp16,bf16}_reduced_precision_reduction``)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # no out_dtype on CPU


def cancel_rounding(
    acc: torch.Tensor, err: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> None:
    """``acc -= err[:, None] * weight[labels]`` for labels in ``[0, V)``: ``acc`` (N, H) fp32 is
    ``grad @ weight`` of a logits' gradient stored in half precision, ``err`` (N,) fp32 the sums
    of its rows' rounding errors (stored minus exact). A direction that all weight rows share
    (trained heads' rows do) adds ``err * direction`` to each row of ``acc``, and the target
    entry, a row's largest, makes most of ``err`` (2^-11 of it in fp16, 2^-8 in bf16): without
    softcap, a gradient row sums to 0, so that direction should cancel. Moving the error onto
    ``w_y`` removes it. Other labels (ignored rows have zero rows; a vocabulary shard marks
    targets elsewhere by ids outside ``[0, V)``) are left as they are."""
    vocab = weight.shape[0]
    err = torch.where((labels >= 0) & (labels < vocab), err, 0.0)
    idx = labels.clamp(0, vocab - 1)
    # rows at a time: a (step, H) gather of the weight (2 MB at H 4096, bf16), not (N, H); it
    # is alive at the token-slab backward's peak (vocab_chunked, accum_dtype=None)
    step = 256
    for s in range(0, acc.shape[0], step):
        wy = weight.index_select(0, idx[s : s + step])
        acc[s : s + step].addcmul_(err[s : s + step, None], wy, value=-1)


def pow2_near(x: torch.Tensor) -> torch.Tensor:
    """A power of two near ``x >= 0`` (1 where ``x`` is 0), on ``x``'s device: scaling by it
    is exact, so a gradient can be formed at a well-scaled magnitude and the scale undone."""
    return torch.exp2(torch.round(torch.log2(torch.where(x > 0, x, torch.ones_like(x)))))


def half_range(dtype: torch.dtype) -> bool:
    """fp16's narrow exponent range: values under 6e-5 lose digits, over 65504 overflow."""
    return dtype == torch.float16


# fp16 logit gradients are formed peaking near this power of two, not 1: entries far below the
# peak (a flat softmax's ~1/V, confident rows' small focal weights) then stay in fp16's normal
# range, and sums of a row's entries times a weight row stay far from 65504.
FP16_HEADROOM = 2.0**8


def headroom(dtype: torch.dtype) -> float:
    """Peak of a logits' gradient formed in ``dtype``: :data:`FP16_HEADROOM` for fp16, else 1."""
    return FP16_HEADROOM if half_range(dtype) else 1.0


def max_grad_entry(rowterms: torch.Tensor, grad_scale: torch.Tensor) -> torch.Tensor:
    """A bound ``(1,)`` on every entry of the logits' gradient, ``max |g (1 - q_y) grad_scale|``,
    from the fused merge's per-row terms ``rowterms (4, N)`` (row 2: the target entry
    ``-g (1 - q_y)``), on the device. A row's other entries ``g q_j`` sum to ``g (1 - q_y)``, so
    its target entry is its largest; softcap's derivative only shrinks entries. Not the focal
    weight ``g`` itself: a row confident under the tempered softmax (``1 - q_y`` near 0, as
    beta < 1 makes it sooner) has entries far below its ``g``."""
    return (rowterms[2].abs() * grad_scale.abs().expand(rowterms.shape[1])).max().reshape(1)


def filter_reference(rowterms: torch.Tensor, grad_scale: torch.Tensor) -> torch.Tensor:
    """Filtering's reference ``(1,)``: the largest of the entries of the gradient on the pre-cap
    logits in row 3 of ``rowterms (4, N)`` (each row's target entry, and with softcap the row
    max column's, softcap's factor included), on the device. Entries of the gradient, so at
    most its largest (up to the rounding of the capped logits that softcap's factor is formed
    from: within ~2x deep in saturation, 0 past ~9 softcaps); without softcap, the largest. A
    threshold under it never drops the whole gradient, as the bound of
    :func:`max_grad_entry` would where every large logit is saturated by softcap."""
    return (rowterms[3] * grad_scale.abs().expand(rowterms.shape[1])).max().reshape(1)


def normalized_grad_scale(
    rowterms: torch.Tensor, grad_scale: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(grad_scale / norm, norm)`` for a backward from the fused merge's per-row terms
    ``rowterms (4, N)`` that forms the logits' gradient in ``dtype``, on the device: for fp16,
    ``norm`` is a power of two near the bound :func:`max_grad_entry` on the gradient (1 if it
    is 0) over :func:`headroom`, so the gradient peaks near the headroom whatever the upstream
    gradient and the reduction: at a mean's 1/N most fp16 entries would be subnormals or zeros
    (a flat softmax's whole off-target gradient), and a tiny upstream gradient or a confident
    batch flushes them too. Multiplying the sums back by ``norm`` is exact; sums into an fp16
    gradient take a :func:`rows_gain` as well. bf16 and fp32 have the range to form the
    gradient at its own scale (no pass to undo one): ``(grad_scale, None)``."""
    if not half_range(dtype):
        return grad_scale, None
    norm = pow2_near(max_grad_entry(rowterms, grad_scale)) / headroom(dtype)
    return grad_scale / norm, norm


def rows_gain(rows: int, dtype: torch.dtype) -> float:
    """Factor for sums over ``rows`` rows of a gradient formed at its headroom that go into a
    ``dtype`` accumulator: 2^-round(log2 rows) / headroom for fp16 (65504 would overflow), 1
    otherwise."""
    if not half_range(dtype):
        return 1.0
    return 2.0 ** -round(math.log2(max(rows, 1))) / headroom(dtype)


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(impl: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Resolve ``impl`` for tensors on ``device``: Triton on GPUs (and under the interpreter)."""
    if impl == "torch":
        return False
    if impl == "auto":
        return dtype in KERNEL_DTYPES and (device.type == "cuda" or interpreting())
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"impl={impl!r} takes {KERNEL_DTYPES} logits, got {dtype}")
    check_triton_device(impl, device)
    return True


def check_triton_device(impl: str, device: torch.device) -> None:
    """Refuse CPU tensors for a Triton impl unless the interpreter runs (Triton itself fails
    with "0 active drivers")."""
    if device.type == "cpu" and not interpreting():
        raise ValueError(
            f"impl={impl!r} runs Triton kernels: CUDA tensors, or CPU tensors under "
            "TRITON_INTERPRET=1 (set before triton is imported); impl='torch' runs on CPU"
        )


def check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {dtypes}, got {t.dtype}")


def check_labels(
    labels: object,
    expected_shape: torch.Size,
    device: torch.device,
    hints: tuple[tuple[torch.Size, str], ...] = (),
) -> torch.Tensor:
    """``labels`` checked, and int8/int16/uint8 ones widened to int64: compared with an
    ``ignore_index`` outside their range, torch wraps it (int8 24 == -1000 is True). ``hints``:
    (shape, advice) pairs; labels of a hint's shape get its advice in the error (a layout or
    argument order from another library)."""
    check_tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != expected_shape:
        advice = "".join(f"; {text}" for shape, text in hints if labels.shape == shape)
        raise ValueError(
            f"labels must have shape {tuple(expected_shape)}, got {tuple(labels.shape)}{advice}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device}, expected {device}")
    return labels.long() if labels.dtype in (torch.int8, torch.int16, torch.uint8) else labels


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise for labels outside ``[0, vocab)``, where that needs no host-device sync (CPU tensors).

    On a GPU the kernels write NaN as such a token's loss instead.
    """
    if labels.device.type != "cpu" or labels.numel() == 0 or torch.compiler.is_compiling():
        return  # a compiled graph must not branch on data: the kernels' NaN reports it
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = labels[bad].flatten()[0].item()
        raise ValueError(
            f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, found {value}"
        )


def check_accum_dtype(accum_dtype: object) -> None:
    if accum_dtype is not None and not (
        isinstance(accum_dtype, torch.dtype) and accum_dtype.is_floating_point
    ):
        raise ValueError(f"accum_dtype must be a floating torch.dtype or None, got {accum_dtype!r}")


def check_num_items(num_items_in_batch: object) -> None:
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):  # its value is on the device: no check
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                "num_items_in_batch must be a number or a one-element tensor, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
        return
    num_items_in_batch = _builtin_number(num_items_in_batch)
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(
            f"num_items_in_batch must be a number or a tensor, got {num_items_in_batch!r}"
        )
    if not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")


def reduction_scale(
    labels: torch.Tensor,
    params: TOFUParams,
    num_items_in_batch: int | float | torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """The device scalar (fp32, or ``dtype``) that turns a sum of per-token losses into the loss.

    None for "none" and "sum". For "mean", ``1 / num_items_in_batch``, or ``1 / n_valid``; the count
    stays on the device (no host sync). A divisor of 0 counts as 1, so that no valid token gives 0,
    not NaN; any other is used as given (Hugging Face's Trainer may pass a fraction under context
    or sequence parallelism).
    """
    if params.reduction != "mean":
        return None
    if num_items_in_batch is None:
        denom = (labels != params.ignore_index).sum()
    elif isinstance(num_items_in_batch, torch.Tensor):
        denom = num_items_in_batch.reshape(())  # (1,) or (1, 1): the loss stays 0-dim
    else:  # a fill, not a host-to-device copy (which would synchronize)
        denom = torch.full((), float(num_items_in_batch), device=labels.device, dtype=dtype)
    denom = denom.to(device=labels.device, dtype=dtype)
    return 1.0 / torch.where(denom != 0, denom, 1.0)


def reduce_loss(
    loss_rows: torch.Tensor, shape: torch.Size, params: TOFUParams, scale: torch.Tensor | None
) -> torch.Tensor:
    """Reduce fp32 per-token losses (0 at ignored tokens) as ``params.reduction`` says."""
    if params.reduction == "none":
        return loss_rows.reshape(shape)
    total = loss_rows.sum()
    return total if scale is None else total * scale


def grad_multiplier(
    grad_output: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The factor, ``(1, 1)`` or per-row ``(N, 1)``, that backward applies to a stored gradient.

    fp32 (or ``dtype``), and with a dimension on purpose: a 0-dim factor would be rounded to
    bf16/fp16 before an in-place multiply of a half-precision gradient.
    """
    factor = grad_output.to(dtype)
    if scale is not None:
        factor = factor * scale
    return factor.reshape(-1, 1)


def check_backward(ctx, op: str, *, consumes: bool) -> None:
    """Refuse what a gradient-in-forward backward cannot do, with a clear error.

    Double backward (``create_graph=True``): the gradient was computed without a graph. A second
    backward through the same graph where the stored gradient is scaled in place (``consumes``).
    """
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} does not support double backward (create_graph=True)")
    if consumes:
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                f"{op}: backward ran twice through the same graph; its stored gradients are "
                "scaled in place and freed. Recompute the loss for a second backward."
            )
        ctx.consumed = True


@dataclass
class TOFUStats:
    """Detached statistics over the valid tokens of one call: 0-dim fp32 tensors (``n_tokens``
    int64) on the inputs' device (no host sync)."""

    mean_p: torch.Tensor  # the target's softmax probability
    mean_focal_weight: torch.Tensor  # g
    entropy: torch.Tensor  # of softmax(z), in nats
    accuracy: torch.Tensor  # argmax(z) == label; the first of tied maxima, as torch.argmax
    n_tokens: torch.Tensor

    @classmethod
    def from_rows(
        cls, row_stats: torch.Tensor, labels: torch.Tensor, ignore_index: int
    ) -> TOFUStats:
        """From per-token ``(4, N)`` rows (p, g, entropy, correct), 0 at ignored tokens."""
        n = (labels.reshape(-1) != ignore_index).sum()
        sums = row_stats.to(torch.float32).sum(dim=1) / n.clamp(min=1).to(torch.float32)
        p, g, entropy, acc = sums.unbind(0)
        return cls(p, g, entropy, acc, n)

    def as_dict(self) -> dict[str, float]:
        """Python floats, for logging (this one synchronizes)."""
        return {k: float(getattr(self, k)) for k in self.__dataclass_fields__}
