"""Prompts: read JSONL/parquet rows, normalise the schema, render the chat template once, filter by length.

Accepted row shapes (first match wins, after applying ``columns``):

* ``{"prompt": "plain text"}``
* ``{"messages": [{"role": "user", "content": ...}, ...]}``: a trailing assistant turn is kept as the
  reference response (used by SFT) and is not part of the prompt;
* verl/DAPO: ``{"prompt": [{"role": "user", ...}], "reward_model": {"ground_truth": ...}, "data_source": ...}``.

The answer comes from ``answer`` or ``reward_model.ground_truth``; the source (for teacher routing and
per-source metrics) from ``data_source``. Any other schema is mapped with ``columns``, e.g.
``{prompt: problem, answer: solution}``.
"""

from __future__ import annotations

import json
import logging
import random

from .errors import UserError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


class DatasetError(UserError, ValueError):
    """A data file or row opdkit cannot use (the message names the file and row)."""


@dataclass
class Example:
    """One prompt, rendered for the student. ``prompt_ids`` end with the generation prompt."""

    index: int
    messages: list[dict]
    prompt_ids: list[int]
    answer: str | None = None
    source: str = ""
    reference: str | None = None  # assistant turn of a chat row, if any
    extra: dict = field(default_factory=dict)
    teacher_prompt_ids: list[int] | None = None  # set when the teacher renders prompts with its own template

    @property
    def teacher_ids(self) -> list[int]:
        """The prompt as the teacher reads it."""
        return self.prompt_ids if self.teacher_prompt_ids is None else self.teacher_prompt_ids


def read_rows(path: str | Path) -> list[dict]:
    """Read all rows of a .jsonl/.json/.parquet file as dicts; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DatasetError(f"{path}: cannot read parquet file: {e}") from None
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open() as fh:
            if path.suffix == ".json":
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}: not valid JSON: {e}") from None
                if not isinstance(data, list):
                    raise DatasetError(f"{path}: a .json dataset must be a list of rows")
                return data
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DatasetError(f"{path}, line {lineno}: each line must be a JSON object, got "
                                       f"{type(row).__name__}")
                rows.append(row)
        return rows
    raise DatasetError(f"{path}: unsupported dataset format {path.suffix!r}; use .jsonl, .json or .parquet")


def row_label(path, i: int) -> str:
    """How errors name the row at index ``i``: rows count from 1, like the lines of a .jsonl file (where no line is
    blank), so "row 3" is the third row."""
    return f"{path}, row {i + 1}"


def _lookup(row: dict, dotted: str) -> Any:
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DatasetError(f"{where}: message {i} must have string 'role' and 'content', got {m!r:.120}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def normalise_row(row: dict, columns: dict, where: str) -> tuple[list[dict], str | None, str | None, str]:
    """Return (prompt messages, reference response, answer, source) for one raw row."""
    col = {"prompt": "prompt", "messages": "messages", "answer": "answer", "source": "data_source", **columns}
    prompt = _lookup(row, col["prompt"])
    messages = _lookup(row, col["messages"])
    reference = None
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DatasetError(f"{where}: '{col['prompt']}' is empty")
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        msgs = _check_messages(prompt, where)
    elif messages is not None:
        msgs = _check_messages(messages, where)
    else:
        present = ", ".join(sorted(row)) or "none"
        raise DatasetError(
            f"{where}: no prompt found. Expected a '{col['prompt']}' string, a '{col['prompt']}' message list "
            f"(verl schema) or a '{col['messages']}' list; columns present: {present}. Map your columns with "
            f"data.columns, e.g. data.columns={{prompt: problem}}")
    if msgs[-1]["role"] == "assistant":
        reference = msgs[-1]["content"]
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise DatasetError(f"{where}: the prompt must end with a user message, got roles "
                           f"{[m['role'] for m in msgs]}")
    answer = _lookup(row, col["answer"])
    if answer is None:
        answer = _lookup(row, "reward_model.ground_truth")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DatasetError(f"{where}: answer must be a string or number, got {type(answer).__name__}")
    source = _lookup(row, col["source"])
    return msgs, reference, (None if answer is None else str(answer)), ("" if source is None else str(source))


def check_mapped_columns(rows: list[dict], columns: dict, path, option: str = "data.columns") -> None:
    """A mapped column that no row has is a typo, not a dataset without answers: say so."""
    for name, column in columns.items():
        if not any(isinstance(r, dict) and _lookup(r, column) is not None for r in rows):
            present = sorted({k for r in rows[:100] if isinstance(r, dict) for k in r})
            raise DatasetError(f"{path}: {option} maps {name} to the column {column!r}, which does not exist in "
                               f"any row; columns present: {', '.join(present) or 'none'}")


def render_prompt(tokenizer, messages: list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of the conversation followed by the assistant generation prompt (template applied once)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **(chat_template_kwargs or {}))
        # The template already contains BOS/role markers; adding special tokens again would double them.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n\n".join(m["content"] for m in messages) + "\n"
    return tokenizer(text)["input_ids"]


@dataclass
class PromptSet:
    examples: list[Example]
    path: str
    skipped_long: int = 0

    def __len__(self) -> int:
        return len(self.examples)


def load_prompts(path: str | Path, tokenizer, *, columns: dict | None = None, prompt_suffix: str = "",
                 system_prompt: str | None = None, chat_template_kwargs: dict | None = None,
                 max_prompt_length: int = 1024, long_prompts: str = "skip", limit: int | None = None,
                 rows: list[dict] | None = None, columns_option: str = "data.columns") -> PromptSet:
    """Load and render a prompt file. Over-long prompts are skipped (and counted) or raise, by ``long_prompts``."""
    rows = read_rows(path) if rows is None else rows
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DatasetError(f"{path}: the dataset has no rows")
    check_mapped_columns(rows, columns or {}, path, columns_option)
    examples, skipped = [], 0
    for i, row in enumerate(rows):
        where = row_label(path, i)
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object, got {type(row).__name__}")
        msgs, reference, answer, source = normalise_row(row, columns or {}, where)
        if prompt_suffix:
            msgs = msgs[:-1] + [{"role": "user", "content": msgs[-1]["content"] + prompt_suffix}]
        if system_prompt is not None and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system_prompt}] + msgs
        ids = render_prompt(tokenizer, msgs, chat_template_kwargs)
        if len(ids) > max_prompt_length:
            if long_prompts == "error":
                raise DatasetError(f"{where}: prompt has {len(ids)} tokens, over data.max_prompt_length="
                                   f"{max_prompt_length}; raise the limit or set data.long_prompts=skip")
            skipped += 1
            continue
        examples.append(Example(i, msgs, ids, answer, source, reference))
    if skipped:
        log.warning("%s: skipped %d of %d prompts longer than %d tokens", path, skipped, len(rows), max_prompt_length)
    if not examples:
        raise DatasetError(f"{path}: all {len(rows)} prompts are longer than max_prompt_length={max_prompt_length}")
    return PromptSet(examples, str(path), skipped)


class PromptSampler:
    """Endless, seeded, resumable stream of prompt batches: shuffles once per epoch.

    Its whole state is (epoch, position), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        if n <= 0:
            raise DatasetError("no prompts to sample from")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.position:self.position + self.batch_size - len(batch)]
            batch += take
            self.position += len(take)
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()
