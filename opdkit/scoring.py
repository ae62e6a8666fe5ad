"""Teacher scoring: the teacher reads the student's own tokens and returns only what the objective needs.

The teacher's decoder runs once over prompt + response; its vocabulary projection runs in chunks over the
valid response positions only, and each chunk is reduced at once to a few numbers per position (sampled-token
log-prob, top-k ids and log-probs, log-probs at the student's top-k ids, entropy, log-normaliser). Memory is
O(B·T·k) plus one (chunk, V) block, never (B, T, V).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch

from .rollout import left_pad


@dataclass
class TeacherScores:
    """Teacher quantities at each response position of a rollout. All (B, T, ...) and 0 where masked.

    Attributes:
        sampled_logp: (B, T) log q_t(ŷ_t) at the teacher temperature.
        topk_ids, topk_logp: (B, T, k) the teacher's top-k S^q_t and log q_t on it (None if k = 0).
        logp_at_student_topk: (B, T, k) log q_t at the student's top-k ids S^p_t (None if not requested or the
            engine cannot score arbitrary ids).
        entropy: (B, T) full-vocabulary entropy H(q_t) (None if the engine cannot provide it).
        hidden: (B, T, H) final hidden states at the positions predicting each response token, kept only for
            full-vocabulary objectives (the loss recomputes teacher logits chunk by chunk with ``head_logits``).
    """

    sampled_logp: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logp: torch.Tensor | None = None
    logp_at_student_topk: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> "TeacherScores":
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        return TeacherScores(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))

    def to(self, device: torch.device | str, *, hidden: bool = True) -> "TeacherScores":
        """All fields on ``device`` (a no-op for those already there); ``hidden=False`` drops the hidden states
        instead of moving them (e.g. when copying scores to the CPU for metrics)."""
        # non_blocking only host -> device: a device -> host copy must complete before the CPU reads it.
        non_blocking = torch.device(device).type != "cpu"
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return TeacherScores(*(move(getattr(self, f)) if f != "hidden" or hidden else None
                               for f in self.__dataclass_fields__))


class Teacher(Protocol):
    """What the training loop needs from a teacher engine."""

    #: capabilities: subset of {"sampled", "topk", "at_ids", "entropy", "hidden"}
    capabilities: frozenset[str]

    def score(self, prompt_ids: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor, *,
              k: int, student_topk_ids: torch.Tensor | None = None, keep_hidden: bool = False,
              sources: list[str] | None = None) -> TeacherScores:
        """Scores on the device of ``response_ids`` (the rollout's), except ``hidden``, which stays on the
        teacher's device; callers move them once with ``TeacherScores.to``."""
        ...


def decoder_and_head(model):
    """The decoder stack (returns hidden states) and the vocabulary projection of a causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, base.base_model_prefix)
    return decoder, base.get_output_embeddings()


def final_logit_softcap(model) -> float | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None


def response_hidden_states(model, prompt_ids: list[list[int]], response_ids: torch.Tensor, pad_id: int
                           ) -> torch.Tensor:
    """Final hidden states (B, T, H) at the positions that predict each response token.

    Prompts are left-padded to P; position P-1+t predicts response token t.
    """
    decoder, _ = decoder_and_head(model)
    device = next(model.parameters()).device
    prompts, prompt_mask = left_pad(prompt_ids, pad_id)
    B, T = response_ids.shape
    ids = torch.cat([prompts, response_ids], 1).to(device)
    # Tokens after EOS are masked out of the loss; causal attention keeps them from affecting earlier positions.
    attn = torch.cat([prompt_mask, torch.ones(B, T, dtype=prompt_mask.dtype)], 1).to(device)
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=ids, attention_mask=attn, position_ids=position, use_cache=False).last_hidden_state
    P = prompts.shape[1]
    return hidden[:, P - 1:P - 1 + T]


class HeadProjection:
    """Logits of a model's vocabulary projection on any hidden states, restricted to the shared vocabulary.

    Holds its own copy of the head weight in ``dtype`` (fp32 by default: bf16 logits are spaced ~0.125 apart
    near |z| = 20, which would quantise every log-ratio OPD uses).
    """

    def __init__(self, model, vocab_size: int, temperature: float = 1.0, dtype: torch.dtype = torch.float32):
        _, head = decoder_and_head(model)
        self.weight = head.weight.detach()[:vocab_size].to(dtype)
        self.bias = None if getattr(head, "bias", None) is None else head.bias.detach()[:vocab_size].to(dtype)
        self.temperature, self.dtype = temperature, dtype
        self.softcap = final_logit_softcap(model)

    def to(self, device: torch.device | str) -> "HeadProjection":
        """A copy of this projection with its weight on ``device``."""
        other = copy.copy(self)
        other.weight = self.weight.to(device)
        other.bias = None if self.bias is None else self.bias.to(device)
        return other

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden.to(self.dtype), self.weight, self.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float() / self.temperature


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


def scatter_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place (N, ...) values at the True positions of mask (B, T) in a zero (B, T, ...) tensor."""
    out = values.new_zeros(mask.shape + values.shape[1:])
    out[mask] = values
    return out


class HFTeacher:
    """A local transformers teacher. Scores any ids, so every objective is available."""

    capabilities = frozenset({"sampled", "topk", "at_ids", "entropy", "hidden"})

    def __init__(self, model, *, vocab_size: int, pad_id: int, temperature: float = 1.0, chunk_size: int = 1024,
                 head_dtype: torch.dtype = torch.float32, batch_size: int | None = None, packed: bool = False):
        from .packing import enable_varlen_attention

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
            from .packing import packed_response_hidden_states

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
