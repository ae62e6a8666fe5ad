"""The small-scale reproduction study (issue 7): ``opdkit study``. See ``opdkit/study/run.py``."""

from .cli import add_commands

__all__ = ["add_commands"]
