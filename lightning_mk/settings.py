"""The options of Majority Kernels, declared once: their checks, their serialisation and the resume check."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar, Optional, Union

from lightning_mk.forms import FORMS
from lightning_mk.layers import LayerType, resolve_layer_types
from lightning_mk.schemes import get_scheme

__all__ = ["Settings", "INITS", "GRAD_SCALES"]

INITS = ("replicate", "independent")
GRAD_SCALES = ("none", "k", "matched")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every option of Majority Kernels. :class:`~lightning_mk.MajorityKernelCallback`,
    :func:`~lightning_mk.apply_majority_kernels` and the Hydra ``method`` config take them by these names;
    a bad value fails when the settings are made, naming what is allowed.

    Attributes:
        k: copies per kernel (>= 2).
        scheme: how a step combines the copies, a name in :data:`lightning_mk.SCHEMES`.
        init: ``"replicate"`` (every copy starts at the current weight, plus ``init_noise``) or
            ``"independent"`` (each copy re-drawn by the layer's own initializer).
        form: how a kernel's copies are stored and folded, a name in :data:`lightning_mk.FORMS`:
            ``"copies"`` (the k copies; their mean trains k times slower under SGD), ``"decoupled"``
            (the deployed kernel ``mu`` and k deviations; ``mu`` gets the plain model's gradient) or
            ``"relative"`` (as decoupled, with draws rescaled to ``noise`` times ``mu``'s RMS from ``mu``);
            ``"doconv"`` (DO-Conv) and ``"expand"`` (ExpandNets, ``k`` the expansion factor) train the kernels as
            a deterministic re-parametrisation instead (no draws).
        include: module-name globs choosing the layers (default: every eligible layer).
        exclude: module-name globs leaving layers out (e.g. ``["head"]``).
        layer_types: layer classes or their names (``"Linear"``, ``"transformers.pytorch_utils.Conv1D"``);
            None: every registered type (:func:`lightning_mk.register_layer`).
        biases: give biases copies too.
        init_noise: relative noise added to the initial copies, centred (the mean is unchanged); None: the
            form's own (0, and 1 for ``"relative"``).
        grad_scale: ``"none"``, ``"k"`` (the mean moves at the plain model's pace under SGD), ``"matched"``
            (``1 / E[sum a_i^2]``) or a number > 0: multiplies the copies' (decoupled: the deviations')
            gradients.
        noise: the level of each draw's deviation from the eval-mode kernel: a step trains
            ``eval + noise * (draw - eval)`` (1: the scheme's draw, 0: the eval-mode kernel); unbiased at
            any level >= 0.
        decay: L2 weight decay on the deployed kernel alone (``mu``; the copies' mean), added to its gradient in
            each training step in proportion to the noise level (``decay`` at ``noise``, none at zero noise).
        seed: keys every draw with the step and the kernel, the same in every process.
    """

    k: int = 4
    scheme: str = "select"
    init: str = "replicate"
    form: str = "copies"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    layer_types: Optional[tuple[LayerType, ...]] = None
    biases: bool = False
    init_noise: Optional[float] = None
    grad_scale: Union[str, float] = "none"
    noise: float = 1.0
    decay: float = 0.0
    seed: int = 0

    #: The settings a run's draws depend on: resuming needs the saved ones.
    RESUMED: ClassVar[tuple[str, ...]] = ("k", "scheme", "init", "form", "seed")
    #: What a state saved before an option existed had.
    _BEFORE: ClassVar[dict[str, Any]] = {"form": "copies"}

    def __post_init__(self) -> None:
        k = self.k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 2:
            raise ValueError(f"k must be an integer >= 2 (the number of copies of each kernel), got {k!r}")
        get_scheme(self.scheme)
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; valid inits: {list(INITS)}")
        if not isinstance(self.form, str) or self.form not in FORMS:
            raise ValueError(f"unknown form {self.form!r}; valid forms: {list(FORMS)}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} takes a list of glob patterns, e.g. {name}=['head'], got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.include:
            raise ValueError("include=[] chooses no layer; the default ('*',) chooses every eligible layer")
        if self.layer_types is not None:
            resolve_layer_types(self.layer_types)  # an unknown name fails here, listing the registered types
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if not isinstance(self.biases, bool):
            raise TypeError(f"biases must be True or False, got {self.biases!r}")
        if self.init_noise is None:
            object.__setattr__(self, "init_noise", FORMS[self.form].init_noise)
        if not is_number(self.init_noise) or self.init_noise < 0:
            raise ValueError(f"init_noise must be a number >= 0, got {self.init_noise!r}")
        if not is_number(self.noise) or not 0 <= self.noise < float("inf"):
            raise ValueError(f"noise must be a number >= 0 (1: the scheme's draw, 0: the eval-mode kernel), got {self.noise!r}")
        if not is_number(self.decay) or not 0 <= self.decay < float("inf"):
            raise ValueError(f"decay must be a number >= 0 (L2 weight decay on the deployed kernel), got {self.decay!r}")
        if self.decay and not self.noise:
            raise ValueError("decay is scaled by the noise level relative to noise, which is 0; give noise > 0 or decay=0")
        if isinstance(self.grad_scale, str) and self.grad_scale not in GRAD_SCALES:
            raise ValueError(f"unknown grad_scale {self.grad_scale!r}; valid: {list(GRAD_SCALES)} or a number > 0")
        if not isinstance(self.grad_scale, str) and (not is_number(self.grad_scale) or self.grad_scale <= 0):
            raise ValueError(f"grad_scale must be one of {list(GRAD_SCALES)} or a number > 0, got {self.grad_scale!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")

    @property
    def gradient_scale(self) -> float:
        """``grad_scale`` as the number the copies' gradients are multiplied by."""
        if not isinstance(self.grad_scale, str):
            return float(self.grad_scale)
        return {"none": 1.0, "k": float(self.k), "matched": 1.0 / get_scheme(self.scheme).second_moment(self.k)}[self.grad_scale]

    def resumed(self) -> dict[str, Any]:
        """The settings a saved draw position is valid with (:attr:`RESUMED`), for a checkpoint."""
        return {name: getattr(self, name) for name in self.RESUMED}

    def check_resume(self, saved: Mapping[str, Any], source: str, target: str) -> None:
        """Refuse to continue the draws of ``saved`` (a :meth:`resumed` dict) with other settings, naming both
        values of each difference; ``source`` and ``target`` name the two sides in the message."""
        saved = self._BEFORE | dict(saved)
        missing = [name for name in self.RESUMED if name not in saved]
        if missing:
            raise ValueError(f"{source} lacks {missing}; a majority-kernel state has {list(self.RESUMED)}")
        differ = [name for name in self.RESUMED if saved[name] != getattr(self, name)]
        if differ:
            was = ", ".join(f"{name}={saved[name]!r}" for name in differ)
            now = ", ".join(f"{name}={getattr(self, name)!r}" for name in differ)
            raise ValueError(f"{source} has {was}, but {target} has {now}; use the same {' and '.join(differ)} to resume")


def is_number(value: Any) -> bool:
    """A real number that is not a bool."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)
