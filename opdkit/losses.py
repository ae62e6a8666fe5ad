"""The OPD losses as pure tensor functions (``opdkit.objectives`` picks one per ``objective.name``).

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

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


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
                         valid: torch.Tensor, baseline: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """−Σ_v A_t(v) ρ_t(v) with the detached advantage A_t(v) = w_t(v) (log q_t(v) − log p_t(v) − b_t).

    This is how the reference code trains OPD: a policy gradient whose reward is the teacher log-ratio, with
    the on-policy ratio ρ = exp(log p − sg[log p]) ≡ 1 (one update per rollout). Its value is therefore
    Σ_v w(v)(log p − log q)(v), the loss the paper plots, and its gradient is Σ_v w(v)(log p − log q)(v) ∇log p(v).
    ``baseline`` b_t (B, T), detached, is the vOPD control variate (``vopd_baseline``); None means b_t = 0.

    Args: student_logp (B, T, C) with grad; teacher_logp (B, T, C); weights, valid (B, T, C).
    Returns: loss (B, T) and the advantage (B, T, C) (0 on invalid slots).
    """
    logp = torch.where(valid, student_logp.float(), torch.zeros_like(student_logp, dtype=torch.float32))
    log_ratio = torch.where(valid, teacher_logp.float() - logp.detach(), torch.zeros_like(logp))
    if baseline is not None:
        log_ratio = torch.where(valid, log_ratio - baseline.detach().float().unsqueeze(-1), log_ratio)
    advantage = weights * log_ratio
    ratio = torch.exp(logp - logp.detach())
    return -(advantage * ratio).sum(-1), advantage


def sampled_token_pg(student_logp: torch.Tensor, teacher_logp: torch.Tensor, baseline: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token OPD (Eq. 3): advantage A_t = log q_t(ŷ_t) − log p_t(ŷ_t) − b_t, loss −A_t log p_t(ŷ_t).

    E_{ŷ_t∼p_t}[log p_t(ŷ_t) − log q_t(ŷ_t)] = KL(p_t‖q_t), so the gradient is an unbiased single-sample estimate
    of the reverse-KL gradient. A detached baseline b_t that depends only on the state (x, ŷ_<t) keeps it
    unbiased, since E_{ŷ_t∼p_t}[b_t ∇log p_t(ŷ_t)] = b_t ∇Σ_v p_t(v) = 0; vOPD's b_t = −KL(p_t‖q_t) is the value of
    that state and lowers the variance (``vopd_baseline``). Args: (B, T) each. Returns loss (B, T), advantage (B, T).
    """
    valid = torch.ones_like(student_logp, dtype=torch.bool).unsqueeze(-1)
    loss, adv = policy_gradient_loss(student_logp.unsqueeze(-1), teacher_logp.unsqueeze(-1),
                                     valid.float(), valid, baseline)
    return loss, adv.squeeze(-1)


def topk_pg(student_logp: torch.Tensor, teacher_logp: torch.Tensor, valid: torch.Tensor, weighting: str,
            renormalise: bool = True, baseline: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k OPD, reference-code form: policy gradient over the candidate set with weights ``weighting``.

    With the student's top-k and student_p weights the gradient is
    Σ_{v∈S} p̄(v)(log p − log q)(v) ∇log p(v), the reverse KL gradient restricted to S (paper §1 [I]).

    ``baseline=True`` subtracts the vOPD baseline with the same weights, b_t = Σ_v w̄(v)(log q − log p)(v)
    (w̄ = w / Σ_valid w; for student_p this is −KL(p̄_t‖·) on S, the top-k approximation of −KL(p_t‖q_t)). Here no
    token is sampled at t, so b_t is not a zero-mean control variate: it removes exactly the component
    b_t ∇log W(S) that moves the set's total mass. With student_p weights the result is the gradient of Eq. 5,
    KL(p̄‖q̄) (tested), which is why the baseline stops the PG form from draining mass into the tail.
    Args: (B, T, C) each. Returns loss (B, T), advantage (B, T, C).
    """
    w = candidate_weights(weighting, student_logp, teacher_logp, valid, renormalise)
    b = vopd_baseline(student_logp, teacher_logp, valid, w) if baseline else None
    return policy_gradient_loss(student_logp, teacher_logp, w, valid, b)


def vopd_baseline(student_logp: torch.Tensor, teacher_logp: torch.Tensor, valid: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """vOPD's closed-form value of state t (arXiv 2605.07865): V_t = E_{v∼p_t}[log q_t(v) − log p_t(v)] = −KL(p_t‖q_t).

    Computed over the valid slots with weights w̄ = w / Σ_valid w (default w = p, so w̄ = p̄, the student's
    probabilities renormalised over the set): b_t = Σ_v w̄(v)(log q_t(v) − log p_t(v)). With the set equal to the
    whole vocabulary this is exactly −KL(p_t‖q_t); over the student's top-k it is the paper's top-k approximation.
    Any value keeps the sampled-token gradient unbiased; the closer to V_t, the lower its variance.
    Detached. Args: (B, T, C) each (full-vocabulary log-probs gathered at the slots). Returns (B, T); 0 where no
    slot is valid.
    """
    logp, logq = student_logp.detach().float(), teacher_logp.detach().float()
    if weights is None:
        weights = masked_log_softmax(logp, valid).exp()
    w = torch.where(valid, weights.float(), torch.zeros_like(logp))
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-30)
    diff = torch.where(valid & (w > 0), logq - logp, torch.zeros_like(logp))
    return (w * diff).sum(-1)


def pg_second_moment_ratio(student_logp: torch.Tensor, teacher_logp: torch.Tensor, baseline: torch.Tensor,
                           student_topk_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """How much a baseline shrinks the sampled-token gradient, measured in logit space on real rollouts.

    Per position the estimator's gradient wrt the logits is (D_t − c_t)(e_ŷ − p_t) with D_t = log p_t(ŷ) − log q_t(ŷ)
    and c_t = −``baseline``; its squared norm is (D_t − c_t)² (1 − 2 p_t(ŷ) + Σ_v p_t(v)²) (Σ p² over the student's
    top-k, a lower bound). Returns Σ_t that with the baseline / Σ_t it without (< 1: the baseline helps; same
    mean gradient, so the ratio of second moments ranks the variances). (B, T) each, (B, T, k), mask (B, T).
    """
    p_y = student_logp.float().exp()
    norm2 = (1 - 2 * p_y + (2 * student_topk_logp.float()).exp().sum(-1)).clamp(min=0)
    d = (student_logp - teacher_logp).float()
    m = mask.float()
    plain = (d.square() * norm2 * m).sum()
    with_b = ((d + baseline.float()).square() * norm2 * m).sum()
    return float(with_b / plain.clamp(min=1e-30))


def truncated_is_weight(train_logp: torch.Tensor, sampling_logp: torch.Tensor, clip: float
                        ) -> torch.Tensor:
    """Truncated importance weight min(π_θ(ŷ_t) / π_sample(ŷ_t), C) for samples drawn by older (stale) weights.

    The sampled prefix came from π_sample; reweighting each token's loss by the ratio corrects the expectation to
    π_θ, and truncating at C bounds the variance a stale or mismatched sampler would add (the bias is confined
    to tokens whose ratio exceeds C). Detached. (B, T), (B, T) -> (B, T).
    """
    ratio = torch.exp(train_logp.detach().float() - sampling_logp.detach().float())
    return ratio.clamp(max=clip)


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
