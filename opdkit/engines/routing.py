"""Several teachers, one per value of a dataset column (multi-domain OPD): ``teacher.route``.

    teacher:
      route:
        math: runs/math-teacher                                   # a path: the shared teacher.* settings
        code: {engine: server, url: http://10.0.0.7:8000/v1}      # a mapping: teacher.* fields for this one
    data: {route_column: data_source}

Each row is scored by the teacher of its ``data.route_column`` value; every teacher is built with its own
engine and checked against the student's tokenizer. A row whose value has no teacher is an error that names
the value and the configured ones (checked on the whole dataset before training starts). Per-teacher metrics:
``teacher/<value>/token_frac`` (share of the step's response tokens) and ``teacher/<value>/reverse_kl``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch

from ..config import route_teacher_configs
from ..errors import InvalidInput
from .base import Teacher, TeacherScores


def metric_name(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", value) or "_"


def route_metrics(sources: list[str], mask: torch.Tensor, student_logp: torch.Tensor, teacher_logp: torch.Tensor
                  ) -> dict[str, float]:
    """Per-teacher token share and k1 reverse-KL estimate (mean of log p − log q over its tokens). (B, T) inputs."""
    total = float(mask.sum())
    out = {}
    for value in sorted(set(sources)):
        rows = torch.tensor([s == value for s in sources])
        m = mask & rows[:, None]
        n = float(m.sum())
        name = metric_name(value)
        out[f"teacher/{name}/token_frac"] = n / total if total else 0.0
        out[f"teacher/{name}/reverse_kl"] = float(((student_logp - teacher_logp) * m).sum() / n) if n else 0.0
    return out


class RoutedTeacher(Teacher):
    """Routes each row to the teacher of its source. Capabilities: those every teacher has, without hidden states
    (a full-vocabulary objective would need one vocabulary head per row)."""

    def __init__(self, cfg, build_one: Callable, load_model: Callable | None = None):
        self.column = cfg.data.route_column
        self.teachers = {}
        for value, t in route_teacher_configs(cfg).items():
            sub = dataclasses.replace(cfg, teacher=t)
            model = load_model(sub, value) if (t.engine == "hf" and load_model is not None) else None
            self.teachers[value] = build_one(sub, model)
        caps = frozenset.intersection(*(frozenset(t.capabilities) for t in self.teachers.values()))
        self.capabilities = caps - {"hidden"}

    def check_sources(self, sources: list[str], rows: list[int] | None = None, where: str = "the data") -> None:
        for i, value in enumerate(sources):
            if value not in self.teachers:
                row = f" row {rows[i] + 1}" if rows is not None else ""  # counted from 1, as data.row_label
                raise InvalidInput(
                    f"{where}{row} has {self.column}={value!r}, which has no teacher: teacher.route has teachers "
                    f"for {', '.join(map(repr, self.teachers))}. Add a teacher for it or remove those rows")

    def metrics(self, sources, mask, student_logp, teacher_logp) -> dict[str, float]:
        return route_metrics(sources, mask, student_logp, teacher_logp)

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor, *,
              k: int, student_topk_ids: torch.Tensor | None = None, keep_hidden: bool = False,
              sources: list[str] | None = None) -> TeacherScores:
        if sources is None or len(sources) != len(prompt_ids):
            raise InvalidInput("teacher.route needs the source of every row to pick its teacher")
        if keep_hidden:
            raise InvalidInput("routed teachers cannot return hidden states (full-vocabulary objectives need one "
                               "teacher)")
        self.check_sources(sources, where="the rollout")
        B, T = response_ids.shape
        fields: dict[str, torch.Tensor] = {}
        for value in dict.fromkeys(sources):
            rows = [i for i, s in enumerate(sources) if s == value]
            idx = torch.tensor(rows)
            part = self.teachers[value].score(
                [prompt_ids[i] for i in rows], response_ids[idx], response_mask[idx], k=k,
                student_topk_ids=None if student_topk_ids is None else student_topk_ids[idx])
            for f in ("sampled_logp", "topk_ids", "topk_logp", "logp_at_student_topk", "entropy"):
                t = getattr(part, f)
                if t is None:
                    continue
                if f not in fields:
                    fields[f] = t.new_zeros((B,) + tuple(t.shape[1:]))
                fields[f][idx] = t
        kept = {"sampled", "topk"} | ({"at_ids"} if "at_ids" in self.capabilities else set()) \
            | ({"entropy"} if "entropy" in self.capabilities else set())
        wanted = {"sampled_logp": "sampled", "topk_ids": "topk", "topk_logp": "topk",
                  "logp_at_student_topk": "at_ids", "entropy": "entropy"}
        return TeacherScores(**{f: v for f, v in fields.items() if wanted[f] in kept})
