"""opdkit: on-policy distillation of language models, with the diagnostics that say why it works or fails."""

__version__ = "0.1.0"
