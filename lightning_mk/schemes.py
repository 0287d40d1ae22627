"""Coefficient schemes: how one training step combines the k copies of a kernel.

A scheme draws random coefficients ``a`` (per element or per layer) with ``E[a_i] = 1/k`` and
returns ``sum_i a_i * copies[i]``, so the sampled kernel is an unbiased draw around the mean of
the copies. Its random numbers come from a :class:`Random`: pure tensor functions of the seed, the
step, the kernel and the element, so a draw is traced and fused by ``torch.compile`` like any other
op, and is the same in every process and every re-run of a forward. Schemes never build a dense
``[k, *shape]`` coefficient tensor (``select`` gathers, ``convex`` accumulates copy by copy,
``layer`` is one matrix-vector product).

Add your own with :func:`register_scheme`; it is then selectable by name everywhere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Random", "Scheme", "Select", "Convex", "Layer", "Majority", "SCHEMES", "register_scheme", "get_scheme"]

_M = 0xFFFFFFFF  # 32-bit values in int64 tensors: with multipliers below 2**31 no product overflows


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash with full avalanche (Mueller's), on int64 tensors holding 32-bit values; in
    place (``x`` is a fresh tensor of the caller's): a third of the eager time of out-of-place ops."""
    for _ in range(2):
        x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(_M)
    return x.bitwise_xor_(x >> 16)


def _mix_int(x: int) -> int:
    """:func:`_mix` on a Python int (constants of a draw: folded away under ``torch.compile``)."""
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & _M
    return (x >> 16) ^ x


class Random:
    """Counter-based random numbers for one kernel's draw at one step.

    Every number is ``hash(element ^ state ^ hash(key, call))``: ``state`` is a 0-dim int64 tensor holding
    the hashed step (:meth:`state_of`; the kernels of a model share one, updated in place each step),
    ``key`` (a 32-bit Python int) stands for the seed, the kernel and (with per-rank noise) the rank,
    ``call`` counts the requests of one draw, and ``element`` is the flat index. No ``torch.Generator``:
    the same arguments give the same numbers on any device, in eager and compiled code.
    """

    def __init__(self, key: int, state: Tensor) -> None:
        self.key = key
        self.state = state
        self.calls = 0

    @staticmethod
    def state_of(step: Tensor) -> Tensor:
        """The state of draw position ``step`` (a 0-dim int64 tensor): its hash, so that neighbouring
        steps draw unrelated numbers."""
        return _mix(step & _M)

    def bits(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Uniform integers in ``[0, 2**32)`` (int64), one per element of ``shape``."""
        # (key, call) is hashed from an offset value, so a small step and a small key or call cannot swap roles
        stream = self.state ^ _mix_int((_mix_int(self.key ^ 0xA511E9B3) + self.calls * 0x9E3779B9) & _M)
        self.calls += 1
        element = torch.arange(math.prod(shape), dtype=torch.int64, device=device)  # below 2**32 in practice
        return _mix(element.bitwise_xor_(stream)).view(shape)

    def integers(self, high: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Integers in ``[0, high)`` (int64; each value's probability within ``2**-32`` of ``1 / high``)."""
        return (self.bits(shape, device) * high) >> 32

    def uniform(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Float32 in ``(0, 1)``: 24 random bits, never 0 or 1."""
        return ((self.bits(shape, device) >> 8).float() + 0.5) * 2.0**-24

    def exponential(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Float32 standard exponentials."""
        return self.uniform(shape, device).log().neg()


class Scheme:
    """Base class. ``combine`` must satisfy ``E[combine(copies, random)] == copies.mean(0)``, drawing
    its random numbers from ``random`` only."""

    def combine(self, copies: Tensor, random: Random) -> Tensor:
        raise NotImplementedError

    def second_moment(self, k: int) -> float:
        """``E[sum_i a_i**2]``: the sampled kernel moves ``c * second_moment`` plain steps per step
        when the copies' gradients are scaled by ``c`` (see ``grad_scale="matched"``)."""
        raise NotImplementedError


class Select(Scheme):
    """Per element, one copy chosen uniformly at random (one-hot coefficients)."""

    def combine(self, copies: Tensor, random: Random) -> Tensor:
        index = random.integers(copies.shape[0], copies.shape[1:], copies.device)
        return copies.gather(0, index.unsqueeze(0)).squeeze(0)

    def second_moment(self, k: int) -> float:
        return 1.0


class Convex(Scheme):
    """Per element, random convex weights, uniform on the simplex (normalised exponentials, i.e. a
    Dirichlet(1, ..., 1) draw), accumulated copy by copy: no ``[k, *shape]`` coefficients."""

    def combine(self, copies: Tensor, random: Random) -> Tensor:
        total = weights = None
        for copy in copies:
            e = random.exponential(copy.shape, copy.device).to(copy.dtype)
            total = e * copy if total is None else total + e * copy
            weights = e if weights is None else weights + e
        return total / weights

    def second_moment(self, k: int) -> float:
        return 2.0 / (k + 1)


class Layer(Scheme):
    """One convex weight vector per layer and step, uniform on the simplex (the cheapest)."""

    def combine(self, copies: Tensor, random: Random) -> Tensor:
        e = random.exponential((copies.shape[0],), copies.device).to(copies.dtype)
        return ((e / e.sum()) @ copies.flatten(1)).view(copies.shape[1:])

    def second_moment(self, k: int) -> float:
        return 2.0 / (k + 1)


class Majority(Scheme):
    """Per element, the mean of a random subset of ``m = k // 2 + 1`` copies (the smallest majority).

    Drawn as its complement, the ``r = k - m`` copies left out, by Floyd's algorithm (one integer
    per left-out copy, no sorting), so the cost is ``r`` gathers rather than k random numbers per
    element. With k = 2 the majority is both copies, so the sampled kernel is always the mean.
    """

    def combine(self, copies: Tensor, random: Random) -> Tensor:
        k = copies.shape[0]
        m = k // 2 + 1
        total = copies.sum(0)
        left_out: list[Tensor] = []
        for j in range(m, k):  # Floyd: a uniform random (k - m)-subset of range(k)
            index = random.integers(j + 1, copies.shape[1:], copies.device)
            if left_out:
                taken = torch.stack([index == earlier for earlier in left_out]).any(0)
                index = torch.where(taken, j, index)
            left_out.append(index)
            total = total - copies.gather(0, index.unsqueeze(0)).squeeze(0)
        return total / m

    def second_moment(self, k: int) -> float:
        return 1.0 / (k // 2 + 1)


SCHEMES: dict[str, Scheme] = {"select": Select(), "convex": Convex(), "layer": Layer(), "majority": Majority()}


def register_scheme(name: str, scheme: Scheme) -> None:
    """Make ``scheme`` selectable as ``scheme=name`` (an existing name is an error, not an override)."""
    if name in SCHEMES:
        raise ValueError(f"scheme {name!r} is already registered; registered schemes: {sorted(SCHEMES)}")
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme {name!r} must be an instance of lightning_mk.Scheme, got {type(scheme).__name__}")
    SCHEMES[name] = scheme


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown scheme {name!r}; valid schemes: {sorted(SCHEMES)}") from None
