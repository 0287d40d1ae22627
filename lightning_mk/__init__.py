"""Train a model as if it were k times larger; deploy it at its original size (Majority Kernels).

Exports are lazy (PEP 562): the raw API (``lightning_mk.apply`` and the modules it uses) needs torch alone,
and ``import lightning_mk`` imports Lightning only when the callback is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MajorityKernelCallback": "lightning_mk.callback",
    "NoiseOnGap": "lightning_mk.control",
    "NormStatistics": "lightning_mk.norms",
    "Settings": "lightning_mk.settings",
    "MajorityKernels": "lightning_mk.apply",
    "apply_majority_kernels": "lightning_mk.apply",
    "collapse": "lightning_mk.collapsing",
    "collapsed_state_dict": "lightning_mk.collapsing",
    "copy_spread": "lightning_mk.collapsing",
    "kernel_copies": "lightning_mk.collapsing",
    "register_layer": "lightning_mk.layers",
    "SCHEMES": "lightning_mk.schemes",
    "Scheme": "lightning_mk.schemes",
    "register_scheme": "lightning_mk.schemes",
    "FORMS": "lightning_mk.forms",
    "Form": "lightning_mk.forms",
    "register_form": "lightning_mk.forms",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from lightning_mk.apply import MajorityKernels, apply_majority_kernels
    from lightning_mk.callback import MajorityKernelCallback
    from lightning_mk.collapsing import collapse, collapsed_state_dict, copy_spread, kernel_copies
    from lightning_mk.control import NoiseOnGap
    from lightning_mk.forms import FORMS, Form, register_form
    from lightning_mk.layers import register_layer
    from lightning_mk.norms import NormStatistics
    from lightning_mk.schemes import SCHEMES, Scheme, register_scheme
    from lightning_mk.settings import Settings


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_mk' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
