"""torch.compile(fullgraph=True) traces through every op with no graph break, same results.

CPU with the aot_eager backend: the Triton launches sit inside opaque custom ops, so the graph is
the same whether the kernels run compiled on a GPU or interpreted here. Compiled and eager runs
agree to fp32 accuracy, not bitwise: ATen's vectorized reductions sum in an order that depends
on the tensors' memory alignment (about 1 run in 6 differed by 2e-6 at these shapes).
"""

from __future__ import annotations

import pytest
import torch

from helpers import GRAD_RTOL, make_inputs, random_labels, rel_err
from tofu_kernels import fused_linear_tofu_loss, tofu_loss


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tofu_loss_compiles_fullgraph(device, impl, reduction):
    torch._dynamo.reset()
    logits = torch.randn(2, 6, 301, device=device)
    labels = random_labels((2, 6), 301, device, ignored=0.4)

    def step(z, y):
        return tofu_loss(z, y, gamma=1.0, beta=1.5, reduction=reduction, impl=impl, softcap=9.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        z = logits.clone().requires_grad_(True)
        loss = fn(z, labels)
        loss.sum().backward()
        results.append((loss.detach(), z.grad))
    for eager, comp in zip(*results, strict=True):
        assert rel_err(comp, eager) < GRAD_RTOL[torch.float32]


@pytest.mark.parametrize("impl", ["chunked", "vocab_chunked", "fused", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_compiles_fullgraph(device, impl, reduction):
    torch._dynamo.reset()
    x, w, b, y = make_inputs((2, 7), 37, 301, torch.float32, device, bias=True, ignored=0.4)
    num_items = torch.tensor(11, device=device)

    def step(x, w, b, y):
        loss = fused_linear_tofu_loss(
            x, w, y, bias=b, reduction=reduction, impl=impl, chunk_size=5,
            num_items_in_batch=num_items if reduction == "mean" else None,
        )  # fmt: skip
        return loss.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        loss = fn(*leaves, y)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for eager, comp in zip(*results, strict=True):
        assert rel_err(comp, eager) < GRAD_RTOL[torch.float32]


def test_gamma_and_beta_stay_full_precision_in_compiled_graphs(device):
    """bf16 inputs: every launch in the AOT graphs (forward and backward) gets gamma and beta as
    the exact Python floats given (0.8, not bf16's 0.80078125), which the kernels take as fp32
    scalars; no impl turns them into tensors of the input dtype."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    calls = []

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "tofu_kernels" in str(node.target):
                calls.append([a for a in node.args if isinstance(a, float)][:2])
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    x, w, _, y = make_inputs((9,), 40, 300, torch.bfloat16, device, ignored=0.3)
    z = torch.randn(9, 300, device=device).to(torch.bfloat16)
    steps = [
        (lambda x, w, y, impl=impl: fused_linear_tofu_loss(x, w, y, beta=0.8, impl=impl), (x, w, y))
        for impl in ("chunked", "vocab_chunked", "fused", "torch")
    ] + [(lambda z, y: tofu_loss(z, y, beta=0.8), (z, y))]
    for step, inputs in steps:
        torch._dynamo.reset()
        calls.clear()
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        torch.compile(step, fullgraph=True, backend=backend)(*leaves).backward()
        assert calls and all(c == [3.0, 0.8] for c in calls), calls


def test_dynamic_shapes_compile_fullgraph(device):
    """torch.compile(dynamic=True) makes every Python float symbolic: the options' checks must
    trace (math.isfinite did not), and one graph serves every token count."""
    torch._dynamo.reset()
    x, w, _, _ = make_inputs((31,), 16, 53, torch.float32, device)
    y = random_labels((31,), 53, device, ignored=0.3)

    def step(x, w, y):
        return fused_linear_tofu_loss(x, w, y, impl="torch") + tofu_loss(x @ w.T, y, gamma=2.5)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (6, 10, 31):
        assert rel_err(compiled(x[:n], w, y[:n]), step(x[:n], w, y[:n])) < 1e-6


# Each op's fake against the op itself (torch.library.opcheck: shapes, dtypes, strides and
# aliasing): a transposed weight and hidden, whose gradients the ops make contiguous (the fakes
# copied the inputs' strides: inductor asserted them and failed), and a frozen weight without
# bias (the fakes returned one empty tensor for two outputs).
@pytest.mark.parametrize("needs", [[True, True, True], [True, False, False]])
def test_fakes_match_the_ops(device, needs):
    from torch.library import opcheck

    ops = torch.ops.tofu_kernels
    x = torch.randn(8, 6, device=device).T  # (6, 8), transposed
    w = torch.randn(8, 37, device=device).T  # (37, 8), transposed
    b = torch.randn(37, device=device) if needs[2] else None
    y = random_labels((6,), 37, device, ignored=0.3)
    scale = torch.rand(1, device=device)
    for drop in (False, True):
        args = (x, w, y, b, scale, 3.0, 0.8, -100, None, "torch", 4, torch.float32, drop, needs)
        opcheck(ops.linear_tofu_chunked, args)
    xc, wc = x.contiguous(), w.contiguous()  # the fused ops' callers make rows contiguous
    _, _, rowterms = ops.fused_tofu_fwd(xc, wc, y, b, 3.0, 0.8, -100, None, "fused", None)
    args = (xc, wc, y, b, rowterms, scale, 3.0, 0.8, -100, None, needs, None, True, "fused")
    opcheck(ops.fused_tofu_bwd, (*args, None, False))
