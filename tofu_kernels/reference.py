"""PyTorch references for the TOFU loss: the oracle of every test, the baseline of every benchmark.

Two forms live here (see ``shared/spec/TOFU.md`` in the repository for the contract):

* :func:`tofu_loss_published` is the loss exactly as the paper's code computes it, on materialized
  float32 logits. It is kept as the behaviour to match, hazards included.
* :func:`tofu_rows` is the numerically safe form of the spec, row by row, in whatever floating dtype
  it is given. In float64 it is the oracle; in float32, chunked, it is the ``impl="torch"`` path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reduce_rows(
    loss_rows: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Hugging Face reduction of per-token losses that are already 0 at ignored tokens."""
    if reduction == "none":
        return loss_rows.reshape(labels.shape)
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is None:
        num_items_in_batch = (labels != ignore_index).sum()
    denom = torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device)
    return total / torch.where(denom != 0, denom, 1)  # no valid token: 0, not NaN


def tofu_loss_published(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 3.0,
    beta: float = 0.8,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The published TOFU loss on materialized logits (upcast to float32, float64 stays float64).

    Kept as published, so it has the published hazards, which the kernels do not:

    * ``log(p)`` of ``p = exp(log_softmax(z))[y]`` is ``-inf`` once ``p`` underflows (a target more
      than about 104 nats below the log-partition in float32): the focal term becomes ``0 * inf``.
    * ``(1 - p) ** (gamma - 1)`` is ``inf`` at ``p == 1`` for ``gamma < 1``, and ``gamma = 0``
      still multiplies it by 0: NaN on a confident token even for plain cross-entropy settings.
    * ``1 - p`` loses every digit for confident tokens in float32.
    * Both ``(N, V)`` log-softmaxes are materialized in float32.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.reshape(-1, logits.shape[-1]).to(dtype)
    y = labels.reshape(-1)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)
    p = F.log_softmax(z, dim=-1).gather(1, y_safe).squeeze(1).exp()
    focal = ((1 - p) ** gamma - gamma * p * (1 - p) ** (gamma - 1) * torch.log(p)).detach()
    log_q = F.log_softmax(z / beta, dim=-1).gather(1, y_safe).squeeze(1)
    loss_rows = torch.where(valid, -beta * focal * log_q, torch.zeros_like(log_q))
    return reduce_rows(loss_rows, labels, ignore_index, reduction, num_items_in_batch)


def softcap_logits(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(z / softcap)`` (Gemma-2 style), or ``z`` itself when ``softcap`` is None."""
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def focal_weight(ell: torch.Tensor, gamma: float) -> torch.Tensor:
    """The stop-gradient focal term ``g`` from ``ell = log((1 - p) / p)``, safe for any ``ell``.

    ``g = (1-p)^gamma * (1 + gamma * log1p(T) / T)`` with ``T = exp(ell)``; ``gamma == 0`` gives 1.
    """
    if gamma == 0:
        return torch.ones_like(ell)
    one_minus_p_pow = torch.exp(-gamma * F.softplus(-ell))
    # log1p(T) / T: softplus(ell) * exp(-ell) for large T, log1p(T) / T -> 1 as T -> 0.
    t = torch.exp(torch.clamp(ell, max=0.0))
    small = torch.where(t > 0, torch.log1p(t) / torch.where(t > 0, t, 1.0), 1.0)
    big = torch.exp(-torch.clamp(ell, min=0.0))  # 0 for ell = inf: not inf * 0
    ratio = torch.where(ell > 0, torch.where(big > 0, F.softplus(ell) * big, 0.0), small)
    return one_minus_p_pow * (1 + gamma * ratio)


def tofu_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float,
    beta: float,
    ignore_index: int = -100,
    softcap: float | None = None,
    compute_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Numerically safe TOFU on ``(N, V)`` logits, computed in ``logits.dtype``.

    Returns ``(loss_rows, stats, grad)``: per-token losses ``(N,)`` (0 at ignored tokens, NaN for
    labels outside ``[0, V)``), per-token statistics ``(4, N)`` (``p``, ``g``, the entropy of
    ``softmax(z)``, and whether the target is the argmax, the first of tied maxima; 0 at ignored
    tokens), and, when ``compute_grad``, the unreduced gradient ``dloss_row / dlogits`` ``(N, V)``,
    with the focal term held constant as the spec requires.
    """
    n, v = logits.shape
    a = logits
    z = softcap_logits(a, softcap)
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < v)
    y = torch.where(in_range, labels, torch.zeros_like(labels)).long().unsqueeze(1)  # int8 too
    onehot = torch.zeros_like(z, dtype=torch.bool).scatter_(1, y, True)

    m = z.max(dim=1, keepdim=True).values
    zm = z - m
    e1 = torch.exp(zm)
    eb = torch.exp(zm / beta)
    zy = zm.gather(1, y).squeeze(1)
    s1x = e1.masked_fill(onehot, 0).sum(1)
    sbx = eb.masked_fill(onehot, 0).sum(1)
    s1 = s1x + torch.exp(zy)
    ell = torch.log(s1x) - zy
    # beta * softplus(x / beta), written so that x / beta never overflows (a small beta)
    x = beta * torch.log(sbx) - zy

    g = focal_weight(ell, gamma)
    loss = g * (x.clamp(min=0) + beta * torch.log1p(torch.exp(-x.abs() / beta)))
    p = torch.exp(-F.softplus(ell))
    entropy = torch.log(s1) - torch.where(e1 > 0, e1 * zm, 0).sum(1) / s1  # not 0 * -inf
    correct = (z.argmax(1) == y.squeeze(1)).to(z.dtype)  # the first of tied maxima, as argmax

    nan = torch.full_like(loss, float("nan"))
    zero = torch.zeros_like(loss)
    loss = torch.where(valid, torch.where(in_range, loss, nan), zero)
    stats = torch.stack([p, g, entropy, correct])
    stats = torch.where((valid & in_range).unsqueeze(0), stats, zero)

    grad = None
    if compute_grad:
        ok = (valid & in_range).unsqueeze(1)
        g_ok = torch.where(ok.squeeze(1), g, zero).unsqueeze(1)
        sb = (sbx + torch.exp(zy / beta)).unsqueeze(1)
        # The target column uses 1 - q_y = sbx / sb: no cancellation for confident tokens.
        dz = torch.where(onehot, -(sbx.unsqueeze(1) / sb), eb / sb)
        grad = torch.where(ok, g_ok * dz, torch.zeros_like(dz))
        if softcap is not None:  # 1 - tanh^2 as 4t / (1 + t)^2: no cancellation in saturation
            t = torch.exp(-2 * (a / softcap).abs())
            grad = grad * (4 * t / (1 + t) ** 2)
    return loss, stats, grad
