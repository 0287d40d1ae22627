"""Which layers get copies: the registry of layer types and their kernel (and bias) parameters, the
choice of layers by type and module-name globs, and a summary of what that choice covers.

Register a type the built-ins miss with :func:`register_layer`; a name registers a third-party type
without importing its library.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

from torch import nn

__all__ = ["SUPPORTED_LAYERS", "LayerParams", "Coverage", "register_layer"]

#: A layer type: the class, or its fully qualified name (``"transformers.pytorch_utils.Conv1D"``).
LayerType = Union[type, str]


class LayerParams(NamedTuple):
    """A layer type's kernel and bias parameter names, each a name or a glob pattern (``"weight_ih_l*"``)."""

    kernels: tuple[str, ...]
    biases: tuple[str, ...]


#: The registry: layer type (a class or a fully qualified class name) -> its :class:`LayerParams`.
#: Add to it with :func:`register_layer`.
SUPPORTED_LAYERS: dict[LayerType, LayerParams] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _short(key: LayerType) -> str:
    return key.rpartition(".")[2] if isinstance(key, str) else key.__name__


def _qualified(key: LayerType) -> str:
    return key if isinstance(key, str) else _qualname(key)


def _resolve(name: str) -> Optional[type]:
    """The class a dotted ``name`` refers to if its module is already imported (nothing is imported
    for it), else None: how an alias such as ``"torch.nn.Linear"`` matches its class."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        found = sys.modules.get(".".join(parts[:cut]))
        if found is not None:
            for attr in parts[cut:]:
                found = getattr(found, attr, None)
            return found if isinstance(found, type) else None
    return None


def _denotes(key: LayerType, cls: type) -> bool:
    if isinstance(key, str):
        return key == _qualname(cls) or _resolve(key) is cls
    return key is cls


def _names(keys: Iterable[LayerType]) -> list[str]:
    """Short names, qualified where two registered types share one."""
    keys = list(keys)
    short = [_short(key) for key in keys]
    return sorted(_qualified(key) if short.count(_short(key)) > 1 else _short(key) for key in keys)


def _patterns(value: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(name, str) and name for name in value):
        raise TypeError(f"{what} takes a sequence of parameter names or glob patterns, e.g. ('weight',), got {value!r}")
    return tuple(value)


def register_layer(
    layer_type: LayerType, kernels: Sequence[str] = ("weight",), biases: Sequence[str] = ("bias",)
) -> None:
    """Give layers of ``layer_type`` (and of its subclasses) copies of their ``kernels`` parameters,
    and of their ``biases`` when the caller asks for biases: parameter names or glob patterns
    (``"weight_*"``). Patterns that match no parameter of a layer are skipped.

    ``layer_type`` is the class or its fully qualified name (where it is defined, e.g.
    ``"transformers.pytorch_utils.Conv1D"``): a name does not import the type's library. A layer is
    matched by the most specific registered type in its class's MRO. A type is registered once:
    registering it again is an error, not an override.
    """
    if isinstance(layer_type, str):
        if "." not in layer_type.strip("."):
            raise ValueError(
                f"register_layer takes a class or its fully qualified name, e.g. 'transformers.pytorch_utils.Conv1D'; "
                f"got {layer_type!r}"
            )
        cls = _resolve(layer_type)
    else:
        cls = layer_type
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_layer takes a subclass of torch.nn.Module or its name, got {layer_type!r}")
    kernels = _patterns(kernels, "kernels")
    if not kernels:
        raise ValueError(f"register_layer({layer_type!r}) needs at least one kernel parameter name")
    biases = _patterns(biases, "biases")
    for key in SUPPORTED_LAYERS:
        if _qualified(key) == _qualified(layer_type) or (cls is not None and _denotes(key, cls)):
            raise ValueError(
                f"layer type {_qualified(layer_type)!r} is already registered (as {_qualified(key)!r}); "
                f"registered layer types: {_names(SUPPORTED_LAYERS)}"
            )
    SUPPORTED_LAYERS[layer_type] = LayerParams(kernels, biases)


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
for _type in (nn.Linear, *_CONV, nn.Bilinear):
    register_layer(_type)
register_layer(nn.Embedding, biases=())
# ``MultiheadAttention.out_proj`` is an ``nn.Linear``, handled as one under its own name (``<attn>.out_proj``)
register_layer(
    nn.MultiheadAttention,
    kernels=("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
    biases=("in_proj_bias",),
)
# every layer and direction (``_reverse``) and LSTM projections (``weight_hr_l*``); forward reads them
# through ``_flat_weights``, which ``RNNBase`` rebuilds when the weights it gets are new tensors
for _type in (nn.RNN, nn.GRU, nn.LSTM):
    register_layer(_type, kernels=("weight_ih_l*", "weight_hh_l*", "weight_hr_l*"), biases=("bias_*",))
for _type in (nn.RNNCell, nn.GRUCell, nn.LSTMCell):
    register_layer(_type, kernels=("weight_ih", "weight_hh"), biases=("bias_ih", "bias_hh"))
# GPT-2's projections: a transposed linear layer (weight ``[in, out]``)
register_layer("transformers.pytorch_utils.Conv1D")


def _kind_of(keys: Iterable[LayerType]) -> Callable[[type], Optional[LayerType]]:
    """A lookup: class -> the most specific of ``keys`` in its MRO, or None."""
    classes: dict[type, LayerType] = {}
    names: dict[str, LayerType] = {}
    for key in keys:
        if isinstance(key, str):
            names[key] = key
            resolved = _resolve(key)
            if resolved is not None:
                classes.setdefault(resolved, key)
        else:
            classes[key] = key

    def kind(cls: type) -> Optional[LayerType]:
        for base in cls.__mro__:
            key = classes.get(base) or names.get(_qualname(base))
            if key is not None:
                return key
        return None

    return kind


def _case_twins(name: str, keys: Iterable[LayerType]) -> list[str]:
    return sorted(_qualified(key) for key in keys if _short(key) != name and _short(key).lower() == name.lower())


def resolve_layer_types(layer_types: Optional[Sequence[LayerType]]) -> tuple[LayerType, ...]:
    """The registry keys ``layer_types`` names (all of them for None): registered classes, their short
    names (``"Linear"``) or fully qualified names."""
    if layer_types is None:
        return tuple(SUPPORTED_LAYERS)
    if isinstance(layer_types, (str, type)):
        raise TypeError(f"layer_types takes a list of layer types, e.g. layer_types=['Linear'], got {layer_types!r}")
    if not layer_types:
        raise ValueError("layer_types=[] selects no layer type; leave it None for all registered types")
    registered = _names(SUPPORTED_LAYERS)
    resolved = []
    for t in layer_types:
        if isinstance(t, type):
            found = [key for key in SUPPORTED_LAYERS if _denotes(key, t)]
        elif isinstance(t, str) and "." in t:
            cls = _resolve(t)
            found = [key for key in SUPPORTED_LAYERS if _qualified(key) == t or (cls is not None and _denotes(key, cls))]
        elif isinstance(t, str):
            found = [key for key in SUPPORTED_LAYERS if _short(key) == t]
            if len(found) > 1:
                raise ValueError(f"layer type {t!r} is ambiguous: give one of {sorted(_qualified(key) for key in found)}")
        else:
            raise TypeError(f"layer_types takes layer classes or their names, got {t!r}")
        if not found:
            twins = _case_twins(_short(t), SUPPORTED_LAYERS) if isinstance(t, str) else []
            hint = f"; {t!r} differs only in case from {twins}" if twins else ""
            raise ValueError(
                f"unknown layer type {t if isinstance(t, str) else _qualname(t)!r}{hint}; registered layer types: "
                f"{registered}; add others with lightning_mk.register_layer"
            )
        resolved.append(found[0])
    return tuple(resolved)


def _param_names(layer: nn.Module, params: LayerParams, biases: bool) -> list[str]:
    """The names of ``layer``'s parameters that ``params`` (kernels, then biases) matches, in that order."""
    names: list[str] = []
    for pattern in params.kernels + (params.biases if biases else ()):
        for pname, p in layer._parameters.items():
            if p is not None and pname not in names and fnmatch.fnmatchcase(pname, pattern):
                names.append(pname)
    return names


def eligible_layers(module: nn.Module, layer_types: tuple[LayerType, ...], biases: bool) -> dict[str, list]:
    """Layer name -> [(layer, parameter name)] for every trainable kernel (and bias) of a chosen type."""
    kind_of = _kind_of(SUPPORTED_LAYERS)
    eligible = {}
    for name, layer in module.named_modules():
        kind = kind_of(type(layer))
        if kind is None or kind not in layer_types:
            continue
        found = []
        for pname in _param_names(layer, SUPPORTED_LAYERS[kind], biases):
            p = layer._parameters[pname]
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(f"layer {name!r} is lazy and not yet initialised: run one forward before applying")
            if p.requires_grad:
                found.append((layer, pname))
        if found:
            eligible[name] = found
    if not eligible:
        chosen = "supported" if layer_types == tuple(SUPPORTED_LAYERS) else "chosen"
        twins = sorted({twin for key in layer_types for twin in _case_twins(_short(key), SUPPORTED_LAYERS)})
        hint = f"; note that {twins} differ only in case from the chosen types" if chosen == "chosen" and twins else ""
        held = sorted(
            {
                type(layer).__name__
                for layer in module.modules()
                if any(p is not None and p.requires_grad for p in layer._parameters.values())
            }
        )
        raise ValueError(
            f"{type(module).__name__} has no layer with a trainable kernel of a {chosen} type "
            f"({_names(layer_types)}){hint}; the model's layer types with trainable parameters: {held}; "
            "register other layer types with lightning_mk.register_layer"
        )
    return eligible


def choose_layers(eligible: dict[str, list], include: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """The eligible layers ``include`` names and ``exclude`` does not (lists of globs, as ``Settings`` checked)."""
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
        raise ValueError(
            f"include={list(include)} and exclude={list(exclude)} leave no layer; eligible: {sorted(eligible)}"
        )
    return chosen


def check_resettable(layers: Iterable[nn.Module]) -> None:
    """``init="independent"`` re-draws each copy with the layer's own initializer: refuse types without
    one before any layer is changed."""
    missing = sorted(
        {
            type(layer).__name__
            for layer in layers
            if not (hasattr(layer, "reset_parameters") or hasattr(layer, "_reset_parameters"))
        }
    )
    if missing:
        raise ValueError(
            f"init='independent' re-draws each copy with the layer's reset_parameters(), which {missing} "
            "lack; use init='replicate', or exclude those layers"
        )


_NORM = re.compile(r"Norm(alization)?(?![a-z])")


def _is_norm(cls: type) -> bool:
    """Normalization layers (LayerNorm, BatchNorm*, GroupNorm, RMSNorm, a model's own ``LlamaRMSNorm``...),
    by class name: they are meant to stay single."""
    return any(_NORM.search(base.__name__) for base in cls.__mro__)


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _percent(share: float) -> str:
    return "<0.1%" if 0 < share < 0.0005 else f"{share:.1%}"


@dataclass(frozen=True)
class Coverage:
    """What majority kernels cover in a model, in trainable parameters (elements; tied ones counted once).

    ``kernels`` parameters got copies, holding ``covered`` of the ``total`` elements of the model as
    written (the deployed size, not the size it trains at). ``single`` holds, per module type, the
    elements left single: normalization layers, biases (unless asked for), layers excluded by
    ``include``/``exclude``/``layer_types``, unregistered types; ``single_names`` their parameter
    names (``("bias",)``), so the summary says what they are. ``unregistered`` is the part of
    ``single`` that no registered layer type names (normalization layers apart): what
    :func:`register_layer` would cover.
    """

    kernels: int
    covered: int
    total: int
    single: dict[type, int]
    unregistered: dict[type, int]
    single_names: dict[type, tuple[str, ...]]

    @property
    def share(self) -> float:
        """The share of the trainable parameters that have copies."""
        return self.covered / self.total if self.total else 0.0

    @property
    def unregistered_share(self) -> float:
        return sum(self.unregistered.values()) / self.total if self.total else 0.0

    def __str__(self) -> str:
        text = (
            f"{self.kernels} kernels have copies: {_percent(self.share)} of the deployed model's "
            f"{_count(self.total)} trainable parameters"
        )
        if self.single:
            parts = [
                f"{kind.__name__} {'/'.join(self.single_names[kind])} {_percent(n / self.total)}"
                + (" (unregistered type)" if kind in self.unregistered else "")
                for kind, n in sorted(self.single.items(), key=lambda item: -item[1])
            ]
            text += "; left single: " + ", ".join(parts)
        return text


def coverage_of(module: nn.Module, covered: Collection[int]) -> Coverage:
    """The :class:`Coverage` of ``module`` when the parameters with ids ``covered`` get copies. A tied
    parameter counts under its first holder's type, and as registered if any holder names it."""
    kind_of = _kind_of(SUPPORTED_LAYERS)
    holder: dict[int, tuple[type, str, nn.Parameter]] = {}
    named: set[int] = set()  # registered, or in a normalization layer
    for layer in module.modules():
        kind = kind_of(type(layer))
        patterns = () if kind is None else SUPPORTED_LAYERS[kind].kernels + SUPPORTED_LAYERS[kind].biases
        for pname, p in layer._parameters.items():
            if p is None or not p.requires_grad:
                continue
            holder.setdefault(id(p), (type(layer), pname, p))
            if _is_norm(type(layer)) or any(fnmatch.fnmatchcase(pname, pattern) for pattern in patterns):
                named.add(id(p))
    single: dict[type, int] = {}
    unregistered: dict[type, int] = {}
    names: dict[type, dict[str, None]] = {}  # ordered sets
    for pid, (kind, pname, p) in holder.items():
        if pid in covered:
            continue
        single[kind] = single.get(kind, 0) + p.numel()
        names.setdefault(kind, {})[pname] = None
        if pid not in named:
            unregistered[kind] = unregistered.get(kind, 0) + p.numel()
    n_covered = sum(p.numel() for pid, (_, _, p) in holder.items() if pid in covered)
    total = sum(p.numel() for _, _, p in holder.values())
    single_names = {kind: tuple(found) for kind, found in names.items()}
    return Coverage(len(covered), n_covered, total, single, unregistered, single_names)
