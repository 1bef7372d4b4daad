"""The module paths of 0.1.0's flat layout (``peft_asr.data``, ``peft_asr.hub``, ...) still import, with a
``DeprecationWarning`` that names the new path; see docs/architecture.md for the map.

An old path imports as an alias module of its own, whose names are looked up in the modules that now hold them
(``peft_asr.hub`` reads ``peft_asr.bank.files``, ``.atomic``, ``.check``, ...). Setting a name on the alias sets it
where it lives, so ``peft_asr.hub.USE_EXCHANGE = False`` still switches the swap. The new modules keep their own
``__spec__``: the alias never stands in for them in ``sys.modules``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

__all__ = ["MOVED", "install", "moved_module"]

_TUNER = ("config", "layer", "router", "rls", "validation", "callback", "errors", "features")
MOVED: dict[str, tuple[str, ...]] = {
    **{f"peft_asr.{m}": (f"peft_asr.tuner.{m}",) for m in _TUNER},
    "peft_asr.model": ("peft_asr.tuner.model", "peft_asr.tuner.blocks", "peft_asr.tuner.shallow"),
    "peft_asr.routing": ("peft_asr.tuner.routing", "peft_asr.tuner.hooks", "peft_asr.tuner.call_inputs"),
    "peft_asr.hub": ("peft_asr.bank", "peft_asr.bank.files", "peft_asr.bank.atomic", "peft_asr.bank.check",
                     "peft_asr.bank.io", "peft_asr.bank.card", "peft_asr.cl.runner"),
    "peft_asr.hub_upload": ("peft_asr.bank.push",),
    "peft_asr.merge": ("peft_asr.bank.merge", "peft_asr.bank.files"),
    "peft_asr.data": ("peft_asr.cl.tasks", "peft_asr.cl.tokenization"),
    "peft_asr.metrics": ("peft_asr.cl.metrics", "peft_asr.cl.scorers"),
    "peft_asr.continual": ("peft_asr.cl.runner",),
    "peft_asr.plots": ("peft_asr.cl.plots",),
    "peft_asr.demo_stream": ("peft_asr.demo.stream",),
    "peft_asr.default_model": ("peft_asr.cl.default_model",),
}


class _Alias(types.ModuleType):
    """An old module path: reads and writes go to the module that now holds the name."""

    def __getattr__(self, name: str):
        for target in self.__dict__["_targets"]:
            if hasattr(target, name):
                return getattr(target, name)
        raise AttributeError(f"`{self.__name__}.{name}` is gone: see docs/architecture.md (Moved since 0.1.0).")

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("__") or name == "_targets":
            super().__setattr__(name, value)
            return
        holder = next((t for t in self.__dict__["_targets"] if hasattr(t, name)), self.__dict__["_targets"][0])
        setattr(holder, name, value)

    def __dir__(self):
        return sorted({n for t in self.__dict__["_targets"] for n in dir(t) if not n.startswith("_")})


def moved_module(name: str) -> _Alias:
    """The alias module of the old path ``name`` (one of ``MOVED``)."""
    alias = _Alias(name, f"Moved to {', '.join(MOVED[name])}.")
    alias._targets = tuple(importlib.import_module(t) for t in MOVED[name])
    return alias


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"`{spec.name}` moved to `{MOVED[spec.name][0]}` (0.1.0 had a flat layout); import it from "
                      "there.", DeprecationWarning, stacklevel=2)
        return moved_module(spec.name)

    def exec_module(self, module):
        pass  # the alias reads the new modules; nothing to run


def install() -> None:
    """Answer imports of the old paths (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
