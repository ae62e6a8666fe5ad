"""OPD objectives as pure tensor functions.

Notation (paper §1): at response position t of a student rollout, p_t = π_θ(·|x, ŷ_<t) is the student and
q_t = π_T(·|x, ŷ_<t) the teacher, both evaluated on the *student's* prefix. Shapes: B sequences, T response
positions, C candidate slots per position, N flattened positions, V vocabulary.

Two families:

* **Gathered** objectives see log-probs at a few ids per position (the sampled token, or a top-k candidate
  set). They cost O(B·T·C) and are what OPD normally uses: ``sampled_token_pg`` (Eq. 3), ``topk_pg`` (the
  reference code's policy-gradient form) and ``topk_kl`` (the paper's renormalised KL(p̄‖q̄), Eq. 5).
* **Full-vocabulary** objectives see logits chunks (N, V): ``reverse_kl`` (Eq. 4), ``forward_kl`` and the
  generalised ``jsd`` of GKD. The trainer calls them chunk by chunk, so (B, T, V) never exists.

Every function returns a per-position loss; ``aggregate`` turns it into one scalar.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------
# Candidate sets for top-k OPD
# --------------------------------------------------------------------------------------------------


def _member(ids: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
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
    """Which candidate slots a top-k set strategy uses.

    Candidates are laid out as 2k slots per position: [S^p_t ; S^q_t], the student's top-k ids followed by
    the teacher's. Each strategy is a mask over that layout, so one gather serves every strategy.

    Args:
        strategy: student | teacher | intersection | union | symmetric_difference.
        student_ids, teacher_ids: (B, T, k).
    Returns:
        valid (B, T, 2k) bool.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown top-k strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    s_in_t, t_in_s = _member(student_ids, teacher_ids), _member(teacher_ids, student_ids)
    on_student, on_teacher = STRATEGIES[strategy](s_in_t, t_in_s)
    return torch.cat([on_student, on_teacher], dim=-1)


def masked_log_softmax(logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Renormalise log-probs over the valid slots: log p̄(v) = log p(v) − log Σ_{u valid} p(u).

    Invalid slots and positions with no valid slot get -inf (their probability is exactly 0).
    """
    masked = logp.masked_fill(~valid, NEG_INF)
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    out = masked - lse
    return out.masked_fill(~valid, NEG_INF)


def _xlogx_ratio(log_a: torch.Tensor, log_b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Σ_valid a (log a − log b) with 0·(−inf) treated as 0. Shapes (..., C) -> (...)."""
    a = log_a.exp()
    term = a * (log_a - log_b)
    return torch.where(valid & (a > 0), term, torch.zeros_like(term)).sum(-1)


# --------------------------------------------------------------------------------------------------
# Gathered objectives
# --------------------------------------------------------------------------------------------------


def candidate_weights(weighting: str, student_logp: torch.Tensor, teacher_logp: torch.Tensor,
                      valid: torch.Tensor, renormalise: bool = True) -> torch.Tensor:
    """Detached per-candidate weights w_t(v) of the policy-gradient form (reference code ``REWARD_WEIGHT_MODE``).

    student_p: w = p̄ (student probabilities renormalised over the valid slots); teacher_p: w = q̄;
    none: uniform 1/|valid|. With ``renormalise=False`` (the reference code's choice for the symmetric
    difference) the raw probabilities p(v), q(v) or 1 are used. Shapes (B, T, C) -> (B, T, C); 0 on invalid slots.
    """
    if weighting == "student_p":
        source = student_logp.detach()
    elif weighting == "teacher_p":
        source = teacher_logp.detach()
    elif weighting == "none":
        source = torch.zeros_like(student_logp, dtype=torch.float32)
    else:
        raise ValueError(f"unknown weighting {weighting!r}; choose student_p, teacher_p or none")
    if renormalise:
        w = masked_log_softmax(source.float(), valid).exp()
    else:
        w = source.float().exp()
    return torch.where(valid, w, torch.zeros_like(w))


def policy_gradient_loss(student_logp: torch.Tensor, teacher_logp: torch.Tensor, weights: torch.Tensor,
                         valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """−Σ_v A_t(v) ρ_t(v) with the detached advantage A_t(v) = w_t(v) (log q_t(v) − log p_t(v)).

    This is how the reference code trains OPD: a policy gradient whose reward is the teacher log-ratio, with
    the on-policy ratio ρ = exp(log p − sg[log p]) ≡ 1 (one update per rollout). Its value is therefore
    Σ_v w(v)(log p − log q)(v), the loss the paper plots, and its gradient is Σ_v w(v)(log p − log q)(v) ∇log p(v).

    Args: student_logp (B, T, C) with grad; teacher_logp (B, T, C); weights, valid (B, T, C).
    Returns: loss (B, T) and the advantage (B, T, C) (0 on invalid slots).
    """
    logp = torch.where(valid, student_logp.float(), torch.zeros_like(student_logp, dtype=torch.float32))
    log_ratio = torch.where(valid, teacher_logp.float() - logp.detach(), torch.zeros_like(logp))
    advantage = weights * log_ratio
    ratio = torch.exp(logp - logp.detach())
    return -(advantage * ratio).sum(-1), advantage


def sampled_token_pg(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token OPD (Eq. 3): advantage A_t = log q_t(ŷ_t) − log p_t(ŷ_t), loss −A_t log p_t(ŷ_t).

    E_{ŷ_t∼p_t}[log p_t(ŷ_t) − log q_t(ŷ_t)] = KL(p_t‖q_t), so the gradient is an unbiased single-sample estimate
    of the reverse-KL gradient. Args: (B, T) each. Returns loss (B, T), advantage (B, T).
    """
    valid = torch.ones_like(student_logp, dtype=torch.bool).unsqueeze(-1)
    loss, adv = policy_gradient_loss(student_logp.unsqueeze(-1), teacher_logp.unsqueeze(-1),
                                     valid.float(), valid)
    return loss, adv.squeeze(-1)


def topk_pg(student_logp: torch.Tensor, teacher_logp: torch.Tensor, valid: torch.Tensor, weighting: str,
            renormalise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k OPD, reference-code form: policy gradient over the candidate set with weights ``weighting``.

    With the student's top-k and student_p weights the gradient is
    Σ_{v∈S} p̄(v)(log p − log q)(v) ∇log p(v), the reverse KL gradient restricted to S (paper §1 [I]).
    Args: (B, T, C) each. Returns loss (B, T), advantage (B, T, C).
    """
    w = candidate_weights(weighting, student_logp, teacher_logp, valid, renormalise)
    return policy_gradient_loss(student_logp, teacher_logp, w, valid)


def topk_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Top-k OPD, paper form (Eq. 5): KL(p̄_t ‖ q̄_t), both renormalised over the valid candidate set.

    Differentiated by autograd through p̄. Positions without a valid slot contribute 0.
    Args: (B, T, C) each (log-probs over the full vocabulary, gathered). Returns (B, T).
    """
    log_p = masked_log_softmax(student_logp.float(), valid)
    log_q = masked_log_softmax(teacher_logp.float(), valid)
    return _xlogx_ratio(log_p, log_q, valid)


def teacher_topk_forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Forward KL on the teacher's top-k with a tail bucket, as a served teacher allows.

    The distributions are coarsened to the k teacher ids plus one "rest" bucket; the result is the exact KL
    between the coarsened q and p, so it is ≥ 0 and 0 iff they agree on the partition.
    Args: student_logp, teacher_logp (B, T, k) at the teacher's top-k ids. Returns (B, T).
    """
    s, t = student_logp.float(), teacher_logp.float()
    s_tail = torch.log1p(-s.exp().sum(-1).clamp(max=1 - 1e-6))
    t_tail = torch.log1p(-t.exp().sum(-1).clamp(max=1 - 1e-6))
    s_all = torch.cat([s, s_tail.unsqueeze(-1)], -1)
    t_all = torch.cat([t, t_tail.unsqueeze(-1)], -1)
    return _xlogx_ratio(t_all, s_all, torch.ones_like(t_all, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# Full-vocabulary objectives on logits chunks
# --------------------------------------------------------------------------------------------------


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_v p(v)(log p(v) − log q(v)) over the whole vocabulary (Eq. 4). (N, V) -> (N,)."""
    log_p = F.log_softmax(student_logits.float(), -1)
    log_q = F.log_softmax(teacher_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(q‖p) = Σ_v q(v)(log q(v) − log p(v)), the supervised-KD direction. (N, V) -> (N,)."""
    log_p = F.log_softmax(student_logits.float(), -1)
    log_q = F.log_softmax(teacher_logits.float(), -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD of GKD (Agarwal et al. 2024): β KL(p‖m) + (1−β) KL(q‖m), m = β p + (1−β) q.

    p is the student, q the teacher. β = 0.5 is the symmetric Jensen-Shannon divergence; both ends (β → 0, 1)
    vanish, so use ``reverse_kl`` / ``forward_kl`` for the pure directions. (TRL's ``beta`` names the same
    family with the roles of p and q swapped.) (N, V) -> (N,).
    """
    log_p = F.log_softmax(student_logits.float(), -1)
    log_q = F.log_softmax(teacher_logits.float(), -1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


FULL_VOCAB_OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    "reverse_kl": reverse_kl,
    "forward_kl": forward_kl,
    "jsd": generalized_jsd,
}


# --------------------------------------------------------------------------------------------------
# Outcome reward and aggregation
# --------------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                     scale: bool = True) -> torch.Tensor:
    """GRPO advantages: each reward minus its group mean, divided by the group std when ``scale``.

    rewards (B,) with B = groups × group_size, consecutive rows forming a group. Returns (B,). A group whose
    rewards are all equal gets advantage 0 (no signal), never NaN.
    """
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def outcome_pg_loss(student_logp: torch.Tensor, sequence_advantage: torch.Tensor) -> torch.Tensor:
    """−A(y) ρ_t with ρ_t = exp(log p_t(ŷ_t) − sg[·]) ≡ 1: the on-policy GRPO token loss for a per-sequence
    advantage (gradient −A(y) ∇log p_t(ŷ_t)). (B, T), (B,) -> (B, T)."""
    logp = student_logp.float()
    return -(sequence_advantage.float().unsqueeze(-1) * torch.exp(logp - logp.detach()))


def truncated_importance_weight(train_logp: torch.Tensor, sampling_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight min(π_θ(ŷ_t) / π_sample(ŷ_t), cap), detached. (B, T), (B, T) -> (B, T).

    Rollouts sampled by stale weights (a one-step-off pipeline) or a lower-precision sampling copy are slightly
    off-policy; weighting each token's loss by this ratio corrects the expectation to the trained policy, and
    the cap bounds the variance (truncated importance sampling, as in verl/TRL's async trainers). ``cap`` 0
    turns it off (all ones).
    """
    if cap <= 0:
        return torch.ones_like(train_logp, dtype=torch.float32)
    ratio = torch.exp(train_logp.detach().float() - sampling_logp.to(train_logp.device).float())
    return ratio.clamp(max=cap)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, num_tokens: float | None = None,
              num_sequences: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss (B, T) under ``mask`` (B, T) to a scalar.

    token_mean: Σ loss / number of tokens; seq_mean: mean over sequences of each sequence's token mean.
    Pass the *global* ``num_tokens`` / ``num_sequences`` of the whole step when the batch is split into
    micro-batches: the sum of micro-batch results then equals the full-batch value exactly.
    An empty mask gives 0, never NaN.
    """
    mask = mask.to(loss.dtype)
    if mode == "token_mean":
        denom = mask.sum() if num_tokens is None else torch.tensor(float(num_tokens))
        return (loss * mask).sum() / denom.clamp(min=1)
    if mode == "seq_mean":
        per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        denom = torch.tensor(float(mask.shape[0] if num_sequences is None else num_sequences))
        return per_seq.sum() / denom.clamp(min=1)
    raise ValueError(f"unknown aggregation {mode!r}; choose token_mean or seq_mean")
