"""Hugging Face integration: one call makes a causal LM train with the fused TOFU loss.

::

    from tofu_kernels import apply_tofu_kernel

    apply_tofu_kernel(model, gamma=3.0, beta=0.8)   # a loaded *ForCausalLM (or its PEFT wrapper)
    model.train()                                   # from_pretrained returns it in eval mode
    loss = model(input_ids=ids, labels=ids).loss    # TOFU from the final hidden states, no logits

How it works (one generic mechanism, no copied forward per model): the instance's ``forward`` is
wrapped. A training forward (``model.training`` and autograd on) with ``labels`` runs the model's
*own* forward with ``labels=None`` while ``lm_head.forward`` is swapped, for that call only, for a
function that computes :func:`~tofu_kernels.fused_linear_tofu_loss` from lm_head's input (the
final hidden states, already cut by ``logits_to_keep``) and returns a zero-width placeholder
instead of the logits. The model's forward thus keeps all of its argument handling, whatever the
transformers version, and ``lm_head`` is still entered through its own ``__call__``: module hooks
(FSDP2's parameter all-gather, accelerate's device hooks) fire around the fused loss. The
placeholder is computed from the loss and the returned loss is joined to it (``+ 0``), so hooks
on lm_head's output also run before the loss's backward: FSDP2 gathers the weight again there,
which ``impl="fused"`` reads in backward. What a model does to lm_head's output
before its loss (Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
``logits_scaling``) is applied inside the kernel, from a small registry (:data:`HEAD_SPECS`);
:func:`apply_tofu_kernel` checks it, and that the model's own loss is the causal LM cross-entropy
of its logits, on two 4-token evaluation forwards, so an architecture that does something else
(labels it does not shift, a loss term of its own) raises :class:`UnsupportedModelError` instead
of training on a wrong loss.

Forwards without labels, and evaluation forwards with labels (``model.eval()`` or
``torch.no_grad()``; ``generate``), run unchanged and return the same logits; with labels, their
loss is TOFU on those logits (through the logits kernel, differentiable). Losses follow
transformers' ``ForCausalLMLoss``: labels shifted left by one (or a ``shift_labels`` kwarg used as
given), ``ignore_index``, and the mean over valid tokens or over the ``num_items_in_batch`` that
``Trainer`` passes under gradient accumulation; a MoE model's ``router_aux_loss_coef * aux_loss``
is added as its own forward would (:class:`TOFUSFTTrainer` adds it as TRL does instead).

With ``Trainer``, leave ``label_smoothing_factor`` and ``compute_loss_func`` unset: both make
``Trainer`` compute its own loss from logits. TRL's ``SFTTrainer`` (>= 1.0) computes its own loss
too; use :class:`TOFUSFTTrainer` (a thin subclass), and a patched model refuses to be bypassed.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tofu_kernels.linear_tofu import RECOMPUTE_IMPLS, fused_linear_tofu_loss
from tofu_kernels.tofu import tofu_loss
from tofu_kernels.utils import KERNEL_DTYPES, TOFUParams, TOFUStats, check_accum_dtype

__all__ = [
    "HEAD_SPECS",
    "HeadSpec",
    "UnsupportedModelError",
    "apply_tofu_kernel",
    "get_tofu_stats",
    "is_tofu_patched",
    "register_head_spec",
    "revert_tofu_kernel",
    "shift_labels",
    "tofu_loss_func",
    "use_tofu_kernel",
]

_STATE = "_tofu_state"
# what apply_tofu_kernel sets on the state (softcap and scale: read from the model)
_OPTIONS = ("gamma", "beta", "ignore_index", "impl", "chunk_size", "accum_dtype", "return_logits",
            "softcap", "scale", "spec")  # fmt: skip
# impl option -> (impl of fused_linear_tofu_loss in training, impl of tofu_loss on eval logits)
_IMPLS = {
    "auto": ("auto", "auto"),
    "triton": ("chunked", "triton"),
    "chunked": ("chunked", "triton"),
    "vocab_chunked": ("vocab_chunked", "triton"),
    "fused": ("fused", "triton"),
    "torch": ("torch", "torch"),
}
_MISSING = object()


class UnsupportedModelError(NotImplementedError):
    """The model cannot be trained with the fused TOFU loss as it is (nothing was patched)."""


# ---------------------------------------------------------------------------------------------
# Registry: what an architecture does to lm_head's output before its loss
# ---------------------------------------------------------------------------------------------


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _config_softcap(model: nn.Module) -> float | None:
    return getattr(_text_config(model), "final_logit_softcapping", None) or None


def _no_scale(model: nn.Module) -> float | None:
    return None


@dataclass(frozen=True)
class HeadSpec:
    """How an architecture turns ``z = lm_head(hidden)`` into the logits of its loss.

    The logits are ``softcap * tanh(scale * z / softcap)`` (no tanh when ``softcap`` is None, no
    factor when ``scale`` is None); both are read from the loaded model when it is patched.
    """

    scale: Callable[[nn.Module], float | None] = _no_scale
    softcap: Callable[[nn.Module], float | None] = _config_softcap


def _cohere_scale(model: nn.Module) -> float | None:
    scale = getattr(model, "logit_scale", None)
    if scale is None:  # the model reads it from its config (None: no scaling)
        scale = getattr(_text_config(model), "logit_scale", None)
    return None if scale is None else float(scale)


def _recurrent_gemma_softcap(model: nn.Module) -> float | None:
    return getattr(_text_config(model), "logits_soft_cap", None) or None


def _xlstm_softcap(model: nn.Module) -> float | None:
    return getattr(_text_config(model), "output_logit_soft_cap", None) or None


def _granite_scale(model: nn.Module) -> float:
    return 1.0 / float(_text_config(model).logits_scaling)


def _hyperclovax_scale(model: nn.Module) -> float:  # muP as Granite's, multiplied
    return float(_text_config(model).logits_scaling)


def _falcon_h1_scale(model: nn.Module) -> float:
    return float(_text_config(model).lm_head_multiplier)


#: ``config.model_type`` -> :class:`HeadSpec`. Architectures not listed get the default spec
#: (``final_logit_softcapping`` when the config has it, which covers Gemma 2 and 3), and every
#: spec is checked against the model's own logits by :func:`apply_tofu_kernel`.
HEAD_SPECS: dict[str, HeadSpec] = {
    **dict.fromkeys(
        ("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text"),
        HeadSpec(scale=_cohere_scale),
    ),
    **dict.fromkeys(
        (
            "granite",
            "granite_swa",
            "granitemoe",
            "granitemoe_swa",
            "granitemoeshared",
            "granitemoehybrid",
        ),
        HeadSpec(scale=_granite_scale),
    ),
    **dict.fromkeys(("hyperclovax", "hyperclovax_vision_v2"), HeadSpec(scale=_hyperclovax_scale)),
    "falcon_h1": HeadSpec(scale=_falcon_h1_scale),
    "recurrent_gemma": HeadSpec(softcap=_recurrent_gemma_softcap),
    "xlstm": HeadSpec(softcap=_xlstm_softcap),
}


def register_head_spec(model_type: str, spec: HeadSpec) -> None:
    """Teach :func:`apply_tofu_kernel` an architecture's logit transform (``config.model_type``)."""
    if not isinstance(spec, HeadSpec):
        raise TypeError(f"spec must be a HeadSpec, got {type(spec).__name__}")
    HEAD_SPECS[model_type] = spec


# ---------------------------------------------------------------------------------------------
# Labels and the LM head's operands
# ---------------------------------------------------------------------------------------------


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Hugging Face's causal shift: position ``t`` predicts ``labels[..., t + 1]``.

    Same shape as ``labels``; the last position gets ``ignore_index``.
    """
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    # A DTensor (a sharded or tensor-parallel head) is gathered, differentiably.
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _lora_operands(
    head: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PEFT ``lora.Linear``: ``x W^T + b + sum_a s_a (drop_a(x) A_a^T) B_a^T`` as one linear map.

    The low-rank inputs are appended to the hidden states and the ``B`` matrices to the weight, so
    the fused kernel sees ``[x, u_1, ...] @ [W, B_1, ...]^T``: exact, and gradients reach ``A``,
    ``B`` and ``x`` through the concatenations (at the cost of one ``(V, H + r)`` weight copy).
    """
    base = head.base_layer
    if not _is_plain_linear(base):
        raise UnsupportedModelError(
            f"lm_head is a LoRA layer over {type(base).__name__}; the fused TOFU loss needs an "
            "nn.Linear base layer (quantized heads are not supported)"
        )
    weight, bias = _full(base.weight), _full(base.bias)
    if head.disable_adapters or head.merged:
        if head.disable_adapters and head.merged:
            head.unmerge()  # as PEFT's own forward does
        return x, weight, bias
    xs, ws = [x], [weight]
    variants = getattr(head, "lora_variant", {})
    use_dora = getattr(head, "use_dora", {})
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in variants or use_dora.get(name, False):
            raise UnsupportedModelError(
                f"lm_head's LoRA adapter {name!r} is a variant (DoRA or similar); the fused TOFU "
                "loss supports plain LoRA on lm_head only"
            )
        lora_a, lora_b = head.lora_A[name], head.lora_B[name]
        s = head.scaling[name]
        u = lora_a(head.lora_dropout[name](x.to(lora_a.weight.dtype))) * s
        xs.append(u.to(x.dtype))
        ws.append(_full(lora_b.weight).to(weight.dtype))
        if lora_b.bias is not None:
            extra = _full(lora_b.bias).to(weight.dtype) * s
            bias = extra if bias is None else bias + extra
    if len(xs) == 1:
        return x, weight, bias
    return torch.cat(xs, dim=-1), torch.cat(ws, dim=1), bias


def _fp32_output_operands(
    head: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    # Ergo's lm_head: both operands in one dtype (the weight's, or the input's), their product
    # accumulated and returned in fp32, as the kernels compute it; never a bias
    weight = _full(head.weight)
    if head.cast_input_to_weight_dtype:
        return x.to(weight.dtype), weight, None
    return x, weight.to(x.dtype), None


def _row_scaled_operands(
    head: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    # Dory's lm_head: a learned scale per vocabulary entry on its logits, folded into the
    # weight's rows (a (V, H) copy, as for LoRA); in bf16/fp16 one rounding more than its own
    weight = _full(head.weight)
    scale = _full(head.logit_scale).float() * head.logit_scale_factor
    return x, weight * scale.to(weight.dtype)[:, None], None


#: ``nn.Linear`` subclasses (by class name) with a forward of their own that is still a linear
#: map of lm_head's input, and how to read its operands
_LINEAR_HEADS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {
    "ErgoLinearWithFP32Output": _fp32_output_operands,
    "DoryLMHead": _row_scaled_operands,
}


def _head_operands(
    head: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(hidden, weight, bias)`` with ``head(x) == hidden @ weight.T + bias``."""
    head = _uncompiled(head)  # a compiled head (accelerate's compile_regions)
    if hasattr(head, "token_adapter"):
        # PEFT's trainable tokens on a head tied to the embeddings: rows of the weight replaced
        # by trained ones, differentiably (index_copy), then F.linear without bias, as PEFT does.
        layer = head.token_adapter
        active = list(layer.active_adapters)
        if layer.disable_adapters or not active or layer.merged:
            if layer.merged and (layer.disable_adapters or not active):
                layer.unmerge()  # as PEFT's own forward does
            return _head_operands(layer.base_layer, x)
        if not _is_plain_linear(layer.base_layer):
            raise UnsupportedModelError(
                f"lm_head's trainable tokens wrap a {type(layer.base_layer).__name__}; the fused "
                "TOFU loss needs an nn.Linear"
            )
        return x, _full(layer.get_merged_weights(active)), None
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        # PEFT's modules_to_save: the trained copy of the active adapter, else the original.
        active = list(head.active_adapters)
        if head.disable_adapters or not active or active[0] not in head.modules_to_save:
            return _head_operands(head.original_module, x)
        return _head_operands(head.modules_to_save[active[0]], x)
    if hasattr(head, "base_layer"):
        if hasattr(head, "lora_A") and hasattr(head, "lora_B"):
            return _lora_operands(head, x)
        raise UnsupportedModelError(
            f"lm_head is a {type(head).__name__} (a PEFT tuner other than LoRA); the fused TOFU "
            "loss supports nn.Linear, LoRA and modules_to_save heads"
        )
    if isinstance(head, nn.Linear) and type(head).__name__ in _LINEAR_HEADS:
        return _LINEAR_HEADS[type(head).__name__](head, x)
    if not _is_plain_linear(head):
        raise UnsupportedModelError(
            f"lm_head is a {type(head).__name__}; the fused TOFU loss needs an nn.Linear head "
            "(or PEFT LoRA / modules_to_save around one)"
        )
    return x, _full(head.weight), _full(head.bias)


@contextmanager
def _swapped_forward(module: nn.Module, fn: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Replace ``module``'s forward for one call; yields the forward it replaced.

    accelerate's hooks live in an instance ``forward`` that calls ``module._old_forward``: the
    inner one is swapped then, so the hooks (device moves, offloaded weights) still run.
    """
    hooked = hasattr(module, "_hf_hook") and "_old_forward" in vars(module)
    attr = "_old_forward" if hooked else "forward"
    previous = vars(module).get(attr, _MISSING)
    replaced = getattr(module, attr)
    _set_instance_attr(module, attr, fn)
    try:
        yield replaced
    finally:
        _set_instance_attr(module, attr, previous)


@torch.compiler.disable  # eager under torch.compile: dynamo would replay it out of order
def _set_instance_attr(module: nn.Module, attr: str, value: Any) -> None:
    """``module.attr = value``, or no instance attribute where ``value`` is ``_MISSING``."""
    if value is _MISSING:
        delattr(module, attr)
    else:
        setattr(module, attr, value)


# ---------------------------------------------------------------------------------------------
# The patch
# ---------------------------------------------------------------------------------------------


class _TOFUState:
    """Per-model options and bookkeeping; lives on the model (``deepcopy`` copies it along)."""

    def __init__(self, **options: Any) -> None:
        self.gamma: float = options["gamma"]
        self.beta: float = options["beta"]
        self.ignore_index: int = options["ignore_index"]
        self.impl: str = options["impl"]
        self.chunk_size: int | None = options["chunk_size"]
        self.accum_dtype: torch.dtype | None = options["accum_dtype"]
        self.return_logits: bool = options["return_logits"]
        # as checked at patch time; training reads the spec's values afresh (a config may change)
        self.softcap: float | None = options["softcap"]
        self.scale: float | None = options["scale"]
        self.spec: HeadSpec = options["spec"]
        self.head_hooks: tuple[int, frozenset] = (0, frozenset())  # (id(lm_head), hooks) checked
        self.previous: Any = None  # the instance ``forward`` that was there, if any
        self.patched: Any = None  # the _PatchedForward we installed
        self.signature: inspect.Signature | None = None
        self.active = True
        self.add_aux = True  # the MoE router loss joins the loss (TOFUSFTTrainer adds its own)
        self.depth = 0  # > 0 while our forward runs (the bypass guard's signal)
        self.stats: TOFUStats | None = None


def _is_fsdp_unit(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return isinstance(module, FSDPModule)


class _FusedHead:
    """Stands in for lm_head's forward during one training forward: the loss, not the logits."""

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        state: _TOFUState,
        labels: torch.Tensor,
        num_items_in_batch: Any,
    ) -> None:
        self.head, self.state, self.labels = head, state, labels
        self.num_items_in_batch = num_items_in_batch
        # the values the model's own forward reads now, in the form the patch checked
        self.softcap, self.scale = state.spec.softcap(model), state.spec.scale(model)
        self.calls = 0
        self.loss: torch.Tensor | None = None
        self.anchor: torch.Tensor | None = None
        self.stats: TOFUStats | None = None
        self.real_forward: Callable[..., torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1 or args or kwargs:
            raise UnsupportedModelError(
                "this model calls lm_head more than once, or with extra arguments, in one forward; "
                "the fused TOFU loss supports one lm_head(hidden_states) call per forward"
            )
        st = self.state
        if _unchecked_hooks(self.head, st):
            warnings.warn(_HOOKS_MESSAGE, stacklevel=2)
        if _unchecked_backward_hooks(self.head, st):
            warnings.warn(_BACKWARD_HOOKS_MESSAGE, stacklevel=2)
        hidden, weight, bias = _head_operands(self.head, x)
        n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        labels = self.labels.to(x.device)
        if labels.numel() != n_rows:
            raise ValueError(
                f"labels give {labels.numel()} targets for {n_rows} positions of hidden states "
                f"(shape {tuple(x.shape[:-1])} after logits_to_keep)"
            )
        if self.scale is not None:
            # softcap(s * (h W^T + b)) == softcap((s h) W^T + s b): the scale folds into hidden.
            hidden = hidden * self.scale
            bias = None if bias is None else bias * self.scale
        impl = _IMPLS[st.impl][0]
        if st.return_logits and _is_fsdp_unit(self.head):
            if impl in RECOMPUTE_IMPLS:
                raise ValueError(
                    f"impl={st.impl!r} with return_logits=True cannot run with lm_head as its "
                    "own FSDP2 unit: its backward reads the weight, and the detached logits "
                    "give FSDP2 no hook to gather it again; use impl='chunked' or no logits"
                )
            if impl == "auto" and hidden.is_cuda and hidden.dtype in KERNEL_DTYPES:
                impl = "chunked"  # what auto measured fastest may be a recompute impl
        self.loss, self.stats = fused_linear_tofu_loss(
            hidden,
            weight,
            labels.reshape(hidden.shape[:-1]),
            bias=bias,
            gamma=st.gamma,
            beta=st.beta,
            ignore_index=st.ignore_index,
            num_items_in_batch=self.num_items_in_batch,
            softcap=self.softcap,
            chunk_size=st.chunk_size,
            accum_dtype=st.accum_dtype,
            impl=impl,
            return_stats=True,
        )
        if st.return_logits:
            with torch.no_grad():
                return self.real_forward(x)
        # An empty "logits" tensor (the model's own softcap or scaling runs on it for free),
        # computed from the loss; the model's loss is then joined to it. Hooks on lm_head's
        # output, such as FSDP2's re-gather of the weight, so run before the loss's backward
        # (which reads the weight again with impl="fused" or "vocab_chunked").
        self.anchor = x.new_zeros((*x.shape[:-1], 0)) * self.loss.to(x.dtype)
        return self.anchor


_HOOKS_MESSAGE = (
    "lm_head has forward hooks that apply_tofu_kernel has not checked: the fused TOFU loss is "
    "computed from lm_head's input, so a hook that changes the logits does not change it (nor do "
    "lm_head's backward hooks run); apply_tofu_kernel again, with the same options, checks them"
)


_BACKWARD_HOOKS_MESSAGE = (
    "lm_head has backward hooks (register_full_backward_hook or register_full_backward_pre_hook; "
    "register_backward_hook): a patched model's training forward never makes the logits whose "
    "gradient they are given, so they do not run (register_backward_hook's see an empty "
    "placeholder's); revert_tofu_kernel(model) to train with them"
)


def _backward_hooks(head: nn.Module) -> frozenset:
    return frozenset(head._backward_hooks) | frozenset(head._backward_pre_hooks)


def _check_head_hooks(head: nn.Module, state: _TOFUState) -> None:
    """Record lm_head's hooks as checked; its backward hooks, which never run, get a warning."""
    backward = _backward_hooks(head)
    if backward:
        warnings.warn(_BACKWARD_HOOKS_MESSAGE, stacklevel=3)
    state.head_hooks = (id(head), frozenset(head._forward_hooks) | backward)


def _unchecked_hooks(head: nn.Module, state: _TOFUState) -> bool:
    """Forward hooks on lm_head added since the patch checked it, other than torch.distributed's
    (FSDP2) and accelerate's, which move parameters and leave the logits alone."""
    head_id, checked = state.head_hooks
    for key, hook in head._forward_hooks.items():
        if head_id == id(head) and key in checked:
            continue
        fn = getattr(hook, "func", hook)  # a functools.partial
        owner = type(fn.__self__) if hasattr(fn, "__self__") else fn
        if not (getattr(owner, "__module__", None) or "").startswith(
            ("torch.distributed", "accelerate")
        ):
            return True
    return False


def _unchecked_backward_hooks(head: nn.Module, state: _TOFUState) -> bool:
    """Backward hooks on lm_head added since the patch checked (and warned about) its hooks."""
    head_id, checked = state.head_hooks
    backward = _backward_hooks(head)
    return bool(backward) and (head_id != id(head) or bool(backward - checked))


def _aux_loss(model: nn.Module, out: Mapping[str, Any], loss: torch.Tensor) -> torch.Tensor:
    """Add a MoE model's weighted router loss, as its forward does when given labels."""
    aux = out.get("aux_loss")
    if aux is None:
        return loss
    owners, names = (model, _text_config(model)), ("router_aux_loss_coef", "aux_loss_coef")
    coef = next(  # aux_loss_coef: JetMoe's
        (c for o in owners for a in names if (c := getattr(o, a, None)) is not None), None
    )
    if coef is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} returns aux_loss but has no router_aux_loss_coef (nor "
            "aux_loss_coef)"
        )
    return loss + coef * aux.to(loss.device)


def _tofu_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The patched ``forward`` (module-level, so a deep-copied model keeps working)."""
    state: _TOFUState | None = vars(self).get(_STATE)
    original = _original_forward(self, state)
    if state is None or not state.active:
        return original(*args, **kwargs)
    if kwargs.get("fused_lm_head"):
        raise RuntimeError(_TRL_MESSAGE)
    bound = state.signature.bind(self, *args, **kwargs)
    labels = bound.arguments.get("labels")
    state.depth += 1
    try:
        if labels is None:
            if self.training and torch.is_grad_enabled():
                warnings.warn(_NO_LABELS_MESSAGE, stacklevel=5)  # the caller of model(...)
            return original(*args, **kwargs)
        return _forward_with_labels(self, state, original, bound, labels)
    finally:
        state.depth -= 1


_NO_LABELS_MESSAGE = (
    "a training forward of a model patched with tofu_kernels.apply_tofu_kernel got no labels: it "
    "returns logits, and whatever loss is computed from them is not TOFU (Trainer computes its "
    "own when label_smoothing_factor or compute_loss_func is set; leave both unset)"
)
_NUM_ITEMS_MESSAGE = (
    "apply_tofu_kernel(ignore_index={i}) got num_items_in_batch: transformers' Trainer counts the "
    "labels that are not -100 for it, so tokens labelled {i} count as targets and the mean "
    "comes out too small; under Trainer, label ignored tokens -100"
)


def _original_forward(model: nn.Module, state: _TOFUState | None) -> Callable[..., Any]:
    if state is not None and state.previous is not None:
        return state.previous
    return functools.partial(type(model).forward, model)  # dynamo traces a partial, not a method


def _forward_with_labels(
    model: nn.Module,
    state: _TOFUState,
    original: Callable[..., Any],
    bound: inspect.BoundArguments,
    labels: torch.Tensor,
) -> Any:
    var_kw = next(
        (p.name for p in state.signature.parameters.values() if p.kind == p.VAR_KEYWORD), None
    )
    extra = bound.arguments.get(var_kw, {}) if var_kw else {}
    extra = dict(extra)
    given_shift = extra.get("shift_labels")
    num_items = extra.get("num_items_in_batch")
    if num_items is not None and state.ignore_index != -100:
        warnings.warn(_NUM_ITEMS_MESSAGE.format(i=state.ignore_index), stacklevel=6)
    # return_dict: a parameter of its own (Bloom, Falcon, Mamba, ...) or one of the **kwargs
    explicit = "return_dict" in state.signature.parameters
    return_dict = bound.arguments.get("return_dict") if explicit else extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True) is not False
    if not return_dict or getattr(model.config, "return_dict", True) is False:
        # we need the fields by name; the tuple is made below
        if explicit:
            bound.arguments["return_dict"] = True
        else:
            extra["return_dict"] = True
    if var_kw:
        bound.arguments[var_kw] = extra
    bound.arguments["labels"] = None
    call_args, call_kwargs = bound.args[1:], bound.kwargs
    targets = given_shift if given_shift is not None else shift_labels(labels, state.ignore_index)

    if model.training and torch.is_grad_enabled():  # a training forward: no logits
        head = model.get_output_embeddings()
        fused = _FusedHead(model, head, state, targets, num_items)
        with _swapped_forward(head, fused) as real_forward:
            fused.real_forward = real_forward
            out = original(*call_args, **call_kwargs)
        if fused.calls != 1 or fused.loss is None:
            raise UnsupportedModelError(
                f"{type(model).__name__}'s forward did not call lm_head once (called "
                f"{fused.calls} times); the fused TOFU loss cannot be computed"
            )
        loss, stats = fused.loss, fused.stats
        if fused.anchor is not None:  # + 0: the backward passes through lm_head's output
            loss = loss + fused.anchor.sum()
        keep_logits = state.return_logits
    else:  # evaluation: the model's own logits, TOFU on them (differentiable if grad is on)
        out = original(*call_args, **call_kwargs)
        logits = out["logits"]
        # The model already applied its softcap / scale to these logits.
        loss, stats = tofu_loss(
            logits,
            targets.to(logits.device).reshape(logits.shape[:-1]),
            gamma=state.gamma,
            beta=state.beta,
            ignore_index=state.ignore_index,
            num_items_in_batch=num_items,
            impl=_IMPLS[state.impl][1],
            return_stats=True,
        )
        keep_logits = True
    if isinstance(out, tuple):
        raise UnsupportedModelError(
            f"{type(model).__name__}'s forward returned a tuple with return_dict=True"
        )
    state.stats = stats
    fields = {k: v for k, v in out.items() if keep_logits or k != "logits"}
    fields["loss"] = _aux_loss(model, out, loss) if getattr(state, "add_aux", True) else loss
    result = type(out)(**fields)
    if return_dict:
        return result
    if keep_logits or "logits" not in out:
        return result.to_tuple()
    # to_tuple drops None fields: the logits never made keep their slot (None), so the positions
    # are an unpatched model's (out[1] was the cache)
    slots = type(out)(**{**fields, "logits": out["logits"]}).keys()
    return tuple(None if k == "logits" else result[k] for k in slots)


_TRL_MESSAGE = (
    "the model is patched with tofu_kernels.apply_tofu_kernel, but something runs a training "
    "forward of its backbone outside the patched forward and computes its own loss from the LM "
    "head: TRL's SFTTrainer (>= 1.0) adds a fused cross-entropy head and takes its loss from "
    "per-token log-probabilities, so it would train with cross-entropy, not TOFU. Use "
    "tofu_kernels.hf.TOFUSFTTrainer instead of trl.SFTTrainer (same arguments). Trainers with "
    "losses of their own (DPO, KTO, GRPO, ...) need no patch: revert_tofu_kernel(model) first. (A "
    "backbone call on purpose, for features: under torch.no_grad() or in eval mode.)"
)


def _bypass_guard(state: _TOFUState, owner_forward: Callable[[], Any], module: nn.Module, args):
    """Backbone pre-hook: refuse a forward that goes around the patched ``forward``.

    Someone who replaced ``model.forward`` on top of ours and calls the backbone directly computes
    their own loss (TRL's fused cross-entropy head): silent cross-entropy, unless we raise here.
    Only a training forward (train mode, autograd on) can train on such a loss: others pass.
    """
    if not (state.active and state.depth == 0 and module.training and torch.is_grad_enabled()):
        return
    if owner_forward() is not state.patched:
        raise RuntimeError(_TRL_MESSAGE)


class _PatchedForward(functools.partial):
    """The instance ``forward`` that :func:`apply_tofu_kernel` installs: ``_tofu_forward`` with the
    model bound, as a module-level partial, not a bound closure. pickle saves a bound method as a
    lookup of its name on the model, which found the class's own forward on load (a copy that
    said it was patched, training with cross-entropy); a partial is saved and copied along with
    its model, and a copy that rebinds the partials in its ``__dict__`` (accelerate's
    ``compile_regions``) gets a forward bound to itself."""

    def __new__(cls, model: nn.Module) -> _PatchedForward:
        return super().__new__(cls, _tofu_forward, model)

    @property
    def model(self) -> nn.Module:
        return self.args[0]

    def __repr__(self) -> str:  # not the whole module tree
        return f"<forward of {type(self.model).__name__}, patched by tofu_kernels>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args and args[0] is self.model:  # rebound as a method (accelerate's unwrap_model)
            args = args[1:]
        return _tofu_forward(self.model, *args, **kwargs)

    # A bound method's two attributes: a copy of the model that rebinds its instance methods
    # by them (accelerate's compile_regions before it rebound partials) binds this forward to
    # itself, not to the original.
    @property
    def __self__(self) -> nn.Module:
        return self.model

    @property
    def __func__(self) -> Callable[..., Any]:
        return _tofu_forward

    @property
    def __code__(self) -> Any:
        """The class forward's, as ``__signature__``: torch.export (non-strict) reads it."""
        return type(self.model).forward.__code__

    @property
    def __signature__(self) -> inspect.Signature:
        """The class forward's, bound: Trainer and generate() inspect it (loss kwargs, columns)."""
        return inspect.signature(functools.partial(type(self.model).forward, self.model))


class _OwnerForward:
    """Reads the owner's instance ``forward`` (deep-copyable, unlike a lambda over the model)."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner

    def __call__(self) -> Any:
        return vars(self.owner).get("forward")


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module inside ``torch.compile(module)``. Not any ``_orig_mod``: accelerate's
    ``compile_regions`` returns a copy of the model (its blocks compiled) that keeps the original
    as ``_orig_mod``, and the copy is what runs."""
    compiled = getattr(getattr(torch, "_dynamo", None), "OptimizedModule", None)
    return module._orig_mod if compiled is not None and isinstance(module, compiled) else module


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``torch.compile`` or PEFT wrapper (or the model itself)."""
    model = _uncompiled(model)  # torch.compile(model): patch the model inside
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def _decoder(lm: nn.Module) -> nn.Module | None:
    """The backbone whose ``last_hidden_state`` feeds ``lm_head``: ``base_model``, else
    ``get_decoder()``, else ``lm.model``, where ``base_model_prefix`` names no attribute
    (transformers 4.x's Gemma-3 text model: prefix ``language_model``, backbone ``model``; the
    text models of Llama 4 and Mllama likewise); None if none is one."""
    base = getattr(lm, "base_model", None)
    if isinstance(base, nn.Module) and base is not lm:
        return base
    get_decoder = getattr(lm, "get_decoder", None)
    for decoder in (get_decoder() if callable(get_decoder) else None, getattr(lm, "model", None)):
        if isinstance(decoder, nn.Module) and decoder is not lm:
            return decoder
    return None


def _check_causal_lm(lm: nn.Module) -> nn.Module:
    name = type(lm).__name__
    config = getattr(lm, "config", None)
    if config is None or not callable(getattr(lm, "get_output_embeddings", None)):
        raise UnsupportedModelError(
            f"{name} is not a Hugging Face PreTrainedModel; apply_tofu_kernel patches a loaded "
            "*ForCausalLM (or its PEFT wrapper)"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; TOFU is patched into "
                                    "decoder-only causal LMs")  # fmt: skip
    head = lm.get_output_embeddings()
    if head is None or _decoder(lm) is None:
        raise UnsupportedModelError(
            f"{name} has no lm_head and decoder pair; apply_tofu_kernel needs a *ForCausalLM "
            "whose decoder returns last_hidden_state"
        )
    if not _shifts_labels(lm):
        raise UnsupportedModelError(
            f"{name} (loss_type={getattr(lm, 'loss_type', None)!r}) does not train with the causal "
            "LM loss; apply_tofu_kernel replaces ForCausalLMLoss only"
        )
    return head


def _shifts_labels(lm: nn.Module) -> bool:
    """True when the model's own loss is transformers' ForCausalLMLoss (as ``Trainer`` decides)."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers is how such a model was built
        return type(lm).__name__.endswith("ForCausalLM")
    # as the loss_function property resolves it: no or an unknown loss_type means ForCausalLM
    return getattr(lm, "loss_function", None) is ForCausalLMLoss


def _input_device(lm: nn.Module) -> torch.device:
    # the embeddings' (first of several: MusicGen's codebooks), else the first parameter's
    try:
        emb = lm.get_input_embeddings()
    except NotImplementedError:
        emb = None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor):
        weight = next(lm.parameters())
    return weight.device


@contextmanager
def _eval_mode(lm: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, LoRA's on lm_head included) without autograd; then as before."""
    modes = {m: m.training for m in lm.modules()}
    lm.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


# dtypes whose check tolerance is 1e-4 (others: a few of their own roundings)
_FULL_PRECISION = (torch.float32, torch.float64)


class _Probe(NamedTuple):
    z: torch.Tensor  # lm_head's output
    z_fused: torch.Tensor  # the same from the operands the fused loss reads, in fp32
    precise: bool  # the head's operands and output are all fp32 (or fp64)
    first: Mapping[str, Any]  # the model's output with one label, at position 0
    out: Mapping[str, Any]  # ... and with every token labelled
    ids: torch.Tensor


def _probe(lm: nn.Module, original: Callable[..., Any], n: int) -> _Probe:
    """The check's two forwards of ``n`` tokens (call it in :func:`_eval_mode`). The first tells
    unshifted labels apart even where both cross-entropies are alike (near-uniform predictions of
    a new model); the second compares the whole loss (an underflowed first loss, a term of its
    own)."""
    head = lm.get_output_embeddings()
    vocab = int(getattr(_text_config(lm), "vocab_size", 0) or 4)
    ids = (torch.arange(1, n + 1, device=_input_device(lm)) % vocab).unsqueeze(0)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = head.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out)))
    try:
        # one label, at position 0: the causal LM loss shifts it out (no target: NaN or 0),
        # a loss that does not shift trains position 0 on it (finite, > 0)
        labels = torch.full_like(ids, -100)
        labels[0, 0] = ids[0, 0]
        first = original(input_ids=ids, labels=labels, use_cache=False, return_dict=True)
        if len(seen) != 1:
            raise UnsupportedModelError(
                f"{type(lm).__name__} called lm_head {len(seen)} times in one forward; the "
                "fused TOFU loss needs exactly one lm_head(hidden_states) call"
            )
        out = original(input_ids=ids, labels=ids, use_cache=False, return_dict=True)
    finally:
        hook.remove()
    x, z = seen[0]
    # the hook saw lm_head's input before accelerate's hook moved it to lm_head's device
    hidden, weight, bias = _head_operands(head, x.to(z.device))
    with torch.autocast(z.device.type, enabled=False):  # as the kernels: no autocast
        z_fused = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    precise = all(t.dtype in _FULL_PRECISION for t in (hidden, weight, z))
    return _Probe(z, z_fused, precise, first, out, ids)


def _verify(lm: nn.Module, original: Callable[..., Any], state: _TOFUState) -> None:
    """Two short eval forwards: are the model's logits ``softcap(scale * lm_head(hidden))``, and
    is its own loss the causal LM cross-entropy of those logits (plus a MoE router loss)?

    Also resolves the head's operands, so an unsupported head fails here, not mid-training.
    """
    name = type(lm).__name__
    if any(p.is_meta for p in lm.parameters()):
        raise UnsupportedModelError(
            f"{name} has parameters on the meta device: the check cannot run a forward; load the "
            "weights first, or apply_tofu_kernel(..., verify=False) to patch it unchecked"
        )
    # xLSTM's kernels take whole chunks of tokens: a failed 4-token check is tried at one chunk
    chunk = getattr(_text_config(lm), "chunk_size", None)
    failures: list[Exception] = []
    with _eval_mode(lm):
        for n in (4, chunk) if type(chunk) is int and chunk > 4 else (4,):
            try:
                probe = _probe(lm, original, n)
                break
            except (UnsupportedModelError, torch.OutOfMemoryError):
                raise
            except Exception as error:  # any failure of the model's own forward
                failures.append(error)
        else:
            raise UnsupportedModelError(
                f"{name}'s check forward (input_ids and labels alone, 4 tokens) failed: "
                f"{type(failures[0]).__name__}: {failures[0]}. apply_tofu_kernel(..., "
                "verify=False) patches without the check, if the model's logits are "
                "softcap(scale * lm_head(hidden)) and its loss their causal LM cross-entropy"
            ) from failures[0]
    z, tol = probe.z.float(), 1e-4 if probe.precise else 3e-2
    if not _close(probe.z_fused, z, tol):
        raise UnsupportedModelError(
            f"lm_head ({type(lm.get_output_embeddings()).__name__}) does not compute "
            "hidden @ weight.T + bias as apply_tofu_kernel reads it; its fused loss would be wrong"
        )
    first_loss = probe.first.get("loss")
    if first_loss is not None and bool(torch.isfinite(first_loss) & (first_loss > 0)):
        raise UnsupportedModelError(_NO_SHIFT_MESSAGE.format(name=name))
    expected = z * (1.0 if state.scale is None else state.scale)
    if state.softcap is not None:
        expected = state.softcap * torch.tanh(expected / state.softcap)
    logits = probe.first["logits"].float()
    if logits.shape != expected.shape or not _close(logits, expected, tol):
        raise UnsupportedModelError(
            f"{name} (model_type={lm.config.model_type!r}) transforms lm_head's output in a way "
            f"the registry does not describe (scale={state.scale}, softcap={state.softcap}): its "
            "fused TOFU loss would be wrong. Describe it with "
            "tofu_kernels.hf.register_head_spec(model_type, HeadSpec(...))."
        )
    _verify_own_loss(lm, probe.out, probe.ids)


def _verify_own_loss(lm: nn.Module, out: Mapping[str, Any], ids: torch.Tensor) -> None:
    """The model's own loss with every token labelled: the causal LM cross-entropy of its logits
    (plus its router loss), or refused."""
    own = out.get("loss")
    if own is None:
        return
    # within a few roundings of the loss's own dtype (a bf16 loss: ~3%), 1e-4 in fp32
    tol = 1e-4 if own.dtype in _FULL_PRECISION else 4 * torch.finfo(own.dtype).eps
    logits = out["logits"].float()
    own = own.float().to(logits.device)
    rows, targets = logits.reshape(-1, logits.shape[-1]), ids.reshape(-1).to(logits.device)
    causal = _aux_loss(lm, out, F.cross_entropy(rows[:-1], targets[1:]))
    if _close(own, causal, tol):
        return
    name = type(lm).__name__
    if _close(own, _aux_loss(lm, out, F.cross_entropy(rows, targets)), tol):
        raise UnsupportedModelError(_NO_SHIFT_MESSAGE.format(name=name))
    raise UnsupportedModelError(
        f"{name}'s own loss ({float(own):.6g}) is not the causal LM cross-entropy of its logits "
        f"({float(causal):.6g}: the mean over tokens, with any router loss): it adds a term of "
        "its own (Bamba's z_loss_coefficient, say) or reduces otherwise, which its fused TOFU "
        "loss would not"
    )


# a *ForCausalLM whose own loss does not shift (Bart's, TrOCR's, Whisper's decoders, XLNet, XLM):
# TOFU of the shifted labels would train each position on the token two ahead
_NO_SHIFT_MESSAGE = (
    "{name}'s own loss does not shift labels (labels[t] is the target of position t), unlike "
    "transformers' causal LM loss, which apply_tofu_kernel follows; its fused TOFU loss would "
    "train on the wrong tokens"
)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    atol = tol * max(float(b.abs().max()) if b.numel() else 0.0, 1e-6)
    return bool(torch.allclose(a, b, rtol=tol, atol=atol))


def apply_tofu_kernel(
    model: nn.Module,
    *,
    gamma: float = 3.0,
    beta: float = 0.8,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = torch.float32,
    return_logits: bool = False,
    verify: bool = True,
) -> nn.Module:
    """Make a loaded Hugging Face causal LM train with the fused TOFU loss; returns ``model``.

    Patches this instance only (its class and other instances are untouched). Afterwards a training
    forward (``model.training`` and autograd enabled) with ``labels`` returns ``loss`` = TOFU of
    the shifted labels, computed by :func:`~tofu_kernels.fused_linear_tofu_loss` from the final
    hidden states, and ``logits=None`` (None in the logits' place of a ``return_dict=False``
    tuple, so the positions are an unpatched model's): the ``(tokens, vocabulary)`` logits never
    exist. Forwards without labels, in eval mode or under ``torch.no_grad()`` (evaluation,
    ``generate``) are unchanged and return the same logits; with labels their loss is TOFU on
    those logits. Applying again replaces the options.

    Args:
        model: a ``*ForCausalLM`` (any architecture with ``lm_head`` and a decoder returning
            ``last_hidden_state``) or a PEFT model around one. Tied embeddings, a frozen
            ``lm_head`` (its weight gradient is skipped), PEFT LoRA or ``modules_to_save`` on
            ``lm_head`` (and ``trainable_token_indices`` with tied embeddings), and bf16/fp16
            models are supported.
        gamma, beta, ignore_index: the TOFU options (see :func:`tofu_kernels.tofu_loss`).
        impl: ``"auto"`` (Triton on GPU, and on CPU under ``TRITON_INTERPRET=1``; PyTorch on
            CPU otherwise), ``"chunked"`` (alias ``"triton"``),
            ``"vocab_chunked"``, ``"fused"`` or ``"torch"``: the impl of the fused loss in
            training (see :func:`~tofu_kernels.fused_linear_tofu_loss`); eval logits use the
            logits kernel. All run under FSDP2 (``"vocab_chunked"`` and ``"fused"``, which read
            lm_head's weight again in backward, through the head's own output hooks; not with
            ``return_logits``).
        chunk_size: tokens (vocabulary columns for ``"vocab_chunked"``) per chunk of the fused
            loss (default: see ``fused_linear_tofu_loss``).
        accum_dtype: the fused loss's ``grad_weight`` accumulation: fp32, or None for the
            weight's dtype (less memory; with ``"vocab_chunked"``, its token slabs). See
            ``fused_linear_tofu_loss``.
        return_logits: also return detached logits from training forwards (costs their memory).
        verify: run two 4-token evaluation forwards to check that the model's logits are what
            the fused loss reads (``softcap(scale * lm_head(hidden))``) and its own loss the
            causal LM cross-entropy of them (plus a MoE router loss). Turn off only where the
            model cannot run such a forward (parameters on the meta device or partitioned by
            DeepSpeed ZeRO-3; a forward that needs inputs besides ``input_ids``).

    Raises:
        UnsupportedModelError: for a model that is not a causal LM of this form, a head that is not
            a (LoRA) linear layer, logits the registry does not describe (see
            :func:`register_head_spec`), an own loss that is not the causal LM cross-entropy of
            the logits, or a check forward that fails. Nothing is patched then.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {tuple(_IMPLS)}, got {impl!r}")
    lm = _causal_lm(model)
    _check_causal_lm(lm)
    spec = HEAD_SPECS.get(getattr(lm.config, "model_type", None), HeadSpec())
    softcap, scale = spec.softcap(lm), spec.scale(lm)
    TOFUParams(gamma, beta, ignore_index, "mean", softcap, _IMPLS[impl][1])  # validates them
    check_accum_dtype(accum_dtype)
    options = {
        "gamma": float(gamma),
        "beta": float(beta),
        "ignore_index": ignore_index,
        "impl": impl,
        "chunk_size": chunk_size,
        "accum_dtype": accum_dtype,
        "return_logits": bool(return_logits),
        "softcap": None if softcap is None else float(softcap),
        "scale": None if scale is None else float(scale),
        "spec": spec,
    }
    head = lm.get_output_embeddings()
    state: _TOFUState | None = vars(lm).get(_STATE)
    if state is not None:
        # Patched before (perhaps reverted under a foreign wrapper): new options, same patch,
        # once they pass the check (a refused call leaves the earlier ones).
        if verify:
            _verify(lm, _original_forward(lm, state), _TOFUState(**options))
        vars(state).update(options)
        _check_head_hooks(head, state)
        _install_guard(lm, state)  # gone if a shallow copy (sharing the decoder) was reverted
        state.active = True
        return model

    state = _TOFUState(**options)
    state.previous = vars(lm).get("forward")
    state.signature = inspect.signature(type(lm).forward)
    if verify:
        _verify(lm, _original_forward(lm, state), state)

    _check_head_hooks(head, state)
    state.patched = _PatchedForward(lm)
    setattr(lm, _STATE, state)
    lm.forward = state.patched
    _install_guard(lm, state)
    return model


def _install_guard(lm: nn.Module, state: _TOFUState) -> None:
    """The backbone's bypass guard for ``state``, unless it has one."""
    decoder = _decoder(lm)
    for hook in decoder._forward_pre_hooks.values():
        if isinstance(hook, functools.partial) and hook.func is _bypass_guard:
            if hook.args[0] is state:
                return
    decoder.register_forward_pre_hook(functools.partial(_bypass_guard, state, _OwnerForward(lm)))


def revert_tofu_kernel(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tofu_kernel`: the model's forward is its own again; returns ``model``.

    A no-op on a model that is not patched. Where another wrapper was installed on top of the
    patch since (accelerate, TRL), the patch stays in place but passes every call through.
    """
    lm = _causal_lm(model)
    state: _TOFUState | None = vars(lm).get(_STATE)
    if state is None:
        return model
    state.active = False
    if vars(lm).get("forward") is not state.patched:
        return model  # wrapped since: our forward stays below the wrapper, passing through
    if state.previous is None:
        del lm.forward
    else:
        lm.forward = state.previous
    hooks = _decoder(lm)._forward_pre_hooks
    for key, hook in list(hooks.items()):
        if isinstance(hook, functools.partial) and hook.func is _bypass_guard:
            del hooks[key]
    delattr(lm, _STATE)
    return model


@contextmanager
def use_tofu_kernel(model: nn.Module, **options: Any) -> Iterator[nn.Module]:
    """``with use_tofu_kernel(model, gamma=3.0): ...``: patched with these options inside the
    block; afterwards as before it (unpatched, or patched with its earlier options)."""
    state = vars(_causal_lm(model)).get(_STATE)
    before = None
    if state is not None and state.active:
        before = {k: getattr(state, k) for k in _OPTIONS}
    apply_tofu_kernel(model, **options)
    try:
        yield model
    finally:
        state = vars(_causal_lm(model)).get(_STATE)
        if before is None:
            revert_tofu_kernel(model)
        elif state is not None:  # the earlier options, checked when they were applied
            vars(state).update(before)


def is_tofu_patched(model: nn.Module) -> bool:
    """Whether :func:`apply_tofu_kernel` is in effect on ``model`` (or the model inside it)."""
    state = vars(_causal_lm(model)).get(_STATE)
    return state is not None and state.active


def get_tofu_stats(model: nn.Module) -> TOFUStats | None:
    """Statistics of the patched model's last forward with labels (detached, no host sync).

    :class:`~tofu_kernels.TOFUStats`: mean target probability ``mean_p``, ``mean_focal_weight``,
    predictive ``entropy``, top-1 ``accuracy`` and ``n_tokens``; None before such a forward.
    """
    state = vars(_causal_lm(model)).get(_STATE)
    return None if state is None else state.stats


# ---------------------------------------------------------------------------------------------
# The paper's interface, for models that are not patched
# ---------------------------------------------------------------------------------------------


def tofu_loss_func(
    gamma: float = 3.0,
    beta: float = 0.8,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
) -> Callable[..., torch.Tensor]:
    """TOFU as ``Trainer(compute_loss_func=...)``: ``f(outputs, labels, num_items_in_batch=None)``.

    The paper's interface, backed by the logits kernel :func:`tofu_kernels.tofu_loss` with
    Hugging Face's causal shift. The model computes its logits as usual, so this saves the
    published loss's float32 copies but not the logits themselves; :func:`apply_tofu_kernel` also
    saves the logits' memory. Softcapping or scaling is already in the model's logits.
    """
    TOFUParams(gamma, beta, ignore_index, "mean", None, impl)  # validates the options

    def compute_loss_func(
        outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        if labels is None:
            raise ValueError("tofu_loss_func needs labels")
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else outputs[0]
        if logits is None:
            raise ValueError(
                "the outputs hold no logits (a model patched by apply_tofu_kernel returns its TOFU "
                "loss instead: use outputs.loss)"
            )
        targets = shift_labels(labels, ignore_index).to(logits.device)
        return tofu_loss(
            logits,
            targets,
            gamma=gamma,
            beta=beta,
            ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch,
            impl=impl,
        )

    compute_loss_func.__name__ = compute_loss_func.__qualname__ = "tofu_compute_loss_func"
    return compute_loss_func


# ---------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------


def _make_sft_trainer() -> type:
    from transformers import Trainer
    from trl import SFTTrainer

    class TOFUSFTTrainer(SFTTrainer):
        """TRL's ``SFTTrainer`` training a model patched by :func:`apply_tofu_kernel`.

        Same arguments as ``SFTTrainer``. The loss is the patched model's fused TOFU loss
        (``Trainer``'s own ``compute_loss``, with ``num_items_in_batch``), where recent TRL
        versions would compute cross-entropy from their own fused head. TRL's ``entropy`` and
        ``mean_token_accuracy`` metrics come from the kernel's statistics, with ``mean_p`` and
        ``focal_weight`` added. A MoE model's router loss is added as ``SFTTrainer`` adds it
        (``SFTConfig.router_aux_loss_coef``, divided by the accumulation steps under
        ``num_items_in_batch``) and logged as ``aux_loss``.
        """

        def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(model, *args, **kwargs)
            if not is_tofu_patched(self.model):
                raise ValueError(
                    "TOFUSFTTrainer needs a model patched by tofu_kernels.apply_tofu_kernel(model)"
                )
            # each makes the trainer compute its own loss from logits instead of the model's TOFU
            replaced = [
                name
                for name, on in (
                    ("label_smoothing_factor", self.args.label_smoothing_factor > 0),
                    ("compute_loss_func", self.compute_loss_func is not None),
                    ("loss_type", getattr(self.args, "loss_type", "nll") != "nll"),
                )
                if on
            ]
            if replaced:
                raise ValueError(
                    f"TOFUSFTTrainer trains the patched model's TOFU loss; {', '.join(replaced)} "
                    "would replace it with another loss: leave them at their defaults"
                )

        def compute_loss(
            self,
            model: nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            inputs = {**inputs, "use_cache": False}
            # A MoE model's router loss as SFTTrainer adds it: its coefficient (SFTConfig's, else
            # the config's), divided by the accumulation steps under num_items_in_batch (the
            # model's own forward adds it to each micro-batch's loss in full)
            coef = getattr(self, "router_aux_loss_coef", None)
            state = vars(_causal_lm(self.model)).get(_STATE)
            aux_enabled = (
                getattr(self, "aux_loss_enabled", False)
                and coef is not None
                and state is not None
                and state.active
            )
            if aux_enabled:
                inputs["output_router_logits"] = True  # VLM wrappers read it from the call only
                state.add_aux = False
            try:
                loss, outputs = Trainer.compute_loss(
                    self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            finally:
                if aux_enabled:
                    state.add_aux = True
            aux = outputs.get("aux_loss") if aux_enabled and isinstance(outputs, Mapping) else None
            if aux is not None:
                steps = 1
                if num_items_in_batch is not None:
                    steps = getattr(self, "current_gradient_accumulation_steps", None)
                    steps = steps or self.args.gradient_accumulation_steps
                loss = loss + coef * aux.to(loss.device) / steps
            stats = get_tofu_stats(self.model)
            metrics = getattr(self, "_metrics", None)
            mode = "train" if self.model.training else "eval"
            if aux is not None and isinstance(metrics, Mapping) and mode in metrics:
                aux_mean = self.accelerator.gather_for_metrics(aux.detach()).mean()
                metrics[mode].setdefault("aux_loss", []).append(float(aux_mean))
            if stats is not None and isinstance(metrics, Mapping) and mode in metrics:
                # every process's token-weighted sums in one gather, read in one sync
                n = stats.n_tokens.to(torch.float32)
                keys = ("entropy", "mean_token_accuracy", "mean_p", "focal_weight")
                means = (stats.entropy, stats.accuracy, stats.mean_p, stats.mean_focal_weight)
                sums = torch.stack([*(m.to(torch.float32) * n for m in means), n])
                sums = self.accelerator.gather_for_metrics(sums).reshape(-1, len(keys) + 1)
                *totals, count = sums.sum(0).tolist()
                for key, total in zip(keys, totals, strict=True):
                    metrics[mode].setdefault(key, []).append(total / max(count, 1.0))
            return (loss, outputs) if return_outputs else loss

    return TOFUSFTTrainer


def __getattr__(name: str) -> Any:
    # TOFUSFTTrainer subclasses trl.SFTTrainer: built on first use, so trl stays optional.
    if name == "TOFUSFTTrainer":
        cls = _make_sft_trainer()
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
