"""Hugging Face integration: patched causal LMs against the published loss on their own logits.

Tiny random models from configs (nothing is downloaded). The oracle of every loss is the paper's
published formula applied to the *unpatched* model's logits with transformers' causal shift; the
oracle of every gradient is autograd through it. Token counts stay small: without a GPU the TOFU
kernel runs through Triton's interpreter, one program per token. Training-loop tests use
``impl="torch"`` (the same chunked algorithm, TOFU rows in PyTorch): they test the integration
with Trainer, not the kernel, which the equivalence tests here and the kernel tests cover.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import transformers
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

import tofu_kernels
from helpers import TINY_LLAMA, returns_of
from tofu_kernels.hf import (
    HEAD_SPECS,
    HeadSpec,
    UnsupportedModelError,
    apply_tofu_kernel,
    get_tofu_stats,
    is_tofu_patched,
    register_head_spec,
    revert_tofu_kernel,
    shift_labels,
    tofu_loss_func,
    use_tofu_kernel,
)
from tofu_kernels.reference import tofu_loss_published

VOCAB = 256
GAMMA, BETA = 3.0, 0.8
# Large weights: peaked, non-uniform predictions, and logits big enough for softcap to matter.
COMMON = {**TINY_LLAMA, "vocab_size": VOCAB, "initializer_range": 0.5}
# name -> (config class, model class, config overrides)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 8, "final_logit_softcapping": 2.0},
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 8, "final_logit_softcapping": 2.0},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_inner": 64, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    ),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", {"logits_scaling": 0.25}),
    "falcon_h1": (
        "FalconH1Config",
        "FalconH1ForCausalLM",
        {
            "lm_head_multiplier": 0.3,
            "mamba_d_ssm": 32,
            "mamba_n_heads": 4,
            "mamba_d_head": 8,
            "mamba_d_state": 8,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 8,
        },
    ),  # fmt: skip
    "bloom": ("BloomConfig", "BloomForCausalLM", {}),  # return_dict: a parameter of its forward
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True},
    ),
    "jetmoe": (  # its router loss weight is aux_loss_coef
        "JetMoeConfig",
        "JetMoeForCausalLM",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "kv_channels": 8,
            "output_router_logits": True,
        },
    ),
    "recurrent_gemma": (
        "RecurrentGemmaConfig",
        "RecurrentGemmaForCausalLM",
        {
            "lru_width": 32,
            "head_dim": 8,
            "num_key_value_heads": 1,
            "attention_window_size": 16,
            "block_types": ["recurrent", "attention"],
            "logits_soft_cap": 2.0,
        },
    ),
    # mode "train" runs whole chunks only: the 4-token check fails and is retried at chunk_size
    # (use_cache=False: transformers 5.25's xLSTM cache has the wrong shape at these sizes)
    "xlstm": (
        "xLSTMConfig",
        "xLSTMForCausalLM",
        {
            "embedding_dim": 32,
            "num_blocks": 2,
            "num_heads": 2,
            "chunk_size": 8,
            "mode": "train",
            "use_cache": False,
            "output_logit_soft_cap": 2.0,
        },
    ),
    "ergo": (  # lm_head: an nn.Linear subclass that returns fp32 logits
        "ErgoConfig",
        "ErgoForCausalLM",
        {
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_intermediate_size": 32,
            "first_dense_intermediate_size": 64,
            "layer_types": ["sliding_attention", "full_attention"],
            "mlp_layer_types": ["dense", "sparse"],
            "sliding_window": 4,
            "global_attention_every_n_layers": 2,
        },
    ),
    "dory": (  # lm_head: an nn.Linear subclass with a learned scale per vocabulary entry
        "DoryConfig",
        "DoryForCausalLM",
        {
            "head_dim": 8,
            "num_hidden_layers": 3,
            "n_input_layers": 1,
            "n_recurrent_layers": 1,
            "n_output_layers": 1,
            "n_recurrent_loops": 1,
            "sliding_window": 4,
        },
    ),
    "cohere_compass_text": (
        "CohereCompassTextConfig",
        "CohereCompassForCausalLM",
        {
            "head_dim": 8,
            "logit_scale": 0.5,
            "rope_parameters": {
                kind: {"rope_type": "default", "rope_theta": 1e4}
                for kind in ("full_attention", "sliding_attention")
            },
        },
    ),
}
ISSUE_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]


def tiny_model(arch: str, device, dtype=torch.float32, **overrides) -> nn.Module:
    config_cls, model_cls, extra = ARCHS[arch]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_cls)(config)
    return model.to(device=device, dtype=dtype).train()


def batch(device, shape=(2, 8)):
    ids = torch.randint(3, VOCAB, shape, device=device)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return ids, mask, labels


def published(model, ids, mask, labels, num_items=None, **forward_kwargs):
    """The oracle: the published loss on the unpatched model's logits, with the causal shift."""
    logits = model(input_ids=ids, attention_mask=mask, **forward_kwargs).logits
    targets = forward_kwargs.get("shift_labels")
    targets = shift_labels(labels) if targets is None else targets
    return tofu_loss_published(logits, targets, GAMMA, BETA, num_items_in_batch=num_items), logits


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(actual, expected, rtol=1e-4):
    assert actual.keys() == expected.keys()
    for name, g in expected.items():
        scale = g.abs().max().clamp(min=1e-12)
        err = ((actual[name].float() - g.float()).abs().max() / scale).item()
        assert err < rtol, f"{name}: relative error {err:.2e}"


# and GPT-2, whose class name gives no loss_type (transformers then uses the causal LM loss), and
# Ergo and Dory, whose lm_heads are nn.Linear subclasses with forwards of their own (fp32 logits;
# a learned scale per vocabulary entry)
@pytest.mark.parametrize("arch", [*ISSUE_ARCHS, "gpt2", "ergo", "dory"])
def test_loss_and_gradients_match_published(arch, device):
    model = tiny_model(arch, device)
    if arch == "dory":  # its scales start at 1: make them matter
        with torch.no_grad():
            model.lm_head.logit_scale.mul_(torch.rand_like(model.lm_head.logit_scale) + 0.5)
    ids, mask, labels = batch(device)
    ref, ref_logits = published(model, ids, mask, labels)
    ref.backward()
    ref_grads = grads(model)

    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert isinstance(out, ModelOutput) and out.logits is None
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=0)
    out.loss.backward()
    assert_grads_close(grads(model), ref_grads)

    # num_items_in_batch (gradient accumulation): the sum over this batch's tokens divided by it.
    out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=37)
    ref37, _ = published(model, ids, mask, labels, num_items=37)
    torch.testing.assert_close(out.loss, ref37.detach(), rtol=1e-5, atol=0)

    # Evaluation: same logits, TOFU on them.
    with torch.no_grad():
        model.eval()
        evaluated = model(input_ids=ids, attention_mask=mask, labels=labels)
        model.train()
    torch.testing.assert_close(evaluated.logits, ref_logits.detach(), rtol=0, atol=0)
    torch.testing.assert_close(evaluated.loss, ref.detach(), rtol=1e-5, atol=0)

    revert_tofu_kernel(model)
    assert "forward" not in vars(model) and not is_tofu_patched(model)
    ce = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    hf = model.loss_function(ref_logits, labels, VOCAB)
    torch.testing.assert_close(ce, hf, rtol=1e-5, atol=0)


# logit scales from the registry: Cohere's and Cohere Compass's logit_scale, Granite's and
# HyperCLOVA X's logits_scaling, Falcon-H1's lm_head_multiplier; softcaps under other names:
# RecurrentGemma's logits_soft_cap, xLSTM's output_logit_soft_cap
REGISTRY_ARCHS = ["cohere", "cohere_compass_text", "granite", "hyperclovax", "falcon_h1"]
SOFTCAP_ARCHS = ["recurrent_gemma", "xlstm"]


# and the router losses of Mixtral (router_aux_loss_coef) and JetMoe (aux_loss_coef)
@pytest.mark.parametrize("arch", [*REGISTRY_ARCHS, *SOFTCAP_ARCHS, "mixtral", "jetmoe"])
def test_registry_and_moe_losses(arch, device):
    model = tiny_model(arch, device)
    ids, mask, labels = batch(device)
    ref, _ = published(model, ids, mask, labels)
    out_ref = model(input_ids=ids, attention_mask=mask)
    if arch in ("mixtral", "jetmoe"):
        coef = model.router_aux_loss_coef if arch == "mixtral" else model.aux_loss_coef
        assert out_ref.aux_loss > 0 and coef > 0
        ref = ref + coef * out_ref.aux_loss
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)


def test_inference_and_generate_unchanged(device):
    model = tiny_model("llama", device)
    ids, mask, labels = batch(device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.eval()
    gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    with use_tofu_kernel(model):
        assert is_tofu_patched(model)
        with torch.no_grad():
            same = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(same, logits, rtol=0, atol=0)
        torch.testing.assert_close(
            model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0), gen
        )
        # Eval mode with grad enabled: the model's logits, and a differentiable TOFU loss on them.
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.logits.detach(), logits, rtol=0, atol=0)
        ref = tofu_loss_published(logits, shift_labels(labels), GAMMA, BETA)
        torch.testing.assert_close(out.loss.detach(), ref, rtol=1e-5, atol=0)
        assert out.loss.requires_grad
        # Training mode with grad: fused, no logits (labels also found by position).
        model.train()
        assert model(input_ids=ids, labels=labels).logits is None
        assert model(ids, None, None, None, None, labels).logits is None
    assert not is_tofu_patched(model) and "forward" not in vars(model)
    assert not model.model._forward_pre_hooks


def test_outputs_options(device):
    model = tiny_model("llama", device)
    ids, mask, labels = batch(device)
    ref, ref_logits = published(model, ids, mask, labels)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA, return_logits=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref_logits.detach(), rtol=1e-6, atol=1e-6)
    assert len(out.hidden_states) == 3
    loss, *rest = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)
    stats = get_tofu_stats(model)
    assert int(stats.n_tokens) == int((shift_labels(labels) != -100).sum())
    assert 0 < float(stats.mean_p) < 1 and float(stats.entropy) > 0
    # Applying again replaces the options.
    apply_tofu_kernel(model, gamma=0.0, beta=1.0)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    ce = nn.functional.cross_entropy(ref_logits.flatten(0, 1), shift_labels(labels).flatten())
    torch.testing.assert_close(out.loss, ce.detach(), rtol=1e-5, atol=0)
    # use_tofu_kernel on a patched model: its options inside, the earlier ones after (it reverted)
    with use_tofu_kernel(model, gamma=GAMMA, beta=BETA):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=0)
    assert is_tofu_patched(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ce.detach(), rtol=1e-5, atol=0)
    # Trainer's num_items_in_batch counts labels != -100: another ignore_index gets a warning
    apply_tofu_kernel(model, ignore_index=-1)
    with pytest.warns(UserWarning, match="label ignored tokens -100"):
        model(input_ids=ids, labels=labels.clamp(min=-1), num_items_in_batch=7)


def test_patch_after_later_changes(device):
    """What the model does after apply_tofu_kernel checked it: a changed softcap or logit scale
    trains with the new value (it kept the checked one, unlike the model's own forward); a
    re-apply that the check refuses leaves the earlier options (it installed the refused ones);
    an lm_head hook added later gets a warning, since the fused loss cannot see its effect."""
    ids, mask, labels = batch(device)
    for arch, owner, attr in (("gemma2", "config", "final_logit_softcapping"),
                              ("cohere", None, "logit_scale")):  # fmt: skip
        model = tiny_model(arch, device)
        apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)  # checked at 2.0 and 0.5
        setattr(getattr(model, owner) if owner else model, attr, 0.3)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        revert_tofu_kernel(model)
        ref, _ = published(model, ids, mask, labels)
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)

    model = tiny_model("llama", device)
    ref, _ = published(model, ids, mask, labels)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.warns(UserWarning, match="hooks that apply_tofu_kernel has not checked"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    for refused in (
        lambda: apply_tofu_kernel(model, gamma=0.5, beta=0.3),
        lambda: use_tofu_kernel(model, gamma=0.5, beta=0.3).__enter__(),
    ):
        with pytest.raises(UnsupportedModelError):
            refused()
    hook.remove()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)  # gamma 3, beta 0.8 still


def test_lm_head_backward_hooks_warn(device):
    """lm_head's backward hooks never run in a patched training forward (the logits whose
    gradient they see are never made): a warning when patching over them, and on the first
    training forward after one is added; nothing was said."""
    ids, mask, labels = batch(device)
    calls = []
    model = tiny_model("llama", device)
    model.lm_head.register_full_backward_hook(lambda *_: calls.append("full"))
    with pytest.warns(UserWarning, match="backward hooks"):
        apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert not calls
    model.lm_head.register_full_backward_pre_hook(lambda *_: calls.append("pre"))
    with pytest.warns(UserWarning, match="backward hooks"):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert not calls
    with pytest.warns(UserWarning, match="backward hooks"):
        apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)  # checked now: said once, here
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model(input_ids=ids, attention_mask=mask, labels=labels)
        apply_tofu_kernel(tiny_model("llama", device))  # no hooks, no warning


def test_return_dict_parameter(device):
    """Bloom's forward takes return_dict as a parameter (not in **kwargs): False gives tuples,
    in training (loss first) and in evaluation (loss, logits), as unpatched."""
    model = tiny_model("bloom", device)
    ids, mask, labels = batch(device)
    ref, ref_logits = published(model, ids, mask, labels)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], ref.detach(), rtol=1e-5, atol=0)
    model.eval()
    loss, logits, *_ = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(logits, ref_logits.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "bloom"])
def test_return_dict_false_keeps_the_logits_slot(arch, device):
    """A training tuple has the unpatched one's positions, None for the logits never made: its
    logits slot was dropped (as ModelOutput.to_tuple drops None), so out[1] was the cache."""
    model = tiny_model(arch, device)
    ids, mask, labels = batch(device)
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, use_cache=True)
    ref = model(**kwargs, return_dict=False)  # (ce, logits, cache)
    ref_loss, _ = published(model, ids, mask, labels)
    assert torch.is_tensor(ref[1]) and ref[1].shape[-1] == VOCAB and len(ref) >= 3
    for return_logits in (False, True):
        apply_tofu_kernel(model, gamma=GAMMA, beta=BETA, return_logits=return_logits)
        out = model(**kwargs, return_dict=False)
        assert len(out) == len(ref)
        torch.testing.assert_close(out[0], ref_loss.detach(), rtol=1e-5, atol=0)
        if return_logits:
            torch.testing.assert_close(out[1], ref[1].detach(), rtol=1e-6, atol=1e-6)
        else:
            assert out[1] is None and model(**kwargs).logits is None
        assert [type(o) for o in out[2:]] == [type(o) for o in ref[2:]]


def test_shift_labels_and_logits_to_keep(device):
    model = tiny_model("qwen2", device)
    ids, mask, labels = batch(device)
    pre_shifted = torch.randint(0, VOCAB, ids.shape, device=device)
    pre_shifted[:, ::3] = -100
    ref, _ = published(model, ids, mask, labels, shift_labels=pre_shifted)
    keep = 5
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    ref_keep = tofu_loss_published(logits, shift_labels(labels[:, -keep:]), GAMMA, BETA)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=pre_shifted)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=0)
    out = model(input_ids=ids, attention_mask=mask, labels=labels[:, -keep:], logits_to_keep=keep)
    torch.testing.assert_close(out.loss, ref_keep.detach(), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="targets for"):
        model(input_ids=ids, labels=labels, logits_to_keep=keep)


def test_tied_and_frozen_heads(device):
    model = tiny_model("llama", device, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask, labels = batch(device)
    ref, _ = published(model, ids, mask, labels)
    ref.backward()
    ref_grads = grads(model)
    with use_tofu_kernel(model, gamma=GAMMA, beta=BETA):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert_grads_close(grads(model), ref_grads)

    model = tiny_model("mistral", device)
    model.lm_head.weight.requires_grad_(False)
    ref, _ = published(model, ids, mask, labels)
    ref.backward()
    ref_grads = grads(model)
    with use_tofu_kernel(model, gamma=GAMMA, beta=BETA):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    got = grads(model)
    assert "lm_head.weight" not in got
    assert_grads_close(got, ref_grads)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_compiled_model(impl, device):
    """torch.compile(model) of a patched model (Trainer's torch_compile=True): the decoder and
    the fused loss trace into one graph (lm_head's forward is swapped outside it); loss and
    gradients as eager, evaluation unchanged. It raised AttributeError before the swap ran
    eagerly: dynamo replayed it out of order around a graph break."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = tiny_model("llama", device)
    ids, mask, labels = batch(device)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA, impl=impl)
    eager = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    eager.backward()
    want = grads(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    loss = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, eager.detach(), rtol=1e-5, atol=0)
    assert_grads_close(grads(model), want)
    graph = max(counter.graphs, key=lambda g: len(g.graph.nodes))
    targets = {str(node.target) for node in graph.graph.nodes}
    assert "autograd_function_apply" in targets and "embedding" in str(targets)
    model.eval()
    with torch.no_grad():
        logits = compiled(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(logits, model(input_ids=ids, attention_mask=mask).logits)
    # patching the compiled wrapper patches the model inside (it broke every forward)
    revert_tofu_kernel(model)
    model.train()
    apply_tofu_kernel(compiled, gamma=GAMMA, beta=BETA, impl=impl)
    assert is_tofu_patched(model) and is_tofu_patched(compiled)
    out = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, eager.detach(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_of_a_patched_model(strict, device):
    """Exporting for inference while patched (non-strict export read forward.__code__, which the
    patched forward lacked): the exported program gives the model's logits."""
    model = tiny_model("llama", device).eval()
    ids, mask, _ = batch(device)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    program = torch.export.export(model, (), inputs, strict=strict)
    torch.testing.assert_close(program.module()(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("patch", ["before", "after"])
def test_accelerate_compile_regions(patch, device):
    """accelerate's compile_regions copies the model, compiles its blocks and keeps the original
    as _orig_mod. Patched after, the original was patched and the copy trained cross-entropy;
    patched before, the copy's forward ran the original's uncompiled blocks."""
    from accelerate.utils import compile_regions

    torch._dynamo.reset()
    model = tiny_model("llama", device)
    ids, mask, labels = batch(device)
    ref, _ = published(model, ids, mask, labels)
    ref.backward()
    ref_grads = grads(model)
    if patch == "before":
        apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    regions = compile_regions(model, backend="aot_eager")
    if patch == "after":
        apply_tofu_kernel(regions, gamma=GAMMA, beta=BETA)
    assert is_tofu_patched(regions)
    block_calls = []
    regions.model.layers[0].register_forward_hook(lambda *_: block_calls.append(1))
    out = regions(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and block_calls  # the fused loss, from the compiled blocks
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=0)
    out.loss.backward()
    got = {name.replace("_orig_mod.", ""): g for name, g in grads(regions).items()}
    assert_grads_close(got, ref_grads)


def test_gradient_checkpointing_and_accelerate_hooks(device):
    """Gradient checkpointing (both forms), and accelerate hooks on lm_head (as device_map and
    offloading install them, before or after the patch): the hook still runs around the fused
    loss, and loss and gradients are the published loss's."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    ids, mask, labels = batch(device)
    for setup in ("reentrant", "non_reentrant", "hook_before", "hook_after"):
        torch.manual_seed(0)
        model = tiny_model("llama", device)
        ref, _ = published(model, ids, mask, labels)
        ref.backward()
        want = grads(model)
        hook = Count()
        if setup.endswith("reentrant"):
            kwargs = {"use_reentrant": setup == "reentrant"}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if setup == "hook_before":
            add_hook_to_module(model.lm_head, hook)
        apply_tofu_kernel(model, gamma=GAMMA, beta=BETA, impl="chunked", verify=False)
        if setup == "hook_after":
            add_hook_to_module(model.lm_head, hook)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0, msg=setup)
        assert_grads_close(grads(model), want)
        assert hook.calls == (1 if setup.startswith("hook") else 0), setup


VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def tiny_vlm(arch: str, device) -> nn.Module:
    torch.manual_seed(0)
    text = {**COMMON, "head_dim": 8}
    if arch == "llava":
        config = transformers.LlavaConfig(
            text_config={"model_type": "llama", **text}, image_token_index=VOCAB - 1,
            vision_config={**VISION, "image_size": 28, "patch_size": 14},
        )  # fmt: skip
        model = transformers.LlavaForConditionalGeneration(config)
    elif arch == "gemma3":
        config = transformers.Gemma3Config(
            text_config=text, vision_config={**VISION, "image_size": 28, "patch_size": 14}
        )
        model = transformers.Gemma3ForConditionalGeneration(config)
    else:  # multimodal rotary sections: head_dim / 2 frequencies in all
        rope = {"type": "mrope", "mrope_section": [1, 1, 2]}
        config = transformers.Qwen2_5_VLConfig(
            text_config={**text, "rope_scaling": rope},
            vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32,
                           "num_heads": 2, "out_hidden_size": text["hidden_size"]},
        )  # fmt: skip
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    return model.to(device).train()


@pytest.mark.parametrize("arch", ["llava", "gemma3", "qwen2_5_vl"])
def test_vision_language_models(arch, device):
    """Vision-language ``*ForConditionalGeneration`` models whose loss is transformers' causal
    LM loss take the same patch: lm_head reads the language model's hidden states. LLaVA with
    an image (4 patch tokens in the prompt, which the labels ignore), the others on text."""
    model = tiny_vlm(arch, device)
    ids, mask, labels = batch(device)
    extra = {}
    if arch == "llava":
        ids = ids.clamp(max=VOCAB - 2)
        ids[:, 1:5] = VOCAB - 1  # the image's place
        labels = torch.where(labels == -100, labels, ids)
        labels[:, :5] = -100
        extra["pixel_values"] = torch.randn(2, 3, 28, 28, device=device)
    elif arch == "gemma3":
        # what Gemma 3's processor returns (1 marks image tokens); transformers 5.0 requires it
        # in training ("`token_type_ids` is required as a model input when training")
        extra["token_type_ids"] = torch.zeros_like(ids)
    ref, _ = published(model, ids, mask, labels, **extra)
    ref.backward()
    want = grads(model)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)
    got = grads(model)
    assert_grads_close(got, want)
    assert arch != "llava" or any("vision_tower" in name for name in got)


@pytest.mark.parametrize("get_decoder", ["backbone", "itself"])
def test_backbone_by_get_decoder(get_decoder, device):
    """A base model prefix that names no attribute (``base_model`` is the model itself): the
    backbone is ``get_decoder()`` (transformers 4.x's Gemma-3 text model), else ``model`` where
    get_decoder() returns the model itself (transformers 5's Llama 4 and Mllama text models)."""
    model = tiny_model("gemma3_text", device)
    model.base_model_prefix = "language_model"
    model.get_decoder = (lambda: model.model) if get_decoder == "backbone" else (lambda: model)
    assert model.base_model is model
    ids, mask, labels = batch(device)
    ref, _ = published(model, ids, mask, labels)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)
    # the bypass guard sits on that backbone: going around the patched forward raises
    patched, model.forward = model.forward, lambda *args, **kwargs: None
    with pytest.raises(RuntimeError, match="TOFUSFTTrainer"):
        model.model(input_ids=ids)
    with torch.no_grad():  # not a training forward: features, probes
        model.model(input_ids=ids)
    model.eval().model(input_ids=ids)
    model.train()
    model.forward = patched
    revert_tofu_kernel(model)
    assert not model.model._forward_pre_hooks
    model.model(input_ids=ids)


@pytest.mark.parametrize("where", ["lora_on_lm_head", "modules_to_save", "trainable_tokens_tied"])
def test_peft_heads(where, device):
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", device, tie_word_embeddings=where == "trainable_tokens_tied")
    if where == "lora_on_lm_head":
        # init_lora_weights=False: B != 0, so the adapter changes the logits from the first step.
        cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    elif where == "modules_to_save":
        cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    else:  # new tokens' rows trained, in the embeddings and (tied) in the head
        tokens = {"embed_tokens": [5, 6, 7]}
        cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=tokens)
    model = peft.get_peft_model(model, cfg)
    if where == "trainable_tokens_tied":
        with torch.no_grad():  # trained rows that differ from the originals
            for p in model.parameters():
                if p.requires_grad and p.shape[0] == 3:
                    p.add_(torch.randn_like(p))
    ids, mask, labels = batch(device)
    ids[:, 2] = 6  # an input and a target that are trainable tokens
    labels[0, 4] = 7
    ref, _ = published(model, ids, mask, labels)
    ref.backward()
    ref_grads = grads(model)
    trained = "trainable_tokens_delta" if where == "trainable_tokens_tied" else "lm_head"
    assert any("lora_B" in n for n in ref_grads) and trained in "".join(ref_grads)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    assert is_tofu_patched(model) and is_tofu_patched(model.get_base_model())
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=0)
    out.loss.backward()
    assert_grads_close(grads(model), ref_grads)
    with model.disable_adapter():
        base, _ = published(model, ids, mask, labels)
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask, labels=labels).loss, base, rtol=1e-5, atol=0
        )


def assert_bf16_grads_close(got: dict, ref: dict) -> None:
    """bf16 gradients that went through different roundings: same dtype, same direction."""
    for name, g in got.items():
        cos = nn.functional.cosine_similarity(g.flatten().float(), ref[name].flatten().float(), 0)
        assert g.dtype == torch.bfloat16 and cos > 0.98, name


def test_bf16_model(device):
    model = tiny_model("gemma2", device, dtype=torch.bfloat16)
    ids, mask, labels = batch(device)
    ref, _ = published(model, ids, mask, labels)
    ref.backward()
    ref_grads = grads(model)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.loss.dtype == torch.float32
    # Both read bf16 logits; softcap rounds once here and three times in the model's own code.
    torch.testing.assert_close(out.loss, ref.detach(), rtol=2e-2, atol=0)
    out.loss.backward()
    assert_bf16_grads_close(grads(model), ref_grads)


def test_accum_dtype_option(device, monkeypatch):
    """accum_dtype reaches the fused loss: None on a bf16 model with vocab_chunked runs its
    backward over token slabs (5 rows here); a bad value raises when applied."""
    from tofu_kernels import vocab_chunked

    monkeypatch.setattr(vocab_chunked, "LEAN_SLAB_ROWS", 5)
    slabs = returns_of(monkeypatch, vocab_chunked, "lean_slab_rows")
    model = tiny_model("gemma2", device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="accum_dtype"):
        apply_tofu_kernel(model, accum_dtype=torch.int32)
    ids, mask, labels = batch(device)
    ref, _ = published(model, ids, mask, labels)
    ref.backward()
    ref_grads = grads(model)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA, impl="vocab_chunked", accum_dtype=None)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=2e-2, atol=0)
    out.loss.backward()
    assert slabs == [5]
    assert_bf16_grads_close(grads(model), ref_grads)


class _ScaledConfig(transformers.LlamaConfig):
    model_type = "tofu_test_scaled"


class ScaledForCausalLM(transformers.LlamaForCausalLM):
    """Doubles its logits after lm_head: an architecture the registry does not know."""

    config_class = _ScaledConfig

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = 2.0 * self.lm_head(hidden)
        loss = None if labels is None else self.loss_function(logits, labels, VOCAB)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_unsupported_models_raise(device):
    config = transformers.LlamaConfig(**COMMON)
    for model in (
        transformers.LlamaForSequenceClassification(config),
        transformers.LlamaModel(config),
        nn.Linear(4, 4),
    ):
        with pytest.raises(UnsupportedModelError):
            apply_tofu_kernel(model)
        assert "forward" not in vars(model)
    # a *ForCausalLM whose own loss does not shift labels (Bart's decoder): the patch would
    # train each position on the token two ahead. bf16 at the default init: the shifted and
    # unshifted losses are close there, so the check must not compare them
    bart = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, decoder_layers=1, encoder_layers=1, decoder_ffn_dim=64,
        encoder_ffn_dim=64, decoder_attention_heads=2, encoder_attention_heads=2,
    )  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        model = transformers.BartForCausalLM(bart).to(device, dtype)
        with pytest.raises(UnsupportedModelError, match="does not shift labels"):
            apply_tofu_kernel(model)
        assert not is_tofu_patched(model) and "forward" not in vars(model)

    model = ScaledForCausalLM(_ScaledConfig(**COMMON)).to(device)
    with pytest.raises(UnsupportedModelError, match="register_head_spec"):
        apply_tofu_kernel(model)
    assert not is_tofu_patched(model) and "forward" not in vars(model)

    register_head_spec("tofu_test_scaled", HeadSpec(scale=lambda m: 2.0))
    try:
        ids, mask, labels = batch(device)
        ref, _ = published(model, ids, mask, labels)
        apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)
    finally:
        HEAD_SPECS.pop("tofu_test_scaled")


class ZLossForCausalLM(transformers.LlamaForCausalLM):
    """Adds a z-loss (Bamba's z_loss_coefficient) to the causal LM cross-entropy."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if labels is not None:
            out.loss = out.loss + 1e-2 * out.logits.logsumexp(-1).pow(2).mean()
        return out


class UnshiftedForCausalLM(transformers.LlamaForCausalLM):
    """Labels as targets of their own positions (XLM's loss), with a head that predicts each
    input token at once: its loss with one label underflows to 0, as a shifted-out label's."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask)
        if labels is not None:
            out.loss = nn.functional.cross_entropy(
                out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100
            )
        return out


class NeedsImagesForCausalLM(transformers.LlamaForCausalLM):
    """A forward that fails without inputs the check does not give (GIT's pixel_values)."""

    def forward(self, input_ids=None, pixel_values=None, labels=None, **kwargs):
        if pixel_values is None:
            raise ValueError("pixel_values are required")
        return super().forward(input_ids=input_ids, labels=labels, **kwargs)


def test_models_whose_own_loss_differs_raise(device):
    """The check compares the model's own loss with the causal LM cross-entropy of its logits:
    a term of its own, or labels it does not shift, refuse the patch; so does a check forward
    that fails or cannot run (meta device): verify=False then patches it unchecked."""
    with torch.device("meta"):  # no forward to check: verify=False patches it
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    with pytest.raises(UnsupportedModelError, match="meta device"):
        apply_tofu_kernel(model)
    assert is_tofu_patched(apply_tofu_kernel(model, verify=False))
    model = ZLossForCausalLM(transformers.LlamaConfig(**COMMON)).to(device)
    with pytest.raises(UnsupportedModelError, match="adds a term of its own"):
        apply_tofu_kernel(model)
    model = UnshiftedForCausalLM(transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 0}))
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight * 100)
    with pytest.raises(UnsupportedModelError, match="does not shift labels"):
        apply_tofu_kernel(model.to(device))
    model = NeedsImagesForCausalLM(transformers.LlamaConfig(**COMMON)).to(device)
    with pytest.raises(UnsupportedModelError, match="verify=False") as raised:
        apply_tofu_kernel(model)
    assert isinstance(raised.value.__cause__, ValueError)
    assert not is_tofu_patched(model) and "forward" not in vars(model)
    ids, mask, labels = batch(device)
    pixels = torch.zeros(1, device=device)
    ref, _ = published(model, ids, mask, labels, pixel_values=pixels)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA, verify=False)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels).loss
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)


class HalfLossForCausalLM(transformers.LlamaForCausalLM):
    """Returns its causal LM loss rounded to the logits' dtype (remote code often does)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if labels is not None:
            out.loss = out.loss.to(out.logits.dtype)
        return out


def test_check_accepts_what_trains_right(device):
    """The check refused models that train right: a trained LoRA adapter on lm_head in train mode
    (its dropout ran while the check read the head), an fp32 model under bf16 autocast (bf16
    logits checked at fp32 precision), bf16 logit heads with fp32 outputs, a loss in bf16."""
    peft = pytest.importorskip("peft")
    ids, mask, labels = batch(device)
    cfg = peft.LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.5,
                          init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(tiny_model("llama", device), cfg).train()
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    assert all(m.training for m in model.modules())  # as it was
    model.eval()
    ref, _ = published(model, ids, mask, labels)
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=mask, labels=labels).loss, ref, rtol=1e-5, atol=0
    )
    model = tiny_model("llama", device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        apply_tofu_kernel(model, gamma=GAMMA, beta=BETA)
    for arch in ("dory", "ergo"):
        apply_tofu_kernel(tiny_model(arch, device, dtype=torch.bfloat16))
    model = HalfLossForCausalLM(transformers.LlamaConfig(**COMMON)).to(device, torch.bfloat16)
    apply_tofu_kernel(model)


def test_tofu_loss_func(device):
    model = tiny_model("llama", device)
    ids, mask, labels = batch(device)
    loss_func = tofu_loss_func(gamma=GAMMA, beta=BETA)
    outputs = model(input_ids=ids, attention_mask=mask)
    for n in (None, 29):
        ref = tofu_loss_published(
            outputs.logits, shift_labels(labels), GAMMA, BETA, -100, "mean", n
        )
        got = loss_func(outputs, labels, num_items_in_batch=n)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    apply_tofu_kernel(model)
    with pytest.raises(ValueError, match="no logits"):
        loss_func(model(input_ids=ids, labels=labels), labels)


def test_deepcopy_and_pickle(device):
    """Copies train with TOFU too. A pickled one (torch.save(model)) came back saying it was
    patched but trained with cross-entropy: its forward was saved as a lookup by name."""
    model = apply_tofu_kernel(tiny_model("llama", device), impl="torch")
    ids, mask, labels = batch(device)
    loss = model(input_ids=ids, labels=labels).loss
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        out = clone(input_ids=ids, labels=labels)
        assert out.logits is None and torch.equal(out.loss, loss)
        revert_tofu_kernel(clone)
        assert is_tofu_patched(model) and not is_tofu_patched(clone)
    assert model(input_ids=ids, labels=labels).logits is None


def test_shallow_copy(device):
    """copy.copy(model) shares its submodules, parameters and hook dicts (torch's shallow copy),
    and so the patch: reverting the copy reverts the original. Patching the original again then
    restored its forward but not the backbone's bypass guard, which the revert had removed."""
    model = apply_tofu_kernel(tiny_model("llama", device), impl="torch")
    ids, mask, labels = batch(device)
    clone = copy.copy(model)
    assert clone(input_ids=ids, labels=labels).logits is None
    revert_tofu_kernel(clone)
    assert not is_tofu_patched(model) and not is_tofu_patched(clone)
    apply_tofu_kernel(model, impl="torch")
    assert model(input_ids=ids, labels=labels).logits is None
    model.forward = lambda **kwargs: model.model(input_ids=kwargs["input_ids"])  # a bypass
    with pytest.raises(RuntimeError, match="TOFUSFTTrainer"):
        model(input_ids=ids, labels=labels)


def test_top_level_exports():
    for name in ("apply_tofu_kernel", "revert_tofu_kernel", "tofu_loss_func"):
        assert getattr(tofu_kernels, name) is getattr(tofu_kernels.hf, name)


def test_training_lowers_loss(device):
    torch.manual_seed(0)
    model = apply_tofu_kernel(tiny_model("llama", device, initializer_range=0.02), impl="torch")
    ids, mask, labels = batch(device, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("impl", ["chunked", "vocab_chunked", "fused"])
def test_kernel_impls_match_published(impl, device):
    """Each Triton impl of the fused loss behind the patch (gemma2: softcap in the kernel too)."""
    model = tiny_model("gemma2", device)
    ids, mask, labels = batch(device)
    ref, _ = published(model, ids, mask, labels)
    ref.backward()
    ref_grads = grads(model)
    apply_tofu_kernel(model, gamma=GAMMA, beta=BETA, impl=impl)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=0)
    out.loss.backward()
    assert_grads_close(grads(model), ref_grads)
