"""Compiled kernels on a real GPU at production shapes (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from helpers import GRAD_RTOL, assert_close, oracle, random_labels, random_logits
from tofu_kernels import tofu_loss

pytestmark = pytest.mark.gpu

LLAMA3_VOCAB = 128256


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_llama3_vocab_bf16_against_oracle(softcap):
    logits = random_logits((512, LLAMA3_VOCAB), torch.bfloat16, "cuda").requires_grad_(True)
    labels = random_labels((512,), LLAMA3_VOCAB, "cuda", ignored=0.3)
    loss = tofu_loss(logits, labels, gamma=3.0, beta=0.8, softcap=softcap, impl="triton")
    loss.backward()
    ref_loss, ref_grad = oracle(
        logits,
        labels,
        gamma=3.0,
        beta=0.8,
        softcap=softcap,
        grad_output=torch.ones((), device="cuda"),
    )
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(logits.grad, ref_grad, GRAD_RTOL[torch.bfloat16], "grad")


def test_out_of_range_label_is_nan_on_gpu():
    logits = torch.randn(4, 1000, device="cuda")
    labels = torch.tensor([1, 2, 5000, 3], device="cuda")
    assert torch.isnan(tofu_loss(logits, labels))
