"""The exceptions a user can act on.

The CLI prints a ``UserError`` as one line (exit 1; a ``ConfigError`` exits 2) and lets anything else keep its
traceback, so a bug in opdkit is never mistaken for bad input. Each class keeps the builtin base it had before
it joined this hierarchy, so ``except ValueError`` / ``pytest.raises(RuntimeError)`` callers still work.

The user-facing classes that belong to one module live there and subclass ``UserError``:
``config.ConfigError``, ``data.DatasetError``, ``models.ModelNotFoundError`` and ``TokenizerMismatchError``,
``engines.logprobs.EngineError`` (and its subclasses), ``loop.TrainingDiverged``.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a missing file or package, or a run that cannot go on: the message says what to change."""


class InvalidInput(UserError, ValueError):
    """An argument, option or input file holds a value opdkit cannot use (the message names it)."""


class InputNotFound(UserError, FileNotFoundError):
    """A path the user named does not hold what the command needs."""


class MissingDependency(UserError, RuntimeError):
    """An optional package, or an environment setting it needs, is absent; the message says how to get it."""


class CheckpointMismatch(UserError, RuntimeError):
    """A checkpoint does not fit the model it is loaded into (a different model or LoRA configuration)."""
