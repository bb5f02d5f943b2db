"""The fused TOFU kernel used directly: final hidden states and an LM-head weight in, loss out.

    python examples/direct_kernel.py            # GPU if there is one, else a small CPU run

For custom training loops: no Hugging Face model and no patching. The loss of
``hidden @ weight.T`` is computed chunk by chunk of tokens, so the ``(tokens, vocabulary)`` logits
never exist; here it is checked against the paper's published formula on materialized logits, and
on a GPU the peak memory of both is printed.
"""

from __future__ import annotations

import torch

from tofu_kernels import fused_linear_tofu_loss
from tofu_kernels.reference import tofu_loss_published


def peak_gb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> None:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    # Llama-3-8B's head on a 4 x 2048-token batch on a GPU; a small one on a CPU.
    batch, seq, hidden_size, vocab = (4, 2048, 4096, 128256) if cuda else (2, 64, 256, 8000)
    torch.manual_seed(0)

    hidden = torch.randn(batch, seq, hidden_size, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    weight.requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    labels[:, : seq // 4] = -100  # prompt tokens: no loss

    # Labels are already aligned with the hidden states (shift them yourself for a causal LM).
    loss, stats = fused_linear_tofu_loss(
        hidden, weight, labels, gamma=3.0, beta=0.8, return_stats=True
    )
    loss.backward()
    print(f"fused TOFU loss   {loss.item():.6f}")
    print("stats            ", {k: round(v, 4) for k, v in stats.as_dict().items()})

    # The same loss as published: materialized float32 logits, autograd.
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    ref = tofu_loss_published(h @ w.T, labels, gamma=3.0, beta=0.8)
    ref.backward()
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    print(f"published loss    {ref.item():.6f}")
    err = abs(loss.item() - ref.item()) / abs(ref.item())
    print(f"relative error    loss {err:.1e}, grad hidden {rel(hidden.grad, h.grad):.1e}, ", end="")
    print(f"grad weight {rel(weight.grad, w.grad):.1e}")

    if cuda:
        fused = peak_gb(lambda: fused_linear_tofu_loss(hidden, weight, labels).backward())
        published = peak_gb(lambda: tofu_loss_published(hidden @ weight.T, labels).backward())
        print(f"peak memory above inputs: fused {fused:.2f} GB, published {published:.2f} GB")


if __name__ == "__main__":
    main()
