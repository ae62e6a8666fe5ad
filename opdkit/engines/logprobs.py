"""Per-token log-prob records from inference engines (vLLM in-process or an OpenAI-compatible server) turned
into opdkit's tensors. Pure functions: no engine is imported here, so they are tested on hand-made records.

An engine reports, at each position, a mapping ``{token_id: (logprob, rank)}`` that holds the top-k ids (ranks
1..k) and the id actually at that position (any rank). vLLM's ranks are 1-based positions in the distribution
sorted by probability.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..rollout import Rollout
from ..scoring import TeacherScores

# {token id: (log-prob, rank)} at one position
PositionLogprobs = Mapping[int, tuple[float, int]]


class EngineError(RuntimeError):
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
    sampled = torch.zeros(B, T)
    topk_ids = torch.zeros(B, T, k, dtype=torch.long) if k else None
    topk_logp = torch.zeros(B, T, k) if k else None
    lengths = response_mask.sum(-1).tolist()
    for i, (row, n) in enumerate(zip(entries, lengths)):
        if len(row) != n:
            raise EngineOutputError(f"{engine}: row {i} has {n} response tokens but {len(row)} log-prob records")
        for t, entry in enumerate(row):
            tok = int(response_ids[i, t])
            where = f"{engine}, row {i}, response position {t}"
            if tok not in entry:
                raise EngineOutputError(f"{where}: no log-prob for the scored token {tok}")
            sampled[i, t] = entry[tok][0]
            if k:
                ids = top_ids(entry, k, where)
                if max(ids) >= vocab_size:
                    raise EngineOutputError(
                        f"{where}: the teacher's top-{k} contains id {max(ids)}, beyond the {vocab_size} ids it "
                        f"shares with the student (padding rows of a larger embedding matrix)")
                topk_ids[i, t] = torch.tensor(ids)
                topk_logp[i, t] = torch.tensor([entry[j][0] for j in ids])
    return TeacherScores(sampled_logp=sampled, topk_ids=topk_ids, topk_logp=topk_logp)


def assemble_rollout(prompts: list[list[int]], outputs: Sequence[tuple[Sequence[int], Sequence[PositionLogprobs]]],
                     *, eos_ids: list[int], pad_id: int, topk: int, example_index: list[int], group_size: int
                     ) -> Rollout:
    """A ``Rollout`` from per-row (generated ids, per-token log-prob records).

    Masks come from each row's own length (an engine stops a row at its first EOS), never from ``id == pad``;
    a row is truncated when it does not end with an EOS id.
    """
    B = len(outputs)
    T = max([len(ids) for ids, _ in outputs] + [1])
    response = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    logp = torch.zeros(B, T)
    top = torch.zeros(B, T, topk, dtype=torch.long) if topk else None
    truncated = torch.zeros(B, dtype=torch.bool)
    eos = set(eos_ids)
    for i, (ids, records) in enumerate(outputs):
        n = len(ids)
        if len(records) != n:
            raise EngineOutputError(f"rollout row {i}: {n} tokens but {len(records)} log-prob records")
        if n:
            response[i, :n] = torch.tensor(list(ids), dtype=torch.long)
            mask[i, :n] = True
        truncated[i] = n == 0 or int(ids[-1]) not in eos
        if any(int(x) in eos for x in list(ids)[:-1]):
            raise EngineOutputError(f"rollout row {i}: the engine kept generating after an EOS id")
        for t, (tok, entry) in enumerate(zip(ids, records)):
            logp[i, t] = entry[int(tok)][0]
            if topk:
                top[i, t] = torch.tensor(top_ids(entry, topk, f"rollout row {i}, position {t}"))
    return Rollout(prompts, response, mask, logp, top, truncated, example_index, group_size)
