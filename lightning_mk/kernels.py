"""Majority Kernels on any ``nn.Module``, without Lightning.

Each chosen kernel ``W`` (shape ``S``) becomes one trainable tensor of ``k`` copies (``[k, *S]``),
attached with :mod:`torch.nn.utils.parametrize`: in training mode the layer sees a random
combination of the copies drawn by a :class:`~lightning_mk.schemes.Scheme`, in eval mode their
mean. :func:`collapse` turns the module back into the user's plain architecture holding the means.

With ``form="decoupled"`` the tensor is ``[k + 1, *S]`` instead: row 0 is the deployed kernel ``mu``,
rows 1..k deviations ``delta_i``, and the copies are ``mu + delta_i - mean(delta)``. The sampled kernel,
``mu + combine(delta) - mean(delta)``, is the scheme's combination of those copies (its coefficients sum
to one), but ``mu`` gets the plain model's gradient rather than 1/k of it, so the deployed kernel trains
at the plain model's pace.

Draws are pure tensor functions of ``(seed, step, kernel index)`` (:class:`~lightning_mk.schemes.Random`),
so every process of a data-parallel run samples the same coefficients with no communication, tied
weights share one draw, a re-run forward (activation checkpointing) sees the same kernel, and
``torch.compile`` traces the draw into the model's graph (``fullgraph=True`` holds).
"""

from __future__ import annotations

import contextlib
import json
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ContextManager, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_mk.layers import _check_resettable, _choose, _coverage, _eligible, _layer_types
from lightning_mk.schemes import Random, get_scheme

__all__ = [
    "MajorityKernel",
    "MajorityKernels",
    "Draws",
    "INITS",
    "FORMS",
    "GRAD_SCALES",
    "apply_majority_kernels",
    "collapse",
    "collapsed_state_dict",
    "kernel_copies",
    "copy_spread",
    "has_majority_kernels",
]

INITS = ("replicate", "independent")
FORMS = ("copies", "decoupled")
GRAD_SCALES = ("none", "k", "matched")


# Generator keys of the initial copies and of their noise (at setup): negative, so disjoint from every
# draw key (seeds and kernel indices are >= 0); -2 keeps earlier versions' independent initial copies.
_INIT_STEP, _NOISE_STEP = -2, -3

_M64 = 2**64 - 1
_P1, _P2, _P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261  # xxHash64's primes


def _key(*ints: int) -> int:
    """A 63-bit generator seed from integers, the same in every process and for every value: the mixing
    of CPython's tuple hash (xxHash64's round) written out, each integer its own 64-bit lane. ``hash``
    itself maps an int to a lane with ``hash(-1) == hash(-2)``; for integers in ``[0, 2**61 - 1)`` the
    lanes, and so the keys of earlier versions' draws, are the same."""
    acc = _P5
    for value in ints:
        acc = (acc + (value & _M64) * _P2) & _M64
        acc = ((acc << 31) | (acc >> 33)) & _M64
        acc = (acc * _P1) & _M64
    acc = (acc + (len(ints) ^ (_P5 ^ 3527539))) & _M64
    return (1546275796 if acc == _M64 else acc) & (2**63 - 1)


def _key32(*ints: int) -> int:
    """A 32-bit draw key from integers, the same in every process."""
    return _key(*ints) & 0xFFFFFFFF


class Draws(nn.Module):
    """The seed, draw counter and noise level shared by all kernels of one model.

    The counter, its hash (the ``state`` every kernel's :class:`~lightning_mk.schemes.Random` starts
    from, computed once per step rather than once per kernel) and the noise level are 0-dim buffers (not
    saved in the module's state: the handle's and the callback's ``state_dict`` hold them) that move with
    the module and are updated in place, so a compiled forward reads them as inputs rather than guarding
    on their values. As a forward
    pre-hook on the root module it advances the counter once per training forward; the Lightning
    callback instead sets ``step`` itself once per training batch. ``noise`` (>= 0) scales each draw's
    deviation from the eval-mode kernel (1: the scheme's draw, 0: the eval-mode kernel itself: the
    mean, or ``mu`` when decoupled); the callback sets it every step (and anneals it). ``rank`` (None:
    every process draws the same) gives each data-parallel process its own draws.
    """

    def __init__(self, seed: int, rank: Optional[int] = None, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.seed = seed
        self.rank = rank
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("state", Random.state_of(self.counter), persistent=False)  # the kernels' Random state
        self.register_buffer("level", torch.ones((), device=device), persistent=False)
        self._noise = 1.0  # the level as given (the buffer holds it in the kernels' precision)
        self.noisy = False  # level != 1: a Python flag, so the default level costs no lerp

    @property
    def step(self) -> int:
        return int(self.counter)

    @step.setter
    def step(self, value: int) -> None:
        with torch.no_grad():
            self.counter.fill_(int(value))
        self._hash_counter()

    def _hash_counter(self) -> None:
        with torch.no_grad():
            self.state.copy_(Random.state_of(self.counter))

    @property
    def noise(self) -> float:
        return self._noise

    @noise.setter
    def noise(self, value: float) -> None:
        self._noise = float(value)
        with torch.no_grad():
            self.level.fill_(self._noise)
        self.noisy = self.noisy or self._noise != 1.0

    def key(self, index: int) -> int:
        """The draw key of kernel ``index`` (its draws at each step are keyed by this and the counter)."""
        return _key32(self.seed, index) if self.rank is None else _key32(self.seed, index, self.rank)

    @torch.compiler.disable  # eager, outside the model's graph: a compiled training forward is one graph
    def forward(self, module: nn.Module, args: tuple) -> None:
        if module.training:
            with torch.no_grad():
                self.counter.add_(1)
            self._hash_counter()


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``scale``: changes the copies' learning rate, not the value."""

    @staticmethod
    def forward(ctx, copies: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return copies.view_as(copies)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


_DEFAULTS = {"form": "copies"}  # settings a state saved before they existed had


def _kernel_settings(value: Any) -> Optional[dict]:
    """``{"k", "scheme", "form"}`` from a majority kernel's extra state (a state saved before forms
    existed is ``"copies"``); None for any other value."""
    if not (isinstance(value, Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
        return None
    try:
        settings = json.loads(bytes(value.tolist()))
    except ValueError:
        return None
    if not (isinstance(settings, dict) and set(settings) in ({"k", "scheme"}, {"k", "scheme", "form"})):
        return None
    return _DEFAULTS | settings


class MajorityKernel(nn.Module):
    """Parametrization of the stored tensor to the kernel ``S``: a random combination of the copies in
    training; in eval their mean (``form="copies"``, stored ``[k, *S]``) or ``mu`` (``form="decoupled"``,
    stored ``[k + 1, *S]``: ``mu`` then the deviations)."""

    def __init__(
        self, k: int, scheme: str, index: int, draws: Draws, grad_scale: float = 1.0, form: str = "copies"
    ) -> None:
        super().__init__()
        self.k = k
        self.scheme = scheme
        self.index = index
        self.draws = draws
        self.grad_scale = grad_scale
        self.form = form
        self._scheme = get_scheme(scheme)
        self.key = draws.key(index)
        self._cache: Optional[tuple] = None

    traceable = True  # False: run eagerly under torch.compile (a graph break per kernel)

    def forward(self, stored: Tensor) -> Tensor:
        if not self.traceable:
            return self._eager(stored)
        return self._kernel(stored)

    @torch.compiler.disable
    def _eager(self, stored: Tensor) -> Tensor:
        return self._kernel(stored)

    def _kernel(self, stored: Tensor) -> Tensor:
        # decoupled: row 0 is mu, the rest deviations, combined around mu (mu's gradient stays unscaled)
        mu, rows = (stored[0], stored[1:]) if self.form == "decoupled" else (None, stored)
        if not self.training:
            return self._mean(rows) if mu is None else mu
        if self.grad_scale != 1.0:
            rows = _ScaleGrad.apply(rows, self.grad_scale)
        kernel = self._scheme.combine(rows, Random(self.key, self.draws.state))
        if mu is not None:  # mu + combine(deltas) - mean(deltas): unbiased around mu for every scheme
            kernel = mu + (kernel - rows.mean(0))
        if self.draws.noisy:
            kernel = torch.lerp(rows.mean(0) if mu is None else mu, kernel, self.draws.level.to(kernel.dtype))
        return kernel

    def train(self, mode: bool = True) -> "MajorityKernel":
        self._cache = None
        return super().train(mode)

    def _mean(self, copies: Tensor) -> Tensor:
        """The copies' mean; without autograd (validation, inference) computed once per eval period and
        change of the copies (an in-place update or a state load bumps their version counter)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return copies.mean(0)
        stamp = (copies.data_ptr(), copies._version, copies.dtype, copies.device)
        if self._cache is None or self._cache[0] != stamp:
            self._cache = (stamp, copies.mean(0))
        return self._cache[1]

    def get_extra_state(self) -> Tensor:
        """``k``, the scheme and the form, as JSON in a uint8 tensor: distributed checkpoints (FSDP's
        sharded state dict, ``torch.distributed.checkpoint``) expect tensors in a model's state."""
        settings = {"k": self.k, "scheme": self.scheme, "form": self.form}
        return torch.frombuffer(bytearray(json.dumps(settings).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: Tensor) -> None:
        saved = _kernel_settings(state)
        if saved is None:
            raise ValueError(f"the state being loaded has no majority-kernel settings where this model has them: {state!r}")
        if (saved["k"], saved["scheme"], saved["form"]) != (self.k, self.scheme, self.form):
            raise ValueError(
                f"the state being loaded has majority kernels with k={saved['k']}, scheme={saved['scheme']!r}, "
                f"form={saved['form']!r}, but this model has k={self.k}, scheme={self.scheme!r}, form={self.form!r}; "
                "use the same k, scheme and form to resume"
            )

    def extra_repr(self) -> str:
        settings = f"k={self.k}, scheme={self.scheme!r}, form={self.form!r}"
        return f"{settings}, index={self.index}, grad_scale={self.grad_scale:g}"


def _check_options(
    k: int, scheme: str, init: str, grad_scale: Union[str, float], init_noise: float, form: str = "copies", noise: float = 1.0
) -> float:
    """Validate the options shared by the callback and :func:`apply_majority_kernels`; return the
    gradient scale as a number."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 2:
        raise ValueError(f"k must be an integer >= 2 (the number of copies of each kernel), got {k!r}")
    scheme_ = get_scheme(scheme)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid inits: {list(INITS)}")
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid forms: {list(FORMS)}")
    if isinstance(init_noise, bool) or not isinstance(init_noise, numbers.Real) or init_noise < 0:
        raise ValueError(f"init_noise must be a number >= 0, got {init_noise!r}")
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not 0 <= noise < float("inf"):
        raise ValueError(f"noise must be a number >= 0 (1: the scheme's draw, 0: the eval-mode kernel), got {noise!r}")
    if isinstance(grad_scale, str):
        if grad_scale not in GRAD_SCALES:
            raise ValueError(f"unknown grad_scale {grad_scale!r}; valid: {list(GRAD_SCALES)} or a number > 0")
        return {"none": 1.0, "k": float(k), "matched": 1.0 / scheme_.second_moment(k)}[grad_scale]
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real) or grad_scale <= 0:
        raise ValueError(f"grad_scale must be one of {list(GRAD_SCALES)} or a number > 0, got {grad_scale!r}")
    return float(grad_scale)


def _init_copies(weight: Tensor, layer: nn.Module, pname: str, k: int, init: str, init_noise: float, seed: int, index: int) -> Tensor:
    w = weight.detach()
    if init == "replicate":
        copies = w.unsqueeze(0).repeat(k, *([1] * w.dim()))
    else:
        reset = getattr(layer, "reset_parameters", None) or getattr(layer, "_reset_parameters", None)
        saved = {name: t.clone() for name, t in layer.state_dict().items()}
        devices = [] if w.device.type == "cpu" else [w.device]
        with torch.no_grad(), torch.random.fork_rng(devices=devices, device_type=w.device.type):
            torch.manual_seed(_key(seed, _INIT_STEP, index))
            draws = []
            for _ in range(k):
                reset()
                draws.append(layer._parameters[pname].detach().clone())
            layer.load_state_dict(saved)
        copies = torch.stack(draws)
    if init_noise:
        # centred over the copies, so the mean (the eval-mode model) is unchanged at step 0
        generator = torch.Generator(w.device).manual_seed(_key(seed, _NOISE_STEP, index))
        noise = torch.randn(copies.shape, generator=generator, device=w.device, dtype=w.dtype)
        copies += init_noise * w.pow(2).mean().sqrt() * (noise - noise.mean(0, keepdim=True))
    return copies


def _init_stored(copies: Tensor, weight: Tensor, init: str, form: str) -> Tensor:
    """The stored tensor of a kernel whose initial copies are ``copies``: those, or (decoupled) ``mu``
    (the weight itself when replicated, else the copies' mean) followed by each copy's offset from it."""
    if form == "copies":
        return copies
    mu = weight.detach().clone() if init == "replicate" else copies.mean(0)
    return torch.cat([mu.unsqueeze(0), copies - mu])


class _LoadPlain:
    """Load-state-dict pre-hook of a layer whose ``pname`` has a majority kernel: a plain state (the
    collapsed model's, as in the callback's checkpoints, or a pretrained model's) holds the kernel under
    its plain name; it loads as copies that all equal it, so the eval-mode kernel is that weight. After
    :func:`collapse` the layer is plain again and the hook does nothing."""

    def __init__(self, pname: str) -> None:
        self.pname = pname

    def __call__(self, layer: nn.Module, state: dict, prefix: str, *args: Any) -> None:
        plain, stored = prefix + self.pname, f"{prefix}parametrizations.{self.pname}.original"
        if plain not in state or stored in state or not parametrize.is_parametrized(layer, self.pname):
            return
        kernel = layer.parametrizations[self.pname][0]
        weight = state.pop(plain)
        state[stored] = _init_stored(weight.unsqueeze(0).expand(kernel.k, *weight.shape), weight, "replicate", kernel.form)
        state[prefix + f"parametrizations.{self.pname}" + _EXTRA] = kernel.get_extra_state()


_SETTINGS = ("k", "scheme", "init", "form", "seed")  # what a saved draw position is only valid with


def _refuse_other_settings(saved: Mapping[str, Any], current: Mapping[str, Any], source: str, target: str) -> None:
    """Raise if ``saved`` lacks a key of ``current`` or differs from it in k, scheme, init, form or seed,
    naming both values of each difference."""
    saved = _DEFAULTS | dict(saved)
    missing = [name for name in current if name not in saved]
    if missing:
        raise ValueError(f"{source} lacks {missing}; a majority-kernel state has {list(current)}")
    differ = [name for name in _SETTINGS if name in current and saved[name] != current[name]]
    if differ:
        was = ", ".join(f"{name}={saved[name]!r}" for name in differ)
        now = ", ".join(f"{name}={current[name]!r}" for name in differ)
        raise ValueError(f"{source} has {was}, but {target} has {now}; use the same {' and '.join(differ)} to resume")


class MajorityKernels:
    """What :func:`apply_majority_kernels` did to ``module``: its settings, the ``Draws`` its kernels
    share, and the way back (:meth:`collapse`, :meth:`collapsed_state_dict`).

    Save :meth:`state_dict` next to the module's and the optimizer's state to resume a raw-PyTorch run
    exactly: it holds the draw position and noise level, which the module's state does not.
    """

    def __init__(self, module: nn.Module, draws: Draws, k: int, scheme: str, init: str, form: str = "copies") -> None:
        self.module = module
        self.draws = draws
        self.k = k
        self.scheme = scheme
        self.init = init
        self.form = form

    @property
    def seed(self) -> int:
        return self.draws.seed

    @property
    def rank(self) -> Optional[int]:
        return self.draws.rank

    @property
    def step(self) -> int:
        """The draw position: training steps drawn so far (the next training forward draws ``step + 1``
        with ``step_on_forward``)."""
        return self.draws.step

    @step.setter
    def step(self, value: int) -> None:
        self.draws.step = int(value)

    def state_dict(self) -> dict[str, Any]:
        settings = {"k": self.k, "scheme": self.scheme, "init": self.init, "form": self.form}
        settings |= {"seed": self.seed, "rank": self.rank}
        return settings | {"step": self.draws.step, "noise": self.draws.noise}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the draw position and noise level; refuse a state saved with another k, scheme, init,
        form or seed. ``rank`` is not compared: with per-rank draws each process resumes with its own."""
        _refuse_other_settings(state, self.state_dict(), "the state being loaded", "this model")
        self.draws.step = int(state["step"])
        self.draws.noise = float(state["noise"])

    def collapse(self) -> nn.Module:
        """:func:`collapse` the module in place (the step hook goes too) and return the plain module."""
        return collapse(self.module)

    def collapsed_state_dict(self) -> dict[str, Any]:
        """:func:`collapsed_state_dict` of the module, which is left as it is."""
        return collapsed_state_dict(self.module)

    def __repr__(self) -> str:
        return f"MajorityKernels({', '.join(f'{key}={value!r}' for key, value in self.state_dict().items())})"


def apply_majority_kernels(
    module: nn.Module,
    k: int = 4,
    scheme: str = "select",
    init: str = "replicate",
    *,
    form: str = "copies",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    layer_types: Optional[Sequence[Union[type, str]]] = None,
    biases: bool = False,
    init_noise: float = 0.0,
    grad_scale: Union[str, float] = "none",
    noise: float = 1.0,
    seed: int = 0,
    rank: Optional[int] = None,
    step_on_forward: bool = True,
) -> MajorityKernels:
    """Give every chosen kernel of ``module`` ``k`` trainable copies, in place; returns the
    :class:`MajorityKernels` handle (``.module``, ``.draws``, ``.step``, ``state_dict``, ``collapse``), whose
    ``coverage`` (:class:`~lightning_mk.layers.Coverage`) says what share of the parameters got copies.

    Layers are chosen by type (``layer_types``: classes or names, default every registered type, see
    :func:`~lightning_mk.layers.register_layer`) and by module name globs (``include``, ``exclude``).
    Frozen parameters are left alone. A parameter shared by several layers (tied weights) gets one set
    of copies and one draw per step; a module holding it that is not of a chosen type (BERT's
    prediction head holds its decoder's bias) is given the copies too.

    ``init="replicate"`` starts every copy at the current weight (plus centred relative noise
    ``init_noise``): the eval-mode model is unchanged, which is what fine-tuning needs.
    ``init="independent"`` re-draws each copy with the layer's own initializer: the copies start
    diverse, but their mean has ``1/sqrt(k)`` of the usual initial scale.

    ``form="copies"`` stores the k copies (``[k, *S]``); the deployed kernel, their mean, gets 1/k of
    the sampled kernel's gradient, so it trains k times slower than the plain model under SGD (about
    sqrt(k) under Adam). ``form="decoupled"`` stores the deployed kernel ``mu`` and k deviations
    (``[k + 1, *S]``, row 0 is ``mu``); the copies are ``mu + delta_i - mean(delta)``, ``mu`` gets the
    plain model's gradient (with all deviations zero this is plain training, under any optimizer) and
    the deviations their share of it. Replicated, ``mu`` is the weight and the deviations zero (plus
    ``init_noise``); independent, ``mu`` is the draws' mean and the deviations the draws' offsets.

    ``grad_scale`` multiplies the copies' gradients: ``"none"`` (1), ``"k"`` (the mean then moves
    at the plain model's pace under SGD) or ``"matched"`` (``1 / E[sum a_i^2]``: the sampled kernel
    moves one plain step per step), or a number. Decoupled, it multiplies the deviations' gradients
    only: ``mu`` always gets the plain gradient.

    ``noise`` scales each draw's deviation from the eval-mode kernel: the kernel a training step uses is
    ``eval + noise * (draw - eval)`` (1: the scheme's draw; 0: the eval-mode kernel itself; decoupled,
    ``mu + noise * (combine(delta) - mean(delta))``), unbiased around the eval-mode kernel at any level.
    The handle's ``draws.noise`` changes it during training (the callback's ``anneal_noise`` does).

    ``rank`` (e.g. the process's global rank) gives each data-parallel process its own draws
    ("per-rank noise"); ``None`` (default) draws the same coefficients in every process.

    With ``step_on_forward`` every training-mode forward of ``module`` draws new coefficients;
    otherwise the caller advances the handle's ``step`` (the Lightning callback does, once per optimizer
    step). Optimizers must be created after this call.

    ``module.load_state_dict`` then takes the module's own state too (a pretrained or collapsed model's,
    with plain keys): each kernel loads as ``k`` equal copies (decoupled: ``mu`` and zero deviations), so
    the eval-mode model is exactly the loaded one; a state with copies loads them as they are.
    """
    scale = _check_options(k, scheme, init, grad_scale, init_noise, form, noise)
    if has_majority_kernels(module):
        raise ValueError("the module already has majority kernels; call collapse(module) before applying them again")
    eligible = _eligible(module, _layer_types(layer_types), biases)
    users: dict[int, list] = {}  # parameter id -> [(layer name, layer, parameter name)]
    params: dict[int, Tensor] = {}
    for name in _choose(eligible, include, exclude):
        for layer, pname in eligible[name]:
            p = layer._parameters[pname]
            params[id(p)] = p
            users.setdefault(id(p), []).append((name, layer, pname))
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

    if init == "independent":
        _check_resettable(layer for uses in users.values() for _, layer, _ in uses)
    coverage = _coverage(module, params)

    device = next((p.device for p in params.values()), None)
    draws = Draws(int(seed), None if rank is None else int(rank), device)
    draws.noise = noise
    for index, (pid, uses) in enumerate(users.items()):
        _, layer, pname = uses[0]
        copies = _init_copies(params[pid], layer, pname, k, init, init_noise, int(seed), index)
        stored = nn.Parameter(_init_stored(copies, params[pid], init, form))
        kernel = MajorityKernel(int(k), scheme, index, draws, scale, form)
        for _, layer, pname in uses:
            parametrize.register_parametrization(layer, pname, kernel, unsafe=True)
            layer.parametrizations[pname].original = stored
            layer.register_load_state_dict_pre_hook(_LoadPlain(pname))
    if step_on_forward:
        module.register_forward_pre_hook(draws)
    handle = MajorityKernels(module, draws, int(k), scheme, init, form)
    handle.coverage = coverage
    return handle


def _parametrized(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, MajorityKernel, Tensor]]:
    """(state-dict prefix, layer, parameter name, kernel, stored tensor) for every majority kernel, once
    per path to it (a shared module appears under each of its names, as in ``state_dict``)."""
    for name, layer in module.named_modules(remove_duplicate=False):
        if not parametrize.is_parametrized(layer):
            continue
        for pname, plist in layer.parametrizations.items():
            if isinstance(plist[0], MajorityKernel):
                yield (f"{name}." if name else ""), layer, pname, plist[0], plist.original


def has_majority_kernels(module: nn.Module) -> bool:
    return next(_parametrized(module), None) is not None


def _deployed(stored: Tensor, form: str) -> Tensor:
    """The eval-mode kernel: the copies' mean, or ``mu`` (a new tensor either way, so that saving it
    does not save the whole stored tensor)."""
    return stored[0].clone() if form == "decoupled" else stored.mean(0)


def _copies(stored: Tensor, form: str) -> Tensor:
    """The ``[k, *S]`` copies the schemes combine: the stored tensor, or ``mu + delta_i - mean(delta)``."""
    if form == "copies":
        return stored
    deltas = stored[1:]
    return stored[0] + (deltas - deltas.mean(0))


def kernel_copies(module: nn.Module) -> dict[str, Tensor]:
    """Plain-model parameter name -> its ``[k, *S]`` copies, one entry per set of copies: with
    ``form="copies"`` the trainable tensor itself (with its ``.grad``), decoupled the copies
    ``mu + delta_i - mean(delta)`` computed from it (detached)."""
    found: dict[int, tuple[str, Tensor]] = {}
    for prefix, _, pname, kernel, stored in _parametrized(module):
        if id(stored) not in found:
            copies = stored if kernel.form == "copies" else _copies(stored.detach(), kernel.form)
            found[id(stored)] = (prefix + pname, copies)
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
        settings = _kernel_settings(value) if key.endswith(_EXTRA) else None
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
    found = list(_parametrized(module))
    targets = {(id(layer), pname): (layer, pname) for _, layer, pname, _, _ in found}
    sets = {id(stored): (stored, kernel.form) for *_, kernel, stored in found}
    for layer in {id(layer): layer for layer, _ in targets.values()}.values():
        _own_class(layer)
    for layer, pname in targets.values():
        parametrize.remove_parametrizations(layer, pname, leave_parametrized=False)
    with torch.no_grad():
        for stored, form in sets.values():
            stored.set_(_deployed(stored, form))
            stored.grad = None
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, Draws):
            del module._forward_pre_hooks[key]
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
                spread[name] = _spread(rows.float(), first, groups, form, stored.shape[0])
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


def _spread(rows: Tensor, first: int, groups: list, form: str, n_rows: int) -> float:
    """:func:`copy_spread` of one kernel from ``rows`` ``first``, ``first + 1``, ... of its stored tensor;
    the sums over the rows held elsewhere are all-reduced over ``groups``."""

    def total(tensor: Tensor) -> Tensor:
        for group in groups:
            torch.distributed.all_reduce(tensor, group=group)
        return tensor

    k = n_rows - (form == "decoupled")
    if form == "decoupled":  # the copies' offsets from mu are the deviations' offsets from their mean
        deviations = rows[1:] if first == 0 else rows
        mu = rows[0] if first == 0 and len(rows) else rows.new_zeros(rows.shape[1:])
        mu, center = total(torch.stack([mu, deviations.sum(0)]))
        center = center / k
    else:
        deviations = rows
        mu = center = total(rows.sum(0)) / k  # the copies' mean
    distance = total((deviations - center).pow(2).sum().reshape(1))
    return (distance / (k * mu.pow(2).sum().clamp_min(1e-24))).sqrt().item()
