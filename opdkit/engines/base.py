"""What flows between the stages, and what every engine implements.

A rollout engine turns prompts into a ``Rollout``; a teacher engine turns a rollout into ``TeacherScores``.
``RolloutEngine`` and ``Teacher`` are the declared interfaces; an engine subclasses one and inherits the no-op
defaults of the optional methods (a routed teacher overrides ``check_sources`` and ``metrics``, a vLLM engine
sets ``last_sync``, a served teacher returns a ``TeacherStream`` from ``stream``), so the trainer calls them
without asking which engine it got.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Rollout:
    """Student samples for one step: B rows = prompts × n, T = longest response in the batch.

    Attributes:
        prompt_ids: per row, the student-rendered prompt token ids.
        response_ids: (B, T) long, right-padded with ``pad_id`` after the end of each response.
        response_mask: (B, T) bool, True for response tokens up to and including the first EOS.
        sampling_logp: (B, T) float, log-prob of each sampled token under the sampling distribution.
        topk_ids: (B, T, k) long, the student's top-k ids at each position (None if k = 0).
        truncated: (B,) bool, True where no EOS came within ``max_new_tokens``.
        example_index: per row, the index of its prompt in the prompt set.
        group_size: responses per prompt (consecutive rows share a prompt).
    """

    prompt_ids: list[list[int]]
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    sampling_logp: torch.Tensor
    topk_ids: torch.Tensor | None
    truncated: torch.Tensor
    example_index: list[int] = field(default_factory=list)
    group_size: int = 1

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, rows: list[int] | slice) -> "Rollout":
        idx = list(range(len(self)))[rows] if isinstance(rows, slice) else rows
        t = torch.tensor(idx, dtype=torch.long)
        return Rollout(
            [self.prompt_ids[i] for i in idx], self.response_ids[t], self.response_mask[t], self.sampling_logp[t],
            None if self.topk_ids is None else self.topk_ids[t], self.truncated[t],
            [self.example_index[i] for i in idx] if self.example_index else [], self.group_size)


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


class RolloutEngine(Protocol):
    """What the training loop needs from a rollout engine (``rollout.engine``)."""

    #: figures of the last ``sync_weights`` check (push_seconds, check_seconds, probe_mean_abs_diff), if it checks
    last_sync: dict | None = None

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, topk: int, seed: int, greedy: bool = False,
                 example_index: list[int] | None = None, row_offset: int = 0, min_new_tokens: int = 0) -> Rollout:
        """``n`` samples of each prompt, with the student's top-k ids at each position when ``topk`` > 0."""
        ...

    def sync_weights(self, student) -> None:
        """Make the sampler's weights the student's (after each optimizer step and after a resume)."""
        ...


class TeacherStream(Protocol):
    """Scores one rollout's rows as they finish sampling (``Teacher.stream``), so the teacher's work overlaps the
    decoding of the rows still running. ``finish`` returns exactly what ``Teacher.score`` would."""

    #: the teacher's own time on the rows (requests in flight, then assembling the scores), known after finish
    seconds: float

    def submit(self, rows: list[int], responses: list[list[int]]) -> None:
        """Rows (indices into the rollout) whose sampling ended, with their final response tokens."""
        ...

    def finish(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> TeacherScores:
        """The whole rollout's scores, after sampling: rows not submitted yet are scored now."""
        ...

    def close(self) -> None:
        """Drop the requests not sent yet (sampling failed; ``finish`` will not be called)."""
        ...


class Teacher(Protocol):
    """What the training loop needs from a teacher engine (``teacher.engine``)."""

    #: capabilities: subset of {"sampled", "topk", "at_ids", "entropy", "hidden"}
    capabilities: frozenset[str]

    def score(self, prompt_ids: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor, *,
              k: int, student_topk_ids: torch.Tensor | None = None, keep_hidden: bool = False,
              sources: list[str] | None = None) -> TeacherScores:
        """Scores on the device of ``response_ids`` (the rollout's), except ``hidden``, which stays on the
        teacher's device; callers move them once with ``TeacherScores.to``."""
        ...

    def stream(self, prompt_ids: list[list[int]], *, k: int, keep_hidden: bool = False) -> TeacherStream | None:
        """A scorer for rows as they finish sampling, or None: the engine scores whole rollouts only (a local
        teacher would take the cores or the device the student is decoding on)."""
        return None

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher logits (N, V) from its hidden states (N, H): engines with the "hidden" capability only."""
        raise NotImplementedError(f"{type(self).__name__} returns no hidden states")

    def check_sources(self, sources: list[str], rows: list[int] | None = None, where: str = "the data") -> None:
        """Refuse rows this teacher cannot score, before training (a routed teacher: rows without a teacher)."""
        return None

    def metrics(self, sources: list[str], mask: torch.Tensor, student_logp: torch.Tensor,
                teacher_logp: torch.Tensor) -> dict[str, float]:
        """Per-step metrics of the teacher's own (a routed teacher: per-teacher token share and reverse KL)."""
        return {}
