"""Every bad input of the spec raises a clear error naming the argument, before any launch."""

from __future__ import annotations

import pytest
import torch

from tofu_kernels import TOFULoss, tofu_loss


def _inputs():
    return torch.randn(4, 11), torch.randint(0, 11, (4,))


# (case id, change to the valid call, error type, message pattern)
BAD_INPUTS = [
    ("gamma<0", dict(gamma=-0.1), ValueError, "gamma"),
    ("gamma nan", dict(gamma=float("nan")), ValueError, "gamma"),
    ("gamma inf", dict(gamma=float("inf")), ValueError, "gamma"),
    ("gamma str", dict(gamma="3"), TypeError, "gamma"),
    ("beta=0", dict(beta=0.0), ValueError, "beta"),
    ("beta<0", dict(beta=-1.0), ValueError, "beta"),
    ("beta inf", dict(beta=float("inf")), ValueError, "beta"),
    ("beta tensor", dict(beta=torch.tensor(0.8)), TypeError, "beta"),
    # finite in Python, not in the kernels' fp32: finite logits gave inf or NaN
    ("gamma over fp32", dict(gamma=1e300), ValueError, "gamma"),
    ("beta under fp32", dict(beta=1e-39), ValueError, "beta"),
    ("softcap over fp32", dict(softcap=1e39), ValueError, "softcap"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("impl", dict(impl="cuda"), ValueError, "impl"),
    ("softcap<=0", dict(softcap=0.0), ValueError, "softcap"),
    ("ignore_index float", dict(ignore_index=-100.0), TypeError, "ignore_index"),
    ("num_items 0", dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    ("logits not tensor", dict(logits=[[0.0, 1.0]]), TypeError, "logits"),
    ("logits int", dict(logits=torch.zeros(4, 11, dtype=torch.long)), TypeError, "logits"),
    ("empty vocabulary", dict(logits=torch.zeros(4, 0)), ValueError, "vocabulary"),
    ("0-dim logits", dict(logits=torch.tensor(1.0)), ValueError, "vocabulary"),
    ("labels float", dict(labels=torch.zeros(4)), TypeError, "labels"),
    ("labels bool", dict(labels=torch.zeros(4, dtype=torch.bool)), TypeError, "labels"),
    ("labels shape", dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels"),
    ("labels 2-D", dict(labels=torch.zeros(4, 1, dtype=torch.long)), ValueError, "labels"),
    ("label >= V", dict(labels=torch.tensor([0, 11, 2, 3])), ValueError, "labels"),
    ("label < 0", dict(labels=torch.tensor([0, -1, 2, 3])), ValueError, "labels"),
    (
        "labels on meta",
        dict(labels=torch.zeros(4, dtype=torch.long, device="meta")),
        ValueError,
        "labels",
    ),
    (
        "fp64 triton",
        dict(logits=torch.zeros(4, 11, dtype=torch.float64), impl="triton"),
        TypeError,
        "impl",
    ),
]


@pytest.mark.parametrize(
    "change,error,pattern", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_raises(change, error, pattern, monkeypatch):
    from tofu_kernels import tofu as tofu_mod

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(tofu_mod, "tofu_fwd", no_launch)
    monkeypatch.setattr(tofu_mod, "tofu_fwd_torch", no_launch)
    logits, labels = _inputs()
    kwargs = dict(change)
    logits = kwargs.pop("logits", logits)
    labels = kwargs.pop("labels", labels)
    with pytest.raises(error, match=pattern):
        tofu_loss(logits, labels, **kwargs)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="beta"):
        TOFULoss(beta=0.0)


def test_ignore_index_label_is_not_out_of_range():
    logits, labels = _inputs()
    labels[0] = -100
    assert torch.isfinite(tofu_loss(logits, labels))
    labels[0] = 11  # a custom ignore_index outside [0, V) is fine too
    assert torch.isfinite(tofu_loss(logits, labels, ignore_index=11))


def test_numpy_scalars_are_numbers():
    """NumPy scalars (a config read with NumPy, a count from ``np.sum``) act as the Python
    numbers of the same value; a float ignore_index is still refused."""
    np = pytest.importorskip("numpy")
    logits, labels = _inputs()
    labels[0] = 5
    python = dict(gamma=2.0, beta=0.5, softcap=4.0, ignore_index=5, num_items_in_batch=3)
    numpy = dict(
        gamma=np.float32(2.0),
        beta=np.float64(0.5),
        softcap=np.float16(4.0),
        ignore_index=np.int64(5),
        num_items_in_batch=np.int32(3),
    )
    expected = tofu_loss(logits, labels, **python)
    torch.testing.assert_close(tofu_loss(logits, labels, **numpy), expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="ignore_index"):
        tofu_loss(logits, labels, ignore_index=np.float64(5.0))


def test_other_libraries_layouts_get_advice():
    """torch's (N, C, T) logits and Liger's (weight, input, target) order fail on the labels'
    shape; the error says what the shapes look like and how to pass them."""
    from tofu_kernels import fused_linear_tofu_loss

    logits, labels = torch.randn(2, 11, 5), torch.randint(0, 11, (2, 5))
    with pytest.raises(ValueError, match=r"\(N, C, d1, \.\.\.\) layout.*movedim\(1, -1\)"):
        tofu_loss(logits, labels)
    torch.testing.assert_close(  # the advice is right
        tofu_loss(logits.movedim(1, -1), labels, gamma=0.0, beta=1.0),
        torch.nn.functional.cross_entropy(logits, labels),
    )
    hidden, weight, labels = torch.randn(6, 4), torch.randn(11, 4), torch.randint(0, 11, (6,))
    with pytest.raises(ValueError, match=r"look swapped.*\(hidden, weight, labels\)"):
        fused_linear_tofu_loss(weight, hidden, labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\), got \(7,\)$"):
        fused_linear_tofu_loss(hidden, weight, labels[:1].expand(7))  # no advice that misleads


def test_triton_impls_on_cpu_need_the_interpreter(monkeypatch):
    """Without TRITON_INTERPRET, a Triton impl on CPU tensors is a clear error (Triton's own
    was "0 active drivers"), and auto runs PyTorch there."""
    from tofu_kernels import fused_linear_tofu_loss

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, labels = _inputs()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tofu_loss(logits, labels, impl="triton")
    assert torch.isfinite(tofu_loss(logits, labels))
    for impl in ("chunked", "vocab_chunked", "fused"):
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            fused_linear_tofu_loss(torch.randn(4, 3), torch.randn(11, 3), labels, impl=impl)
