"""The OPD loop: prompts -> rollout -> teacher scoring -> token losses and diagnostics -> optimizer step.

``Distiller`` builds the pieces once (models, data, engines, optimizer); ``forward_backward`` is its step
function, which ``loop.TrainingLoop`` drives (update, checkpoints, interrupts, NaN guard, eval cadence), and
``opd_step`` composes one whole step outside the loop. Everything a resumed run needs lives in the checkpoint,
and per-step seeds are derived from ``run.seed`` and the step index, so an interrupted and resumed run matches
an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import losses
from .answers import score_response
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from .config import ConfigError, DistillConfig, dump_yaml
from .data import Example, PromptSampler, load_prompts, render_prompt
from .diagnostics import step_diagnostics
from .drift import DriftStop, cut_rollout, prune_metrics, prune_weights, rollout_drift
from .distributed import DistInfo, all_gather_objects, all_reduce_gradients, all_reduce_sum, barrier, \
    devices_per_rank, init_from_env, local_rank, pad_cat, resolve_device, shard_bounds
from .evaluation import decode_responses, evaluate
from .loop import LoopSettings, TrainingDiverged, TrainingLoop, apply_update, prepare_run_dir
from .candidates import Candidates
from .objectives import check_teacher_supports, objective_for, token_loss
from .packing import enable_varlen_attention
from .pipeline import build_pipeline
from .models import DTYPES, eos_token_ids, load_causal_lm, load_teacher, load_tokenizer, model_vocab_size, \
    resolve_model_path
from .engines.base import Rollout, TeacherScores, TeacherStream
from .student import TeacherLogits, student_forward
from .tracking import console
from .hardware import configure_threads

log = logging.getLogger(__name__)

__all__ = ["Distiller", "TrainingDiverged", "run_distill", "step_seed"]

# Keys a resumed run may change (applied and recorded); any other change needs run.resume_override=true.
RESUME_CADENCE_KEYS = {"run.steps", "run.save_every", "run.keep_checkpoints", "run.log_samples", "run.tensorboard",
                       "run.threads", "run.rollout_threads", "run.progress", "eval.every",
                       # how the same computation is laid out over processes (sharded checkpoints re-shard)
                       "distributed.strategy", "distributed.cpu_offload", "distributed.reshard_after_forward",
                       "distributed.memory_table",
                       "teacher.stream_scoring"}  # when rows are sent to a served teacher, not what it returns


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of one step: distinct per (seed, step), independent of how the run was split."""
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1)


def stream_scoring(cfg: DistillConfig) -> bool:
    """``teacher.stream_scoring`` resolved: null is on wherever it applies, true where it cannot is refused."""
    t = cfg.teacher
    # (applies, why not): rows can be scored one by one only by a served teacher, fed by the HF sampling loop
    conditions = [
        (not cfg.uses_teacher or t.engine == "server",
         f"teacher.engine={t.engine} scores whole rollouts (a local teacher would compete with the student's "
         f"decoding for the same cores or device)"),
        (not t.route, "teacher.route scores whole rollouts"),
        (cfg.rollout.engine == "hf", "rollout.engine=vllm returns the rollout all at once"),
        (cfg.run.pipeline == "sync", f"run.pipeline={cfg.run.pipeline} already overlaps the teacher's scoring with "
                                     f"the next step's rollout"),
        (cfg.objective.prune != "truncate", "objective.prune=truncate scores the rows with its own teacher pass "
                                            "while they are sampled"),
    ]
    blockers = [why for applies, why in conditions if not applies]
    if t.stream_scoring and blockers:
        raise ConfigError(f"teacher.stream_scoring=true cannot apply: {'; '.join(blockers)}. Leave "
                          f"teacher.stream_scoring unset (or false)")
    return cfg.uses_teacher and t.stream_scoring is not False and not blockers


def rank_devices(cfg: DistillConfig) -> tuple[str, str]:
    """This process's student and teacher devices: ``cuda:i`` is relative to the rank's block of GPUs under
    torchrun (rank r of a run using cuda:0 and cuda:1 gets GPUs 2r and 2r+1); a missing GPU is a ConfigError."""
    devices = [cfg.student.device, cfg.teacher.device]
    per_rank = devices_per_rank(devices)
    try:
        return tuple(resolve_device(d, local_rank=local_rank(), devices_per_rank=per_rank) for d in devices)
    except ValueError as exc:
        raise ConfigError(f"student.device={cfg.student.device!r}, teacher.device={cfg.teacher.device!r}: {exc}") \
            from exc


def on_device(device: torch.device, scores: TeacherScores | None, *tensors: torch.Tensor | None):
    """``scores`` and ``tensors`` moved to ``device`` (None stays None): the one copy between engines, which
    return results where the rollout lives (the CPU), and the student's loss."""
    non_blocking = device.type != "cpu"  # host -> device only; the CPU must not read an unfinished copy
    return (None if scores is None else scores.to(device),
            *(None if t is None else t.to(device, non_blocking=non_blocking) for t in tensors))


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak LR at scheduler step s: linear warmup, then constant / cosine / linear decay."""
    decays = {
        "constant": lambda progress: 1.0,
        "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
        "linear": lambda progress: 1.0 - progress,
    }
    decay = decays[schedule]

    def fn(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return decay(min(1.0, (s - warmup) / max(1, total - warmup)))

    return fn


def make_optimizer(params, optim_cfg, total_steps: int):
    params = [p for p in params if p.requires_grad]
    # The fused kernel is ~3x faster than the default on CPU (0.04 s vs 0.13 s for 81M parameters).
    fused = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    optimizer = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                  weight_decay=optim_cfg.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim_cfg.schedule, optim_cfg.warmup_steps, total_steps))
    return optimizer, scheduler


@dataclass
class StepBatch:
    """Everything one optimizer step works on, detached, for metrics and diagnostics (B, T, ...)."""

    rollout: Rollout
    scores: TeacherScores
    student_logp_sampled: torch.Tensor
    student_logp_at: torch.Tensor | None
    student_entropy: torch.Tensor
    rewards: torch.Tensor | None
    texts: list[str] = field(default_factory=list)

    @property
    def candidates(self) -> Candidates | None:
        """The layout of ``student_logp_at``: the rollout's top-k S^p, then the teacher's S^q when it has one."""
        return Candidates.of(self.rollout.topk_ids, None if self.scores is None else self.scores.topk_ids)


class Distiller:
    """Owns the models, data, engines and optimizer of one distillation run."""

    def __init__(self, cfg: DistillConfig, *, student=None, teacher_model=None, tokenizer=None,
                 teacher_tokenizer=None, log_to_disk: bool = True):
        self.cfg = cfg
        self.stream_scoring = stream_scoring(cfg)
        configure_threads(cfg.run.threads)
        self.student_device, self.teacher_device = rank_devices(cfg)
        self.dist: DistInfo = init_from_env(self.student_device)
        if cfg.rollout.prompts_per_step % self.dist.world_size:
            raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be divisible by the "
                              f"number of processes ({self.dist.world_size})")
        self.run_dir = Path(cfg.run.out_dir)
        existing = latest_checkpoint(self.run_dir)
        if existing is not None and not cfg.run.resume and log_to_disk:
            raise ConfigError(f"{self.run_dir} already holds a run ({existing.name}); pass run.resume=true to "
                              f"continue it, or choose another run.out_dir")
        self.log_to_disk = log_to_disk  # the same on every rank; only rank 0 writes (self.writes)
        self.writes = log_to_disk and self.dist.is_main
        if self.writes:  # an unwritable out_dir fails here, before minutes of model loading
            prepare_run_dir(self.run_dir)
        self._load_models(student, teacher_model, tokenizer, teacher_tokenizer)
        self._load_data()
        self._build_engines()
        self.optimizer, self.scheduler = make_optimizer(self.student.parameters(), cfg.optim, cfg.run.steps)
        self.sampler = PromptSampler(len(self.train_set), cfg.rollout.prompts_per_step, cfg.run.seed,
                                     cfg.data.shuffle)
        self.bad_steps = 0
        self.completed = 0
        self.step_extra: dict = {}  # per-step metrics the stages add (Prune-OPD, importance weights)
        self.pipeline = build_pipeline(self)  # None with run.pipeline=sync
        if self.pipeline is not None:  # a batch drawn ahead for the in-flight rollout is not drawn yet
            self.sampler = self.pipeline.sampler

    # -- setup ---------------------------------------------------------------------------------------

    def _load_models(self, student, teacher_model, tokenizer, teacher_tokenizer) -> None:
        cfg = self.cfg
        if student is None:
            s_path = resolve_model_path(cfg.student.path)
            tokenizer = load_tokenizer(s_path)
            student = load_causal_lm(s_path, cfg.student.param_dtype)
        self.tokenizer = tokenizer
        self.teacher_tokenizer = teacher_tokenizer or tokenizer
        self.teacher_model = None
        if teacher_model is not None or (cfg.uses_teacher and cfg.teacher.engine == "hf" and not cfg.teacher.route):
            self.teacher_model, self.teacher_tokenizer, vocab = load_teacher(
                cfg.teacher.path, cfg.teacher.dtype, self.teacher_device, student_tokenizer=tokenizer,
                student_vocab=model_vocab_size(student), student_name=cfg.student.path,
                teacher_name=cfg.teacher.path, model=teacher_model, tokenizer=teacher_tokenizer)
            self.vocab_size = vocab.shared_vocab_size
        elif cfg.uses_teacher:  # vLLM, served or routed teachers: checked without loading them here
            from .engines import shared_vocab_size

            self.vocab_size = shared_vocab_size(cfg, tokenizer, model_vocab_size(student))
            if cfg.teacher.engine == "vllm" and not cfg.teacher.route and teacher_tokenizer is None:
                self.teacher_tokenizer = load_tokenizer(resolve_model_path(cfg.teacher.path))
        else:
            self.vocab_size = model_vocab_size(student)
        self.student = self._prepare_student(student)
        self.eos_ids = eos_token_ids(tokenizer, self.student)
        self.pad_id = tokenizer.pad_token_id

    def _prepare_student(self, student):
        """The student on its device, with LoRA, gradient checkpointing, packing and sharding as configured."""
        cfg = self.cfg
        student.to(self.student_device)
        if cfg.student.lora_rank:
            from .lora import apply_lora

            student = apply_lora(student, cfg.student, seed=cfg.run.seed)
        if cfg.student.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # before the rollout engine copies the student: padded calls of the copy keep their implementation
        self.student_packed = cfg.student.packed and enable_varlen_attention(student)
        student.train()
        self.sharded = cfg.distributed.strategy == "fsdp2"
        return self._shard(student) if self.sharded else student

    def _shard(self, student):
        from . import fsdp

        s, d = self.cfg.student, self.cfg.distributed
        self._sampler_model = fsdp.rollout_copy(student, DTYPES[s.sampling_dtype])
        return fsdp.shard_student(student, device=s.device, compute_dtype=DTYPES[s.compute_dtype],
                                  head_dtype=DTYPES[s.head_dtype], cpu_offload=d.cpu_offload,
                                  reshard_after_forward=d.reshard_after_forward)

    def _render_kwargs(self) -> dict:
        d = self.cfg.data
        columns = d.columns
        if self.cfg.teacher.route and "source" not in columns:
            columns = {**columns, "source": d.route_column}
        return dict(columns=columns, prompt_suffix=d.prompt_suffix, system_prompt=d.system_prompt,
                    chat_template_kwargs=d.chat_template_kwargs, max_prompt_length=d.max_prompt_length,
                    long_prompts=d.long_prompts)

    def _load_data(self) -> None:
        d, e = self.cfg.data, self.cfg.eval
        train = load_prompts(d.train, self.tokenizer, limit=d.limit, **self._render_kwargs())
        examples = train.examples
        self.skipped_long = train.skipped_long
        if d.eval:
            eval_examples = load_prompts(d.eval, self.tokenizer, **self._render_kwargs()).examples[:e.prompts]
        elif e.prompts:
            if len(examples) <= e.prompts:
                raise ConfigError(f"data.train ({d.train}) has {len(examples)} usable prompts, not enough to hold "
                                  f"out eval.prompts={e.prompts} for evaluation: set data.eval, lower eval.prompts "
                                  f"or set eval.prompts=0")
            examples, eval_examples = examples[:-e.prompts], examples[-e.prompts:]
        else:
            eval_examples = []
        self.train_set: list[Example] = examples
        self.eval_set: list[Example] = eval_examples
        t = self.cfg.teacher
        if t.chat_template == "own":
            for ex in examples + eval_examples:
                ex.teacher_prompt_ids = render_prompt(self.teacher_tokenizer, ex.messages, t.chat_template_kwargs)

    def _build_engines(self) -> None:
        from .engines import build_rollout_engine, build_teacher

        cfg = self.cfg
        if self.sharded:
            from .engines.hf_rollout import GatheredRolloutEngine

            self.engine = GatheredRolloutEngine(self._sampler_model, eos_ids=self.eos_ids, pad_id=self.pad_id,
                                                vocab_size=self.vocab_size)
        else:
            self.engine = build_rollout_engine(cfg, self.student, eos_ids=self.eos_ids, pad_id=self.pad_id,
                                               vocab_size=self.vocab_size, tokenizer=self.tokenizer)
        self.teacher = None
        self.k = 0
        self.objective = objective_for(cfg.objective)
        if cfg.uses_teacher:
            self.teacher = build_teacher(cfg, self.teacher_model, vocab_size=self.vocab_size, pad_id=self.pad_id,
                                         tokenizer=self.tokenizer, student_vocab=model_vocab_size(self.student))
            # routed teachers: every row must have one, before step 1
            for name, examples in ((cfg.data.train, self.train_set), (cfg.data.eval or cfg.data.train, self.eval_set)):
                self.teacher.check_sources([ex.source for ex in examples], [ex.index for ex in examples], name)
            check_teacher_supports(cfg.objective, self.teacher.capabilities,
                                   "teacher.route" if cfg.teacher.route else cfg.teacher.engine)
            if cfg.objective.prune != "none" and "topk" not in self.teacher.capabilities:
                raise ConfigError(f"objective.prune={cfg.objective.prune} watches the student-teacher top-k overlap, "
                                  f"but this teacher engine returns no top-k ids")
            # Top-k ids are gathered for every objective the engine allows: the diagnostics need them.
            self.k = cfg.objective.k if "topk" in self.teacher.capabilities else 0

    # -- one step ------------------------------------------------------------------------------------

    def rollout(self, indices: list[int], seed: int, stop_hook=None, scorer: TeacherStream | None = None) -> Rollout:
        """Sample this rank's block of the step's prompts (all of them in a single process); ``scorer`` gets each
        row as soon as it finishes."""
        c = self.cfg.rollout
        start, end = shard_bounds(len(indices), self.dist)
        local = indices[start:end]
        extra = {} if stop_hook is None else {"stop_hook": stop_hook}  # only the HF engine takes these
        if scorer is not None:
            extra["on_finished"] = scorer.submit
        try:
            return self.engine.generate([self.train_set[i].prompt_ids for i in local], n=c.n,
                                        temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                                        topk=self.k, seed=seed, example_index=local, row_offset=start * c.n,
                                        min_new_tokens=c.min_new_tokens, **extra)
        except BaseException:
            if scorer is not None:
                scorer.close()
            raise

    def teacher_prompts(self, indices: list[int]) -> list[list[int]]:
        """The teacher's prompt ids of this rank's rollout rows (each prompt n times), in the rollout's order."""
        start, end = shard_bounds(len(indices), self.dist)
        return [self.train_set[i].teacher_ids for i in indices[start:end] for _ in range(self.cfg.rollout.n)]

    def drift_stop(self, indices: list[int]) -> DriftStop:
        """Prune-OPD truncate: the teacher scores this rank's rollout rows chunk by chunk while they are sampled."""
        o = self.cfg.objective
        return DriftStop(self.teacher, self.teacher_prompts(indices), k=self.k, threshold=o.prune_threshold,
                         window=o.prune_window, pad_id=self.pad_id, eos_ids=self.eos_ids,
                         keep_hidden=self.objective.full_vocab)

    def stream_scorer(self, indices: list[int]) -> TeacherStream | None:
        """With ``teacher.stream_scoring``: a scorer that takes this rank's rows as they finish sampling."""
        if not self.stream_scoring:
            return None
        return self.teacher.stream(self.teacher_prompts(indices), k=self.k, keep_hidden=self.objective.full_vocab)

    def score(self, rollout: Rollout, scorer: TeacherStream | None = None) -> TeacherScores | None:
        if self.teacher is None:
            return None
        if scorer is not None:
            return scorer.finish(rollout.response_ids, rollout.response_mask)
        prompts = [self.train_set[i].teacher_ids for i in rollout.example_index]
        return self.teacher.score(prompts, rollout.response_ids, rollout.response_mask, k=self.k,
                                  student_topk_ids=rollout.topk_ids if "at_ids" in self.teacher.capabilities else None,
                                  keep_hidden=self.objective.full_vocab,
                                  sources=[self.train_set[i].source for i in rollout.example_index])

    def outcome_rewards(self, rollout: Rollout, texts: list[str]) -> torch.Tensor | None:
        answers = [self.train_set[i].answer for i in rollout.example_index]
        if all(a is None for a in answers):
            return None
        return torch.tensor([score_response(t, a) or 0.0 for t, a in zip(texts, answers)])

    def update(self, rollout: Rollout, scores: TeacherScores | None, rewards: torch.Tensor | None
               ) -> tuple[float, StepBatch]:
        """Micro-batched forward/backward over the rollout; returns the step loss and detached step tensors."""
        o = self.cfg.objective
        mask = rollout.response_mask
        num_tokens = all_reduce_sum(float(mask.sum()), self.dist)
        num_seqs = all_reduce_sum(float(mask.shape[0]), self.dist)
        # The engine/trainer boundary: everything the loss reads moves to the student's device once, here.
        cpu_scores = None if scores is None else scores.to("cpu", hidden=False)
        scores, topk_ids, rewards_d = on_device(next(self.student.parameters()).device, scores, rollout.topk_ids,
                                                rewards)
        candidates = Candidates.of(topk_ids, scores.topk_ids) if self.k and scores is not None else None
        opd_w = None
        if o.prune == "downweight" and cpu_scores is not None:
            drift = rollout_drift(rollout, cpu_scores, self.k, o.prune_threshold, o.prune_window)
            opd_w = prune_weights(drift, rollout.response_mask.shape[1], "downweight", o.prune_decay)
            self.step_extra.update(prune_metrics(opd_w, rollout.response_mask, drift))
            opd_w = opd_w.to(scores.sampled_logp.device)
        is_sum = is_clipped = 0.0
        seq_adv = None
        if o.outcome_weight and rewards is not None:
            seq_adv = losses.group_advantages(rewards_d, rollout.group_size)
        objective = self.objective if scores is not None else None
        total = 0.0
        logp_sampled, logp_at, entropy = [], [], []
        mb = self.cfg.optim.micro_batch_size
        for start in range(0, len(rollout), mb):
            rows = torch.arange(start, min(start + mb, len(rollout)))
            sub = rollout.select(rows.tolist())
            sub_scores = None if scores is None else scores.select(rows)
            sub_candidates = None if candidates is None else candidates.select(rows)
            full_vocab = objective is not None and objective.full_vocab
            out = student_forward(
                self.student, sub.prompt_ids, sub.response_ids, sub.response_mask, pad_id=self.pad_id,
                vocab_size=self.vocab_size, candidates=sub_candidates, objective=objective,
                teacher=TeacherLogits(sub_scores.hidden, self.teacher.head_logits) if full_vocab else None,
                chunk_size=o.chunk_size, temperature=self.cfg.rollout.temperature,
                compute_dtype=DTYPES[self.cfg.student.compute_dtype], head_dtype=DTYPES[self.cfg.student.head_dtype],
                packed=self.student_packed)
            per_token = token_loss(self.objective, out, sub_scores, sub_candidates,
                                   None if seq_adv is None else seq_adv[rows], None if opd_w is None else opd_w[rows])
            if o.is_correction == "truncated":
                sub_mask = sub.response_mask.to(per_token.device)
                weight = losses.truncated_is_weight(out.logp_sampled, sub.sampling_logp.to(per_token.device),
                                                    o.is_clip)
                per_token = per_token * weight
                is_sum += float((weight * sub_mask).sum())
                is_clipped += float(((weight >= o.is_clip) & sub_mask).sum())
            loss = losses.aggregate(per_token, sub.response_mask.to(per_token.device), o.aggregation,
                                 num_tokens, num_seqs)
            loss.backward()
            total = total + loss.detach()  # one host sync per step (below), not one per micro-batch
            logp_sampled.append(out.logp_sampled.detach().cpu())
            logp_at.append(None if out.logp_at is None else out.logp_at.detach().cpu())
            entropy.append(out.entropy.cpu())
        if not self.sharded:  # FSDP reduce-scatters the gradients itself
            all_reduce_gradients([p for p in self.student.parameters() if p.requires_grad], self.dist)
        if o.is_correction == "truncated":
            self.step_extra["opd/is_weight_mean"] = all_reduce_sum(is_sum, self.dist) / max(num_tokens, 1)
            self.step_extra["opd/is_clipped_frac"] = all_reduce_sum(is_clipped, self.dist) / max(num_tokens, 1)
        batch = StepBatch(rollout, cpu_scores, torch.cat(logp_sampled),
                          None if logp_at[0] is None else torch.cat(logp_at), torch.cat(entropy), rewards)
        return all_reduce_sum(float(total), self.dist), batch

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def forward_backward(self, step: int):
        """Rollout, teacher scoring and the accumulated backward of one step; the weights are not touched.

        Returns the step loss and ``finish(optim_metrics) -> (metrics, batch)``, to call after the update."""
        timer = PhaseTimer()
        self.step_extra = {}
        stop = scorer = None
        with timer("rollout"):
            if self.pipeline is not None:  # sampled on the pipeline's worker while the last step trained
                rollout = self.pipeline.rollout_for(step, self.step_extra)
            else:
                indices = self.sampler.next_batch()
                stop = self.drift_stop(indices) if self.cfg.objective.prune == "truncate" else None
                scorer = self.stream_scorer(indices)  # scores rows while the rest are sampled
                rollout = self.rollout(indices, step_seed(self.cfg.run.seed, step), stop_hook=stop, scorer=scorer)
        if stop is not None:
            # the teacher's chunks ran inside the decode loop, and the step waited for them
            timer.seconds["rollout"] -= stop.seconds
            timer.seconds["teacher_wait"] = stop.seconds
        # the phases follow one another (time/step is their sum): the teacher's phase is the step's wait for it
        with timer("teacher_wait"):
            if stop is None:
                scores = self.score(rollout, scorer)
            else:
                generated = rollout.response_mask.clone()
                scores, kept = stop.scores(rollout.response_ids, rollout.topk_ids)
                rollout = cut_rollout(rollout, kept)
                self.step_extra.update(self._truncate_metrics(stop, generated, kept))
        # the teacher's own time: all of the wait, unless streamed requests overlapped the rollout
        self.step_extra["time/teacher"] = timer.seconds["teacher_wait"] if scorer is None else scorer.seconds
        with timer("rollout"):
            texts = decode_responses(self.tokenizer, rollout.response_ids, rollout.response_mask)
            rewards = self.outcome_rewards(rollout, texts)
        train_start = time.perf_counter()
        loss, batch = self.update(rollout, scores, rewards)

        def finish(optim_metrics: dict) -> tuple[dict, StepBatch]:
            timer.seconds["train"] = time.perf_counter() - train_start  # backward and the update
            return self._finish_step(loss, batch, texts, scores, optim_metrics, timer)

        return loss, finish

    def _finish_step(self, loss: float, batch: StepBatch, texts: list[str], scores, optim_metrics: dict,
                     timer: PhaseTimer) -> tuple[dict, StepBatch]:
        optim_metrics = dict(optim_metrics)
        if not optim_metrics["optim/skipped"]:
            optim_metrics.update(self.sync_sampler() if self.pipeline is None else self.pipeline.after_update())
        batch.texts = texts
        batch = self.gather(batch)
        diagnostics = {} if scores is None else step_diagnostics(
            batch, k=self.k, max_new_tokens=self.cfg.rollout.max_new_tokens,
            span=self.cfg.diagnostics.position_span or None)
        metrics = {"opd/loss": loss, **self.core_metrics(batch), **optim_metrics, **diagnostics, **self.step_extra,
                   **self.mismatch_metrics(batch), **{f"time/{k}": v for k, v in timer.seconds.items()}}
        metrics["time/step"] = sum(timer.seconds.values())
        return metrics, batch

    def sync_sampler(self) -> dict:
        """Copy the trained weights into the sampling model; engines that check their sync report it."""
        self.engine.sync_weights(self.student)
        sync = self.engine.last_sync
        if not sync:
            return {}
        return {"time/weight_sync": sync["push_seconds"] + sync["check_seconds"],
                "rollout/sync_probe_diff": sync["probe_mean_abs_diff"]}

    def opd_step(self, step: int) -> tuple[dict, StepBatch]:
        """One whole step outside the loop (tests, benchmarks): no checkpoints, no interrupt handling."""
        loss, finish = self.forward_backward(step)
        optim = apply_update(self.trainable_parameters(), self.optimizer, self.scheduler, loss,
                             self.cfg.optim.max_grad_norm)
        self.bad_steps = self.bad_steps + 1 if optim["optim/skipped"] else 0
        self.completed = step
        return finish(optim)

    @staticmethod
    def mismatch_metrics(b: StepBatch) -> dict:
        """Sampling vs training log-prob of the sampled tokens: what a lower-precision sampling copy (or stale
        sampling weights) costs, and what ``objective.is_correction=truncated`` corrects."""
        mask = b.rollout.response_mask
        n = mask.sum().clamp(min=1)
        diff = (b.rollout.sampling_logp - b.student_logp_sampled) * mask
        return {"rollout/logp_mismatch": float(diff.sum() / n),
                "rollout/logp_mismatch_abs": float(diff.abs().sum() / n)}

    def _truncate_metrics(self, stop: DriftStop, generated: torch.Tensor, kept: torch.Tensor) -> dict:
        """Prune-OPD truncate: what the early stop did this step (summed over ranks).

        generated: tokens the student sampled up to each row's EOS or stop (the decode and teacher work);
        kept: tokens trained on; tokens_saved_bound: max_new_tokens minus the generated length of stopped rows,
        the most the stop can have saved (a stopped row might have ended sooner on its own)."""
        T = generated.shape[1]
        t = torch.arange(T).unsqueeze(0)
        stopped = stop.stopped_at >= 0
        live = generated & ~(stopped.unsqueeze(-1) & (t >= stop.stopped_at.unsqueeze(-1)))
        n_gen = all_reduce_sum(float(live.sum()), self.dist)
        n_kept = all_reduce_sum(float(kept.sum()), self.dist)
        bound = float((self.cfg.rollout.max_new_tokens - stop.stopped_at[stopped]).sum())
        drift = stop.drift
        return {"prune/drift_frac": all_reduce_sum(float((drift >= 0).sum()), self.dist)
                / all_reduce_sum(float(len(drift)), self.dist),
                "prune/generated_tokens": n_gen, "prune/kept_tokens": n_kept,
                "prune/pruned_frac": (n_gen - n_kept) / max(n_gen, 1),
                "prune/tokens_saved_bound": all_reduce_sum(bound, self.dist)}

    def gather(self, batch: StepBatch) -> StepBatch:
        """The whole step's batch on every rank (metrics then equal a single process's), without hidden states."""
        if not self.dist.enabled:
            return batch
        if batch.scores is not None:
            batch.scores.hidden = None
        parts: list[StepBatch] = all_gather_objects(batch, self.dist)
        ro = [p.rollout for p in parts]
        rollout = Rollout(sum((r.prompt_ids for r in ro), []), pad_cat([r.response_ids for r in ro], self.pad_id),
                          pad_cat([r.response_mask for r in ro], False), pad_cat([r.sampling_logp for r in ro]),
                          pad_cat([r.topk_ids for r in ro]), torch.cat([r.truncated for r in ro]),
                          sum((r.example_index for r in ro), []), ro[0].group_size)
        scores = None
        if parts[0].scores is not None:
            fields = TeacherScores.__dataclass_fields__
            scores = TeacherScores(**{f: pad_cat([getattr(p.scores, f) for p in parts]) for f in fields
                                      if f != "hidden"})
        rewards = None if parts[0].rewards is None else torch.cat([p.rewards for p in parts])
        return StepBatch(rollout, scores, pad_cat([p.student_logp_sampled for p in parts]),
                         pad_cat([p.student_logp_at for p in parts]), pad_cat([p.student_entropy for p in parts]),
                         rewards, sum((p.texts for p in parts), []))

    def core_metrics(self, b: StepBatch) -> dict:
        mask = b.rollout.response_mask
        n = mask.sum().clamp(min=1)
        lengths = mask.sum(-1).float()
        out = {"opd/student_logp": float((b.student_logp_sampled * mask).sum() / n),
               "diag/entropy_student": float((b.student_entropy * mask).sum() / n)}
        if b.scores is not None:
            kl_token = (b.student_logp_sampled - b.scores.sampled_logp) * mask
            # k1 estimate of the per-token reverse KL on the student's own samples (unbiased for any objective)
            out["opd/reverse_kl"] = float(kl_token.sum() / n)
            out["opd/teacher_logp"] = float((b.scores.sampled_logp * mask).sum() / n)
            sources = [self.train_set[i].source for i in b.rollout.example_index]
            out.update(self.teacher.metrics(sources, mask, b.student_logp_sampled, b.scores.sampled_logp))
        out.update({
            "rollout/len_mean": float(lengths.mean()),
            "rollout/len_max": float(lengths.max()),
            "rollout/eos_frac": float((~b.rollout.truncated).float().mean()),
            "rollout/truncated_frac": float(b.rollout.truncated.float().mean()),
            "rollout/tokens": float(mask.sum()),
        })
        if b.rewards is not None:
            out["rollout/accuracy"] = float(b.rewards.mean())
        return out

    def samples(self, batch: StepBatch, count: int) -> list[dict]:
        rows = []
        for i in range(min(count, len(batch.rollout))):
            m = batch.rollout.response_mask[i]
            ex = self.train_set[batch.rollout.example_index[i]]
            row = {"prompt": ex.messages[-1]["content"], "response": batch.texts[i],
                   "tokens": self.tokenizer.convert_ids_to_tokens(batch.rollout.response_ids[i][m].tolist()),
                   "answer": ex.answer, "reward": None if batch.rewards is None else float(batch.rewards[i])}
            if batch.scores is not None:
                kl = (batch.student_logp_sampled[i] - batch.scores.sampled_logp[i])[m]
                row["token_reverse_kl"] = [round(float(x), 4) for x in kl]
            rows.append(row)
        return rows

    # -- evaluation, checkpoints, the loop -------------------------------------------------------------

    def evaluate(self) -> tuple[dict, list[dict]]:
        """Held-out evaluation on rank 0 (the other ranks wait; with fsdp2 they join its forwards' all-gathers)."""
        if self.pipeline is not None:  # the sampling model must hold the trained weights, and be free
            self.pipeline.drain()
        result: tuple[dict, list[dict]] = ({}, [])
        if (self.dist.is_main or self.sharded) and self.eval_set:
            result = self._evaluate()
        barrier(self.dist)
        return result

    def _evaluate(self) -> tuple[dict, list[dict]]:
        teacher = self.teacher
        if teacher is not None and "hidden" not in teacher.capabilities:
            console.print("[yellow]eval: the teacher engine cannot return hidden states; only accuracy is reported[/]")
            teacher = None
        e = self.cfg.eval
        return evaluate(student=self.student, engine=self.engine, teacher=teacher, tokenizer=self.tokenizer,
                        examples=self.eval_set, teacher_prompts=[x.teacher_ids for x in self.eval_set],
                        max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, pad_id=self.pad_id,
                        vocab_size=self.vocab_size, chunk_size=self.cfg.objective.chunk_size)

    def save(self, step: int) -> Path | None:
        if self.pipeline is not None:
            self.pipeline.drain()
        path = None
        if self.sharded:
            from .fsdp import save_sharded_checkpoint

            return save_sharded_checkpoint(self.run_dir, step, model=self.student, optimizer=self.optimizer,
                                           scheduler=self.scheduler, sampler_state=self.sampler.state_dict(),
                                           extra={"bad_steps": self.bad_steps}, keep=self.cfg.run.keep_checkpoints)
        if self.writes:
            path = self._save(step)
        barrier(self.dist)
        return path

    def _save(self, step: int) -> Path:
        return save_checkpoint(self.run_dir, step, model=self.student, tokenizer=self.tokenizer,
                               optimizer=self.optimizer, scheduler=self.scheduler,
                               sampler_state=self.sampler.state_dict(), extra={"bad_steps": self.bad_steps},
                               keep=self.cfg.run.keep_checkpoints)

    def load(self, path: Path) -> dict:
        state = load_checkpoint(path, model=self.student, optimizer=self.optimizer, scheduler=self.scheduler)
        self.sampler.load_state_dict(state["sampler"])
        self.bad_steps = state["extra"].get("bad_steps", 0)
        return state

    def after_restore(self) -> None:
        self.engine.sync_weights(self.student)

    def memory_table(self) -> str:
        from .memory import format_table, table_for_run

        trainable = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        teacher_config = None if self.teacher_model is None else self.teacher_model.config
        rows = table_for_run(self.cfg, self.student.config, teacher_config, self.dist.world_size, trainable)
        return format_table(rows, self.dist.world_size)

    def step_samples(self, batch: StepBatch) -> list[dict]:
        return self.samples(batch, self.cfg.run.log_samples)

    def export(self) -> None:
        if self.sharded:
            from .fsdp import export_full_model

            export_full_model(self.student, self.tokenizer, self.run_dir / "final_model")
        elif self.writes:
            save_model(self.student, self.tokenizer, self.run_dir / "final_model")

    def barrier(self) -> None:
        barrier(self.dist)

    def loop_settings(self) -> LoopSettings:
        cfg = self.cfg
        return LoopSettings(
            total_steps=cfg.run.steps, config=cfg, resume=cfg.run.resume, resume_override=cfg.run.resume_override,
            cadence_keys=RESUME_CADENCE_KEYS, model_key="student.path", loss_key="opd/loss",
            view_keys=["opd/loss", "opd/reverse_kl", "diag/overlap_ratio", "rollout/len_mean", "time/step"],
            max_grad_norm=cfg.optim.max_grad_norm, max_bad_steps=cfg.optim.max_bad_steps,
            save_every=cfg.run.save_every if self.log_to_disk else 0, eval_every=cfg.eval.every,
            tensorboard=cfg.run.tensorboard, progress=cfg.run.progress, is_main=self.dist.is_main,
            distributed=self.dist.enabled)

    def run(self) -> dict:
        if self.cfg.distributed.memory_table and self.dist.is_main:
            console.print(self.memory_table(), highlight=False)
        try:
            result = TrainingLoop(self, self.loop_settings()).run()
        finally:
            if self.pipeline is not None:  # an interrupt hands the untrained in-flight batch back
                self.pipeline.close()
        summary: dict = {"steps": self.cfg.run.steps, "skipped_long_prompts": self.skipped_long}
        before, after = result.before, result.after
        if before:
            summary["eval_before"] = before
            if result.samples_before:
                summary["samples_before"] = result.samples_before[:4]
        if after:
            summary["eval_after"] = after
            if result.samples_after:
                summary["samples_after"] = result.samples_after[:4]
        step_times: dict[str, list[float]] = {}
        for metrics in result.history:
            for key in ("time/rollout", "time/teacher", "time/teacher_wait", "time/train", "time/step"):
                step_times.setdefault(key, []).append(metrics[key])
        summary.update({
            "wall_seconds": result.wall_seconds,
            "seconds_per_step": statistics.median(step_times["time/step"]) if step_times else None,
            "phase_seconds_median": {k.split("/")[1]: statistics.median(v) for k, v in step_times.items()},
        })
        if "eval/reverse_kl" in before and "eval/reverse_kl" in after:
            summary["reverse_kl_before"] = before["eval/reverse_kl"]
            summary["reverse_kl_after"] = after["eval/reverse_kl"]
        if "eval/accuracy" in before and "eval/accuracy" in after:
            summary["accuracy_before"], summary["accuracy_after"] = before["eval/accuracy"], after["eval/accuracy"]
        return summary


def is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def run_distill(cfg: DistillConfig, **kwargs) -> dict:
    if is_main_process():
        console.print("[bold]resolved config[/]")
        console.print(dump_yaml(cfg), highlight=False)
    return Distiller(cfg, **kwargs).run()
