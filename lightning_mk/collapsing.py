"""Back to the plain model: :func:`collapse` a module in place, :func:`collapsed_state_dict` of a module or of its
state dict (sharded ones too), and what the copies hold (:func:`kernel_copies`, :func:`copy_spread`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, ContextManager, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_mk import parametrization
from lightning_mk.forms import get_form
from lightning_mk.parametrization import Draws, kernel_settings, majority_kernels

__all__ = ["collapse", "collapsed_state_dict", "kernel_copies", "copy_spread"]


def _deployed(stored: Tensor, form: str) -> Tensor:
    """The eval-mode kernel as a tensor of its own (saving it does not save the whole stored tensor): a view of
    the stored tensor (decoupled's ``mu``) is copied, a computed one (the copies' mean) is new already."""
    form_ = get_form(form)
    deployed = form_.deployed(*form_.split(stored))
    return deployed.clone() if deployed._is_view() else deployed


def kernel_copies(module: nn.Module) -> dict[str, Tensor]:
    """Plain-model parameter name -> its ``[k, *S]`` copies, one entry per set of copies: with
    ``form="copies"`` the trainable tensor itself (with its ``.grad``), decoupled the copies
    ``mu + delta_i - mean(delta)`` computed from it (detached)."""
    found: dict[int, tuple[str, Tensor]] = {}
    for prefix, _, pname, kernel, stored in majority_kernels(module):
        if id(stored) not in found:
            copies = get_form(kernel.settings.form).copies(stored)
            found[id(stored)] = (prefix + pname, copies if copies is stored else copies.detach())
    return dict(found.values())


_EXTRA = ".0._extra_state"


def _full(tensor: Tensor) -> Tensor:
    """A sharded ``DTensor`` (FSDP2) gathered into one full tensor (a collective); others as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _kernels_in(state: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """``<layer>.parametrizations.<name>.original`` -> (``<layer>.<name>``, form) for every majority
    kernel in a state dict, found by its extra state."""
    kernels = {}
    for key, value in state.items():
        settings = kernel_settings(value) if key.endswith(_EXTRA) else None
        if settings is not None:
            layer, _, name = key[: -len(_EXTRA)].rpartition("parametrizations.")
            kernels[key[: -len(_EXTRA)] + ".original"] = (layer + name, settings["form"])
    return kernels


def _state_of(source: Union[nn.Module, Mapping[str, Any]]) -> Mapping[str, Any]:
    """A module's state dict (its own tensors, no copies), or ``source`` itself if it is one."""
    return source.state_dict(keep_vars=True) if isinstance(source, nn.Module) else source


def _storage(tensor: Tensor) -> tuple:
    """Equal for the entries of tied copies (one tensor under several keys)."""
    return tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


def collapsed_state_dict(source: Union[nn.Module, Mapping[str, Any]]) -> dict[str, Any]:
    """The state dict of the plain model: every kernel replaced by its eval-mode value (the copies'
    mean, or ``mu`` when decoupled), under the plain parameter's key; tied kernels are collapsed once
    and shared. ``source`` is the MK module (left
    untouched: no deep copy) or its state dict, e.g. one a sharded strategy consolidated; sharded
    ``DTensor`` entries are gathered, so with FSDP2 every rank must call it."""
    state = _state_of(source)
    kernels = _kernels_in(state)
    means: dict[tuple, Tensor] = {}
    out = {}
    with torch.no_grad():
        for key, value in state.items():
            if key.endswith(_EXTRA) and key[: -len(_EXTRA)] + ".original" in kernels:
                continue
            if not isinstance(value, Tensor):
                out[key] = value
                continue
            value = _full(value).detach()
            if key not in kernels:
                out[key] = value
                continue
            name, form = kernels[key]
            same = _storage(value)
            if same not in means:
                means[same] = _deployed(value, form)
            out[name] = means[same]
    return out


def _own_class(layer: nn.Module) -> None:
    """Give a parametrized layer a class of its own. ``parametrize`` makes one class per layer, but a
    ``copy.deepcopy`` of the model shares it, and removing a parametrization deletes the property from
    the class: collapsing the original would break the copy."""
    cls = type(layer)
    layer.__class__ = type(cls.__name__, cls.__bases__, {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})


def collapse(module: nn.Module) -> nn.Module:
    """Replace every kernel's stored tensor by its eval-mode value (the copies' mean, or ``mu`` when
    decoupled), in place, and return the plain ``module``.

    Each layer gets back an ordinary ``Parameter`` under its own name; tied layers get back one shared
    ``Parameter``, computed once. The ``Parameter`` objects are those that held the copies, resized.
    """
    found = list(majority_kernels(module))
    targets = {(id(layer), pname): (layer, pname) for _, layer, pname, _, _ in found}
    sets = {id(stored): (stored, kernel.settings.form) for *_, kernel, stored in found}
    for layer in {id(layer): layer for layer, _ in targets.values()}.values():
        _own_class(layer)
    for layer, pname in targets.values():
        parametrize.remove_parametrizations(layer, pname, leave_parametrized=False)
    with torch.no_grad():
        for stored, form in sets.values():
            stored.set_(_deployed(stored, form))
            stored.grad = None
    ours = (parametrization.enter_cache, parametrization.exit_cache)
    for owner in (module, *(layer for layer, _ in targets.values())):  # the step hook, the layers' cache hooks
        for hooks in (owner._forward_pre_hooks, owner._forward_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(hook, Draws) or hook in ours:
                    del hooks[key]
                    owner._forward_hooks_always_called.pop(key, None)
    return module


def copy_spread(
    source: Union[nn.Module, Mapping[str, Any]], whole: Callable[[Tensor], ContextManager] = contextlib.nullcontext
) -> dict[str, float]:
    """Per set of copies: RMS distance of the copies from the eval-mode kernel (their mean, which is
    ``mu`` when decoupled), relative to that kernel's RMS. ``source`` is the MK module or its state
    dict. A ``DTensor`` sharded along the copies (FSDP2, or FSDP's sharded state dict) is measured from
    each rank's own rows with two all-reduces (a kernel-sized sum, then a scalar), never gathered whole:
    every rank must call it then, and every rank gets the same values. ``whole(tensor)``, a context manager
    giving the tensor to measure, is entered around each kernel's measure (the Lightning callback gives
    DeepSpeed's fp32 master of it, gathered: one kernel whole at a time)."""
    state = _state_of(source)
    spread, seen = {}, set()
    with torch.no_grad():
        for key, (name, form) in _kernels_in(state).items():
            with whole(state[key]) as tensor:
                stored = tensor.detach()
                rows, first, groups = _rows(stored)
                if _storage(rows) in seen:  # tied: the same copies under another key
                    continue
                seen.add(_storage(rows))
                spread[name] = get_form(form).spread(rows.float(), first, stored.shape[0], _summed(groups))
    return spread


def _rows(stored: Tensor) -> tuple[Tensor, int, list]:
    """This process's rows of the stored tensor, the index of the first, and the process groups holding
    the others: the whole tensor and no group, unless it is split along its first dimension only, as a
    ``DTensor`` (FSDP2) or a ``ShardedTensor`` (FSDP's sharded state dict); other layouts are gathered."""
    if hasattr(stored, "local_shards"):  # ShardedTensor: FSDP chunks each parameter along its first dimension
        shards = stored.local_shards()
        if len(shards) > 1 or any(list(s.metadata.shard_sizes[1:]) != list(stored.shape[1:]) for s in shards):
            raise ValueError(f"copy_spread measures copies split along their first dimension, not {stored.metadata()}")
        if not shards:  # this process holds no row
            empty = torch.empty((0, *stored.shape[1:]), dtype=stored.metadata().tensor_properties.dtype)
            return empty, stored.shape[0], [stored._process_group]
        return shards[0].tensor, shards[0].metadata.shard_offsets[0], [stored._process_group]
    if not hasattr(stored, "device_mesh"):
        return stored, 0, []
    placements = stored.placements
    if not all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in placements):
        return stored.full_tensor(), 0, []
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(stored.shape, stored.device_mesh, placements)
    groups = [stored.device_mesh.get_group(dim) for dim, p in enumerate(placements) if p.is_shard()]
    return stored.to_local(), offset[0], groups


def _summed(groups: list) -> Callable[[Tensor], Tensor]:
    """A function summing a tensor in place over the processes of ``groups`` (none: the tensor as it is)."""

    def total(tensor: Tensor) -> Tensor:
        for group in groups:
            torch.distributed.all_reduce(tensor, group=group)
        return tensor

    return total
