"""Rollout and teacher engines, chosen by name in the config (``rollout.engine``, ``teacher.engine``).

Each builder takes the run config and returns an object with the ``RolloutEngine`` / ``Teacher`` interface;
the training loop never needs to know which one it got.
"""

from __future__ import annotations

from typing import Callable

from ..models import DTYPES


def _hf_rollout(cfg, student, *, eos_ids, pad_id, vocab_size, tokenizer):
    from ..rollout import HFRolloutEngine

    return HFRolloutEngine(student, eos_ids=eos_ids, pad_id=pad_id, sampling_dtype=DTYPES[cfg.student.sampling_dtype],
                           vocab_size=vocab_size)


def _vllm_rollout(cfg, student, *, eos_ids, pad_id, vocab_size, tokenizer):
    from .vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(cfg, student, tokenizer=tokenizer, eos_ids=eos_ids, pad_id=pad_id,
                             vocab_size=vocab_size)


ROLLOUT_ENGINES: dict[str, Callable] = {"hf": _hf_rollout, "vllm": _vllm_rollout}


def _hf_teacher(cfg, model, *, vocab_size, pad_id, tokenizer):
    from ..scoring import HFTeacher

    t = cfg.teacher
    return HFTeacher(model, vocab_size=vocab_size, pad_id=pad_id, temperature=t.temperature, chunk_size=t.chunk_size,
                     head_dtype=DTYPES[t.head_dtype])


def _vllm_teacher(cfg, model, *, vocab_size, pad_id, tokenizer):
    from .vllm_engine import VLLMTeacher

    return VLLMTeacher(cfg, tokenizer=tokenizer, vocab_size=vocab_size)


def _server_teacher(cfg, model, *, vocab_size, pad_id, tokenizer):
    from .server import ServerTeacher

    return ServerTeacher(cfg.teacher, tokenizer=tokenizer, vocab_size=vocab_size)


TEACHER_ENGINES: dict[str, Callable] = {"hf": _hf_teacher, "vllm": _vllm_teacher, "server": _server_teacher}


def build_rollout_engine(cfg, student, **kwargs):
    return ROLLOUT_ENGINES[cfg.rollout.engine](cfg, student, **kwargs)


def build_teacher(cfg, model, **kwargs):
    if cfg.teacher.route:
        from .routing import RoutedTeacher

        return RoutedTeacher(cfg, build_one=lambda sub_cfg, sub_model: TEACHER_ENGINES[sub_cfg.teacher.engine](
            sub_cfg, sub_model, **kwargs))
    return TEACHER_ENGINES[cfg.teacher.engine](cfg, model, **kwargs)
