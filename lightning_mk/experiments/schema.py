"""Structured configs made from the library's own declarations, so that an option is declared once.

``method.callback`` (conf/method/mk.yaml) is typed by :data:`CALLBACK`: every field of
:class:`lightning_mk.Settings` and every argument of :class:`lightning_mk.MajorityKernelCallback`, with their
defaults, so Hydra refuses a wrongly typed or unknown option when it composes the config, before anything runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, List, Optional, Union

from hydra.core.config_store import ConfigStore

from lightning_mk.callback import MajorityKernelCallback
from lightning_mk.settings import Settings


def _config_type(hint: Any) -> Any:
    """The type OmegaConf checks a field against: int, float, str and bool as they are (Optional when None is
    allowed), a tuple of str as a list of str, Any where OmegaConf has no type for it (unions, classes)."""
    if hint in (int, float, str, bool):
        return hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and args[1:] == (Ellipsis,) and args[0] is str:
        return List[str]
    if typing.get_origin(hint) is Union and type(None) in args and len(args) == 2:
        inner = _config_type(next(arg for arg in args if arg is not type(None)))
        return Any if inner is Any else Optional[inner]
    return Any


def _field(name: str, hint: Any, default: Any) -> tuple:
    if isinstance(default, tuple):
        return name, _config_type(hint), dataclasses.field(default_factory=lambda: list(default))
    return name, _config_type(hint), dataclasses.field(default=default)


def _callback_schema() -> type:
    settings = typing.get_type_hints(Settings)
    fields = {f.name: _field(f.name, settings[f.name], f.default) for f in dataclasses.fields(Settings)}
    hints = typing.get_type_hints(MajorityKernelCallback.__init__)
    for name, parameter in inspect.signature(MajorityKernelCallback).parameters.items():
        if parameter.kind is parameter.KEYWORD_ONLY:  # the callback's own defaults of settings (form, noise) win
            fields[name] = _field(name, hints[name], parameter.default)
    target = ("_target_", str, dataclasses.field(default="lightning_mk.MajorityKernelCallback"))
    return dataclasses.make_dataclass("MajorityKernelCallbackConfig", [target, *fields.values()])


#: The schema of ``method.callback``.
CALLBACK = _callback_schema()
ConfigStore.instance().store(group="schema", name="mk_callback", node=CALLBACK)
