"""From student outputs and teacher scores to the per-token OPD loss, picked by ``objective.name``.

Candidate layout for top-k objectives: 2k slots per position, [S^p_t ; S^q_t] (see
``objectives.candidate_mask``). The student forward gathers its log-probs at all 2k ids once; the teacher
already returned its log-probs at S^p (``logp_at_student_topk``) and on S^q (``topk_logp``). A strategy is
then only a mask over the slots.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import objectives as obj
from .config import ObjectiveConfig
from .scoring import TeacherScores
from .student import StudentOutputs

# What each objective needs from a teacher engine (see Teacher.capabilities).
REQUIREMENTS: dict[str, Callable[[ObjectiveConfig], set[str]]] = {
    "sampled": lambda cfg: {"sampled"},
    "topk": lambda cfg: {"topk"} | (set() if cfg.strategy == "teacher" else {"at_ids"}),
    "reverse_kl": lambda cfg: {"hidden"},
    "forward_kl": lambda cfg: {"hidden"},
    "jsd": lambda cfg: {"hidden"},
    "teacher_topk_forward_kl": lambda cfg: {"topk"},
}


def check_teacher_supports(cfg: ObjectiveConfig, capabilities: frozenset[str], engine: str) -> None:
    missing = REQUIREMENTS[cfg.name](cfg) - set(capabilities)
    if missing:
        available = [name for name, req in REQUIREMENTS.items() if req(cfg) <= set(capabilities)]
        raise ValueError(
            f"objective.name={cfg.name} (strategy {cfg.strategy}) needs teacher {', '.join(sorted(missing))}, "
            f"which teacher.engine={engine} cannot provide. Available with this engine: {', '.join(available)}"
            + (" (top-k only with objective.strategy=teacher)" if "at_ids" not in capabilities else ""))


def teacher_candidate_logp(scores: TeacherScores) -> torch.Tensor | None:
    """Teacher log-probs on the [S^p ; S^q] layout, (B, T, 2k); S^p half is -inf if the engine lacks it."""
    if scores.topk_logp is None:
        return None
    at_student = scores.logp_at_student_topk
    if at_student is None:
        at_student = torch.full_like(scores.topk_logp, float("-inf"))
    return torch.cat([at_student, scores.topk_logp], -1)


def _sampled(cfg, s: StudentOutputs, t: TeacherScores, valid):
    return obj.sampled_token_pg(s.logp_sampled, t.sampled_logp)[0]


def _topk(cfg, s: StudentOutputs, t: TeacherScores, valid):
    teacher = teacher_candidate_logp(t)
    if cfg.form == "kl":
        return obj.topk_kl(s.logp_at, teacher, valid)
    # The reference code leaves the symmetric-difference weights unnormalised; we keep that for parity.
    renormalise = cfg.strategy != "symmetric_difference"
    return obj.topk_pg(s.logp_at, teacher, valid, cfg.weighting, renormalise)[0]


def _full(cfg, s: StudentOutputs, t: TeacherScores, valid):
    return s.full_loss


def _teacher_topk_fkl(cfg, s: StudentOutputs, t: TeacherScores, valid):
    k = t.topk_logp.shape[-1]
    return obj.teacher_topk_forward_kl(s.logp_at[..., k:], t.topk_logp)


OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    "sampled": _sampled,
    "topk": _topk,
    "reverse_kl": _full,
    "forward_kl": _full,
    "jsd": _full,
    "teacher_topk_forward_kl": _teacher_topk_fkl,
}


def full_vocab_fn(cfg: ObjectiveConfig) -> Callable | None:
    """The per-chunk divergence for full-vocabulary objectives (None for gathered ones)."""
    if cfg.name not in obj.FULL_VOCAB_OBJECTIVES:
        return None
    fn = obj.FULL_VOCAB_OBJECTIVES[cfg.name]
    if cfg.name == "jsd":
        beta = cfg.beta
        return lambda s, t: fn(s, t, beta)
    return fn


def token_loss(cfg: ObjectiveConfig, student: StudentOutputs, teacher: TeacherScores | None,
               valid: torch.Tensor | None, sequence_advantage: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss (B, T): ``opd_weight`` × the distillation objective + ``outcome_weight`` × the outcome
    policy-gradient term (the hybrid OPD + GRPO objective; ``opd_weight`` = 0 is plain GRPO)."""
    loss = torch.zeros_like(student.logp_sampled)
    if cfg.opd_weight and teacher is not None:
        loss = loss + cfg.opd_weight * OBJECTIVES[cfg.name](cfg, student, teacher, valid)
    if cfg.outcome_weight and sequence_advantage is not None:
        loss = loss + cfg.outcome_weight * obj.outcome_pg_loss(student.logp_sampled, sequence_advantage)
    return loss
