"""The error classes peft-asr raises for bad input. No imports: every module, ``rls`` included, can use them.

Each class subclasses the built-in error a caller would expect (``ValueError`` for bad values, ``TypeError`` for a
value of the wrong type), so ``except ValueError`` keeps working; ``except peft_asr.ASRError`` catches them all.
docs/bad_inputs.md lists which input raises which class.
"""

from __future__ import annotations

__all__ = ["ASRError", "ASRConfigError", "ASRConfigTypeError", "BankError", "RouterNumericalError"]


class ASRError(Exception):
    """Base class of the errors peft-asr raises about its input (a config, a bank on disk, router features)."""


class ASRConfigError(ASRError, ValueError):
    """An `ASRConfig` field, or a saved ``adapter_config.json``, has a bad value (or keys that are unknown/missing)."""


class ASRConfigTypeError(ASRConfigError, TypeError):
    """An `ASRConfig` field has the wrong type (e.g. ``tasks`` that is not a list). Also a ``TypeError``."""


class BankError(ASRError, ValueError):
    """A bank folder cannot be saved, loaded or merged: missing, truncated or pickle-only files, statistics that do
    not belong to the bank, a destination that is not a folder."""


class RouterNumericalError(ASRError, ValueError):
    """The router's ridge system could not be solved to finite values (overflowed features or a singular system)."""
