"""Which layers get copies: the layer types and their kernel (and bias) parameters, and the choice of
layers by type and module-name globs."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Optional, Union

from torch import nn

__all__ = ["SUPPORTED_LAYERS"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_ATTENTION_KERNELS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
#: Layer type -> (kernel parameter names, bias parameter names). ``MultiheadAttention.out_proj`` is an
#: ``nn.Linear`` and is handled as one, under its own module name (``<attn>.out_proj``).
SUPPORTED_LAYERS: dict[type[nn.Module], tuple[tuple[str, ...], tuple[str, ...]]] = {
    nn.Linear: (("weight",), ("bias",)),
    **{conv: (("weight",), ("bias",)) for conv in _CONV},
    nn.Embedding: (("weight",), ()),
    nn.Bilinear: (("weight",), ("bias",)),
    nn.MultiheadAttention: (_ATTENTION_KERNELS, ("in_proj_bias",)),
}

def _layer_types(layer_types: Optional[Sequence[Union[type, str]]]) -> tuple[type[nn.Module], ...]:
    if layer_types is None:
        return tuple(SUPPORTED_LAYERS)
    by_name = {t.__name__: t for t in SUPPORTED_LAYERS}
    resolved = []
    for t in layer_types:
        t = by_name.get(t, t) if isinstance(t, str) else t
        if t not in SUPPORTED_LAYERS:
            raise ValueError(f"unsupported layer type {t!r}; supported: {sorted(by_name)}")
        resolved.append(t)
    return tuple(resolved)


def _eligible(module: nn.Module, layer_types: tuple[type[nn.Module], ...], biases: bool) -> dict[str, list]:
    """Layer name -> [(layer, parameter name)] for every trainable kernel (and bias) of a chosen type."""
    eligible = {}
    for name, layer in module.named_modules():
        kind = next((t for t in type(layer).__mro__ if t in layer_types), None)
        if kind is None:
            continue
        kernel_names, bias_names = SUPPORTED_LAYERS[kind]
        found = []
        for pname in kernel_names + (bias_names if biases else ()):
            p = layer._parameters.get(pname)
            if p is None or not p.requires_grad:
                continue
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(f"layer {name!r} is lazy and not yet initialised: run one forward before applying")
            found.append((layer, pname))
        if found:
            eligible[name] = found
    return eligible


def _choose(eligible: dict[str, list], include: Sequence[str], exclude: Sequence[str]) -> list[str]:
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include and exclude take a list of glob patterns, e.g. include=['encoder.*']")
    for key, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not fnmatch.filter(eligible, pattern):
                raise ValueError(
                    f"{key} pattern {pattern!r} matches no eligible layer; eligible layers: {sorted(eligible)}"
                )
    chosen = [
        name
        for name in eligible
        if any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]
    if not chosen:
        raise ValueError(f"include={list(include)} and exclude={list(exclude)} leave no layer; eligible: {sorted(eligible)}")
    return chosen
