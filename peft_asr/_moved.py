"""The module paths of 0.1.0's flat layout (``peft_asr.data``, ``peft_asr.hub``, ...) still import, with a
``DeprecationWarning`` that names the new path; see docs/architecture.md for the map."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "install"]

MOVED = {
    **{f"peft_asr.{m}": f"peft_asr.tuner.{m}" for m in
       ("config", "layer", "model", "routing", "features", "router", "rls", "validation", "callback", "errors")},
    "peft_asr.hub": "peft_asr.bank",
    "peft_asr.hub_upload": "peft_asr.bank.push",
    "peft_asr.merge": "peft_asr.bank.merge",
    "peft_asr.data": "peft_asr.cl",
    "peft_asr.metrics": "peft_asr.cl",
    "peft_asr.continual": "peft_asr.cl.runner",
    "peft_asr.plots": "peft_asr.cl.plots",
    "peft_asr.demo_stream": "peft_asr.demo.stream",
    "peft_asr.default_model": "peft_asr.cl.default_model",
}


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"`{spec.name}` moved to `{MOVED[spec.name]}` (0.1.0 had a flat layout); import it from there.",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # the new module is already executed


def install() -> None:
    """Answer imports of the old paths (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
