"""The ``select`` scheme's CPU kernel: draw, gather and gradient in one pass each (``csrc/select.cpp``).

With stock ops a step of ``select`` writes and reads an int64 index per element, gathers through it and, in the
backward, zero-fills the ``[k, n]`` gradient before scattering into it: several passes over memory for what is
data movement. The kernel decodes the draw block by block (bit for bit that of
:meth:`~lightning_mk.schemes.Random.integers`, so every guarantee of the draw holds unchanged), picks the chosen
copy in the forward and writes the gradient's one-hot rows in one pass in the backward. For the decoupled forms
(the callback's default) one C++ autograd node (:func:`select_around`) also centres, scales and adds ``mu`` in the
forward's pass and writes the stored tensor's gradient in the backward's (the stock ops' values bit for bit up to
k = 4); the relative form's noise scale (to rounding) is summed in the same pass, which leaves the centred draw for a
second pass over mu and the kernel alone to scale.

It is compiled on first use with :func:`torch.utils.cpp_extension.load` (once per torch version, then cached in
``TORCH_EXTENSIONS_DIR``; it needs a C++ compiler and ninja) and used in CPU training, eager and compiled (one op
of the graph). Where it cannot be built, training uses the stock ops, with one warning; ``LIGHTNING_MK_NATIVE=0``
skips it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "select.cpp"
_lock = threading.Lock()
_loaded: Optional[bool] = None  # None: not tried yet
# the kernels round every operation as the stock ops do (no fused multiply-add), and view elements as both
# floats and unsigned integers of their size
_EXACT = ["-ffp-contract=off", "-fno-strict-aliasing"]


def available() -> bool:
    """Whether the kernel is loaded, building it on the first call outside ``torch.compile``'s tracing (False
    where it cannot be built or is switched off with ``LIGHTNING_MK_NATIVE=0``)."""
    global _loaded
    if _loaded is None and not torch.compiler.is_compiling():
        with _lock:
            if _loaded is None:
                _loaded = _load()
    return bool(_loaded)


def handles(tensor: Tensor) -> bool:
    """Whether the kernel runs on ``tensor``: a CPU tensor, with the kernel built."""
    return tensor.device.type == "cpu" and available()


def _load() -> bool:
    if os.environ.get("LIGHTNING_MK_NATIVE", "1") == "0":
        return False
    try:
        from torch.utils import cpp_extension

        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja is not installed (pip install ninja)")
        openmp = ["-fopenmp"] if sys.platform == "linux" else []  # the intra-op threads of torch's own OpenMP
        log.debug("lightning_mk: loading the CPU select kernel (compiled on first use, once per torch version)")
        # one build per torch version (the cache is keyed by the name and the sources, not by torch's ABI)
        name = "lightning_mk_select_" + "".join(c if c.isalnum() else "_" for c in torch.__version__)
        cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=["-O3", *_EXACT, *openmp], extra_ldflags=openmp,
                           is_python_module=False)
    except Exception as error:  # no compiler, no ninja, a failed build: the stock ops do the same
        log.debug("lightning_mk: building the select kernel failed", exc_info=True)
        warnings.warn(f"lightning_mk: the CPU select kernel could not be built, training uses the stock ops "
                      f"(slower, same draws): {str(error).splitlines()[0]} (the whole log at debug level of "
                      f"logger {__name__!r}). LIGHTNING_MK_NATIVE=0 skips the attempt.", stacklevel=3)
        return False
    # shapes for torch.compile's tracing
    torch.library.register_fake("lightning_mk::select")(lambda copies, state, constant: copies.new_empty(copies.shape[1:]))
    torch.library.register_fake("lightning_mk::select_backward")(
        lambda grad, state, constant, k: grad.new_empty(k, *grad.shape))
    torch.library.register_fake("lightning_mk::select_index")(
        lambda state, constant, high, count: state.new_empty(count, dtype=torch.int64))
    torch.library.register_fake("lightning_mk::stream_state")(lambda state: torch.empty_like(state))
    torch.library.register_fake("lightning_mk::select_around")(
        lambda stored, state, constant, c, normalise, decay, grad_scale: stored.new_empty(stored.shape[1:]))
    torch.library.register_fake("lightning_mk::normaliser")(lambda mu, rows, center: rows.new_empty(()))
    torch.library.register_fake("lightning_mk::select_around_forward")(
        lambda stored, state, constant, c, normalise: (stored.new_empty(stored.shape[1:]), c.new_empty((), dtype=stored.dtype)))
    torch.library.register_fake("lightning_mk::select_around_backward")(
        lambda grad, stored, scale, state, constant, decay: grad.new_empty(stored.shape))
    return True


def select(copies: Tensor, state: Tensor, constant: int) -> Tensor:
    """``copies[i_j, j]`` for each element ``j`` of the ``[k, *S]`` CPU tensor ``copies`` (flat index ``j`` over ``S``;
    the result is ``[*S]``), ``i`` the draw ``Random.integers(k)`` of the stream ``state ^ constant``; its gradient
    reaches the chosen copy only. The autograd node keeps its own copy of ``state``."""
    return torch.ops.lightning_mk.select(copies, state, constant)


def select_around(stored: Tensor, state: Tensor, constant: int, c: Tensor, normalise: bool, decay: Optional[Tensor],
                  grad_scale: float) -> Tensor:
    """The decoupled forms' training kernel ``mu + f (deviations[i_j, j] - center_j)`` from the stored
    ``[mu, deviations]`` (``[k + 1, *S]``), ``center`` the deviations' mean, ``i`` :func:`select`'s draw and ``f = c``
    (one value, no gradient) times, where ``normalise``, the relative form's noise scale (:func:`normaliser`), summed
    in the pass that draws; each operation rounded as the stock ops' (their values up to k = 4, the noise scale to
    rounding).
    Its autograd node (C++, with its own copy of ``state``) writes the stored tensor's gradient in one pass:
    ``g + decay mu`` for ``mu`` (``decay`` None: ``g``) and ``grad_scale f g (onehot_i - 1/k)`` for deviation ``i``."""
    return torch.ops.lightning_mk.select_around(stored, state, constant, c, normalise, decay, grad_scale)


def normaliser(mu: Tensor, rows: Tensor, center: Tensor) -> Tensor:
    """The relative form's noise scale ``RMS(mu) / RMS(rows - center)`` (at most 1e6) of the ``[k, *S]`` CPU tensor
    ``rows`` in one op, without the ``[k, *S]`` difference (squares summed in fixed blocks, in a fixed order: the stock
    ops' value to rounding, and the same for any number of threads)."""
    return torch.ops.lightning_mk.normaliser(mu, rows, center)


def stream_state(state: Tensor) -> Tensor:
    """A copy of the model's draw state for one draw, saved (never recomputed) by a compiled graph: another training
    forward may move the model's state on, in place, before this draw's backward."""
    return torch.ops.lightning_mk.stream_state(state)


def index(state: Tensor, constant: int, high: int, count: int) -> Tensor:
    """The kernel's draw itself: ``count`` integers in ``[0, high)`` (int64), as :func:`select` decodes them."""
    return torch.ops.lightning_mk.select_index(state, constant, high, count)
