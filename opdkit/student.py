"""The student's single training forward: what every objective's token loss reads, in one pass.

One forward of the decoder per micro-batch, then the vocabulary projection in chunks over the valid response
positions. Each chunk is wrapped in activation checkpointing, so its (chunk, V) logits are recomputed in
backward instead of stored: memory stays O(B·T·(H + C)). From each chunk we keep log-probs of the sampled
token and at the candidate ids (with grad), the entropy (no grad, for diagnostics) and, for an objective with
a full-vocabulary loss, its per-token value against the teacher's logits recomputed from its hidden states.
The token losses themselves are in ``opdkit.objectives``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch.utils.checkpoint import checkpoint

from .candidates import Candidates
from .lm import HeadProjection, response_hidden_states, scatter_rows

if TYPE_CHECKING:
    from .objectives import Objective


@dataclass
class StudentOutputs:
    """Student quantities at each response position, (B, T, ...), 0 where masked.

    logp_sampled (B, T) and logp_at (B, T, C) carry gradients; entropy (B, T) does not; full_loss (B, T) is the
    per-token full-vocabulary divergence (with grad) when a full-vocabulary objective was requested.
    """

    logp_sampled: torch.Tensor
    logp_at: torch.Tensor | None
    entropy: torch.Tensor
    full_loss: torch.Tensor | None = None


@dataclass
class TeacherLogits:
    """The teacher's full-vocabulary distribution at each response position: its final hidden states
    (B, T, H) and the projection ``head`` (hidden -> logits (N, V)) that recomputes its logits per chunk."""

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]


def _chunk_outputs(head: HeadProjection, objective: Objective | None, teacher_head: Callable | None,
                   hidden: torch.Tensor, sampled: torch.Tensor, at_ids: torch.Tensor | None,
                   teacher_hidden: torch.Tensor | None):
    logits = head(hidden)  # at the sampling temperature
    logp = torch.log_softmax(logits, -1)
    logp_sampled = logp.gather(-1, sampled[:, None]).squeeze(-1)
    logp_at = logp.gather(-1, at_ids) if at_ids is not None else logp_sampled.new_zeros(0)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    full = logp_sampled.new_zeros(0)
    if objective is not None:
        full = objective.chunk_loss(logits, teacher_head(teacher_hidden))
    return logp_sampled, logp_at, entropy, full


def student_forward(model, *args, **kwargs) -> StudentOutputs:
    """Run the student on prompt + response and gather what the loss needs (arguments: ``local_student_forward``).

    A model sharded by ``opdkit.fsdp`` runs this inside its root FSDP unit's forward, so the all-gather of the
    embedding/head weights and the reduce-scatter of their gradients also cover the chunked head below.
    """
    sharded = getattr(model, "opd_sharded_forward", None)
    if sharded is not None:
        return StudentOutputs(*sharded(_forward_tuple, *args, **kwargs))
    return local_student_forward(model, *args, **kwargs)


def _forward_tuple(model, *args, **kwargs) -> tuple:
    # FSDP registers its backward hooks on the tensors of a pytree; a plain tuple is one.
    out = local_student_forward(model, *args, **kwargs)
    return out.logp_sampled, out.logp_at, out.entropy, out.full_loss


def local_student_forward(model, prompt_ids: list[list[int]], response_ids: torch.Tensor,
                          response_mask: torch.Tensor, *, pad_id: int, vocab_size: int,
                          candidates: Candidates | None = None, objective: Objective | None = None,
                          teacher: TeacherLogits | None = None, chunk_size: int = 512, temperature: float = 1.0,
                          compute_dtype: torch.dtype | None = None, head_dtype: torch.dtype | None = torch.float32,
                          packed: bool = False) -> StudentOutputs:
    """The student forward on this process's (unsharded or layer-sharded) model.

    Args:
        candidates: the ids whose log-probs are gathered, (B, T, C) in their layout (None: only the sampled token).
        objective: when it has a full-vocabulary loss (``objective.full_vocab``), its per-token value against
            ``teacher``'s logits is computed chunk by chunk (``StudentOutputs.full_loss``).
        compute_dtype: autocast dtype of the decoder (None: the weights' dtype).
        head_dtype: dtype of the vocabulary projection (None: follow autocast).
        packed: run the decoder once over the rows packed without padding (``opdkit.packing``; the model's
            attention must have been set up with ``enable_varlen_attention``); same losses and gradients.
    """
    if objective is not None and not objective.full_vocab:
        objective = None  # the student forward only runs full-vocabulary losses; gathered ones read its outputs
    device = next(model.parameters()).device
    use_autocast = compute_dtype is not None and compute_dtype != torch.float32
    packed = packed and bool(response_mask.any())  # an all-masked batch keeps the padded graph (zero loss)
    with torch.autocast(device.type, dtype=compute_dtype or torch.bfloat16, enabled=use_autocast):
        if packed:
            from .packing import packed_response_hidden_states

            flat_h = packed_response_hidden_states(model, prompt_ids, response_ids, response_mask)
        else:
            hidden = response_hidden_states(model, prompt_ids, response_ids, pad_id)
    mask = response_mask.to(device)
    if not packed:
        flat_h = hidden[mask]
    at_ids = None if candidates is None else candidates.ids
    flat_tok = response_ids.to(device)[mask]
    flat_at = None if at_ids is None else at_ids.to(device)[mask]
    flat_th = None if objective is None else teacher.hidden.to(device)[mask]
    teacher_head = None if objective is None else teacher.head
    head = HeadProjection(model, vocab_size, temperature, head_dtype, trainable=True)
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, flat_h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (flat_h[sl], flat_tok[sl], None if flat_at is None else flat_at[sl],
                None if flat_th is None else flat_th[sl])
        fn = lambda *a: _chunk_outputs(head, objective, teacher_head, *a)  # noqa: E731
        if torch.is_grad_enabled():
            parts.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            parts.append(fn(*args))
    if not parts:
        zero = hidden.sum() * 0.0  # keeps the graph connected for an all-masked micro-batch
        shape = response_ids.shape
        return StudentOutputs(zero.expand(shape).clone(),
                              None if at_ids is None else zero.expand(at_ids.shape).clone(),
                              torch.zeros(shape, device=device), None if objective is None else zero.expand(shape).clone())
    logp_sampled, logp_at, entropy, full = (torch.cat(x) for x in zip(*parts))
    return StudentOutputs(
        logp_sampled=scatter_rows(logp_sampled, mask),
        logp_at=None if at_ids is None else scatter_rows(logp_at, mask),
        entropy=scatter_rows(entropy.detach(), mask),
        full_loss=None if objective is None else scatter_rows(full, mask),
    )
