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
from .errors import InvalidInput
from .scoring import TeacherScores
from .student import StudentOutputs

# What each objective needs from a teacher engine (see Teacher.capabilities).
REQUIREMENTS: dict[str, Callable[[ObjectiveConfig], set[str]]] = {
    # vOPD's baseline for the sampled token reads the teacher at the student's top-k ids
    "sampled": lambda cfg: {"sampled"} | ({"topk", "at_ids"} if cfg.baseline == "vopd" else set()),
    "topk": lambda cfg: {"topk"} | (set() if cfg.strategy == "teacher" else {"at_ids"}),
    "reverse_kl": lambda cfg: {"hidden"},
    "forward_kl": lambda cfg: {"hidden"},
    "jsd": lambda cfg: {"hidden"},
    "teacher_topk_forward_kl": lambda cfg: {"topk"},
}


CAPABILITY_WORDS = {
    "sampled": "log-prob of the sampled token",
    "topk": "top-k ids and log-probs",
    "at_ids": "log-probs at the student's top-k ids",
    "entropy": "entropy",
    "hidden": "hidden states (its full-vocabulary distribution)",
}


def available_objectives(capabilities: frozenset[str]) -> list[str]:
    """Objectives (and, for topk, candidate strategies) that a teacher with these capabilities supports."""
    import typing

    strategies = typing.get_args(typing.get_type_hints(ObjectiveConfig)["strategy"])
    out = []
    for name, req in REQUIREMENTS.items():
        ok = [s for s in strategies if req(ObjectiveConfig(name=name, strategy=s)) <= set(capabilities)]
        if len(ok) == len(strategies):
            out.append(name)
        elif ok:
            out.append(f"{name} with objective.strategy={'/'.join(ok)}")
    return out


def check_teacher_supports(cfg: ObjectiveConfig, capabilities: frozenset[str], engine: str) -> None:
    """Refuse, before training, an objective that needs more than the teacher engine can return."""
    missing = REQUIREMENTS[cfg.name](cfg) - set(capabilities)
    if missing:
        where = f"teacher.engine={engine}" if engine in ("hf", "vllm", "server") else engine
        what = "topk with objective.strategy=" + cfg.strategy if cfg.name == "topk" else cfg.name
        raise InvalidInput(
            f"objective.name={what} needs the teacher's {' and '.join(CAPABILITY_WORDS[m] for m in sorted(missing))}, "
            f"which {where} cannot provide (it returns: "
            f"{', '.join(CAPABILITY_WORDS[c] for c in sorted(capabilities))}). "
            f"Available with {where}: {', '.join(available_objectives(capabilities))}")


def teacher_candidate_logp(scores: TeacherScores) -> torch.Tensor | None:
    """Teacher log-probs on the [S^p ; S^q] layout, (B, T, 2k); S^p half is -inf if the engine lacks it."""
    if scores.topk_logp is None:
        return None
    at_student = scores.logp_at_student_topk
    if at_student is None:
        at_student = torch.full_like(scores.topk_logp, float("-inf"))
    return torch.cat([at_student, scores.topk_logp], -1)


def _sampled(cfg, s: StudentOutputs, t: TeacherScores, valid):
    baseline = None
    if cfg.baseline == "vopd":
        k = t.logp_at_student_topk.shape[-1]
        student_slots = torch.ones_like(t.logp_at_student_topk, dtype=torch.bool)
        baseline = obj.vopd_baseline(s.logp_at[..., :k], t.logp_at_student_topk, student_slots)
    return obj.sampled_token_pg(s.logp_sampled, t.sampled_logp, baseline)[0]


def _topk(cfg, s: StudentOutputs, t: TeacherScores, valid):
    teacher = teacher_candidate_logp(t)
    if cfg.form == "kl":
        return obj.topk_kl(s.logp_at, teacher, valid)
    # The reference code leaves the symmetric-difference weights unnormalised; we keep that for parity.
    renormalise = cfg.strategy != "symmetric_difference"
    return obj.topk_pg(s.logp_at, teacher, valid, cfg.weighting, renormalise, cfg.baseline == "vopd")[0]


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
               valid: torch.Tensor | None, sequence_advantage: torch.Tensor | None = None,
               opd_token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss (B, T): ``opd_weight`` × the distillation objective + ``outcome_weight`` × the outcome
    policy-gradient term (the hybrid OPD + GRPO objective; ``opd_weight`` = 0 is plain GRPO).

    ``opd_token_weight`` (B, T), detached, scales the distillation term per token (Prune-OPD's weights)."""
    loss = torch.zeros_like(student.logp_sampled)
    if cfg.opd_weight and teacher is not None:
        opd = OBJECTIVES[cfg.name](cfg, student, teacher, valid)
        if opd_token_weight is not None:
            opd = opd * opd_token_weight.to(opd.device)
        loss = loss + cfg.opd_weight * opd
    if cfg.outcome_weight and sequence_advantage is not None:
        loss = loss + cfg.outcome_weight * obj.outcome_pg_loss(student.logp_sampled, sequence_advantage)
    return loss
