"""Shared by the recipes: the prompt section of their configs, prompt preparation, and writing row files.

Prompts are prepared in one place so that ``rollout``, ``eval`` and the arithmetic set treat instructions the
same way: an optional few-shot conversation is put in front, and the answer-format instruction (the paper's
``Please reason step by step, and put your final answer within \\boxed{}.``) is appended to the last user
message always, never, or only where the prompt does not already ask for an answer format.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..config import BatchSamplingConfig, ConfigError, PromptDataConfig, _help
from ..data import DatasetError, PromptSet, _check_messages, load_prompts, normalise_row, read_rows, row_label
from ..tracking import console

BOXED_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."

# A prompt that mentions \boxed or an "Answer:" line already tells the model how to give its final answer.
ANSWER_INSTRUCTION = re.compile(r"\\boxed|\banswer\s*:", re.IGNORECASE)


def has_answer_instruction(text: str) -> bool:
    return bool(ANSWER_INSTRUCTION.search(text))


@dataclass
class PromptsConfig(PromptDataConfig):
    """The ``data`` section of the sampling recipes: the keys mean what they mean in ``opdkit distill``."""

    RENAMED = {"path": "train", "suffix": "prompt_suffix"}  # old names, read with a deprecation warning

    prompt_suffix: str = _help("answer-format instruction appended to the last user message", default=BOXED_SUFFIX)
    add_suffix: Literal["if_missing", "always", "never"] = _help(
        "if_missing: only where the prompt does not mention \\boxed or an 'Answer:' line", default="if_missing")
    fewshot: list = _help("messages put before every prompt, e.g. a one-shot [{role: user, ...}, "
                          "{role: assistant, ...}]", default_factory=list)
    limit: Optional[int] = _help("use only N prompts", default=None)
    subset_seed: Optional[int] = _help("with limit: a random subset drawn with this seed (default: the first N)",
                                       default=None)

    def validate(self, section: str = "data") -> None:
        super().validate(section)
        try:
            _check_messages(self.fewshot, f"{section}.fewshot") if self.fewshot else None
        except DatasetError as e:
            raise ConfigError(str(e)) from None


def select_rows(n: int, limit: int | None, seed: int | None) -> list[int]:
    """Indices of the rows to use: all, the first ``limit``, or a seeded random subset of size ``limit``."""
    if limit is None or limit >= n:
        return list(range(n))
    if seed is None:
        return list(range(limit))
    return sorted(random.Random(seed).sample(range(n), limit))


@dataclass
class RecipeSamplingConfig(BatchSamplingConfig):
    """The ``rollout`` section of ``opdkit rollout`` (``opdkit eval``: ``EvalSamplingConfig``, its defaults)."""

    n: int = _help("responses kept per prompt (answer slots)", default=1)
    temperature: float = _help("sampling temperature (paper C.1: 0.7)", default=0.7)
    top_p: float = _help("nucleus sampling threshold (paper: 0.95)", default=0.95)
    max_new_tokens: int = _help("maximum response length; longer responses are truncated (and rejected)",
                                default=512)


def prepare_messages(messages: list[dict], cfg: PromptsConfig) -> list[dict]:
    """Few-shot turns in front, the answer-format suffix on the last user message (by ``add_suffix``)."""
    last = messages[-1]["content"]
    if cfg.prompt_suffix and (cfg.add_suffix == "always" or
                              (cfg.add_suffix == "if_missing" and not has_answer_instruction(last))):
        sep = "" if last.endswith((" ", "\n")) else " "
        messages = messages[:-1] + [{"role": "user", "content": last + sep + cfg.prompt_suffix}]
    return [dict(m) for m in cfg.fewshot] + messages


def load_recipe_prompts(cfg: PromptsConfig, tokenizer, rows: list[dict] | None = None
                        ) -> tuple[PromptSet, list[int]]:
    """Read, subset, prepare and render prompts. Returns the prompt set and each example's row in the file.

    ``Example.messages`` are the prepared messages (few-shot + prompt + suffix); ``Example.index`` is the row's
    position in the file, so outputs can point back to their source row.
    """
    rows = read_rows(cfg.train) if rows is None else rows
    if not rows:
        raise DatasetError(f"{cfg.train}: the dataset has no rows")
    chosen = select_rows(len(rows), cfg.limit, cfg.subset_seed)
    prepared = []
    for i in chosen:
        msgs, _, answer, source = normalise_row(rows[i], cfg.columns, row_label(cfg.train, i))
        prepared.append({"messages": prepare_messages(msgs, cfg), "answer": answer, "data_source": source})
    prompts = load_prompts(cfg.train, tokenizer, rows=prepared, system_prompt=cfg.system_prompt,
                           chat_template_kwargs=cfg.chat_template_kwargs, max_prompt_length=cfg.max_prompt_length)
    for ex in prompts.examples:
        ex.index = chosen[ex.index]
    return prompts, [ex.index for ex in prompts.examples]


# --------------------------------------------------------------------------------------------------
# Row files
# --------------------------------------------------------------------------------------------------


def check_output_path(path: str | Path, key: str) -> Path:
    path = Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ConfigError(f"{key}={path}: use a .jsonl or .parquet file name")
    return path


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSONL or parquet (by extension), atomically: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                table = pa.Table.from_pylist(rows) if rows else pa.table({})
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise DatasetError(f"{path}: these rows do not fit one parquet schema ({e}); write .jsonl "
                                   f"instead") from None
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
    os.replace(tmp, path)
    return path


def last_user_content(row: dict, columns: dict, where: str) -> str:
    msgs, _, _, _ = normalise_row(row, columns, where)
    return msgs[-1]["content"]


class Progress:
    """A rich progress bar on a terminal; a line per update elsewhere."""

    def __init__(self, total: int, done: int, label: str):
        import sys

        self.progress = None
        self.label = label
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.progress = RichProgress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.description}"), console=console)
            self.task = self.progress.add_task("", total=total, completed=done)
            self.progress.start()
        self.total, self.done = total, done

    def advance(self, count: int, text: str) -> None:
        self.done += count
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done, description=text)
        else:
            console.print(f"{self.label} {self.done}/{self.total} {text}", highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
