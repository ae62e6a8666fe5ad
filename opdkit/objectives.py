"""The OPD objectives, one object each, in one registry: ``OBJECTIVES[objective.name]``.

An objective declares what it needs from the teacher engine (``requires``: capabilities, see
``Teacher.capabilities``), which candidate slots its loss reads (``candidate_set``: a ``candidates.STRATEGIES``
name, or None), its per-chunk full-vocabulary divergence if it has one (``chunk_loss``, run inside the student
forward against the teacher's logits) and its per-token loss (``token_loss``). The tensor maths lives in
``opdkit.losses``; adding an objective is one class here and its name in ``OBJECTIVES`` (and in the config's
``objective.name`` choices, which a test checks against this registry).
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, ClassVar

import torch

from . import losses
from .candidates import Candidates
from .config import ObjectiveConfig
from .errors import InvalidInput

if TYPE_CHECKING:
    from .engines.base import TeacherScores
    from .student import StudentOutputs


CAPABILITY_WORDS = {
    "sampled": "log-prob of the sampled token",
    "topk": "top-k ids and log-probs",
    "at_ids": "log-probs at the student's top-k ids",
    "entropy": "entropy",
    "hidden": "hidden states (its full-vocabulary distribution)",
}


class Objective:
    """One OPD objective, configured by the ``objective.*`` section (``cfg``)."""

    name: ClassVar[str]
    #: teacher capabilities the objective needs besides those of its candidate set
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: ObjectiveConfig | None = None):
        self.cfg = ObjectiveConfig(name=self.name) if cfg is None else cfg

    def candidate_set(self) -> str | None:
        """The candidate slots (a ``STRATEGIES`` name) the token loss reads; None: none of them."""
        return None

    def requires(self) -> set[str]:
        """Teacher capabilities: the objective's own, plus the teacher's top-k for any candidate set and its
        log-probs at the student's ids for a set that reads S^p_t."""
        on_candidates = {None: set(), "teacher": {"topk"}}.get(self.candidate_set(), {"topk", "at_ids"})
        return set(self.needs) | on_candidates

    @property
    def full_vocab(self) -> bool:
        """Whether the student forward computes ``chunk_loss`` (which needs the teacher's hidden states)."""
        return False

    def chunk_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary divergence on one chunk of logits, (N, V) each -> (N,)."""
        raise NotImplementedError(f"objective {self.name} has no full-vocabulary loss")

    def token_loss(self, student: StudentOutputs, teacher: TeacherScores, candidates: Candidates | None
                   ) -> torch.Tensor:
        """Per-token distillation loss (B, T) from the student forward and the teacher's scores."""
        raise NotImplementedError


class SampledToken(Objective):
    """Sampled-token OPD (Eq. 3), optionally with vOPD's baseline read on the student's top-k."""

    name = "sampled"
    needs = frozenset({"sampled"})

    def candidate_set(self) -> str | None:
        return "student" if self.cfg.baseline == "vopd" else None

    def token_loss(self, student, teacher, candidates):
        baseline = None
        if self.cfg.baseline == "vopd":
            on_student = teacher.logp_at_student_topk
            baseline = losses.vopd_baseline(candidates.student(student.logp_at), on_student,
                                            torch.ones_like(on_student, dtype=torch.bool))
        return losses.sampled_token_pg(student.logp_sampled, teacher.sampled_logp, baseline)[0]


def teacher_candidate_logp(scores: TeacherScores) -> torch.Tensor | None:
    """Teacher log-probs on the [S^p ; S^q] layout, (B, T, 2k); S^p half is -inf if the engine lacks it."""
    if scores.topk_logp is None:
        return None
    at_student = scores.logp_at_student_topk
    if at_student is None:
        at_student = torch.full_like(scores.topk_logp, float("-inf"))
    return Candidates.join(at_student, scores.topk_logp)


class TopK(Objective):
    """Top-k OPD on the ``objective.strategy`` set: the paper's KL(p̄‖q̄) (form kl) or the reference code's
    policy gradient (form pg)."""

    name = "topk"

    def candidate_set(self) -> str | None:
        return self.cfg.strategy

    def token_loss(self, student, teacher, candidates):
        cfg = self.cfg
        valid = candidates.mask(cfg.strategy)
        on_teacher = teacher_candidate_logp(teacher)
        if cfg.form == "kl":
            return losses.topk_kl(student.logp_at, on_teacher, valid)
        # The reference code leaves the symmetric-difference weights unnormalised; we keep that for parity.
        renormalise = cfg.strategy != "symmetric_difference"
        return losses.topk_pg(student.logp_at, on_teacher, valid, cfg.weighting, renormalise,
                              cfg.baseline == "vopd")[0]


class TeacherTopKForwardKL(Objective):
    """Forward KL on the teacher's top-k plus a tail bucket: what a served teacher's top-k allows."""

    name = "teacher_topk_forward_kl"

    def candidate_set(self) -> str | None:
        return "teacher"

    def token_loss(self, student, teacher, candidates):
        return losses.teacher_topk_forward_kl(candidates.teacher(student.logp_at), teacher.topk_logp)


class FullVocab(Objective):
    """A divergence over the whole vocabulary, computed chunk by chunk inside the student forward against the
    teacher's logits recomputed from its hidden states; the token loss is that per-token value."""

    needs = frozenset({"hidden"})

    @property
    def full_vocab(self) -> bool:
        return True

    def token_loss(self, student, teacher, candidates):
        return student.full_loss


class ReverseKL(FullVocab):
    name = "reverse_kl"

    def chunk_loss(self, student_logits, teacher_logits):
        return losses.reverse_kl(student_logits, teacher_logits)


class ForwardKL(FullVocab):
    name = "forward_kl"

    def chunk_loss(self, student_logits, teacher_logits):
        return losses.forward_kl(student_logits, teacher_logits)


class JSD(FullVocab):
    name = "jsd"

    def chunk_loss(self, student_logits, teacher_logits):
        return losses.generalized_jsd(student_logits, teacher_logits, self.cfg.beta)


OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (
    SampledToken, TopK, ReverseKL, ForwardKL, JSD, TeacherTopKForwardKL)}


def objective_for(cfg: ObjectiveConfig) -> Objective:
    """The objective ``cfg.name``, configured by ``cfg``."""
    return OBJECTIVES[cfg.name](cfg)


def available_objectives(capabilities: frozenset[str]) -> list[str]:
    """Objectives (and, for topk, candidate strategies) that a teacher with these capabilities supports."""
    strategies = typing.get_args(typing.get_type_hints(ObjectiveConfig)["strategy"])
    out = []
    for name, objective in OBJECTIVES.items():
        ok = [s for s in strategies
              if objective(ObjectiveConfig(name=name, strategy=s)).requires() <= set(capabilities)]
        if len(ok) == len(strategies):
            out.append(name)
        elif ok:
            out.append(f"{name} with objective.strategy={'/'.join(ok)}")
    return out


def check_teacher_supports(cfg: ObjectiveConfig, capabilities: frozenset[str], engine: str) -> None:
    """Refuse, before training, an objective that needs more than the teacher engine can return."""
    missing = objective_for(cfg).requires() - set(capabilities)
    if missing:
        where = f"teacher.engine={engine}" if engine in ("hf", "vllm", "server") else engine
        what = "topk with objective.strategy=" + cfg.strategy if cfg.name == "topk" else cfg.name
        raise InvalidInput(
            f"objective.name={what} needs the teacher's {' and '.join(CAPABILITY_WORDS[m] for m in sorted(missing))}, "
            f"which {where} cannot provide (it returns: "
            f"{', '.join(CAPABILITY_WORDS[c] for c in sorted(capabilities))}). "
            f"Available with {where}: {', '.join(available_objectives(capabilities))}")


def token_loss(objective: Objective, student: StudentOutputs, teacher: TeacherScores | None,
               candidates: Candidates | None, sequence_advantage: torch.Tensor | None = None,
               opd_token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss (B, T): ``opd_weight`` × the distillation objective + ``outcome_weight`` × the outcome
    policy-gradient term (the hybrid OPD + GRPO objective; ``opd_weight`` = 0 is plain GRPO).

    ``opd_token_weight`` (B, T), detached, scales the distillation term per token (Prune-OPD's weights)."""
    cfg = objective.cfg
    loss = torch.zeros_like(student.logp_sampled)
    if cfg.opd_weight and teacher is not None:
        opd = objective.token_loss(student, teacher, candidates)
        if opd_token_weight is not None:
            opd = opd * opd_token_weight.to(opd.device)
        loss = loss + cfg.opd_weight * opd
    if cfg.outcome_weight and sequence_advantage is not None:
        loss = loss + cfg.outcome_weight * losses.outcome_pg_loss(student.logp_sampled, sequence_advantage)
    return loss
