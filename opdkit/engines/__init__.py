"""Rollout and teacher engines, chosen by name in the config (``rollout.engine``, ``teacher.engine``).

Each builder takes the run config and returns a ``RolloutEngine`` / ``Teacher`` (``engines.base``); the
training loop never needs to know which one it got. ``hf_rollout`` and ``hf_teacher`` run transformers models
in this process, ``vllm_engine`` an in-process vLLM, ``server`` an OpenAI-compatible server, ``routing`` one
teacher per data source.
"""

from __future__ import annotations

from typing import Callable

from ..models import DTYPES


def _hf_rollout(cfg, student, *, eos_ids, pad_id, vocab_size, tokenizer):
    from .hf_rollout import HFRolloutEngine

    return HFRolloutEngine(student, eos_ids=eos_ids, pad_id=pad_id, sampling_dtype=DTYPES[cfg.student.sampling_dtype],
                           vocab_size=vocab_size, share_prefill=cfg.rollout.share_prefill,
                           compact=cfg.rollout.compact)


def _vllm_rollout(cfg, student, *, eos_ids, pad_id, vocab_size, tokenizer):
    from .vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(cfg, student, tokenizer=tokenizer, eos_ids=eos_ids, pad_id=pad_id,
                             vocab_size=vocab_size)


ROLLOUT_ENGINES: dict[str, Callable] = {"hf": _hf_rollout, "vllm": _vllm_rollout}


def _hf_teacher(cfg, model, *, vocab_size, pad_id, tokenizer):
    from .hf_teacher import HFTeacher

    t = cfg.teacher
    return HFTeacher(model, vocab_size=vocab_size, pad_id=pad_id, temperature=t.temperature, chunk_size=t.chunk_size,
                     head_dtype=DTYPES[t.head_dtype], batch_size=t.batch_size, packed=t.packed)


def _vllm_teacher(cfg, model, *, vocab_size, pad_id, tokenizer):
    from .vllm_engine import VLLMTeacher

    return VLLMTeacher(cfg, tokenizer=tokenizer, vocab_size=vocab_size)


def _server_teacher(cfg, model, *, vocab_size, pad_id, tokenizer):
    from .server import ServerTeacher

    return ServerTeacher(cfg.teacher, tokenizer=tokenizer, vocab_size=vocab_size)


TEACHER_ENGINES: dict[str, Callable] = {"hf": _hf_teacher, "vllm": _vllm_teacher, "server": _server_teacher}


def build_rollout_engine(cfg, student, **kwargs):
    return ROLLOUT_ENGINES[cfg.rollout.engine](cfg, student, **kwargs)


def load_hf_teacher(cfg, tokenizer, student_vocab: int, name: str = "teacher"):
    """A local HF teacher (frozen, on ``teacher.device``), checked against the student's tokenizer."""
    from ..models import load_teacher

    model, _, _ = load_teacher(cfg.teacher.path, cfg.teacher.dtype, rank_device(cfg, cfg.teacher.device),
                               student_tokenizer=tokenizer, student_vocab=student_vocab, student_name=cfg.student.path,
                               teacher_name=f"{name} ({cfg.teacher.path})")
    return model


def rank_device(cfg, device: str) -> str:
    """``device`` for this process: ``cuda:i`` relative to the rank's block of GPUs (see ``resolve_device``)."""
    from ..distributed import devices_per_rank, local_rank, resolve_device

    return resolve_device(device, local_rank=local_rank(),
                          devices_per_rank=devices_per_rank([cfg.student.device, cfg.teacher.device]))


def shared_vocab_size(cfg, tokenizer, student_vocab: int) -> int:
    """Ids shared by the student and every teacher that is not loaded in this process as an HF model (vLLM
    teachers and routed teachers: read from their config and tokenizer; a served teacher is checked against
    the student's tokenizer when it connects and shares the student's ids)."""
    from ..models import check_tokenizers, load_tokenizer, resolve_model_path

    teachers = [cfg.teacher]
    if cfg.teacher.route:
        from ..config import route_teacher_configs

        teachers = list(route_teacher_configs(cfg).values())
    size = student_vocab
    for t in teachers:
        if t.engine == "server":
            continue
        path = resolve_model_path(t.path)
        from transformers import AutoConfig

        check = check_tokenizers(tokenizer, load_tokenizer(path), student_vocab,
                                 int(AutoConfig.from_pretrained(path).vocab_size), cfg.student.path, str(t.path))
        size = min(size, check.shared_vocab_size)
    return size


def build_teacher(cfg, model, **kwargs):
    if cfg.teacher.route:
        from .routing import RoutedTeacher

        student_vocab = kwargs.pop("student_vocab", kwargs["vocab_size"])
        return RoutedTeacher(
            cfg, build_one=lambda sub_cfg, sub_model: TEACHER_ENGINES[sub_cfg.teacher.engine](
                sub_cfg, sub_model, **kwargs),
            load_model=lambda sub_cfg, value: load_hf_teacher(sub_cfg, kwargs["tokenizer"], student_vocab,
                                                              f"teacher for {value!r}"))
    kwargs.pop("student_vocab", None)
    return TEACHER_ENGINES[cfg.teacher.engine](cfg, model, **kwargs)
