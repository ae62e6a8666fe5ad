"""The HF teacher engine (``teacher.engine=hf``): the teacher reads the student's own tokens and returns only
what the objective needs.

The teacher's decoder runs once over prompt + response; its vocabulary projection runs in chunks over the
valid response positions only, and each chunk is reduced at once to a few numbers per position (sampled-token
log-prob, top-k ids and log-probs, log-probs at the student's top-k ids, entropy). Memory is O(B·T·k) plus
one (chunk, V) block, never (B, T, V).
"""

from __future__ import annotations

import torch

from ..lm import HeadProjection, response_hidden_states, scatter_rows
from .base import Teacher, TeacherScores


def reduce_logits(logits: torch.Tensor, sampled: torch.Tensor, k: int, at_ids: torch.Tensor | None
                  ) -> dict[str, torch.Tensor]:
    """Reduce a (N, V) logits chunk to per-position quantities (the only place teacher logits exist)."""
    logz = torch.logsumexp(logits, -1, keepdim=True)
    logp = logits - logz
    out = {"sampled_logp": logp.gather(-1, sampled[:, None]).squeeze(-1),
           "entropy": -(logp.exp() * logp).sum(-1)}
    if k:
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        out["topk_ids"], out["topk_logp"] = top.indices, top.values
    if at_ids is not None:
        out["logp_at_student_topk"] = logp.gather(-1, at_ids)
    return out



class HFTeacher(Teacher):
    """A local transformers teacher. Scores any ids, so every objective is available."""

    capabilities = frozenset({"sampled", "topk", "at_ids", "entropy", "hidden"})

    def __init__(self, model, *, vocab_size: int, pad_id: int, temperature: float = 1.0, chunk_size: int = 1024,
                 head_dtype: torch.dtype = torch.float32, batch_size: int | None = None, packed: bool = False):
        from ..packing import enable_varlen_attention

        self.model, self.pad_id, self.chunk_size, self.batch_size = model, pad_id, chunk_size, batch_size
        # packed: one padding-free decoder pass over a block's rows (opdkit.packing), else a padded batch
        self.packed = packed and enable_varlen_attention(model)
        self.head = HeadProjection(model, vocab_size, temperature, head_dtype)
        self.device = next(model.parameters()).device
        self._heads: dict[torch.device, HeadProjection] = {self.device: self.head}

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor, *,
              k: int, student_topk_ids: torch.Tensor | None = None, keep_hidden: bool = False,
              sources: list[str] | None = None) -> TeacherScores:
        """Rows are scored in blocks of ``batch_size`` (activations of one block at a time, not the whole
        rollout's); the result equals one forward over all rows up to float rounding."""
        B = response_ids.shape[0]
        step = self.batch_size or max(B, 1)
        blocks = [self._score_rows(prompt_ids[i:i + step], response_ids[i:i + step], response_mask[i:i + step], k,
                                   None if student_topk_ids is None else student_topk_ids[i:i + step], keep_hidden)
                  for i in range(0, max(B, 1), step)]
        if len(blocks) == 1:
            return blocks[0]
        cat = lambda f: None if getattr(blocks[0], f) is None else torch.cat([getattr(b, f) for b in blocks])  # noqa
        return TeacherScores(*(cat(f) for f in TeacherScores.__dataclass_fields__))

    def _score_rows(self, prompt_ids, response_ids, response_mask, k, student_topk_ids, keep_hidden
                    ) -> TeacherScores:
        if self.packed:
            from ..packing import packed_response_hidden_states

            flat_h = packed_response_hidden_states(self.model, prompt_ids, response_ids, response_mask)
            mask = response_mask.to(flat_h.device)
            hidden = scatter_rows(flat_h, mask) if keep_hidden else None
        else:
            hidden = response_hidden_states(self.model, prompt_ids, response_ids, self.pad_id)
            mask = response_mask.to(hidden.device)
            flat_h = hidden[mask]
        flat_tok = response_ids.to(flat_h.device)[mask]
        flat_at = None if student_topk_ids is None else student_topk_ids.to(flat_h.device)[mask]
        parts: dict[str, list[torch.Tensor]] = {}
        # max(.., 1): an all-masked batch still runs one empty chunk, so every field gets its shape.
        for start in range(0, max(flat_h.shape[0], 1), self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            chunk = reduce_logits(self.head(flat_h[sl]), flat_tok[sl], k, None if flat_at is None else flat_at[sl])
            for name, value in chunk.items():
                parts.setdefault(name, []).append(value)
        # Back where the rollout lives (B·T·k numbers); the hidden states, the large part, stay on the teacher.
        out = response_ids.device
        full = {name: scatter_rows(torch.cat(vals).to(out), response_mask) for name, vals in parts.items()}
        return TeacherScores(
            sampled_logp=full["sampled_logp"], topk_ids=full.get("topk_ids"), topk_logp=full.get("topk_logp"),
            logp_at_student_topk=full.get("logp_at_student_topk"), entropy=full["entropy"],
            hidden=hidden.detach() if keep_hidden else None)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher logits on the caller's device. With the teacher on another device, its head is copied to the
        caller's once, so neither hidden states nor (chunk, V) logits cross devices at every chunk."""
        head = self._heads.get(hidden.device)
        if head is None:
            head = self._heads[hidden.device] = self.head.to(hidden.device)
        return head(hidden)
