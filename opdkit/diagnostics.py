"""The paper's token-level diagnostics (§2), as pure tensor functions on data every OPD step already has.

Inputs per response position t of a student rollout (B rows, T positions, k = top-k size):

* ``student_ids`` S^p_t and ``teacher_ids`` S^q_t, (B, T, k);
* ``student_logp_S`` = log p_t and ``teacher_logp_S`` = log q_t at the ids of S^p_t, (B, T, k): full-vocabulary
  log-probs gathered at those ids (the loss gathers them anyway);
* full-vocabulary entropies H(p_t), H(q_t), (B, T);
* log-probs of the sampled token under both models, (B, T).

Per-position values are reduced with the response mask; positions where a quantity is undefined (an empty
overlap) are skipped, as the paper specifies.
"""

from __future__ import annotations

import torch

from .candidates import member
from .losses import NEG_INF, masked_log_softmax


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over True positions of mask; NaN when there are none (the metric is then undefined)."""
    mask = mask.bool()
    n = int(mask.sum())
    return float(x[mask].float().sum() / n) if n else float("nan")


def overlap_membership(student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, k) bool: slot i of S^p_t is also in S^q_t. Its row sum is |S^p_t ∩ S^q_t|."""
    return member(student_ids, teacher_ids)


def overlap_ratio(in_both: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 6 per position: |S^p_t ∩ S^q_t| / k. (B, T, k) -> (B, T).

    k is the requested top-k size; if the vocabulary is smaller than k, both sets are the whole vocabulary and
    the denominator is the vocabulary size (= the slots present), so identical models still give 1.
    """
    return in_both.float().sum(-1) / min(k, in_both.shape[-1])


def overlap_token_advantage(student_logp_S: torch.Tensor, teacher_logp_S: torch.Tensor, in_both: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 per position: (1/|I_t|) Σ_{v∈I_t} p̄_t(v)(log q̄_t(v) − log p̄_t(v)), I_t = S^p_t ∩ S^q_t.

    p̄ and q̄ are renormalised over I_t, so the value equals −KL(p̄_I‖q̄_I)/|I_t| ≤ 0; 0 means aligned.
    Returns the value (B, T) and where it is defined (B, T) (I_t non-empty).
    """
    log_p = masked_log_softmax(student_logp_S.float(), in_both)
    log_q = masked_log_softmax(teacher_logp_S.float(), in_both)
    terms = torch.where(in_both, log_p.exp() * (log_q - log_p), torch.zeros_like(log_p))
    size = in_both.sum(-1)
    return terms.sum(-1) / size.clamp(min=1), size > 0


def overlap_token_advantage_reference(student_logp_S: torch.Tensor, teacher_logp_S: torch.Tensor,
                                      in_both: torch.Tensor) -> torch.Tensor:
    """The reference code's ``adv_intersection``: the *training* advantages on overlap slots.

    A(v) = p̄^S(v)(log q(v) − log p(v)) with p̄^S renormalised over the whole student top-k and unnormalised
    log-ratios; returned per slot (B, T, k), to be averaged over the slots where ``in_both``.
    """
    weights = torch.softmax(student_logp_S.float(), -1)
    return weights * (teacher_logp_S.float() - student_logp_S.float())


def overlap_mass(logp_S: torch.Tensor, in_both: torch.Tensor) -> torch.Tensor:
    """Eqs. 9-10 per position: Σ_{v∈I_t} π(v) with the unrenormalised probabilities of one model. -> (B, T)."""
    return torch.where(in_both, logp_S.float().exp(), torch.zeros_like(logp_S, dtype=torch.float32)).sum(-1)


def maxadv_prob_gap(student_logp_S: torch.Tensor, teacher_logp_S: torch.Tensor, in_both: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """App. B.2: p_t(v*) − q_t(v*) at v* = argmax_{v ∈ I_t} |A_t(v)|, A_t the Eq. 7 advantage.

    The paper does not say which set the argmax runs over; like the reference code we use the overlap I_t,
    where the Eq. 7 advantage is defined. Returns (B, T) and where it is defined (I_t non-empty).
    """
    log_p = masked_log_softmax(student_logp_S.float(), in_both)
    log_q = masked_log_softmax(teacher_logp_S.float(), in_both)
    adv = torch.where(in_both, (log_p.exp() * (log_q - log_p)).abs(), torch.full_like(log_p, NEG_INF))
    star = adv.argmax(-1, keepdim=True)
    gap = (student_logp_S.float().exp() - teacher_logp_S.float().exp()).gather(-1, star).squeeze(-1)
    return gap, in_both.any(-1)


def sequence_mean_reward(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """§6.2: r̄(y) = (1/T) Σ_t [log q_t(y_t) − log p_t(y_t)] per rollout. (B, T) -> (B,)."""
    m = mask.float()
    return ((teacher_logp.float() - student_logp.float()) * m).sum(-1) / m.sum(-1).clamp(min=1)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` separating labels 1 from 0 (Mann-Whitney U, ties count ½).

    NaN when either class is missing.
    """
    pos, neg = scores[labels.bool()].float(), scores[~labels.bool()].float()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().sum()
    ties = (pos[:, None] == neg[None, :]).float().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def position_bins(length: int, max_length: int, span: int) -> dict[str, tuple[int, int]]:
    """Named [start, end) response-position windows: four quarters of ``max_length`` and fixed ``span``s."""
    bins: dict[str, tuple[int, int]] = {}
    quarter = max(1, -(-max_length // 4))
    for q in range(4):
        bins[f"pos_q{q + 1}"] = (q * quarter, min((q + 1) * quarter, max_length))
    for start in range(0, max_length, span):
        bins[f"pos_{start}-{min(start + span, max_length) - 1}"] = (start, min(start + span, max_length))
    return {name: (a, min(b, length)) for name, (a, b) in bins.items() if a < length}


def per_position_diagnostics(*, student_ids, teacher_ids, student_logp_S, teacher_logp_S, entropy_student,
                             entropy_teacher, student_logp_sampled, teacher_logp_sampled, k: int
                             ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Every diagnostic per position: name -> (values (B, T), defined-mask (B, T) or None for always defined)."""
    in_both = overlap_membership(student_ids, teacher_ids)
    adv, adv_defined = overlap_token_advantage(student_logp_S, teacher_logp_S, in_both)
    gap, gap_defined = maxadv_prob_gap(student_logp_S, teacher_logp_S, in_both)
    return {
        "overlap_ratio": (overlap_ratio(in_both, k), None),
        "overlap_token_advantage": (adv, adv_defined),
        "overlap_mass_student": (overlap_mass(student_logp_S, in_both), None),
        "overlap_mass_teacher": (overlap_mass(teacher_logp_S, in_both), None),
        "maxadv_prob_gap": (gap, gap_defined),
        "entropy_student": (entropy_student.float(), None),
        "entropy_teacher": (entropy_teacher.float(), None),
        "entropy_gap": ((entropy_teacher.float() - entropy_student.float()).abs(), None),
        "reverse_kl": ((student_logp_sampled - teacher_logp_sampled).float(), None),
    }


# The quantities also reported per response-position window (paper §6.1: back-to-front instability).
BINNED = ("overlap_ratio", "overlap_token_advantage", "entropy_student", "entropy_teacher", "entropy_gap",
          "reverse_kl")


def reduce_diagnostics(per_position: dict, mask: torch.Tensor, prefix: str = "diag/",
                       names: tuple[str, ...] | None = None) -> dict[str, float]:
    out = {}
    for name, (values, defined) in per_position.items():
        if names is not None and name not in names:
            continue
        m = mask if defined is None else mask & defined
        out[prefix + name] = masked_mean(values, m)
    return out


def topk_diagnostics(*, student_ids, teacher_ids, student_logp_S, teacher_logp_S, entropy_student, entropy_teacher,
                     student_logp_sampled, teacher_logp_sampled, mask: torch.Tensor, k: int,
                     reverse_kl: torch.Tensor | None = None, prefix: str = "diag/"
                     ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], dict[str, float]]:
    """The §4 diagnostics of one batch of rollouts, shared by a training step and the probe.

    Inputs are (B, T, k) top-k ids and log-probs on the student's set S^p_t, (B, T) entropies and sampled-token
    log-probs, and the (B, T) response ``mask``. ``reverse_kl`` (B, T), when given, is the exact per-token
    KL(p_t‖q_t) reported instead of the one-sample estimate (the probe computes it; a step does not). Returns
    the per-position values (for windows, ``windowed_diagnostics``) and their means over ``mask``, keyed
    ``prefix + name``, including the overlap-token advantage of the reference formula.
    """
    per_pos = per_position_diagnostics(
        student_ids=student_ids, teacher_ids=teacher_ids, student_logp_S=student_logp_S,
        teacher_logp_S=teacher_logp_S, entropy_student=entropy_student, entropy_teacher=entropy_teacher,
        student_logp_sampled=student_logp_sampled, teacher_logp_sampled=teacher_logp_sampled, k=k)
    if reverse_kl is not None:
        per_pos["reverse_kl"] = (reverse_kl, None)
    out = reduce_diagnostics(per_pos, mask, prefix=prefix)
    in_both = overlap_membership(student_ids, teacher_ids)
    ref = overlap_token_advantage_reference(student_logp_S, teacher_logp_S, in_both)
    out[prefix + "overlap_token_advantage_ref"] = masked_mean(ref, in_both & mask.unsqueeze(-1))
    return per_pos, out


def windowed_diagnostics(per_pos: dict, mask: torch.Tensor, bins: dict[str, tuple[int, int]]
                         ) -> dict[str, dict[str, float]]:
    """The ``BINNED`` diagnostics averaged within each [a, b) window of response positions (paper §6.1)."""
    out = {}
    for name, (a, b) in bins.items():
        window = torch.zeros_like(mask)
        window[:, a:b] = True
        out[name] = reduce_diagnostics(per_pos, mask & window, prefix="", names=BINNED)
    return out


def step_diagnostics(batch, *, k: int, max_new_tokens: int | None = None,
                     span: int | None = None) -> dict[str, float]:
    """All ``diag/*`` metrics of one step from its detached ``StepBatch`` (no extra forward pass): the
    candidates' student half S^p_t carries the student's and the teacher's log-probs the §4 diagnostics read."""
    rollout, scores = batch.rollout, batch.scores
    mask = rollout.response_mask
    out: dict[str, float] = {}
    seq_reward = sequence_mean_reward(batch.student_logp_sampled, scores.sampled_logp, mask)
    out["diag/seq_reward_mean"] = float(seq_reward.mean())
    if batch.rewards is not None:
        out["diag/reward_auroc"] = auroc(seq_reward, batch.rewards > 0.5)
    candidates = batch.candidates  # S^p from the rollout, S^q from the teacher
    if not (k and candidates is not None and candidates.teacher_ids is not None):
        return out
    have_logp = (scores.logp_at_student_topk is not None and batch.student_logp_at is not None
                 and scores.entropy is not None)
    if not have_logp:
        # A served teacher returns its top-k but no log-probs at the student's ids: Eq. 6 needs only the ids.
        ratio = overlap_ratio(overlap_membership(candidates.student_ids, candidates.teacher_ids), k)
        out["diag/overlap_ratio"] = masked_mean(ratio, mask)
        return out
    per_pos, means = topk_diagnostics(
        student_ids=candidates.student_ids, teacher_ids=candidates.teacher_ids,
        student_logp_S=candidates.student(batch.student_logp_at), teacher_logp_S=scores.logp_at_student_topk,
        entropy_student=batch.student_entropy, entropy_teacher=scores.entropy,
        student_logp_sampled=batch.student_logp_sampled, teacher_logp_sampled=scores.sampled_logp, mask=mask, k=k)
    out.update(means)
    max_len = max_new_tokens or mask.shape[1]
    bins = position_bins(mask.shape[1], max_len, span or max(1, max_len // 8))
    for name, values in windowed_diagnostics(per_pos, mask, bins).items():
        out.update({f"diag/{name}/{key}": v for key, v in values.items()})
    return out
