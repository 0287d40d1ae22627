"""Train a model as if it were k times larger; deploy it at its original size (Majority Kernels)."""

from lightning_mk.callback import MajorityKernelCallback
from lightning_mk.kernels import apply_majority_kernels, collapse, collapsed_state_dict, copy_spread, kernel_copies
from lightning_mk.schemes import SCHEMES, Scheme, register_scheme

__all__ = [
    "MajorityKernelCallback",
    "apply_majority_kernels",
    "collapse",
    "collapsed_state_dict",
    "copy_spread",
    "kernel_copies",
    "SCHEMES",
    "Scheme",
    "register_scheme",
]
