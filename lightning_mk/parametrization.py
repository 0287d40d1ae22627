"""The parametrization that draws and combines a kernel's copies (:class:`MajorityKernel`), and the draws its
kernels share (:class:`Draws`).

Draws are pure tensor functions of ``(seed, step, kernel index)`` (:class:`~lightning_mk.schemes.Random`),
so every process of a data-parallel run samples the same coefficients with no communication, tied
weights share one draw, a re-run forward (activation checkpointing) sees the same kernel, and
``torch.compile`` traces the draw into the model's graph (``fullgraph=True`` holds).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_mk import native
from lightning_mk.forms import Decoupled, Form, get_form
from lightning_mk.schemes import Batch, Random, Select, get_scheme
from lightning_mk.settings import Settings

__all__ = ["MajorityKernel", "Draws", "majority_kernels", "has_majority_kernels", "kernel_settings", "seed_of"]

_M64 = 2**64 - 1
_FORM_STEP = -4  # the draw step keying a form's own initial randomness (apply.py's initial copies use -2, -3)
_P1, _P2, _P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261  # xxHash64's primes


def seed_of(*ints: int) -> int:
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


class Draws(nn.Module):
    """The seed, draw counter and noise level shared by all kernels of one model.

    The step's hash (the ``state`` every kernel's :class:`~lightning_mk.schemes.Random` starts from, computed
    once per step rather than once per kernel) and the noise level are 0-dim buffers (not saved in the module's
    state: the handle's and the callback's ``state_dict`` hold them, and the step) that move with the module and
    are updated in place, so a compiled forward reads them as inputs rather than guarding on their values. The
    step itself is a Python int: the hash is computed on the host and written with one ``fill_`` (no device
    sync, no tensor ops per step). As a forward pre-hook on the root module it advances the step once per
    training forward; the Lightning callback instead sets ``step`` itself once per optimizer step. ``noise`` (>= 0)
    scales each draw's deviation from the eval-mode kernel (1: the scheme's draw, 0: the eval-mode kernel
    itself); the callback sets it every step (and anneals it). ``rank`` (None: every process draws the
    same) gives each data-parallel process its own draws.
    """

    def __init__(self, settings: Settings, rank: Optional[int] = None, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.seed = int(settings.seed)
        self.rank = None if rank is None else int(rank)
        self._step = 0
        state = torch.tensor(Random.state_of(0), dtype=torch.int64, device=device)
        self.register_buffer("state", state, persistent=False)  # the kernels' Random state
        self.batch = Batch()  # the kernels' small draws, hashed together each step
        self.register_buffer("level", torch.ones((), device=device), persistent=False)
        self._noise = 1.0  # the level as given (the buffer holds it in the kernels' precision)
        self.noisy = False  # level != 1: a Python flag, so the default level costs no lerp
        self._decay = float(settings.decay) / settings.noise if settings.decay else 0.0  # per unit of level
        self.register_buffer("decay", torch.zeros((), device=device), persistent=False)  # now: decay * level / noise

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = int(value)
        with torch.no_grad():
            self.state.fill_(Random.state_of(self._step))
        self.batch.advance()

    @property
    def noise(self) -> float:
        return self._noise

    @noise.setter
    def noise(self, value: float) -> None:
        self._noise = float(value)
        with torch.no_grad():
            self.level.fill_(self._noise)
            self.decay.fill_(self._decay * self._noise)
        self.noisy = self.noisy or self._noise != 1.0

    def key(self, index: int) -> int:
        """The 32-bit draw key of kernel ``index`` (its draws at each step are keyed by this and the step)."""
        ints = (self.seed, index) if self.rank is None else (self.seed, index, self.rank)
        return seed_of(*ints) & 0xFFFFFFFF

    def forward(self, module: nn.Module, args: tuple) -> None:  # outside compiled graphs: see compile_boundaries
        if module.training:
            self.step = self._step + 1


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``scale``: changes the copies' learning rate, not the value."""

    @staticmethod
    def forward(ctx, copies: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return copies.view_as(copies)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class _Decay(torch.autograd.Function):
    """Identity on the kernel; adds ``coefficient * mu`` to ``mu``'s gradient: L2 weight decay on the deployed
    kernel alone, whatever the optimizer does to the stored tensor."""

    @staticmethod
    def forward(ctx, kernel: Tensor, mu: Tensor, coefficient: Tensor) -> Tensor:
        ctx.save_for_backward(mu, coefficient)
        return kernel.view_as(kernel)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        mu, coefficient = ctx.saved_tensors
        return grad, mu * coefficient.to(mu.dtype), None


def kernel_settings(value: Any) -> Optional[dict]:
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
    return {"form": "copies"} | settings


class MajorityKernel(nn.Module):
    """Parametrization of the stored tensor to the kernel ``S``: in training a random combination of the
    copies (drawn by the scheme, shaped by the form), in eval the deployed kernel (their mean, or ``mu``).

    Registered with ``unsafe=True``, as the stored tensor has another shape than the kernel (``dims``
    dimensions): the stored tensor is put in the layer's place first, so that every holder of a tied weight
    registers the same one, and :meth:`right_inverse` passes a tensor of the stored layout through (rather
    than resizing the layer's own parameter in place at registration, ``original.set_``, which a tied
    holder would then see resized and DeepSpeed ZeRO-3's partitioned parameters do not allow). Assigning
    a plain kernel, ``layer.weight = w``, makes every copy ``w``.
    """

    def __init__(self, settings: Settings, index: int, draws: Draws, dims: int) -> None:
        super().__init__()
        self.settings = settings
        self.index = index
        self.draws = draws
        self.dims = dims
        self.grad_scale = settings.gradient_scale
        self._scheme = get_scheme(settings.scheme)
        self._form = get_form(settings.form)
        # Decoupled.sample of Select.combine as one autograd node (Decoupled.select), where neither is overridden
        self._select = (isinstance(self._form, Decoupled) and type(self._form).sample is Decoupled.sample
                        and type(self._scheme).combine is Select.combine)
        self.key = draws.key(index)
        # the rows themselves drawn by Select.combine, as they are: in eager CPU training at the plain noise level the
        # whole training kernel is the CPU kernel's one op (its stream constant fixed, as Select makes one request)
        form = type(self._form)
        self._direct = (self._form.random and form.split is Form.split and form.rows is Form.rows
                        and form.sample is Form.sample and type(self._scheme).combine is Select.combine
                        and self.grad_scale == 1.0)
        self._constant = Random(self.key, draws.state).stream()
        self._cache: Optional[tuple] = None

    traceable = True  # False: run eagerly under torch.compile (a graph break per kernel)

    def forward(self, stored: Tensor) -> Tensor:
        if not self.traceable:
            return self._eager(stored)
        return self._kernel(stored)

    def _eager(self, stored: Tensor) -> Tensor:  # outside compiled graphs: see compile_boundaries
        return self._kernel(stored)

    def _kernel(self, stored: Tensor) -> Tensor:
        if not self.training:
            return self._deployed(stored)
        draws = self.draws
        direct = self._direct and not (draws.noisy or draws._decay or torch.compiler.is_compiling())
        if direct and native.handles(stored):  # what the general composition below computes, as one op
            return native.select(stored, draws.state, self._constant)
        # a re-parametrisation trains its deployed kernel; at zero noise the draw is the eval kernel: skip it
        # (compiled, the draw stays: one graph for every level)
        if not self._form.random or (draws._noise == 0 and not torch.compiler.is_compiling()):
            return self._form.deployed(*self._form.split(stored))
        random = Random(self.key, draws.state, draws.batch)
        # compiled, the CPU kernel's node where it runs (elsewhere inductor fuses the general composition)
        if self._select and (not torch.compiler.is_compiling() or native.handles(stored)):
            decay = draws.decay if draws._decay else None
            return self._form.select(stored, self._scheme, random, draws.level, decay, self.grad_scale)
        head, rows = self._form.split(stored)
        if self.grad_scale != 1.0:
            rows = _ScaleGrad.apply(rows, self.grad_scale)
        kernel = self._form.sample(head, rows, self._scheme.combine(rows, random))
        if draws.noisy or draws._decay:
            deployed = self._form.deployed(head, rows)  # once: the copies form averages k rows for it
            if draws.noisy:
                kernel = torch.lerp(deployed, kernel, draws.level.to(kernel.dtype))
            if draws._decay:
                kernel = _Decay.apply(kernel, deployed, draws.decay)
        return kernel

    def right_inverse(self, value: Tensor) -> Tensor:
        """A stored tensor as it is; a plain kernel as the stored tensor whose copies all equal it (its
        deployed kernel is ``value``)."""
        if value.dim() == self.dims + 1:
            return value
        return self.store(value.unsqueeze(0).repeat(self.settings.k, *[1] * value.dim()), value, replicated=True)

    def store(self, copies: Tensor, weight: Tensor, replicated: bool) -> Tensor:
        """The form's stored tensor for this kernel (:meth:`Form.store`, its randomness keyed by the seed and the
        kernel's index)."""
        return self._form.store(copies, weight, replicated, seed_of(self.settings.seed, _FORM_STEP, self.index))

    def train(self, mode: bool = True) -> "MajorityKernel":
        self._cache = None
        return super().train(mode)

    def _deployed(self, stored: Tensor) -> Tensor:
        """The deployed kernel; without autograd (validation, inference) computed once per eval period and
        change of the stored tensor (an in-place update or a state load bumps its version counter)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._form.deployed(*self._form.split(stored))
        stamp = (stored.data_ptr(), stored._version, stored.dtype, stored.device)
        if self._cache is None or self._cache[0] != stamp:
            self._cache = (stamp, self._form.deployed(*self._form.split(stored)))
        return self._cache[1]

    def get_extra_state(self) -> Tensor:
        """``k``, the scheme and the form, as JSON in a uint8 tensor: distributed checkpoints (FSDP's
        sharded state dict, ``torch.distributed.checkpoint``) expect tensors in a model's state."""
        settings = {name: getattr(self.settings, name) for name in ("k", "scheme", "form")}
        return torch.frombuffer(bytearray(json.dumps(settings).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: Tensor) -> None:
        saved = kernel_settings(state)
        if saved is None:
            raise ValueError(f"the state being loaded has no majority-kernel settings where this model has them: {state!r}")
        k, scheme, form = self.settings.k, self.settings.scheme, self.settings.form
        if (saved["k"], saved["scheme"], saved["form"]) != (k, scheme, form):
            raise ValueError(
                f"the state being loaded has majority kernels with k={saved['k']}, scheme={saved['scheme']!r}, "
                f"form={saved['form']!r}, but this model has k={k}, scheme={scheme!r}, form={form!r}; "
                "use the same k, scheme and form to resume"
            )

    def extra_repr(self) -> str:
        settings = f"k={self.settings.k}, scheme={self.settings.scheme!r}, form={self.settings.form!r}"
        return f"{settings}, index={self.index}, grad_scale={self.grad_scale:g}"


_CACHES: list = []  # the parametrize.cached() contexts of the layer forwards running now, innermost last


def enter_cache(layer: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a layer that reads its weights several times per forward (an RNN reads each about
    2.5 times): the forward runs in ``parametrize.cached()``, so each kernel is drawn once per forward (the
    same draw as every read gave: draws depend on the step alone; a re-run forward draws it again, the same).
    Not in a compiled graph, where the reads are traced as they are (a hook outside the graph would break it)."""
    if not torch.compiler.is_compiling():
        context = parametrize.cached()
        context.__enter__()
        _CACHES.append(context)


def exit_cache(layer: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook closing :func:`enter_cache` (registered with ``always_call``: also when the forward fails)."""
    if not torch.compiler.is_compiling():
        _CACHES.pop().__exit__(None, None, None)


def compile_boundaries() -> None:
    """Run the draw-step hook (a compiled training forward is then the model's graph alone) and a kernel marked
    not ``traceable`` outside ``torch.compile``'s graphs. Done once, when majority kernels are first applied,
    rather than at import: ``torch.compiler.disable`` imports ``torch._dynamo``, about a second."""
    if not getattr(Draws, "_outside_graphs", False):
        Draws.forward = torch.compiler.disable(Draws.forward)
        MajorityKernel._eager = torch.compiler.disable(MajorityKernel._eager)
        Draws._outside_graphs = True


def majority_kernels(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, MajorityKernel, Tensor]]:
    """(state-dict prefix, layer, parameter name, kernel, stored tensor) for every majority kernel, once
    per path to it (a shared module appears under each of its names, as in ``state_dict``)."""
    for name, layer in module.named_modules(remove_duplicate=False):
        if not parametrize.is_parametrized(layer):
            continue
        for pname, plist in layer.parametrizations.items():
            if isinstance(plist[0], MajorityKernel):
                yield (f"{name}." if name else ""), layer, pname, plist[0], plist.original


def has_majority_kernels(module: nn.Module) -> bool:
    return next(majority_kernels(module), None) is not None
