"""Shared test helpers: random inputs and comparison against the float64 oracle."""

from __future__ import annotations

import torch

from tofu_kernels.reference import reduce_rows, tofu_rows

# Tolerances: the loss is computed in fp32 whatever the input dtype, so it must match the float64
# oracle (on the same rounded inputs) to fp32 accuracy; the gradient is rounded to the logits'
# dtype once in the kernel and once more when backward scales it. (Triton's interpreter rounds
# fp32 to bf16 toward zero, the GPU to nearest: interpreted bf16 results are ~1 unit worse.)
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def random_logits(shape, dtype, device, scale=4.0) -> torch.Tensor:
    """Logits with a spread like a trained LM head: mostly O(scale), a few large outliers."""
    z = torch.randn(shape, dtype=torch.float32, device=device) * scale
    z = z + (torch.rand(shape, device=device) < 0.01) * 3 * scale
    return z.to(dtype)


def random_labels(shape, vocab, device, ignored=0.0, ignore_index=-100) -> torch.Tensor:
    labels = torch.randint(0, vocab, shape, device=device)
    if ignored >= 1.0:
        return torch.full_like(labels, ignore_index)
    drop = torch.rand(shape, device=device) < ignored
    return torch.where(drop, torch.full_like(labels, ignore_index), labels)


def row_factors(grad_output, labels, ignore_index, reduction, num_items_in_batch):
    """float64 d(loss)/d(loss_row) per token: the reduction's weight times the upstream gradient."""
    y = labels.reshape(-1)
    if reduction == "none":
        return grad_output.double().reshape(-1)
    factor = grad_output.double().expand(y.shape[0])
    if reduction == "mean":
        denom = num_items_in_batch if num_items_in_batch is not None else (y != ignore_index).sum()
        factor = factor / (float(denom) or 1.0)  # no valid token: zero gradients
    return factor


def oracle(
    logits,
    labels,
    *,
    gamma,
    beta,
    ignore_index=-100,
    reduction="mean",
    num_items_in_batch=None,
    softcap=None,
    grad_output=None,
):
    """float64 loss and, for a given upstream gradient, the float64 gradient w.r.t. the logits."""
    vocab = logits.shape[-1]
    z = logits.detach().reshape(-1, vocab).double()
    y = labels.reshape(-1)
    rows, _, grad_rows = tofu_rows(z, y, gamma, beta, ignore_index, softcap, compute_grad=True)
    loss = reduce_rows(rows, labels, ignore_index, reduction, num_items_in_batch)
    if grad_output is None:
        return loss, None
    factor = row_factors(grad_output, labels, ignore_index, reduction, num_items_in_batch)
    return loss, (grad_rows * factor[:, None]).reshape(logits.shape)


def assert_close(actual, expected, rtol, what=""):
    """Elementwise, with an absolute floor of rtol times the largest expected magnitude."""
    actual = actual.double()
    expected = expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}"
    )


def linear_oracle(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    gamma,
    beta,
    ignore_index=-100,
    reduction="mean",
    num_items_in_batch=None,
    softcap=None,
    grad_output=None,
    rows_per_slice=1024,
    logits_dtype=None,
):
    """float64 loss and gradients (hidden, weight, bias) of TOFU on ``hidden @ weight.T + bias``.

    Slices of rows keep float64 memory bounded at production shapes (the GPU tests). With
    ``logits_dtype``, the logits are first rounded to it, as a logits buffer of that dtype is.
    """
    h = hidden.shape[-1]
    x = hidden.detach().reshape(-1, h).double()
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else None
    y = labels.reshape(-1)
    if grad_output is None:  # d(loss)/d(loss) = 1
        grad_output = torch.ones(labels.shape if reduction == "none" else (), device=x.device)
    factor = row_factors(grad_output, labels, ignore_index, reduction, num_items_in_batch)
    rows, gx = [], torch.zeros_like(x)
    gw, gb = torch.zeros_like(w), torch.zeros(w.shape[0], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], rows_per_slice):
        xs = x[s : s + rows_per_slice]
        z = xs @ w.T if b is None else xs @ w.T + b
        if logits_dtype is not None:
            z = z.to(logits_dtype).double()
        r, _, g = tofu_rows(z, y[s : s + rows_per_slice], gamma, beta, ignore_index, softcap, True)
        g = g * factor[s : s + rows_per_slice, None]
        rows.append(r)
        gx[s : s + rows_per_slice] = g @ w
        gw += g.T @ xs
        gb += g.sum(0)
    loss = reduce_rows(torch.cat(rows), labels, ignore_index, reduction, num_items_in_batch)
    return loss, gx.reshape(hidden.shape), gw, gb


# A tiny Llama for the integration tests (a few thousand parameters; nothing is downloaded).
TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.3,
)


# The chunk's logits are rounded to the inputs' dtype, as the model's own LM head would round
# them; per-token losses therefore carry that rounding (bf16: 8 bits), means much less of it.
LINEAR_LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 1e-3}
LINEAR_GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(actual, expected) -> float:
    """Largest elementwise error relative to the largest expected magnitude."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


def returns_of(monkeypatch, module, name: str) -> list:
    """Every value ``module.name`` returns from here on, in order, as it still runs: e.g. the
    answers of vocab_chunked.lean_slab_rows (whether, and with how many rows, token slabs ran)."""
    seen = []
    real = getattr(module, name)

    def record(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(module, name, record)
    return seen


def shared_direction_head(rows, vocab, hidden, dtype, device, common=1.0):
    """``(hidden_states, weight)`` of a flat softmax (logits spread ~0.3) over weight rows that
    share a direction ``common`` times a standard normal one, as a trained head's rows do: the
    direction cancels out of grad_hidden only if the logits' gradient rows keep summing to 0,
    so their rounding errors in half precision show (utils.cancel_rounding)."""
    x = (torch.randn(rows, hidden, device=device) * 0.3 / hidden**0.5).to(dtype)
    direction = common * torch.randn(1, hidden, device=device)
    w = (torch.randn(vocab, hidden, device=device) * 0.1 + direction).to(dtype)
    return x, w


def tied_head(pairs, hidden, vocab, dtype, device):
    """``(hidden_states, weight, labels)`` whose row t's logits tie at the row's max (10, exact
    in every dtype) on the columns ``pairs[t] = (target, twin)`` and stay within 0.1 of 0
    elsewhere: argmax, the first of tied maxima, is the target only where ``target < twin``.
    No column may appear in two pairs."""
    n = len(pairs)
    assert len({c for pair in pairs for c in pair}) == 2 * n, "a column in two pairs"
    x = torch.zeros(n, hidden, device=device)
    x[range(n), range(n)] = 10.0  # needs hidden >= n
    w = torch.randn(vocab, hidden, device=device) * 0.01
    for t, pair in enumerate(pairs):
        w[list(pair)] = 0.0
        w[list(pair), t] = 1.0
    y = torch.tensor([target for target, _ in pairs], device=device)
    return x.to(dtype), w.to(dtype), y


def make_inputs(shape, hidden, vocab, dtype, device, *, bias=False, ignored=0.3):
    # weight scaled so logits have a spread of a few units, as in a trained head
    x = torch.randn(*shape, hidden, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, device=device) * 3 / hidden**0.5).to(dtype)
    b = torch.randn(vocab, device=device).to(dtype) if bias else None  # a bias of order 1
    y = random_labels(shape, vocab, device, ignored)
    return x, w, b, y
