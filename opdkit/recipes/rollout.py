"""``opdkit rollout``: sample a model (usually the teacher) on a prompt set and keep only usable responses.

This makes the data of the off-policy cold start (paper §5.1, App. C.1): the teacher answers each prompt ``n``
times and each answer slot goes through *rejection sampling*: a response is rejected for the first reason
that applies, in this order,

1. ``truncated``: no end-of-sequence token within ``rollout.max_new_tokens`` (incomplete);
2. ``no_answer``: no explicit final answer, i.e. no ``\\boxed{...}`` and no ``Answer: ...`` line
   (``opdkit.answers.extract_answer``);
3. ``repetitive``: degenerate looping text, see ``repeated_span``;
4. ``wrong_answer``: only with ``filter.keep_correct_only``, the final answer does not match the reference
   (math-verify).

A rejected slot is sampled again with a fresh seed, up to ``filter.max_attempts`` attempts in all, and is then
abandoned (the reference code's ``vllm_rollout.py`` does the same with 3 attempts; it checks only format and
repetition, never correctness).

Output: accepted responses as chat rows ready for ``opdkit sft``
``{"messages": [...prompt, {"role": "assistant", ...}], "answer", "data_source", ...}``, appended to the output
file as they finish (so an interrupted run keeps its work and ``output.resume=true`` continues it), abandoned
slots with their reasons in ``<output>.rejected.jsonl``, and the counts of every rejection reason in
``<output>.stats.json``, recomputed from the files so they stay exact across resumes.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from ..answers import extract_answer, score_response
from ..config import ConfigError, FrozenModelConfig, _help, dump_yaml
from ..data import DatasetError
from ..evaluation import decode_responses
from ..models import eos_token_ids, load_causal_lm, load_tokenizer, model_vocab_size, resolve_model_path
from ..engines.hf_rollout import sample
from ..tracking import console
from .common import Progress, PromptsConfig, RecipeSamplingConfig, check_output_path, load_recipe_prompts, write_json, \
    write_rows
from ..hardware import configure_threads

REASONS = ("truncated", "no_answer", "repetitive", "wrong_answer")


# --------------------------------------------------------------------------------------------------
# Rejection filters (pure functions on text)
# --------------------------------------------------------------------------------------------------


def repeated_span(text: str, span_chars: int = 40, min_repeats: int = 4) -> str | None:
    """A span of ``span_chars`` characters that occurs at ``min_repeats`` or more positions of the text.

    Whitespace runs are collapsed to one space first, so a loop cannot hide behind changing line breaks.
    Occurrences may overlap, so a loop of any period p is caught once it is span_chars + (min_repeats − 1)·p
    characters long: with the defaults, about four repeats of a sentence ("The answer is 5. The answer is 5.
    ...") or a run of 43 equal characters ("1111..."). Honest step-by-step math repeats short pieces
    ("= 2x + 1") but rarely the same 40 characters four times. The reference code uses a 100-character window
    repeated 3 times (plus line and block checks) on responses of up to 7K tokens; the defaults here suit
    responses of a few hundred tokens. Returns the span, or None when there is none.
    """
    norm = " ".join(text.split())
    if span_chars <= 0 or min_repeats <= 1 or len(norm) < span_chars + min_repeats - 1:
        return None
    counts: dict[str, int] = {}
    for i in range(len(norm) - span_chars + 1):
        span = norm[i:i + span_chars]
        counts[span] = counts.get(span, 0) + 1
        if counts[span] >= min_repeats:
            return span
    return None


@dataclass
class FilterConfig:
    max_attempts: int = _help("samples tried per answer slot before it is abandoned (1 = no retries)", default=3)
    drop_truncated: bool = _help("reject responses without an end-of-sequence token", default=True)
    require_answer: bool = _help("reject responses without \\boxed{...} or an 'Answer:' line", default=True)
    repetition_chars: int = _help("span length of the repetition check (0 disables it)", default=40)
    repetition_count: int = _help("reject if a span of repetition_chars occurs at this many positions",
                                  default=4)
    keep_correct_only: bool = _help("reject answers that math-verify finds wrong (needs reference answers)",
                                    default=False)


def rejection_reason(text: str, truncated: bool, gold: str | None, cfg: FilterConfig) -> str | None:
    """The first reason (in ``REASONS`` order) to reject a response, or None to keep it."""
    if cfg.drop_truncated and truncated:
        return "truncated"
    if cfg.require_answer and extract_answer(text) is None:
        return "no_answer"
    if cfg.repetition_chars and repeated_span(text, cfg.repetition_chars, cfg.repetition_count) is not None:
        return "repetitive"
    if cfg.keep_correct_only and score_response(text, gold) != 1.0:
        return "wrong_answer"
    return None


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class OutputConfig:
    path: str = _help("accepted chat rows: .jsonl (appended as they finish) or .parquet (written at the end)",
                      default="")
    resume: bool = _help("continue an interrupted run into the same output (finished slots are skipped)",
                         default=False)


@dataclass
class RolloutRecipeConfig:
    RENAMED = {"sampling": "rollout"}  # old names, read with a deprecation warning

    model: FrozenModelConfig = field(default_factory=FrozenModelConfig)
    data: PromptsConfig = field(default_factory=PromptsConfig)
    rollout: RecipeSamplingConfig = field(default_factory=RecipeSamplingConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    threads: Optional[int] = _help("torch CPU threads (default: all cores)", default=None)

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.rollout.validate()
        f = self.filter
        if f.max_attempts <= 0:
            raise ConfigError(f"filter.max_attempts must be > 0, got {f.max_attempts}")
        if f.repetition_chars < 0 or (f.repetition_chars and f.repetition_count < 2):
            raise ConfigError("filter.repetition_chars must be >= 0 and filter.repetition_count >= 2")
        if not self.output.path:
            raise ConfigError("output.path is required, e.g. output.path=runs/teacher_sft.jsonl")
        check_output_path(self.output.path, "output.path")


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def slot_seed(seed: int, row: int, sample_index: int, attempt: int) -> int:
    """Sampling seed of one attempt at one answer slot: independent of batching and of resumption."""
    return (seed * 1_000_003 + row * 7_919 + sample_index * 104_729 + attempt * 15_485_863 + 11) % (2**63 - 1)


def _paths(cfg: RolloutRecipeConfig) -> dict[str, Path]:
    out = Path(cfg.output.path)
    base = out.with_suffix("")
    work = out if out.suffix == ".jsonl" else base.with_name(base.name + ".partial.jsonl")
    return {"output": out, "work": work, "rejected": base.with_name(base.name + ".rejected.jsonl"),
            "stats": base.with_name(base.name + ".stats.json"), "config": base.with_name(base.name + ".config.yaml")}


def _read_jsonl_tolerant(path: Path) -> list[dict]:
    """Rows of a JSONL file we appended to; a torn last line (crash mid-write) is cut off."""
    if not path.is_file():
        return []
    rows, good_bytes = [], 0
    with path.open("rb") as fh:
        for raw in fh:
            try:
                rows.append(json.loads(raw))
            except json.JSONDecodeError:
                if raw.endswith(b"\n"):
                    raise DatasetError(f"{path}: corrupt line {len(rows) + 1}; it is not a file this command "
                                       f"wrote") from None
                break
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with path.open("r+b") as fh:
            fh.truncate(good_bytes)
    return rows


def _append(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with path.open("a") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def rejection_stats(accepted: list[dict], abandoned: list[dict], *, prompts: int, slots: int) -> dict:
    """Counts per rejection reason over all attempts, from the accepted and abandoned rows."""
    reasons = Counter()
    for row in accepted + abandoned:
        reasons.update(row["rejections"])
    attempts = sum(len(r["rejections"]) + 1 for r in accepted) + sum(len(r["rejections"]) for r in abandoned)
    first_try = sum(1 for r in accepted if not r["rejections"])
    lengths = [r["response_tokens"] for r in accepted]
    correct = [r["correct"] for r in accepted if r.get("correct") is not None]
    return {
        "prompts": prompts, "slots": slots, "accepted": len(accepted), "abandoned": len(abandoned),
        "pending": slots - len(accepted) - len(abandoned), "attempts": attempts,
        "rejected": {reason: reasons.get(reason, 0) for reason in REASONS},
        "rejected_fraction_of_attempts": {reason: reasons.get(reason, 0) / max(attempts, 1) for reason in REASONS},
        "accepted_first_attempt": first_try,
        "slot_acceptance_rate": len(accepted) / max(len(accepted) + len(abandoned), 1),
        "accepted_mean_tokens": sum(lengths) / max(len(lengths), 1),
        "accepted_correct_fraction": (sum(correct) / len(correct)) if correct else None,
        "prompts_with_an_accepted_response": len({r["prompt_index"] for r in accepted}),
    }


def run_rollout(cfg: RolloutRecipeConfig) -> dict:
    start_time = time.perf_counter()
    paths = _paths(cfg)
    existing = [p for p in (paths["work"], paths["rejected"]) if p.is_file() and p.stat().st_size]
    if paths["output"].suffix == ".parquet" and paths["output"].is_file():
        existing.append(paths["output"])
    if existing and not cfg.output.resume:
        raise ConfigError(f"{existing[0]} already exists; pass output.resume=true to continue that run, or choose "
                          f"another output.path")
    configure_threads(cfg.threads)
    model_dir = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, cfg.model.dtype).to(cfg.model.device).eval()
    prompts, _ = load_recipe_prompts(cfg.data, tokenizer)
    examples = prompts.examples
    if cfg.filter.keep_correct_only:
        missing = [ex.index for ex in examples if ex.answer is None]
        if missing:
            raise DatasetError(f"{cfg.data.train}: filter.keep_correct_only needs reference answers, but row "
                               f"{missing[0]} (and {len(missing) - 1} more) has none; map the column with "
                               f"data.columns={{answer: <column>}}")
    paths["work"].parent.mkdir(parents=True, exist_ok=True)
    paths["config"].write_text(dump_yaml(cfg))
    accepted = _read_jsonl_tolerant(paths["work"])
    abandoned = _read_jsonl_tolerant(paths["rejected"])
    done = {(r["prompt_index"], r["sample"]) for r in accepted + abandoned}
    s = cfg.rollout
    # Longest prompts first, so a batch holds prompts of similar length (less left padding).
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt_ids))
    queue = deque((i, j, 0, []) for i in order for j in range(s.n) if (examples[i].index, j) not in done)
    total_slots = len(examples) * s.n
    if done:
        console.print(f"resuming: {len(done)} of {total_slots} answer slots already finished")
    eos_ids, pad_id, vocab = eos_token_ids(tokenizer, model), tokenizer.pad_token_id, model_vocab_size(model)
    progress = Progress(total_slots, len(done), "rollout")
    try:
        while queue:
            batch = [queue.popleft() for _ in range(min(s.batch_size, len(queue)))]
            seeds = [slot_seed(s.seed, examples[i].index, j, a) for i, j, a, _ in batch]
            resp, mask, _, _, truncated = sample(
                model, [examples[i].prompt_ids for i, _, _, _ in batch], max_new_tokens=s.max_new_tokens,
                eos_ids=eos_ids, pad_id=pad_id, temperature=s.temperature, top_p=s.top_p, seeds=seeds,
                vocab_size=vocab)
            texts = decode_responses(tokenizer, resp, mask)
            new_ok, new_abandoned = [], []
            for (i, j, attempt, history), text, trunc, n_tok in zip(batch, texts, truncated.tolist(),
                                                                    mask.sum(-1).tolist()):
                ex = examples[i]
                reason = rejection_reason(text, trunc, ex.answer, cfg.filter)
                record = {"prompt_index": ex.index, "sample": j, "attempt": attempt}
                if reason is None:
                    new_ok.append({"messages": ex.messages + [{"role": "assistant", "content": text}],
                                   "answer": ex.answer, "data_source": ex.source, **record,
                                   "correct": score_response(text, ex.answer), "response_tokens": int(n_tok),
                                   "rejections": history})
                elif attempt + 1 < cfg.filter.max_attempts:
                    queue.append((i, j, attempt + 1, history + [reason]))
                else:
                    new_abandoned.append({**record, "rejections": history + [reason], "last_response": text[:2000],
                                          "prompt": ex.messages[-1]["content"]})
            _append(paths["work"], new_ok)
            _append(paths["rejected"], new_abandoned)
            accepted += new_ok
            abandoned += new_abandoned
            progress.advance(len(new_ok) + len(new_abandoned),
                             f"accepted {len(accepted)} abandoned {len(abandoned)} retrying {sum(1 for q in queue if q[2])}")
    finally:
        progress.close()
        stats = rejection_stats(accepted, abandoned, prompts=len(examples), slots=total_slots)
        stats.update({"skipped_long_prompts": prompts.skipped_long, "model": str(model_dir),
                      "output": str(paths["output"]), "seconds_this_run": time.perf_counter() - start_time})
        write_json(paths["stats"], stats)
    if paths["output"].suffix == ".parquet":
        order_key = lambda r: (r["prompt_index"], r["sample"])  # noqa: E731
        write_rows(paths["output"], sorted(accepted, key=order_key))
    return stats


def print_stats(stats: dict) -> None:
    from rich.table import Table

    table = Table(title=f"rejection sampling: {stats['accepted']} of {stats['slots']} answer slots accepted")
    table.add_column("reason")
    table.add_column("rejected attempts", justify="right")
    table.add_column("share of attempts", justify="right")
    for reason in REASONS:
        table.add_row(reason, str(stats["rejected"][reason]), f"{stats['rejected_fraction_of_attempts'][reason]:.1%}")
    table.add_row("[bold]attempts[/]", str(stats["attempts"]), "")
    console.print(table)
    console.print(f"accepted {stats['accepted']} (first attempt {stats['accepted_first_attempt']}), abandoned "
                  f"{stats['abandoned']} after all attempts; mean accepted length "
                  f"{stats['accepted_mean_tokens']:.0f} tokens")
