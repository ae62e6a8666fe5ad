"""``opdkit sft``: supervised fine-tuning on chat data, the off-policy cold start of paper §5.1.

The loss is the mean negative log-likelihood of the *assistant tokens only*: each conversation is rendered with
the model's chat template once, and a token is trained on iff it is part of what the model would generate
after the assistant generation prompt, i.e. the assistant content and the template's end-of-turn token
(``<|im_end|>`` for ChatML), never the prompt, the role headers or the newline the template puts after the
end-of-turn token (``assistant_token_mask``).

Batches are either padded (``data.packing=false``: one conversation per row, right padding) or packed
(``data.packing=true``: conversations concatenated into rows of up to ``data.max_length`` tokens). Packed rows
restart their position ids at every conversation and pass no attention mask, so transformers builds a
block-diagonal causal mask from the position ids: no token attends across conversations, and the loss and
gradients equal the padded ones (tested).

The vocabulary projection runs in checkpointed chunks over the trained positions only, so (B, T, V) logits
never exist (SmolLM2's vocabulary is 49,152). The loss of an optimizer step is normalised by the step's total
number of trained tokens, so gradient accumulation over micro-batches equals one large batch. AdamW with
warmup and a cosine/linear/constant schedule, checkpoints with exact resume, ``metrics.jsonl`` and the final
HF model in ``RUN_DIR/final_model`` (``opdkit distill student.path=RUN_DIR/final_model`` starts from it).
Defaults follow the paper's Table 3 (lr 1e-5, cosine, warmup ratio 0.05).
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from ..config import (ConfigError, DataFileConfig, EvalEveryConfig, OptimConfig, RunConfig, TrainedModelConfig,
                      _help, dump_yaml)
from ..loop import LoopSettings, TrainingLoop, prepare_run_dir
from ..data import DatasetError, PromptSampler, _check_messages, _lookup, read_rows, row_label
from ..models import DTYPES, load_causal_lm, load_tokenizer, model_vocab_size, resolve_model_path
from ..lm import HeadProjection, decoder_and_head
from ..tracking import console
from ..train import make_optimizer
from ..hardware import configure_threads

# --------------------------------------------------------------------------------------------------
# Tokenisation with an assistant-token mask
# --------------------------------------------------------------------------------------------------


def assistant_char_spans(tokenizer, messages: list[dict], chat_template_kwargs: dict | None = None,
                         turns: str = "all") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the model must generate, one per trained turn.

    For assistant message i, the span starts where the rendering of messages[:i] with the generation prompt
    ends, and ends where the rendering of messages[:i+1] ends, minus the whitespace the template adds after
    the end-of-turn token (the model stops at the end-of-turn token and never generates that newline).
    Templates that render earlier turns differently once later ones exist (e.g. ones that drop reasoning from
    history) cannot be split this way and raise ``DatasetError``.
    """
    kw = chat_template_kwargs or {}
    full = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if turns == "last":
        assistant = assistant[-1:]
    spans = []
    for i in assistant:
        if i == 0:
            raise DatasetError("a conversation cannot start with an assistant message")
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True, **kw)
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False, **kw).rstrip()
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise DatasetError("the chat template renders earlier turns differently when later turns follow, so "
                               "the assistant tokens cannot be located; use data.assistant_turns=last or a "
                               "template without history rewriting")
        spans.append((len(before), len(through)))
    return full, spans


def assistant_token_mask(tokenizer, messages: list[dict], chat_template_kwargs: dict | None = None,
                         turns: str = "all") -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation (tokenised once) and, per token, whether it is trained on.

    A token is trained on iff its first character lies inside an assistant span (``assistant_char_spans``).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DatasetError("opdkit sft needs a fast (Rust) tokenizer for character offsets")
    text, spans = assistant_char_spans(tokenizer, messages, chat_template_kwargs, turns)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(s <= start < e for s, e in spans) and end > start for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), trained


def conversation(row: dict, columns: dict, system_prompt: str | None, where: str) -> list[dict]:
    """Messages of one SFT row: a ``messages`` list, or a ``prompt`` + ``response`` pair (mapped by columns)."""
    col = {"messages": "messages", "prompt": "prompt", "response": "response", **columns}
    messages = _lookup(row, col["messages"])
    if messages is None:
        prompt, response = _lookup(row, col["prompt"]), _lookup(row, col["response"])
        if isinstance(prompt, list) and isinstance(response, str):
            messages = prompt + [{"role": "assistant", "content": response}]
        elif isinstance(prompt, str) and isinstance(response, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        else:
            raise DatasetError(f"{where}: no conversation found. Expected a '{col['messages']}' list, or "
                               f"'{col['prompt']}' and '{col['response']}' columns; columns present: "
                               f"{', '.join(sorted(row))}. Map yours with data.columns, e.g. "
                               f"data.columns={{prompt: question, response: solution}}")
    messages = _check_messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: the conversation has no assistant message to train on")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


@dataclass
class Sequence:
    ids: list[int]
    trained: list[bool]
    row: int


@dataclass
class Batch:
    """One micro-batch. input_ids, position_ids, trained (B, L); attention_mask (B, L) or None when packed."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    trained: torch.Tensor
    sequences: int

    @property
    def targets(self) -> int:
        return int(self.trained[:, 1:].sum())


def pack(sequences: list[Sequence], capacity: int) -> list[list[Sequence]]:
    """Greedy packing in the given order: a sequence opens a new row when it does not fit the current one."""
    rows: list[list[Sequence]] = []
    used = capacity + 1
    for seq in sequences:
        if used + len(seq.ids) > capacity:
            rows.append([])
            used = 0
        rows[-1].append(seq)
        used += len(seq.ids)
    return rows


def collate(rows: list[list[Sequence]], pad_id: int, packed: bool) -> Batch:
    """Right-padded tensors; packed rows get position ids restarting per sequence and no attention mask.

    The padding tail of a packed row restarts its positions too, so it forms its own block and no real token
    attends to it. A trained token at the start of a sequence is never a target (nothing predicts it).
    """
    width = max(sum(len(s.ids) for s in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    trained = torch.zeros((B, width), dtype=torch.bool)
    for b, row in enumerate(rows):
        at = 0
        for seq in row:
            n = len(seq.ids)
            ids[b, at:at + n] = torch.tensor(seq.ids)
            pos[b, at:at + n] = torch.arange(n)
            attn[b, at:at + n] = 1
            trained[b, at + 1:at + n] = torch.tensor(seq.trained[1:], dtype=torch.bool)
            at += n
        pos[b, at:] = torch.arange(width - at)
    return Batch(ids, pos, None if packed else attn, trained, sum(len(r) for r in rows))


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def _chunk_nll(head: HeadProjection, hidden: torch.Tensor, targets: torch.Tensor):
    logits = head(hidden)
    nll = F.cross_entropy(logits, targets, reduction="sum")
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).sum()
    return nll, correct


def sft_loss(model, batch: Batch, *, vocab_size: int, chunk_size: int = 1024,
             compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
    """Summed NLL of the trained tokens (with grad) and the number predicted correctly (argmax).

    Hidden state t predicts token t+1; only positions whose next token is trained go through the vocabulary
    projection, in checkpointed chunks (their (chunk, V) logits are recomputed in backward, never stored).
    """
    decoder, _ = decoder_and_head(model)
    device = next(model.parameters()).device
    use_autocast = compute_dtype is not None and compute_dtype != torch.float32
    with torch.autocast(device.type, dtype=compute_dtype or torch.bfloat16, enabled=use_autocast):
        hidden = decoder(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                         attention_mask=None if batch.attention_mask is None else batch.attention_mask.to(device),
                         use_cache=False).last_hidden_state
    select = batch.trained[:, 1:].to(device)
    flat_h = hidden[:, :-1][select]
    flat_t = batch.input_ids[:, 1:].to(device)[select]
    head = HeadProjection(model, vocab_size, dtype=torch.float32, trainable=True)
    total = hidden.sum() * 0.0  # keeps the graph connected when nothing is trained
    correct = 0
    for start in range(0, flat_h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            nll, ok = checkpoint(_chunk_nll, head, flat_h[sl], flat_t[sl], use_reentrant=False)
        else:
            nll, ok = _chunk_nll(head, flat_h[sl], flat_t[sl])
        total = total + nll
        correct += int(ok)
    return total, correct


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class SFTDataConfig(DataFileConfig):
    train: str = _help("chat data (.jsonl / .parquet): 'messages' lists (as opdkit rollout writes) or "
                       "prompt/response columns", default="")
    system_prompt: Optional[str] = _help("system message prepended where a conversation has none", default=None)
    limit: Optional[int] = _help("use only the first N conversations", default=None)
    assistant_turns: Literal["all", "last"] = _help("train on every assistant turn or only the last one",
                                                    default="all")
    max_length: int = _help("tokens per conversation (and per packed row)", default=1024)
    long_sequences: Literal["skip", "error"] = _help("what to do with a conversation over max_length",
                                                     default="skip")
    packing: bool = _help("pack conversations into rows of max_length tokens (block-diagonal attention)",
                          default=False)
    shuffle: bool = _help("shuffle rows every epoch (seeded by run.seed)", default=True)


@dataclass
class SFTOptimConfig(OptimConfig):
    """``opdkit distill``'s ``optim`` with SFT's defaults (paper Table 3) and three keys of its own: warmup as a
    share of the steps, gradient accumulation and the chunk size of the vocabulary projection."""

    lr: float = _help("peak learning rate of AdamW (paper Table 3: 1e-5)", default=1e-5)
    schedule: Literal["constant", "cosine", "linear"] = _help("LR schedule after warmup", default="cosine")
    warmup_steps: Optional[int] = _help("warmup steps (overrides warmup_ratio)", default=None)
    micro_batch_size: int = _help("rows per forward/backward", default=8)
    warmup_ratio: float = _help("warmup steps as a fraction of all steps (paper: 0.05)", default=0.05)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    chunk_size: int = _help("positions per chunk of the vocabulary projection", default=1024)


@dataclass
class SFTRunConfig(RunConfig):
    RENAMED = {"max_steps": "steps"}  # old names, read with a deprecation warning

    out_dir: str = _help("run directory (metrics, checkpoints, final_model)", default="runs/sft")
    steps: Optional[int] = _help("optimizer steps (default: as many as run.epochs take)", default=None)
    seed: int = _help("seed of the data order", default=0)
    epochs: float = _help("passes over the data when run.steps is not set (paper: 1; the reference config: 2)",
                          default=1.0)


@dataclass
class SFTEvalConfig(EvalEveryConfig):
    every: int = _help("measure eval/loss every N steps (0: before and after training)", default=0)
    rows: int = _help("hold out the last N conversations of data.train to measure eval/loss", default=0)


@dataclass
class SFTConfig:
    RENAMED = {"run.eval_every": "eval.every", "data.eval_rows": "eval.rows"}  # read with a deprecation warning

    model: TrainedModelConfig = field(default_factory=TrainedModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: SFTOptimConfig = field(default_factory=SFTOptimConfig)
    eval: SFTEvalConfig = field(default_factory=SFTEvalConfig)
    run: SFTRunConfig = field(default_factory=SFTRunConfig)

    def validate(self) -> None:
        if not self.model.path:
            raise ConfigError("model.path is required: the model to fine-tune (HF directory, .gguf or bundled name)")
        if not self.data.train:
            raise ConfigError("data.train is required: a .jsonl or .parquet file of chat rows")
        for key, value in (("data.max_length", self.data.max_length), ("optim.micro_batch_size",
                           self.optim.micro_batch_size), ("optim.grad_accum", self.optim.grad_accum),
                           ("optim.chunk_size", self.optim.chunk_size)):
            if value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        if self.optim.lr < 0 or self.optim.max_grad_norm < 0 or not 0 <= self.optim.warmup_ratio < 1:
            raise ConfigError("optim.lr and optim.max_grad_norm must be >= 0 and optim.warmup_ratio in [0, 1)")
        if self.run.steps is None and self.run.epochs <= 0:
            raise ConfigError(f"run.epochs must be > 0, got {self.run.epochs}")
        if self.run.steps is not None and self.run.steps <= 0:
            raise ConfigError(f"run.steps must be > 0, got {self.run.steps}")
        if self.eval.rows < 0 or self.run.save_every < 0 or self.eval.every < 0:
            raise ConfigError("eval.rows, run.save_every and eval.every must be >= 0")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers, got {self.optim.betas}")


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


def load_sequences(cfg: SFTDataConfig, tokenizer) -> tuple[list[Sequence], dict]:
    rows = read_rows(cfg.train)
    if cfg.limit is not None:
        rows = rows[:cfg.limit]
    if not rows:
        raise DatasetError(f"{cfg.train}: the dataset has no rows")
    sequences, skipped = [], 0
    for i, row in enumerate(rows):
        where = row_label(cfg.train, i)
        messages = conversation(row, cfg.columns, cfg.system_prompt, where)
        try:
            ids, trained = assistant_token_mask(tokenizer, messages, cfg.chat_template_kwargs, cfg.assistant_turns)
        except DatasetError as e:
            raise DatasetError(f"{where}: {e}") from None
        if len(ids) > cfg.max_length:
            if cfg.long_sequences == "error":
                raise DatasetError(f"{where}: {len(ids)} tokens, over data.max_length={cfg.max_length}; raise it "
                                   f"or set data.long_sequences=skip")
            skipped += 1
            continue
        sequences.append(Sequence(ids, trained, i))
    if not sequences:
        raise DatasetError(f"{cfg.train}: all {len(rows)} conversations are longer than data.max_length="
                           f"{cfg.max_length}")
    return sequences, {"rows": len(rows), "skipped_long": skipped}


# Keys a resumed run may change (applied and recorded); any other change needs run.resume_override=true.
RESUME_CADENCE_KEYS = {"run.epochs", "run.steps", "run.save_every", "run.keep_checkpoints", "eval.every",
                       "run.tensorboard", "run.threads", "run.progress"}


class SFTTrainer:
    def __init__(self, cfg: SFTConfig, *, model=None, tokenizer=None):
        self.cfg = cfg
        configure_threads(cfg.run.threads)
        self.run_dir = Path(cfg.run.out_dir)
        existing = latest_checkpoint(self.run_dir)
        if existing is not None and not cfg.run.resume:
            raise ConfigError(f"{self.run_dir} already holds a run ({existing.name}); pass run.resume=true to "
                              f"continue it, or choose another run.out_dir")
        prepare_run_dir(self.run_dir)  # an unwritable out_dir fails before the model loads
        self.writes = self.log_to_disk = True
        self.completed = self.bad_steps = 0
        if model is None:
            path = resolve_model_path(cfg.model.path)
            tokenizer = load_tokenizer(path)
            model = load_causal_lm(path, cfg.model.param_dtype)
        model.to(cfg.model.device)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = model_vocab_size(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        sequences, self.data_stats = load_sequences(cfg.data, tokenizer)
        d, held_out = cfg.data, cfg.eval.rows
        if held_out:
            if held_out >= len(sequences):
                raise ConfigError(f"eval.rows={held_out} leaves no training data ({len(sequences)} usable "
                                  f"conversations)")
            sequences, self.eval_sequences = sequences[:-held_out], sequences[-held_out:]
        else:
            self.eval_sequences = []
        if d.packing:
            order = list(range(len(sequences)))
            random.Random(cfg.run.seed).shuffle(order)  # packing order is fixed by the seed: resumes repack alike
            self.units = pack([sequences[i] for i in order], d.max_length)
        else:
            self.units = [[s] for s in sequences]
        o = cfg.optim
        self.rows_per_step = o.micro_batch_size * o.grad_accum
        self.steps_per_epoch = math.ceil(len(self.units) / self.rows_per_step)
        self.total_steps = cfg.run.steps or max(1, math.ceil(cfg.run.epochs * self.steps_per_epoch))
        warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_ratio * self.total_steps)
        self.optimizer, self.scheduler = make_optimizer(model.parameters(), dataclasses.replace(o, warmup_steps=warmup),
                                                        self.total_steps)
        self.sampler = PromptSampler(len(self.units), self.rows_per_step, cfg.run.seed, d.shuffle)

    def micro_batches(self, unit_indices: list[int], size: int) -> list[Batch]:
        return [collate([self.units[i] for i in unit_indices[s:s + size]], self.pad_id, self.cfg.data.packing)
                for s in range(0, len(unit_indices), size)]

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward_backward(self, step: int):
        """The accumulated backward of one step; returns the loss and ``finish(optim_metrics)`` for after the update."""
        o = self.cfg.optim
        start = time.perf_counter()
        batches = self.micro_batches(self.sampler.next_batch(), o.micro_batch_size)
        targets = sum(b.targets for b in batches)
        total_nll, correct = 0.0, 0
        compute = DTYPES[self.cfg.model.compute_dtype]
        for batch in batches:
            nll, ok = sft_loss(self.model, batch, vocab_size=self.vocab_size, chunk_size=o.chunk_size,
                               compute_dtype=compute)
            (nll / max(targets, 1)).backward()
            total_nll += float(nll.detach())
            correct += ok
        loss = total_nll / max(targets, 1)

        def finish(optim_metrics: dict) -> tuple[dict, None]:
            seconds = time.perf_counter() - start
            tokens = sum(int(b.input_ids.numel()) for b in batches)
            return {"sft/loss": loss, "sft/token_accuracy": correct / max(targets, 1),
                    "sft/trained_tokens": targets, "sft/sequences": sum(b.sequences for b in batches),
                    "sft/epoch": self.sampler.epoch + self.sampler.position / len(self.units),
                    **optim_metrics, "time/step": seconds, "time/tokens_per_second": tokens / seconds}, None

        return loss, finish

    def step_samples(self, batch) -> list[dict]:
        return []

    def evaluate(self) -> tuple[dict, list]:
        return self.eval_metrics(), []

    @torch.no_grad()
    def eval_metrics(self) -> dict:
        if not self.eval_sequences:
            return {}
        self.model.eval()
        nll, correct, targets = 0.0, 0, 0
        units = [[s] for s in self.eval_sequences]
        for s in range(0, len(units), self.cfg.optim.micro_batch_size):
            batch = collate(units[s:s + self.cfg.optim.micro_batch_size], self.pad_id, packed=False)
            value, ok = sft_loss(self.model, batch, vocab_size=self.vocab_size, chunk_size=self.cfg.optim.chunk_size,
                                 compute_dtype=DTYPES[self.cfg.model.compute_dtype])
            nll, correct, targets = nll + float(value), correct + ok, targets + batch.targets
        self.model.train()
        return {"eval/loss": nll / max(targets, 1), "eval/token_accuracy": correct / max(targets, 1)}

    def save(self, step: int) -> Path:
        return save_checkpoint(self.run_dir, step, model=self.model, tokenizer=self.tokenizer,
                               optimizer=self.optimizer, scheduler=self.scheduler,
                               sampler_state=self.sampler.state_dict(), extra={"bad_steps": self.bad_steps},
                               keep=self.cfg.run.keep_checkpoints)

    def load(self, path: Path) -> dict:
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.sampler.load_state_dict(state["sampler"])
        self.bad_steps = state.get("extra", {}).get("bad_steps", 0)
        return state

    def after_restore(self) -> None:
        pass

    def export(self) -> None:
        save_model(self.model, self.tokenizer, self.run_dir / "final_model")

    def barrier(self) -> None:
        pass

    def run(self) -> dict:
        cfg = self.cfg
        result = TrainingLoop(self, LoopSettings(
            total_steps=self.total_steps, config=cfg, resume=cfg.run.resume, resume_override=cfg.run.resume_override,
            cadence_keys=RESUME_CADENCE_KEYS, model_key="model.path", loss_key="sft/loss",
            view_keys=["sft/loss", "sft/token_accuracy", "optim/lr", "time/step"],
            max_grad_norm=cfg.optim.max_grad_norm, max_bad_steps=cfg.optim.max_bad_steps,
            save_every=cfg.run.save_every, eval_every=cfg.eval.every, tensorboard=cfg.run.tensorboard,
            progress=cfg.run.progress)).run()
        summary: dict = {"steps": self.total_steps, "units": len(self.units), "packing": cfg.data.packing,
                         **self.data_stats}
        if result.before:
            summary["eval_before"] = result.before
        if result.after:
            summary["eval_after"] = result.after
        losses = [m["sft/loss"] for m in result.history]
        step_times = [m["time/step"] for m in result.history]
        summary.update({"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                        "seconds_per_step": statistics.median(step_times) if step_times else None,
                        "wall_seconds": result.wall_seconds,
                        "final_model": str(self.run_dir / "final_model")})
        return summary


def run_sft(cfg: SFTConfig, **kwargs) -> dict:
    console.print("[bold]resolved config[/]")
    console.print(dump_yaml(cfg), highlight=False)
    return SFTTrainer(cfg, **kwargs).run()
