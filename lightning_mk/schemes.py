"""Coefficient schemes: how one training step combines the k copies of a kernel.

A scheme draws random coefficients ``a`` (per element or per layer) with ``E[a_i] = 1/k`` and
returns ``sum_i a_i * copies[i]``, so the sampled kernel is an unbiased draw around the mean of
the copies. Its random numbers come from a :class:`Random`: pure tensor functions of the seed, the
step, the kernel and the element, so a draw is traced and fused by ``torch.compile`` like any other
op, and is the same in every process and every re-run of a forward. Schemes never build a dense
``[k, *shape]`` coefficient tensor (``select`` indexes, ``convex`` accumulates copy by copy,
``layer`` is one matrix-vector product).

Add your own with :func:`register_scheme`; it is then selectable by name everywhere.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Union

import torch
from torch import Tensor

from lightning_mk import native

__all__ = ["Random", "Batch", "Scheme", "Select", "Convex", "Layer", "Majority", "SCHEMES", "register_scheme", "get_scheme"]

_M = 0xFFFFFFFF  # 32-bit values in int64 tensors: with multipliers below 2**31 no product overflows


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash with full avalanche (Mueller's), on int64 tensors holding 32-bit values; in
    place (``x`` is a fresh tensor of the caller's): a third of the eager time of out-of-place ops."""
    for _ in range(2):
        x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(_M)
    return x.bitwise_xor_(x >> 16)


def _hash(constant: int, count: int, state: Tensor, device: torch.device) -> Tensor:
    """The hashes of ``count`` indices in the stream ``state ^ constant`` (int64 holding 32-bit values)."""
    return _mix(torch.arange(count, dtype=torch.int64, device=device).bitwise_xor_(state ^ constant))  # count < 2**32


def _words(count: int, width: int) -> int:
    """The hashes a request of ``count`` numbers of ``width`` bits takes (``width`` 0: a whole 32-bit hash each)."""
    return count if width == 0 else -(-count // (32 // width))


def _split(words: Tensor, width: int) -> Tensor:
    """Each 32-bit hash split into ``32 // width`` integers of ``width`` bits (int64, flat, low bits first): the
    index type of ``gather`` and its backward, which would otherwise convert them."""
    shifts = torch.arange(0, 32 // width * width, width, dtype=torch.int64, device=words.device)
    return (words.view(-1, 1) >> shifts).bitwise_and_((1 << width) - 1).view(-1)


def _numbers(constant: int, count: int, width: int, state: Tensor, device: torch.device) -> Tensor:
    """``count`` numbers of ``width`` bits (0: whole hashes, int64) of the stream ``state ^ constant``."""
    words = _hash(constant, _words(count, width), state, device)
    return words if width == 0 else _split(words, width)[:count]


def _mix_int(x: int) -> int:
    """:func:`_mix` on a Python int (constants of a draw: folded away under ``torch.compile``)."""
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & _M
    return (x >> 16) ^ x


class Random:
    """Counter-based random numbers for one kernel's draw at one step.

    Every number is ``hash(index ^ state ^ hash(key, call))``, or a field of one: ``state`` is a 0-dim int64
    tensor holding the hashed step (:meth:`state_of`; the kernels of a model share one, updated in place each
    step), ``key`` (a 32-bit Python int) stands for the seed, the kernel and (with per-rank noise) the rank,
    ``call`` counts the requests of one draw, and ``index`` is the flat element index (for :meth:`integers` of a
    power of two, the index of the hash whose bits it takes). No ``torch.Generator``: the same arguments give the
    same numbers on any device, in eager and compiled code, batched (``batch``) or not.
    """

    def __init__(self, key: int, state: Tensor, batch: Optional["Batch"] = None) -> None:
        self.key = key
        self.state = state
        self.batch = batch
        self.calls = 0

    @staticmethod
    def state_of(step: Union[int, Tensor]) -> Union[int, Tensor]:
        """The state of draw position ``step`` (an int, or a 0-dim int64 tensor: the same value): its hash, so
        that neighbouring steps draw unrelated numbers."""
        return _mix_int(step & _M) if isinstance(step, int) else _mix(step & _M)

    def stream(self) -> int:
        """The next request's stream constant: its numbers are those of the stream ``state ^ constant``."""
        # (key, call) is hashed from an offset value, so a small step and a small key or call cannot swap roles
        constant = _mix_int((_mix_int(self.key ^ 0xA511E9B3) + self.calls * 0x9E3779B9) & _M)
        self.calls += 1
        return constant

    def _numbers(self, count: int, width: int, device: torch.device) -> Tensor:
        """This call's ``count`` numbers of ``width`` bits (:func:`_numbers`), from the batch where it holds them."""
        constant = self.stream()
        if self.batch is not None and not torch.compiler.is_compiling():
            return self.batch.numbers(constant, count, width, self.state, device)
        return _numbers(constant, count, width, self.state, device)

    def bits(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Uniform integers in ``[0, 2**32)`` (int64), one per element of ``shape``."""
        return self._numbers(math.prod(shape), 0, device).view(shape)

    def integers(self, high: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Integers in ``[0, high)`` (int64). For ``high`` a power of two ``2**b`` each is exactly uniform: one hash
        gives ``32 // b`` of them, ``b`` bits each (a sixteenth of the hashing at ``high = 4``); otherwise one hash per
        element, scaled (each value's probability within ``2**-32`` of ``1 / high``)."""
        width = (high - 1).bit_length()
        if width == 0 or high != 1 << width:
            return (self.bits(shape, device) * high) >> 32
        return self._numbers(math.prod(shape), width, device).view(shape)

    def uniform(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Float32 in ``(0, 1)``: 24 random bits, never 0 or 1."""
        return ((self.bits(shape, device) >> 8).float() + 0.5) * 2.0**-24

    def exponential(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Float32 standard exponentials."""
        return self.uniform(shape, device).log().neg()


class Batch:
    """The small requests of one model's draws at one step, made together (eager mode).

    A model's kernels make the same requests every step (a ``(key, call)`` stream, a count and a width), so the
    requests of one step are planned for the next: their indices, each xor-ed with its stream's constant, laid
    end to end once; each step then hashes the whole plan and splits it per width in the dozen tensor ops one
    request costs alone (a small kernel's draw is otherwise mostly dispatch). The numbers are those of the
    request made alone. Requests of more than :attr:`LARGEST` hashes are made alone: for them the arithmetic
    dominates, and the batch would hold their numbers until the next step.
    """

    LARGEST = 1 << 16  #: hashes of one batched request at most
    PLANNED = 1 << 22  #: hashes in the plan at most

    def __init__(self) -> None:
        self._where: dict[tuple[int, int, int], int] = {}  # planned (constant, count, width) -> offset in its width's numbers
        self._widths: list[tuple[int, int, int]] = []  # (width, first hash, end) of each width's part of the plan
        self._seen: dict[tuple[int, int, int], None] = {}  # this step's requests
        self._plan: Optional[Tensor] = None  # each planned request's indices xor its constant, by width
        self._numbers: Optional[dict[int, Tensor]] = None  # this step's numbers of the plan, by width

    def advance(self) -> None:
        """A new step: plan the requests of the last one if they were not all planned, and drop its numbers."""
        self._numbers = None
        if self._plan is None or not self._seen.keys() - self._where.keys():
            self._seen = {}
            return
        self._where, self._widths, parts, total = {}, [], [], 0
        for width, requests in itertools.groupby(sorted(self._seen, key=lambda request: request[2]), lambda request: request[2]):
            first = total
            for request in requests:
                words = _words(request[1], width)
                if total + words <= self.PLANNED:
                    self._where[request] = (total - first) * (32 // width if width else 1)
                    parts.append(torch.arange(words, dtype=torch.int64, device=self._plan.device).bitwise_xor_(request[0]))
                    total += words
            self._widths.append((width, first, total))
        self._plan, self._seen = torch.cat(parts) if parts else self._plan[:0], {}

    def numbers(self, constant: int, count: int, width: int, state: Tensor, device: torch.device) -> Tensor:
        """:func:`_numbers` of the request, from this step's batch where it is planned."""
        request = (constant, count, width)
        if _words(count, width) <= self.LARGEST:
            if self._plan is None or self._plan.device != device:  # the first step, or moved: plan anew
                self._plan, self._where, self._numbers = torch.empty(0, dtype=torch.int64, device=device), {}, None
            self._seen[request] = None
            offset = self._where.get(request)
            if offset is not None:
                if self._numbers is None:
                    words = _mix(self._plan ^ state)
                    self._numbers = {w: words[a:b] if w == 0 else _split(words[a:b], w) for w, a, b in self._widths}
                return self._numbers[width][offset : offset + count]
        return _numbers(constant, count, width, state, device)


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
    """Per element, one copy chosen uniformly at random (one-hot coefficients). In CPU training, eager and compiled,
    the draw, the gather and the gradient are one pass each (:mod:`lightning_mk.native`), with the same draws."""

    def combine(self, copies: Tensor, random: Random) -> Tensor:
        stream = self.stream(copies, random)
        if stream is not None:
            return native.select(copies, *stream)
        flat = copies.reshape(len(copies), -1)
        return flat.gather(0, self.index(copies, random)).view(copies.shape[1:])

    def stream(self, copies: Tensor, random: Random) -> Optional[tuple[Tensor, int]]:
        """Where the CPU kernel draws (copies on the CPU, the kernel built): its stream, ``(state, constant)``, whose
        draw is :meth:`index`'s; otherwise None. Eager, the state is the model's (the kernel's autograd node keeps a
        copy, as another training forward may move the model's on before this one's backward); compiled, a copy
        that the graph saves."""
        if native.handles(copies):
            return native.stream_state(random.state) if torch.compiler.is_compiling() else random.state, random.stream()
        return None

    def index(self, copies: Tensor, random: Random) -> Tensor:
        """The copy each element takes, ``[1, numel]`` (int64, the index type of ``gather``)."""
        return random.integers(len(copies), (1, copies[0].numel()), copies.device)

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
