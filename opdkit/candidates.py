"""The candidate set of top-k OPD: 2k slots per response position, [S^p_t ; S^q_t].

S^p_t is the student's top-k at position t (recorded by the rollout), S^q_t the teacher's (returned by its
engine). The student forward gathers its log-probs at all 2k ids once and the teacher returns its log-probs
on both halves, so every set strategy (student, teacher, intersection, union, symmetric difference) is only a
mask over the same slots. ``Candidates`` owns that layout: code reads the halves by name, never by slicing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def member(ids: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
    """ids (..., A), of (..., B) -> bool (..., A): ids[..., a] is in of[..., :]."""
    return (ids.unsqueeze(-1) == of.unsqueeze(-2)).any(-1)


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool)


# Each strategy is a pair of slot masks (over S^p, over S^q), given s_in_t = [S^p_i ∈ S^q] and t_in_s = [S^q_j ∈ S^p].
# In union a teacher id already in S^p is masked so that no token counts twice.
STRATEGIES: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "student": lambda s_in_t, t_in_s: (_ones(s_in_t), ~_ones(t_in_s)),
    "teacher": lambda s_in_t, t_in_s: (~_ones(s_in_t), _ones(t_in_s)),
    "intersection": lambda s_in_t, t_in_s: (s_in_t, ~_ones(t_in_s)),
    "union": lambda s_in_t, t_in_s: (_ones(s_in_t), ~t_in_s),
    "symmetric_difference": lambda s_in_t, t_in_s: (~s_in_t, ~t_in_s),
}


def candidate_mask(strategy: str, student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Which of the 2k candidate slots [S^p_t ; S^q_t] a top-k set strategy uses.

    Args:
        strategy: student | teacher | intersection | union | symmetric_difference.
        student_ids, teacher_ids: (B, T, k).
    Returns:
        valid (B, T, 2k) bool.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown top-k strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    s_in_t, t_in_s = member(student_ids, teacher_ids), member(teacher_ids, student_ids)
    on_student, on_teacher = STRATEGIES[strategy](s_in_t, t_in_s)
    return torch.cat([on_student, on_teacher], dim=-1)


@dataclass
class Candidates:
    """The candidate ids of one batch: S^p_t (``student_ids``) and S^q_t (``teacher_ids``), each (B, T, k).

    ``teacher_ids`` is None when the teacher engine returned no top-k: the layout is then S^p_t alone. Values
    gathered at ``ids`` (the student's log-probs, the teacher's on ``join``) share the layout; ``student`` and
    ``teacher`` read a half of any such (B, T, C) tensor.
    """

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor | None = None

    @classmethod
    def of(cls, student_ids: torch.Tensor | None, teacher_ids: torch.Tensor | None) -> "Candidates | None":
        """The candidates of a rollout's top-k and a teacher's (None without the student's top-k)."""
        return None if student_ids is None else cls(student_ids, teacher_ids)

    @property
    def k(self) -> int:
        """Slots in the student half (the teacher half has as many)."""
        return self.student_ids.shape[-1]

    @property
    def ids(self) -> torch.Tensor:
        """(B, T, C) all candidate ids in layout order, C = 2k (k without a teacher half)."""
        if self.teacher_ids is None:
            return self.student_ids
        return torch.cat([self.student_ids, self.teacher_ids], -1)

    def student(self, values: torch.Tensor) -> torch.Tensor:
        """The S^p_t half (B, T, k) of values laid out on these candidates."""
        return values[..., :self.k]

    def teacher(self, values: torch.Tensor) -> torch.Tensor:
        """The S^q_t half (B, T, k) of values laid out on these candidates."""
        return values[..., self.k:]

    @staticmethod
    def join(on_student: torch.Tensor, on_teacher: torch.Tensor) -> torch.Tensor:
        """Values on S^p_t and on S^q_t, (B, T, k) each, as one (B, T, 2k) tensor in layout order."""
        return torch.cat([on_student, on_teacher], -1)

    def mask(self, strategy: str) -> torch.Tensor:
        """(B, T, 2k) bool: the slots the set ``strategy`` uses (``candidate_mask``)."""
        return candidate_mask(strategy, self.student_ids, self.teacher_ids)

    def select(self, rows: torch.Tensor) -> "Candidates":
        return Candidates(self.student_ids[rows], None if self.teacher_ids is None else self.teacher_ids[rows])

    def to(self, device: torch.device | str) -> "Candidates":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Candidates(move(self.student_ids), move(self.teacher_ids))
