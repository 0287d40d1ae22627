"""Majority Kernels on any ``nn.Module``, without Lightning: :func:`apply_majority_kernels` attaches them (choosing
the layers, initialising the copies, keeping ties) and returns the :class:`MajorityKernels` handle."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_mk import native, parametrization
from lightning_mk.collapsing import collapse, collapsed_state_dict
from lightning_mk.forms import Relative, get_form
from lightning_mk.layers import check_resettable, choose_layers, coverage_of, eligible_layers, resolve_layer_types
from lightning_mk.parametrization import Draws, MajorityKernel, compile_boundaries, has_majority_kernels, seed_of
from lightning_mk.schemes import Select, get_scheme
from lightning_mk.settings import Settings

__all__ = ["MajorityKernels", "apply_majority_kernels"]

# Generator keys of the initial copies and of their noise (at setup): negative, so disjoint from every
# draw key (seeds and kernel indices are >= 0); -2 keeps earlier versions' independent initial copies.
_INIT_STEP, _NOISE_STEP = -2, -3


class MajorityKernels:
    """What :func:`apply_majority_kernels` did to ``module``: its :class:`~lightning_mk.settings.Settings`, the
    ``Draws`` its kernels share, what got copies (``coverage``), and the way back (:meth:`collapse`,
    :meth:`collapsed_state_dict`).

    Save :meth:`state_dict` next to the module's and the optimizer's state to resume a raw-PyTorch run
    exactly: it holds the draw position and noise level, which the module's state does not.
    """

    def __init__(self, module: nn.Module, settings: Settings, draws: Draws, coverage: Any) -> None:
        self.module = module
        self.settings = settings
        self.draws = draws
        self.coverage = coverage

    @property
    def step(self) -> int:
        """The draw position: training steps drawn so far (the next training forward draws ``step + 1``
        with ``step_on_forward``)."""
        return self.draws.step

    @step.setter
    def step(self, value: int) -> None:
        self.draws.step = int(value)

    def state_dict(self) -> dict[str, Any]:
        return self.settings.resumed() | {"rank": self.draws.rank, "step": self.draws.step, "noise": self.draws.noise}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the draw position and noise level; refuse a state saved with other settings (those of
        ``Settings.RESUMED``). ``rank`` is not compared: with per-rank draws each process resumes with its own."""
        missing = [name for name in ("step", "noise") if name not in state]
        if missing:
            raise ValueError(f"the state being loaded lacks {missing}; a handle's state has {list(self.state_dict())}")
        self.settings.check_resume(state, "the state being loaded", "this model")
        self.draws.step = int(state["step"])
        self.draws.noise = float(state["noise"])

    def collapse(self) -> nn.Module:
        """:func:`~lightning_mk.collapse` the module in place (the step hook goes too) and return the plain module."""
        return collapse(self.module)

    def collapsed_state_dict(self) -> dict[str, Any]:
        """:func:`~lightning_mk.collapsed_state_dict` of the module, which is left as it is."""
        return collapsed_state_dict(self.module)

    def __repr__(self) -> str:
        return f"MajorityKernels({', '.join(f'{key}={value!r}' for key, value in self.state_dict().items())})"


def apply_majority_kernels(
    module: nn.Module,
    settings: Optional[Settings] = None,
    *,
    rank: Optional[int] = None,
    step_on_forward: bool = True,
    **options: Any,
) -> MajorityKernels:
    """Give every chosen kernel of ``module`` ``k`` trainable copies, in place; returns the
    :class:`MajorityKernels` handle (``.module``, ``.draws``, ``.step``, ``state_dict``, ``collapse``), whose
    ``coverage`` (:class:`~lightning_mk.layers.Coverage`) says what share of the parameters got copies.

    The options are those of :class:`~lightning_mk.settings.Settings`, given by name
    (``apply_majority_kernels(net, k=4, exclude=["head"])``) or as a ``Settings`` (which they then update).

    Layers are chosen by type (``layer_types``: classes or names, default every registered type, see
    :func:`~lightning_mk.layers.register_layer`) and by module name globs (``include``, ``exclude``).
    Frozen parameters are left alone. A parameter shared by several layers (tied weights) gets one set
    of copies and one draw per step; a module holding it that is not of a chosen type (BERT's
    prediction head holds its decoder's bias) is given the copies too.

    ``init="replicate"`` starts every copy at the current weight (plus centred relative noise
    ``init_noise``): the eval-mode model is unchanged, which is what fine-tuning needs.
    ``init="independent"`` re-draws each copy with the layer's own initializer: the copies start
    diverse, but their mean has ``1/sqrt(k)`` of the usual initial scale.

    The ``form`` (:mod:`lightning_mk.forms`) says how the copies are stored: ``"copies"`` (``[k, *S]``; the
    deployed kernel, their mean, gets 1/k of the sampled kernel's gradient, so it trains k times slower
    than the plain model under SGD, about sqrt(k) under Adam), ``"decoupled"`` (``[k + 1, *S]``: the
    deployed kernel ``mu``, which gets the plain model's gradient, and k deviations) or ``"relative"`` (stored
    as decoupled; a draw's distance from ``mu`` is ``noise`` times ``mu``'s RMS). Replicated, ``mu`` is the
    weight and the deviations zero (plus ``init_noise``, which is 1 for ``"relative"``); independent, ``mu``
    is the draws' mean.

    ``grad_scale`` multiplies the copies' gradients (decoupled: the deviations' only). ``noise`` scales
    each draw's deviation from the eval-mode kernel, unbiased at any level; the handle's ``draws.noise``
    changes it during training (the callback's ``anneal_noise`` and :class:`~lightning_mk.control.NoiseOnGap`
    do). ``decay`` adds L2 weight decay on the deployed kernel to its gradient, in proportion to the level.

    ``rank`` (e.g. the process's global rank) gives each data-parallel process its own draws
    ("per-rank noise"); ``None`` (default) draws the same coefficients in every process.

    With ``step_on_forward`` every training-mode forward of ``module`` draws new coefficients;
    otherwise the caller advances the handle's ``step`` (the Lightning callback does, once per optimizer
    step). Optimizers must be created after this call.

    ``module.load_state_dict`` then takes the module's own state too (a pretrained or collapsed model's,
    with plain keys): each kernel loads as ``k`` equal copies (decoupled: ``mu`` and zero deviations), so
    the eval-mode model is exactly the loaded one; a state with copies loads them as they are.
    """
    settings = Settings(**options) if settings is None else dataclasses.replace(settings, **options)
    compile_boundaries()
    if has_majority_kernels(module):
        raise ValueError("the module already has majority kernels; call collapse(module) before applying them again")
    eligible = eligible_layers(module, resolve_layer_types(settings.layer_types), settings.biases)
    form = get_form(settings.form)
    unsupported: list[str] = []  # chosen kernels the form does not take (left plain)
    users: dict[int, list] = {}  # parameter id -> [(layer name, layer, parameter name)]
    params: dict[int, Tensor] = {}
    for name in choose_layers(eligible, settings.include, settings.exclude):
        for layer, pname in eligible[name]:
            p = layer._parameters[pname]
            if not form.supports(layer, p):
                unsupported.append(f"{name}.{pname}")
                continue
            params[id(p)] = p
            users.setdefault(id(p), []).append((name, layer, pname))
    if unsupported and not users:
        raise ValueError(
            f"form={form.name!r} takes none of the chosen kernels ({', '.join(unsupported[:3])}"
            f"{', ...' if len(unsupported) > 3 else ''}); it takes {form.takes}"
        )
    chosen = {(id(layer), pname) for uses in users.values() for _, layer, pname in uses}
    for name, layer in module.named_modules():
        for pname, p in layer._parameters.items():
            if p is not None and id(p) in users and (id(layer), pname) not in chosen:
                if (layer, pname) in eligible.get(name, ()):  # left out by include or exclude
                    tied = f"{users[id(p)][0][0]}.{users[id(p)][0][2]}"
                    raise ValueError(
                        f"{name}.{pname} is tied to {tied} but is not chosen; include both layers or exclude both"
                    )
                users[id(p)].append((name, layer, pname))  # a holder of another type follows the tie

    if settings.init == "independent":
        check_resettable(layer for uses in users.values() for _, layer, _ in uses)
    coverage = coverage_of(module, params)

    device = next((p.device for p in params.values()), None)
    if device is not None and device.type == "cpu" and (
        isinstance(get_scheme(settings.scheme), Select) or isinstance(get_form(settings.form), Relative)
    ):
        native.available()  # built now rather than at the first step, so that torch.compile's graphs use it too
    draws = Draws(settings, rank, device)
    draws.noise = settings.noise
    for index, (pid, uses) in enumerate(users.items()):
        weight = params[pid]
        _, layer, pname = uses[0]
        copies = _init_copies(weight, layer, pname, settings, index)
        kernel = MajorityKernel(settings, index, draws, weight.dim())
        stored = nn.Parameter(kernel.store(copies, weight, settings.init == "replicate"))
        for _, layer, pname in uses:
            setattr(layer, pname, stored)  # every holder registers the one stored tensor (MajorityKernel says why)
            parametrize.register_parametrization(layer, pname, kernel, unsafe=True)
            layer.register_load_state_dict_pre_hook(_LoadPlain(pname))
    for layer in {id(layer): layer for uses in users.values() for _, layer, _ in uses}.values():
        # an RNN reads each weight about 2.5 times per forward, attention its ``in_proj_weight`` three times (its
        # fast-path checks): draw each once
        if isinstance(layer, (nn.RNNBase, nn.MultiheadAttention)):
            layer.register_forward_pre_hook(parametrization.enter_cache)
            layer.register_forward_hook(parametrization.exit_cache, always_call=True)
    if step_on_forward:
        module.register_forward_pre_hook(draws)
    return MajorityKernels(module, settings, draws, coverage)


def _init_copies(weight: Tensor, layer: nn.Module, pname: str, settings: Settings, index: int) -> Tensor:
    w = weight.detach()
    k = settings.k
    if settings.init == "replicate":
        copies = w.unsqueeze(0).repeat(k, *([1] * w.dim()))
    else:
        reset = getattr(layer, "reset_parameters", None) or getattr(layer, "_reset_parameters", None)
        saved = {name: t.clone() for name, t in layer.state_dict().items()}
        devices = [] if w.device.type == "cpu" else [w.device]
        with torch.no_grad(), torch.random.fork_rng(devices=devices, device_type=w.device.type):
            torch.manual_seed(seed_of(settings.seed, _INIT_STEP, index))
            draws = []
            for _ in range(k):
                reset()
                draws.append(layer._parameters[pname].detach().clone())
            layer.load_state_dict(saved)
        copies = torch.stack(draws)
    if settings.init_noise:
        # centred over the copies, so the mean (the eval-mode model) is unchanged at step 0
        generator = torch.Generator(w.device).manual_seed(seed_of(settings.seed, _NOISE_STEP, index))
        noise = torch.randn(copies.shape, generator=generator, device=w.device, dtype=w.dtype)
        copies += settings.init_noise * w.pow(2).mean().sqrt() * (noise - noise.mean(0, keepdim=True))
    return copies


class _LoadPlain:
    """Load-state-dict pre-hook of a layer whose ``pname`` has a majority kernel: a plain state (the
    collapsed model's, as in the callback's checkpoints, or a pretrained model's) holds the kernel under
    its plain name; it loads as copies that all equal it (:meth:`MajorityKernel.right_inverse`), so the
    eval-mode kernel is that weight. After :func:`collapse` the layer is plain again and the hook does nothing."""

    def __init__(self, pname: str) -> None:
        self.pname = pname

    def __call__(self, layer: nn.Module, state: dict, prefix: str, *args: Any) -> None:
        plain, stored = prefix + self.pname, f"{prefix}parametrizations.{self.pname}.original"
        if plain not in state or stored in state or not parametrize.is_parametrized(layer, self.pname):
            return
        kernel = layer.parametrizations[self.pname][0]
        state[stored] = kernel.right_inverse(state.pop(plain))
        state[f"{prefix}parametrizations.{self.pname}.0._extra_state"] = kernel.get_extra_state()
