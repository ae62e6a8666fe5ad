"""Per-token log-prob records from inference engines (vLLM in-process or an OpenAI-compatible server) turned
into opdkit's tensors. Pure functions: no engine is imported here, so they are tested on hand-made records.

An engine reports, at each position, a mapping ``{token_id: (logprob, rank)}`` that holds the top-k ids (ranks
1..k) and the id actually at that position (any rank). vLLM's ranks are 1-based positions in the distribution
sorted by probability.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import UserError
from .base import Rollout, TeacherScores

# {token id: (log-prob, rank)} at one position
PositionLogprobs = Mapping[int, tuple[float, int]]


class EngineError(UserError, RuntimeError):
    """A rollout or teacher engine failed in a way the user can act on (the CLI prints the message)."""


class EngineOutputError(EngineError):
    """An engine returned something opdkit cannot use (missing ids, too few top-k entries, ids off the vocab)."""


def top_ids(entry: PositionLogprobs, k: int, where: str) -> list[int]:
    """The k ids of rank 1..k, best first. Ties in rank are broken by log-prob, then id."""
    ranked = sorted(entry.items(), key=lambda kv: (kv[1][1], -kv[1][0], kv[0]))
    ids = [tid for tid, (_, rank) in ranked if rank <= k][:k]
    if len(ids) < k:
        raise EngineOutputError(f"{where}: the engine returned {len(ids)} top-k entries, expected {k}")
    return ids


def sequences_to_score(prompt_ids: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor
                       ) -> tuple[list[list[int]], list[int]]:
    """Prompt + valid response tokens of each row (one token prompt per row) and the response lengths."""
    lengths = response_mask.sum(-1).tolist()
    seqs = [list(p) + response_ids[i, :n].tolist() for i, (p, n) in enumerate(zip(prompt_ids, lengths))]
    return seqs, [int(n) for n in lengths]


def scores_from_prompt_logprobs(entries: Sequence[Sequence[PositionLogprobs]], response_ids: torch.Tensor,
                                response_mask: torch.Tensor, k: int, vocab_size: int,
                                engine: str = "engine") -> TeacherScores:
    """Teacher scores (B, T[, k]) from per-response-position log-prob records.

    Args:
        entries: per row, one record per valid response position (the prompt positions already dropped).
        vocab_size: ids at or beyond it are not shared with the student; a top-k id there is an error.
    """
    B, T = response_ids.shape
    lengths = response_mask.sum(-1).tolist()
    tokens = response_ids.tolist()  # one conversion, not one tensor read per position
    # Per-position values go into flat Python lists and become tensors once, scattered at the mask.
    sampled, top, top_logp = [], [], []
    for i, (row, n) in enumerate(zip(entries, lengths)):
        if len(row) != n:
            raise EngineOutputError(f"{engine}: row {i} has {n} response tokens but {len(row)} log-prob records")
        for t, entry in enumerate(row):
            tok = tokens[i][t]
            if tok not in entry:
                raise EngineOutputError(f"{engine}, row {i}, response position {t}: no log-prob for the scored "
                                        f"token {tok}")
            sampled.append(entry[tok][0])
            if k:
                ids = top_ids(entry, k, f"{engine}, row {i}, response position {t}")
                if max(ids) >= vocab_size:
                    raise EngineOutputError(
                        f"{engine}, row {i}, response position {t}: the teacher's top-{k} contains id {max(ids)}, "
                        f"beyond the {vocab_size} ids it shares with the student (padding rows of a larger "
                        f"embedding matrix)")
                top.append(ids)
                top_logp.append([entry[j][0] for j in ids])
    # Records fill each row's first n positions: the mask of those, whatever response_mask's own pattern.
    filled = torch.arange(T)[None, :] < torch.tensor(lengths, dtype=torch.long).reshape(B, 1)
    scatter = lambda values, shape, dtype: _scatter(values, filled, shape, dtype)  # noqa: E731
    return TeacherScores(sampled_logp=scatter(sampled, (), torch.float32),
                         topk_ids=scatter(top, (k,), torch.long) if k else None,
                         topk_logp=scatter(top_logp, (k,), torch.float32) if k else None)


def _scatter(values: list, mask: torch.Tensor, tail: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero (B, T, *tail) tensor holding ``values`` (one per True of ``mask``, in row-major order)."""
    out = torch.zeros(tuple(mask.shape) + tail, dtype=dtype)
    if values:
        out[mask] = torch.tensor(values, dtype=dtype).reshape((-1,) + tail)
    return out


def assemble_rollout(prompts: list[list[int]], outputs: Sequence[tuple[Sequence[int], Sequence[PositionLogprobs]]],
                     *, eos_ids: list[int], pad_id: int, topk: int, example_index: list[int], group_size: int
                     ) -> Rollout:
    """A ``Rollout`` from per-row (generated ids, per-token log-prob records).

    Masks come from each row's own length (an engine stops a row at its first EOS), never from ``id == pad``;
    a row is truncated when it does not end with an EOS id.
    """
    B = len(outputs)
    T = max([len(ids) for ids, _ in outputs] + [1])
    eos = set(eos_ids)
    rows, logp, top, truncated = [], [], [], []
    for i, (ids, records) in enumerate(outputs):
        ids = [int(x) for x in ids]
        n = len(ids)
        if len(records) != n:
            raise EngineOutputError(f"rollout row {i}: {n} tokens but {len(records)} log-prob records")
        truncated.append(n == 0 or ids[-1] not in eos)
        if any(x in eos for x in ids[:-1]):
            raise EngineOutputError(f"rollout row {i}: the engine kept generating after an EOS id")
        rows.append(ids + [pad_id] * (T - n))
        for t, (tok, entry) in enumerate(zip(ids, records)):
            logp.append(entry[tok][0])
            if topk:
                top.append(top_ids(entry, topk, f"rollout row {i}, position {t}"))
    lengths = torch.tensor([len(ids) for ids, _ in outputs], dtype=torch.long).reshape(B, 1)
    mask = torch.arange(T)[None, :] < lengths
    response = torch.tensor(rows, dtype=torch.long).reshape(B, T)
    return Rollout(prompts, response, mask, _scatter(logp, mask, (), torch.float32),
                   _scatter(top, mask, (topk,), torch.long) if topk else None,
                   torch.tensor(truncated, dtype=torch.bool).reshape(B), example_index, group_size)
