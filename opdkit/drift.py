"""Prune-OPD (arXiv 2605.07804): stop trusting the teacher's token rewards once the student's prefix has drifted.

The drift signal is the per-position top-k overlap ratio of the paper's diagnostics (Eq. 6,
``diagnostics.overlap_ratio``): o_t = |S^p_t ∩ S^q_t| / k. A row has *drifted* at t* when o_t < τ at every
position of a run of W consecutive response positions ending at t* (the first such run; W = ``prune_window``,
τ = ``prune_threshold``). Positions after t* get weight

    downweight:  w_t = γ^(t − t*)   (γ = ``prune_decay``; monotone, 1 up to and including t*)
    truncate:    w_t = 0, and the row stops generating at t* during rollout,

so with ``truncate`` the tokens after the drift point are never sampled, scored or trained on. Online stopping
needs the teacher's top-k while the row is being generated: ``DriftStop`` runs the (HF) teacher with its own KV
cache *in chunks of W tokens* alongside the student's decode loop (a stop-criterion hook of
``rollout.sample``). The chunks it scores are the teacher's scores of the rollout, so no token is scored twice;
a row that drifts inside a chunk wastes at most W − 1 generated tokens.
"""

from __future__ import annotations

import time

import torch

from .diagnostics import overlap_membership, overlap_ratio
from .engines.base import Rollout, TeacherScores
from .engines.hf_rollout import response_mask_from_eos
from .engines.hf_teacher import reduce_logits
from .lm import decoder_and_head, left_pad

NO_DRIFT = -1


def drift_points(overlap: torch.Tensor, mask: torch.Tensor, threshold: float, window: int) -> torch.Tensor:
    """The drift point t* of each row: the last position of its first run of ``window`` consecutive response
    positions with overlap < ``threshold``.

    Args: overlap (B, T) per-position overlap ratio; mask (B, T) response positions (a masked position breaks a
    run). Returns (B,) long, ``NO_DRIFT`` (−1) for rows without such a run.
    """
    B, T = overlap.shape
    low = (overlap < threshold) & mask.bool()
    t = torch.arange(T, device=overlap.device).expand(B, T)
    # run length of low positions ending at t = t − (index of the last non-low position at or before t)
    last_reset = torch.where(low, torch.full_like(t, -1), t).cummax(-1).values
    hit = (t - last_reset) >= window
    first = torch.where(hit, t, torch.full_like(t, T)).min(-1).values
    return torch.where(first < T, first, torch.full_like(first, NO_DRIFT))


def prune_weights(drift: torch.Tensor, length: int, mode: str, decay: float) -> torch.Tensor:
    """Per-token weights (B, T) from drift points (B,): 1 up to and including t*, then γ^(t − t*) (downweight)
    or 0 (truncate); all 1 for rows without drift and for ``mode`` none."""
    t = torch.arange(length, device=drift.device).unsqueeze(0)
    after = (t - drift.unsqueeze(-1)).clamp(min=0)
    after = torch.where(drift.unsqueeze(-1) == NO_DRIFT, torch.zeros_like(after), after)
    if mode == "none":
        return torch.ones(drift.shape[0], length)
    if mode == "downweight":
        return torch.where(after > 0, torch.full(after.shape, float(decay)) ** after.float(), torch.ones(after.shape))
    if mode == "truncate":
        return (after == 0).float()
    raise ValueError(f"unknown objective.prune {mode!r}; choose none, downweight or truncate")


def rollout_drift(rollout: Rollout, scores: TeacherScores, k: int, threshold: float, window: int) -> torch.Tensor:
    """Drift points (B,) of a scored rollout, from the student's and the teacher's top-k ids."""
    ratio = overlap_ratio(overlap_membership(rollout.topk_ids, scores.topk_ids), k)
    return drift_points(ratio, rollout.response_mask, threshold, window)


def prune_metrics(weights: torch.Tensor, mask: torch.Tensor, drift: torch.Tensor) -> dict[str, float]:
    m = mask.bool()
    n = max(int(m.sum()), 1)
    return {"prune/drift_frac": float((drift != NO_DRIFT).float().mean()),
            "prune/pruned_frac": float(((weights < 1) & m).sum()) / n,
            "prune/weight_mean": float((weights * m).sum()) / n}


class DriftStop:
    """Stop-criterion hook for ``rollout.sample``: every ``window`` tokens the HF teacher reads the new chunk
    (with its own KV cache) and rows whose drift point has been reached stop generating.

    Args:
        teacher: an ``HFTeacher``; teacher_prompts: its prompt ids per rollout row (same order as the rows).
        k: top-k size; threshold, window: Prune-OPD's τ and W.
    After sampling, ``scores(response_ids, topk_ids)`` finishes the last chunk and returns the teacher's
    ``TeacherScores`` for the whole rollout plus the drift points, and ``seconds`` holds the teacher time.
    """

    def __init__(self, teacher, teacher_prompts: list[list[int]], *, k: int, threshold: float, window: int,
                 pad_id: int, eos_ids: list[int], keep_hidden: bool = False):
        from transformers import DynamicCache

        self.teacher, self.k, self.threshold, self.window = teacher, k, threshold, window
        self.keep_hidden, self.eos_ids = keep_hidden, eos_ids
        self.seconds = 0.0
        start = time.perf_counter()
        self.decoder, _ = decoder_and_head(teacher.model)
        device = teacher.device
        ids, attn = left_pad(teacher_prompts, pad_id)
        self.attn = attn.to(device)
        position = (self.attn.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        with torch.no_grad():
            out = self.decoder(input_ids=ids.to(device), attention_mask=self.attn, position_ids=position,
                               past_key_values=self.cache, use_cache=True)
        self.last = out.last_hidden_state[:, -1:]  # predicts response token 0
        self.next_pos = position[:, -1:] + 1
        self.fed = 0  # response tokens the teacher has read
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.drift = torch.full((len(teacher_prompts),), NO_DRIFT, dtype=torch.long)
        self.stopped_at = torch.full_like(self.drift, -1)  # tokens generated when the decode loop stopped the row
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def _read(self, tokens: torch.Tensor, student_top: torch.Tensor) -> None:
        """Teacher quantities at positions fed..fed+w of tokens (B, w) with the student's top-k (B, w, k)."""
        device = self.teacher.device
        B, w = tokens.shape
        tokens = tokens.to(device)
        self.attn = torch.cat([self.attn, torch.ones((B, w), dtype=self.attn.dtype, device=device)], -1)
        position = self.next_pos + torch.arange(w, device=device)
        hidden = self.decoder(input_ids=tokens, attention_mask=self.attn, position_ids=position,
                              past_key_values=self.cache, use_cache=True).last_hidden_state
        predicting = torch.cat([self.last, hidden[:, :-1]], 1)  # hidden state before each of the w tokens
        self.last, self.next_pos, self.fed = hidden[:, -1:], self.next_pos + w, self.fed + w
        flat = predicting.reshape(B * w, -1)
        chunk = reduce_logits(self.teacher.head(flat), tokens.reshape(-1), self.k,
                              student_top.to(device).reshape(B * w, -1))
        for name, value in chunk.items():
            self.parts.setdefault(name, []).append(value.reshape(B, w, *value.shape[1:]).cpu())
        if self.keep_hidden:
            self.parts.setdefault("hidden", []).append(predicting.cpu())

    def _update_drift(self, tokens: torch.Tensor, student_top: torch.Tensor) -> None:
        mask, _ = response_mask_from_eos(tokens, self.eos_ids)
        teacher_top = torch.cat(self.parts["topk_ids"], 1)
        ratio = overlap_ratio(overlap_membership(student_top, teacher_top), self.k)
        found = drift_points(ratio, mask, self.threshold, self.window)
        self.drift = torch.where(self.drift == NO_DRIFT, found, self.drift)

    def __call__(self, t: int, tokens: torch.Tensor, tops: torch.Tensor) -> torch.Tensor | None:
        """Called by the decode loop after token t with the (B, t+1) tokens and (B, t+1, k) top-k ids so far;
        returns rows to stop (B,) at chunk ends, else None."""
        if (t + 1) % self.window:
            return None
        start = time.perf_counter()
        self._read(tokens[:, self.fed:], tops[:, self.fed:])
        self._update_drift(tokens.cpu(), tops.cpu())
        stop = self.drift != NO_DRIFT
        self.stopped_at = torch.where(stop & (self.stopped_at < 0), torch.full_like(self.stopped_at, t + 1),
                                      self.stopped_at)
        self.seconds += time.perf_counter() - start
        return stop

    def scores(self, response_ids: torch.Tensor, topk_ids: torch.Tensor) -> tuple[TeacherScores, torch.Tensor]:
        """Read what is left, cut the responses at their drift points and return (scores, new response mask)."""
        start = time.perf_counter()
        if response_ids.shape[1] > self.fed:
            self._read(response_ids[:, self.fed:], topk_ids[:, self.fed:])
            self._update_drift(response_ids, topk_ids)
        mask, _ = response_mask_from_eos(response_ids, self.eos_ids)
        T = response_ids.shape[1]
        mask &= prune_weights(self.drift, T, "truncate", 0.0).bool()
        full = {name: torch.cat(v, 1)[:, :T] for name, v in self.parts.items()}
        zero = lambda x: x.masked_fill(~mask.view(*mask.shape, *([1] * (x.dim() - 2))), 0)  # noqa: E731
        scores = TeacherScores(
            sampled_logp=zero(full["sampled_logp"]), topk_ids=zero(full["topk_ids"]),
            topk_logp=zero(full["topk_logp"]), logp_at_student_topk=zero(full["logp_at_student_topk"]),
            entropy=zero(full["entropy"]), hidden=full["hidden"] if self.keep_hidden else None)
        self.seconds += time.perf_counter() - start
        return scores, mask


def cut_rollout(rollout: Rollout, mask: torch.Tensor) -> Rollout:
    """The rollout with its response mask replaced by ``mask`` (a subset: rows cut at their drift points)."""
    rollout.response_mask = mask
    rollout.sampling_logp = rollout.sampling_logp.masked_fill(~mask, 0.0)
    return rollout
