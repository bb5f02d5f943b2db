"""The causal-LM architectures of the installed transformers, and which of them are MoE models.

``causal_lm_archs()`` lists one :class:`Arch` per causal-LM class of
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``; ``MOE`` (computed on first use) names the model types
whose config has router or expert settings.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any

import transformers
from transformers.models.auto.configuration_auto import (
    CONFIG_MAPPING_NAMES,
    model_type_to_module_name,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# Config attributes that make a model a MoE model when set (truthy).
_EXPERT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Config attributes whose mere presence does.
_ROUTER_ATTRS = ("output_router_logits", "router_aux_loss_coef", "aux_loss_coef")


@dataclass(frozen=True)
class Arch:
    model_type: str
    model_class: str
    config_class: str


def resolve(model_type: str, name: str) -> Any:
    """A transformers class by name: top-level export, else the model type's own modules."""
    obj = getattr(transformers, name, None)
    if obj is not None:
        return obj
    short = model_type_to_module_name(model_type)
    package = f"transformers.models.{short}"
    for module in (package, f"{package}.modeling_{short}", f"{package}.configuration_{short}"):
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if obj is not None:
            return obj
    raise ImportError(f"transformers has no {name} (model type {model_type!r})")


def _preferred(model_class: str, model_types: list[str]) -> str:
    """Of the model types sharing one class, the one that is its own config's model type."""
    if len(model_types) == 1:
        return model_types[0]
    try:
        own = resolve(model_types[0], model_class).config_class.model_type
    except (ImportError, AttributeError):
        own = None
    return own if own in model_types else model_types[0]


@functools.cache
def causal_lm_archs() -> tuple[Arch, ...]:
    """One Arch per causal-LM class (a class mapped from several model types appears once)."""
    by_class: dict[str, list[str]] = {}
    for model_type, model_class in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if model_type in CONFIG_MAPPING_NAMES:
            by_class.setdefault(model_class, []).append(model_type)
    archs = []
    for model_class, model_types in by_class.items():
        model_type = _preferred(model_class, model_types)
        archs.append(Arch(model_type, model_class, CONFIG_MAPPING_NAMES[model_type]))
    return tuple(sorted(archs, key=lambda a: a.model_type))


def text_config(config: Any) -> Any:
    """The config of a composite config's text decoder (the config itself if it has none)."""
    try:
        return config.get_text_config(decoder=True)
    except ValueError:  # ambiguous
        return config


def is_moe(config: Any) -> bool:
    """Whether a config (or its text config) has router or expert settings."""
    for c in (config, text_config(config)):
        if any(hasattr(c, a) for a in _ROUTER_ATTRS):
            return True
        if any(getattr(c, a, None) for a in _EXPERT_ATTRS):
            return True
        if any(k.startswith("moe_") and v for k, v in vars(c).items()):
            return True
    return False


@functools.cache
def moe_archs() -> tuple[str, ...]:
    """Model types whose default config is a MoE config (builds every default config once)."""
    moe = []
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # default configs warn about their token ids
    try:
        for arch in causal_lm_archs():
            try:
                config = resolve(arch.model_type, arch.config_class)()
            except Exception:  # a config that cannot be built with defaults: not listed
                continue
            if is_moe(config):
                moe.append(arch.model_type)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return tuple(moe)


def __getattr__(name: str) -> Any:
    if name == "MOE":  # lazily: importing this module stays cheap
        return list(moe_archs())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    for a in causal_lm_archs():
        print(f"{a.model_type:28} {a.model_class:44} {a.config_class}")
    print(f"{len(causal_lm_archs())} architectures; MoE: {', '.join(moe_archs())}")
