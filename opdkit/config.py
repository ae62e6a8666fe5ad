"""Typed configuration: one small dataclass per stage, YAML files plus ``key=value`` overrides.

A config file mirrors the dataclass nesting::

    student: {path: runs/pruned15}
    teacher: {path: smollm2-135m-instruct}
    objective: {name: topk, k: 16}

and any field can be overridden on the command line as ``objective.k=8``. Values are parsed as YAML
(``teacher.chat_template_kwargs={enable_thinking: false}`` works). Unknown keys, wrong types and values
outside a ``Literal`` choice are errors that name the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """An invalid config key or value; the CLI prints it and exits 2."""


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


# Every dtype key of every command takes this type; ``auto`` is resolved by opdkit.hardware when the config loads.
Dtype = Literal["auto", "float32", "bfloat16"]
AUTO_DTYPE_HELP = "; auto: bfloat16 where this device computes it natively and fast, else float32"


# --------------------------------------------------------------------------------------------------
# The shared vocabulary. Every command's sections are these types or extend them, so a key means the same thing
# in distill, grpo, sft, rollout, eval and probe: ``student``/``teacher``/``model`` are model sections,
# ``data`` a data section, ``rollout`` a sampling section, ``optim`` and ``run`` the same everywhere.
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Every model section (``student``, ``teacher``, ``model``): where the model is and where it runs.

    A section given as a plain string is its path: ``teacher=smollm2-135m-instruct``.
    """

    path: str = _help("HF model directory, .gguf file or bundled name (e.g. smollm2-135m-instruct)", default="")
    device: str = _help("device the model runs on (cpu, cuda, cuda:1)", default="cpu")

    def validate(self, section: str = "model") -> None:
        if not self.path:
            raise ConfigError(f"{section}.path is required: a local HF model directory, a .gguf file or a "
                              f"bundled name such as smollm2-135m-instruct")
        _check_device(f"{section}.device", self.device)


@dataclass
class FrozenModelConfig(ModelConfig):
    """A model the command runs without training it (the teacher; the model of rollout, eval, bench)."""

    dtype: Dtype = _help("dtype of the weights" + AUTO_DTYPE_HELP, default="auto")


@dataclass
class TrainedModelConfig(ModelConfig):
    """A model the command trains (``opdkit sft``'s model; the base of the OPD student)."""

    param_dtype: Dtype = _help("dtype of the trained (master) weights; auto: float32", default="auto")
    compute_dtype: Dtype = _help("autocast dtype of the training forward" + AUTO_DTYPE_HELP, default="auto")
    gradient_checkpointing: bool = _help("recompute decoder activations in backward to save memory", default=False)


@dataclass
class StudentConfig(TrainedModelConfig):
    path: str = _help("HF model directory, .gguf file or bundled name of the student", default="")
    sampling_dtype: Dtype = _help(
        "dtype of the sampling copy of the student, re-synced after every optimizer step" + AUTO_DTYPE_HELP,
        default="auto")
    head_dtype: Dtype = _help(
        "dtype of the student's vocabulary projection in training (log-softmax is always float32); auto: float32",
        default="auto")
    packed: bool = _help("training forward/backward over the rows packed without padding (per-row attention)",
                         default=True)
    lora_rank: int = _help("train LoRA adapters of this rank (PEFT) instead of all weights; 0 = full training",
                           default=0)
    lora_alpha: float = _help("LoRA alpha", default=16.0)
    lora_target_modules: list = _help("module names LoRA adapts", default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class ScoringTeacherConfig(FrozenModelConfig):
    """What every teacher section has: how the teacher reads and scores the student's responses."""

    path: str = _help("HF model directory, .gguf file or bundled name of the teacher", default="")
    temperature: float = _help("teacher logits are divided by this before the softmax", default=1.0)
    chat_template: Literal["student", "own"] = _help(
        "student: teacher sees the student's rendered prompt; own: the prompt is re-rendered with the "
        "teacher's chat template and the student's response tokens appended", default="student")
    chat_template_kwargs: dict = _help("extra arguments for the teacher's chat template (with chat_template=own)",
                                       default_factory=dict)


@dataclass
class TeacherConfig(ScoringTeacherConfig):
    engine: Literal["hf", "vllm", "server"] = _help(
        "hf: local transformers model; vllm: in-process vLLM; server: OpenAI-compatible server (teacher.url)",
        default="hf")
    url: Optional[str] = _help("base URL of a served teacher, e.g. http://127.0.0.1:8000/v1", default=None)
    served_model: Optional[str] = _help("model name the server expects (default: first model it lists)",
                                        default=None)
    head_dtype: Dtype = _help(
        "dtype of the teacher's vocabulary projection; float32 avoids bf16 quantisation of log-ratios; auto: float32",
        default="auto")
    chunk_size: int = _help("positions per chunk of the teacher's vocabulary projection", default=1024)
    batch_size: int = _help("sequences per teacher forward when scoring a rollout (bounds activation memory)",
                            default=16)
    packed: bool = _help("hf: score the rows packed without padding in one decoder pass (per-row attention)",
                         default=True)
    route: dict = _help("several teachers: {value of data.route_column: teacher path}", default_factory=dict)
    timeout: float = _help("seconds per request to a served teacher", default=120.0)
    max_retries: int = _help("retries with exponential backoff for a served teacher", default=4)
    request_batch_size: int = _help("served teacher: sequences per HTTP request", default=8)
    concurrency: int = _help("served teacher: requests in flight at once", default=4)
    stream_scoring: Optional[bool] = _help(
        "served teacher: send rollout rows as soon as they finish sampling, request_batch_size at a time, so "
        "scoring overlaps the decoding of the rows still running; null: on where it applies (teacher.engine="
        "server without teacher.route, rollout.engine=hf, run.pipeline=sync)", default=None)
    vllm_gpu_memory_utilization: float = _help("in-process vLLM teacher: fraction of GPU memory (GPU only)",
                                               default=0.3)
    vllm_kv_cache_gib: int = _help("in-process vLLM teacher on CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE); "
                                   "0: a tenth of this machine's memory, 1-16 GiB", default=0)


@dataclass
class DataFileConfig:
    """Every data section: the file, how its columns map to opdkit's fields, and how rows are rendered."""

    train: str = _help("training file: .jsonl or .parquet", default="")
    columns: dict = _help(
        "map opdkit fields (prompt, messages, answer, source; sft: messages, prompt, response) to dataset "
        "columns, e.g. {prompt: problem}", default_factory=dict)
    system_prompt: Optional[str] = _help("system message prepended to every conversation", default=None)
    chat_template_kwargs: dict = _help("extra arguments for the chat template, e.g. {enable_thinking: false}",
                                       default_factory=dict)
    limit: Optional[int] = _help("use only the first N rows of data.train", default=None)


@dataclass
class PromptDataConfig(DataFileConfig):
    """A data section of prompts (distill, grpo, rollout, eval, probe)."""

    train: str = _help("prompt file: .jsonl or .parquet (plain prompts, chat messages or verl rows)", default="")
    prompt_suffix: str = _help("text appended to every user prompt (e.g. an answer-format instruction)",
                               default="")
    max_prompt_length: int = _help("prompts longer than this many tokens are skipped or rejected", default=1024)

    def validate(self, section: str = "data") -> None:
        if not self.train:
            raise ConfigError(f"{section}.train is required: a .jsonl or .parquet prompt file")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"{section}.limit must be > 0, got {self.limit}")
        if self.max_prompt_length <= 0:
            raise ConfigError(f"{section}.max_prompt_length must be > 0")


@dataclass
class DataConfig(PromptDataConfig):
    eval: Optional[str] = _help("held-out prompt file; default: the last eval.prompts rows of data.train",
                                default=None)
    long_prompts: Literal["skip", "error"] = _help("what to do with a prompt over max_prompt_length",
                                                   default="skip")
    shuffle: bool = _help("shuffle prompts each epoch (seeded by run.seed)", default=True)
    route_column: str = _help("column that selects a teacher when teacher.route is set", default="data_source")


@dataclass
class SamplingConfig:
    """Every sampling section (``rollout`` in every command): what is sampled per prompt, and how."""

    n: int = _help("responses sampled per prompt", default=1)
    temperature: float = _help("sampling temperature (the paper trains at 1.0)", default=1.0)
    top_p: float = _help("nucleus sampling threshold", default=1.0)
    max_new_tokens: int = _help("maximum response length; longer responses are truncated and counted",
                                default=64)

    def validate(self, section: str = "rollout") -> None:
        for key in ("n", "max_new_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{section}.{key} must be > 0, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ConfigError(f"{section}.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{section}.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class RolloutConfig(SamplingConfig):
    engine: Literal["hf", "vllm"] = _help("hf: batched sampling with a KV cache in transformers; vllm: in-process vLLM",
                                          default="hf")
    prompts_per_step: int = _help("prompts sampled per optimizer step", default=8)
    min_new_tokens: int = _help("EOS is suppressed before this many tokens (fixed-length benchmarks)", default=0)
    share_prefill: bool = _help("hf: prefill each prompt once and copy its KV cache to its n samples", default=True)
    compact: bool = _help("hf: drop rows that hit EOS from the decode batch (no decode work for finished rows)",
                          default=True)
    vllm_gpu_memory_utilization: float = _help("vLLM: fraction of GPU memory (GPU only)", default=0.3)
    vllm_enforce_eager: bool = _help("vLLM: skip graph capture/compilation (starts in seconds on CPU)", default=True)
    vllm_kv_cache_gib: int = _help("vLLM on CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE); 0: a tenth of this "
                                   "machine's memory, 1-16 GiB", default=0)
    vllm_sync_tolerance: float = _help(
        "vLLM: largest mean abs log-prob difference between vLLM and the student on a probe text after a weight "
        "sync; catches a wrong or missing load (nats), not bf16 rounding (0.05-0.09 on the demo student)",
        default=0.5)


@dataclass
class BatchSamplingConfig(SamplingConfig):
    """The ``rollout`` section of the commands that only sample (rollout, eval, probe): batches and seeds."""

    batch_size: int = _help("sequences sampled together (KV-cache batch)", default=32)
    seed: int = _help("base seed; every (prompt, slot, attempt) gets its own seed from it", default=0)

    def validate(self, section: str = "rollout") -> None:
        super().validate(section)
        if self.batch_size <= 0:
            raise ConfigError(f"{section}.batch_size must be > 0, got {self.batch_size}")


@dataclass
class ObjectiveConfig:
    name: Literal["sampled", "topk", "reverse_kl", "forward_kl", "jsd", "teacher_topk_forward_kl"] = _help(
        "loss: sampled-token OPD (Eq.3), top-k OPD (Eq.5), full-vocabulary reverse/forward KL, generalised JSD, "
        "or forward KL on the teacher's top-k (for served teachers)", default="topk")
    k: int = _help("top-k size", default=16)
    strategy: Literal["student", "teacher", "intersection", "union", "symmetric_difference"] = _help(
        "top-k candidate set", default="student")
    weighting: Literal["student_p", "teacher_p", "none"] = _help(
        "per-candidate weight of the policy-gradient form (renormalised over the set)", default="student_p")
    form: Literal["kl", "pg"] = _help(
        "pg: reference-code policy gradient on detached weighted log-ratios; kl: autograd through KL(p̄||q̄) on the "
        "renormalised set (Eq.5)", default="kl")
    beta: float = _help("JSD mixture weight (0 < beta < 1)", default=0.5)
    aggregation: Literal["token_mean", "seq_mean"] = _help("how per-token losses become one number",
                                                           default="token_mean")
    opd_weight: float = _help("weight of the distillation term (0 with outcome_weight > 0: pure GRPO, no teacher)",
                              default=1.0)
    outcome_weight: float = _help("weight of a GRPO-style outcome-reward term (needs answers in the data)",
                                  default=0.0)
    chunk_size: int = _help("positions per chunk of the student's vocabulary projection", default=512)
    baseline: Literal["none", "vopd"] = _help(
        "policy-gradient forms (sampled; topk with form=pg): vopd subtracts the detached per-token value "
        "-KL(p_t||q_t) on the student's top-k (vOPD, arXiv 2605.07865)", default="none")
    is_correction: Literal["none", "truncated"] = _help(
        "truncated: weight each token's loss by min(pi_theta/pi_sample, is_clip) on the sampled token, for stale "
        "or mismatched samplers", default="none")
    is_clip: float = _help("truncation level C of objective.is_correction=truncated (>= 1)", default=2.0)
    prune: Literal["none", "downweight", "truncate"] = _help(
        "Prune-OPD (arXiv 2605.07804): after the top-k overlap stays below prune_threshold for prune_window "
        "positions, decay later token losses (downweight) or drop them and stop that row's rollout (truncate)",
        default="none")
    prune_threshold: float = _help("Prune-OPD: overlap ratio (Eq.6) below which a position counts as drifted",
                                   default=0.5)
    prune_window: int = _help("Prune-OPD: consecutive drifted positions that mark a drift; with truncate also the "
                              "rollout chunk between teacher checks", default=8)
    prune_decay: float = _help("Prune-OPD downweight: per-token factor on losses after the drift point (0..1)",
                               default=0.9)


@dataclass
class OptimConfig:
    lr: float = _help("peak learning rate of AdamW", default=1e-5)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    betas: list = _help("AdamW betas", default_factory=lambda: [0.9, 0.999])
    eps: float = _help("AdamW epsilon", default=1e-8)
    schedule: Literal["constant", "cosine", "linear"] = _help("LR schedule after warmup", default="constant")
    warmup_steps: int = _help("linear warmup steps", default=0)
    max_grad_norm: float = _help("gradient clipping threshold (global L2 norm); 0 disables", default=1.0)
    micro_batch_size: int = _help("sequences per forward/backward; gradients accumulate over the step",
                                  default=8)
    max_bad_steps: int = _help("consecutive NaN/inf steps tolerated (each is skipped) before the run stops",
                               default=3)


@dataclass
class EvalEveryConfig:
    """Every eval section: how often the held-out measurement runs."""

    every: int = _help("evaluate every N steps (0: only before and after training)", default=0)


@dataclass
class EvalConfig(EvalEveryConfig):
    prompts: int = _help("held-out prompts for periodic evaluation (0 disables)", default=32)
    max_new_tokens: int = _help("greedy response length at evaluation", default=64)
    batch_size: int = _help("prompts per evaluation batch", default=16)


@dataclass
class DiagnosticsConfig:
    position_span: int = _help("token span of the position-binned diagnostics (0: max_new_tokens / 8)", default=0)


@dataclass
class RunConfig:
    """Every trainer's ``run`` section: where the run lives, how long it is, checkpoints and logging."""

    out_dir: str = _help("run directory (metrics, checkpoints, final model)", default="runs/distill")
    steps: int = _help("optimizer steps", default=50)
    seed: int = _help("base seed; per-step seeds are derived from it", default=0)
    save_every: int = _help("checkpoint every N steps (0: only at the end and on Ctrl-C)", default=0)
    keep_checkpoints: int = _help("how many checkpoints to keep", default=2)
    resume: bool = _help("continue from the last checkpoint in out_dir", default=False)
    resume_override: bool = _help("on resume, apply changed non-cadence keys (e.g. optim.lr) instead of "
                                  "refusing them; each change is recorded in config_history.jsonl",
                                  default=False)
    tensorboard: bool = _help("write TensorBoard event files", default=True)
    threads: Optional[int] = _help("torch CPU threads (default: this process's share of the cores: all of them, "
                                   "or cores / LOCAL_WORLD_SIZE per rank under torchrun)", default=None)
    progress: bool = _help("show a progress bar", default=True)


@dataclass
class DistillRunConfig(RunConfig):
    log_samples: int = _help("rollouts written to samples.jsonl per step", default=2)
    pipeline: Literal["sync", "one_step_off"] = _help(
        "sync: rollout, teacher scoring and training one after another; one_step_off: the rollout of step t+1 is "
        "sampled on a worker thread, from weights one optimizer step old, while step t is scored and trained "
        "(logs pipeline/staleness; pair with objective.is_correction=truncated)", default="sync")
    rollout_threads: Optional[int] = _help("run.pipeline=one_step_off: torch CPU threads of the rollout worker "
                                           "(default: as many as training uses)", default=None)


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp2"] = _help(
        "multi-process training: ddp (full replica per rank, gradients summed) or fsdp2 (student weights, grads "
        "and optimizer state sharded per decoder layer; sharded checkpoints)", default="ddp")
    cpu_offload: bool = _help("fsdp2: keep sharded parameters, gradients and optimizer state in CPU memory",
                              default=False)
    reshard_after_forward: bool = _help(
        "fsdp2: free each layer's gathered weights after its forward (re-gathered in backward)", default=True)
    memory_table: bool = _help("print the per-rank memory estimate before step 1", default=True)


@dataclass
class DistillConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    run: DistillRunConfig = field(default_factory=DistillRunConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def uses_teacher(self) -> bool:
        """False only for pure outcome-reward training (opd_weight 0 and no teacher given)."""
        return self.objective.opd_weight != 0 or bool(self.teacher.path or self.teacher.url or self.teacher.route)

    def validate(self) -> None:
        _positive(self, ["rollout.prompts_per_step", "rollout.n", "rollout.max_new_tokens", "objective.k",
                         "objective.chunk_size", "teacher.chunk_size", "teacher.batch_size", "optim.micro_batch_size",
                         "data.max_prompt_length", "eval.max_new_tokens", "eval.batch_size"])
        _nonnegative(self, ["run.steps", "run.save_every", "eval.every", "eval.prompts", "optim.warmup_steps",
                            "optim.lr", "optim.max_grad_norm", "optim.weight_decay", "objective.outcome_weight",
                            "objective.opd_weight",
                            "student.lora_rank"])
        if not self.student.path:
            raise ConfigError("student.path is required: a local HF model directory, a .gguf file, or a bundled "
                              "name such as smollm2-135m-instruct")
        if self.objective.opd_weight == 0 and self.objective.outcome_weight == 0:
            raise ConfigError("objective.opd_weight and objective.outcome_weight are both 0: nothing to train")
        if (self.uses_teacher and not self.teacher.path and self.teacher.engine != "server"
                and not self.teacher.route):
            raise ConfigError("teacher.path is required (or teacher.engine=server with teacher.url)")
        if self.teacher.engine == "server" and not self.teacher.url:
            raise ConfigError("teacher.engine=server needs teacher.url, e.g. http://127.0.0.1:8000/v1")
        if not self.data.train:
            raise ConfigError("data.train is required: a .jsonl or .parquet prompt file")
        if not 0 < self.rollout.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.rollout.top_p}")
        if self.rollout.temperature <= 0 or self.teacher.temperature <= 0:
            raise ConfigError("rollout.temperature and teacher.temperature must be > 0")
        if self.objective.name == "jsd" and not 0 < self.objective.beta < 1:
            raise ConfigError(f"objective.beta must be in (0, 1) for jsd, got {self.objective.beta}")
        if self.objective.form == "kl" and self.objective.weighting != "student_p":
            raise ConfigError("objective.form=kl is KL(p̄||q̄) on the renormalised set, whose weights are the student's "
                              "p̄ by definition: use objective.weighting=student_p, or objective.form=pg to choose "
                              "another weighting")
        self._validate_objective_extras()
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers, got {self.optim.betas}")
        for key in ("student.device", "teacher.device"):
            _check_device(key, _get(self, key))
        self._validate_engines()
        self._validate_pipeline()
        if self.distributed.strategy == "fsdp2":
            if self.student.lora_rank:
                raise ConfigError("distributed.strategy=fsdp2 trains all weights; LoRA (student.lora_rank > 0) "
                                  "keeps so few trainable weights that distributed.strategy=ddp is the right choice")
            if self.rollout.engine != "hf":
                raise ConfigError("distributed.strategy=fsdp2 needs rollout.engine=hf (the sharded student syncs "
                                  "its gathered weights into the HF sampler); serve the teacher with vLLM instead")

    def _validate_pipeline(self) -> None:
        if self.run.rollout_threads is not None:
            _positive(self, ["run.rollout_threads"])
        if self.run.pipeline != "one_step_off":
            return
        if self.distributed.strategy == "fsdp2":
            raise ConfigError("run.pipeline=one_step_off samples on a worker thread, but distributed.strategy=fsdp2 "
                              "gathers the sharded weights for sampling with collectives that must run in step "
                              "with training: use run.pipeline=sync, or distributed.strategy=ddp")
        if self.objective.prune == "truncate":
            raise ConfigError("objective.prune=truncate scores the rollout with the teacher while it is sampled, "
                              "which run.pipeline=one_step_off would do on its worker while the main thread scores "
                              "the previous step: use objective.prune=downweight, or run.pipeline=sync")

    def _validate_objective_extras(self) -> None:
        o = self.objective
        if o.baseline == "vopd" and not (o.name == "sampled" or (o.name == "topk" and o.form == "pg")):
            raise ConfigError(f"objective.baseline=vopd applies to the policy-gradient forms (objective.name=sampled, "
                              f"or topk with objective.form=pg), not objective.name={o.name} with form={o.form}")
        if o.is_clip < 1:
            raise ConfigError(f"objective.is_clip must be >= 1 (it truncates a ratio whose on-policy value is 1), "
                              f"got {o.is_clip}")
        if o.prune != "none":
            if not 0 < o.prune_threshold <= 1:
                raise ConfigError(f"objective.prune_threshold must be in (0, 1] (an overlap ratio), got "
                                  f"{o.prune_threshold}")
            if o.prune_window < 1:
                raise ConfigError(f"objective.prune_window must be >= 1, got {o.prune_window}")
            if not 0 <= o.prune_decay <= 1:
                raise ConfigError(f"objective.prune_decay must be in [0, 1], got {o.prune_decay}")
        if o.prune == "truncate" and (self.teacher.engine != "hf" or self.teacher.route or
                                      self.rollout.engine != "hf"):
            raise ConfigError("objective.prune=truncate scores the rollout with the teacher while it is generated, "
                              "which needs rollout.engine=hf and a local teacher.engine=hf (no teacher.route); "
                              "use objective.prune=downweight with other engines")

    def _validate_engines(self) -> None:
        _positive(self, ["teacher.request_batch_size", "teacher.concurrency", "teacher.timeout"])
        _nonnegative(self, ["teacher.max_retries", "rollout.vllm_sync_tolerance", "rollout.vllm_kv_cache_gib",
                            "teacher.vllm_kv_cache_gib"])
        if self.teacher.route:
            teachers = list(route_teacher_configs(self).values())  # raises ConfigError on a bad entry
            if self.teacher.chat_template != "student":
                raise ConfigError("teacher.route needs teacher.chat_template=student (routed teachers read the "
                                  "student's rendered prompt)")
            source = self.data.columns.get("source")
            if source is not None and source != self.data.route_column:
                raise ConfigError(f"data.columns.source={source!r} and data.route_column={self.data.route_column!r} "
                                  f"name different columns; set one of them")
        else:
            teachers = [self.teacher] if self.uses_teacher else []
        for t in teachers:
            if t.engine in ("vllm", "server") and t.temperature != 1.0:
                raise ConfigError(
                    f"teacher.temperature={t.temperature} with teacher.engine={t.engine}: the engine returns "
                    f"log-probs of the untempered teacher for its top-k ids only, which cannot be re-normalised at "
                    f"another temperature; use teacher.temperature=1.0 or teacher.engine=hf")


def route_teacher_configs(cfg) -> dict[str, TeacherConfig]:
    """The teacher config of every route: the shared ``teacher.*`` fields updated by the route's entry."""
    from .hardware import resolve_config  # hardware reads configs: imported here, when a config is checked

    shared = dataclasses.asdict(cfg.teacher)
    shared["route"] = {}
    out = {}
    for value, spec in cfg.teacher.route.items():
        key = f"teacher.route.{value}"
        if isinstance(spec, str):
            fields = {**shared, "path": spec}
        elif isinstance(spec, dict):
            if "route" in spec:
                raise ConfigError(f"{key}: a routed teacher cannot route again")
            fields = {**shared, **spec}
        else:
            raise ConfigError(f"{key} must be a teacher path or a mapping of teacher fields, got {spec!r}")
        t = from_dict(TeacherConfig, fields, prefix=key + ".")
        resolve_config(t)  # a route may set its own dtype, auto included
        if t.engine == "server" and not t.url:
            raise ConfigError(f"{key}: engine server needs url, e.g. {{engine: server, url: http://host:8000/v1}}")
        if t.engine != "server" and not t.path:
            raise ConfigError(f"{key}: a teacher path is required")
        out[str(value)] = t
    return out


def _check_device(key: str, value: str) -> None:
    import torch

    try:
        kind = torch.device(value).type
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{key}={value!r} is not a device: use cpu, cuda or cuda:N") from exc
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"{key}={value!r}: opdkit runs on cpu or cuda devices")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _positive(cfg: Any, keys: list[str]) -> None:
    for key in keys:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {_get(cfg, key)}")


def _nonnegative(cfg: Any, keys: list[str]) -> None:
    for key in keys:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)}")


# --------------------------------------------------------------------------------------------------
# Generic loading: dict -> dataclass with type checks, YAML + overrides, dumping.
# --------------------------------------------------------------------------------------------------

T = typing.TypeVar("T")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of its fields, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if tp in (dict, list) or origin in (dict, list):
        base = origin or tp
        if not isinstance(value, base):
            raise ConfigError(f"{key} must be a {base.__name__}, got {value!r}")
        return value
    return value


# A dataclass renames a key by mapping old -> new names in a ``RENAMED`` class attribute; the old name is read
# as the new one, with a deprecation warning, for one release. Either side may be dotted, to move a key into
# another section (``{"prompts": "data.train"}``).
def renamed_keys(cls: type) -> dict[str, str]:
    return dict(getattr(cls, "RENAMED", {}))


def _parent(data: dict, dotted: str) -> tuple[dict | None, str]:
    """The mapping that holds the last part of ``dotted`` (None if there is none), and that part."""
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), last


def _has_dotted(data: dict, dotted: str) -> bool:
    node, last = _parent(data, dotted)
    return node is not None and last in node


def _pop_dotted(data: dict, dotted: str) -> tuple[bool, Any]:
    node, last = _parent(data, dotted)
    return (True, node.pop(last)) if node is not None and last in node else (False, None)


def _apply_renames(cls: type, data: dict, prefix: str, warn: bool = True) -> dict:
    renamed = renamed_keys(cls)
    if not any(_has_dotted(data, old) for old in renamed):
        return data
    out = copy.deepcopy(data)
    for old, new in renamed.items():
        found, value = _pop_dotted(out, old)
        if not found:
            continue
        if _has_dotted(out, new):
            raise ConfigError(f"'{prefix}{old}' is the old name of '{prefix}{new}': give only '{prefix}{new}'")
        if warn:
            warnings.warn(f"config key '{prefix}{old}' is deprecated and will be removed in the next release: use "
                          f"'{prefix}{new}'", FutureWarning, stacklevel=2)
        _set_dotted(out, new, value)
    return out


def upgrade_keys(cls: type, data: dict, prefix: str = "") -> dict:
    """``data`` (a saved config of ``cls``) with every old key name replaced by its new one, silently: a run
    saved before a rename compares and resumes as if it had been saved after it."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    data = _apply_renames(cls, data, prefix, warn=False)
    hints = typing.get_type_hints(cls)
    return {k: upgrade_keys(hints[k], v, prefix + k + ".") if k in hints and dataclasses.is_dataclass(hints[k])
            else v for k, v in data.items()}


def _expand_paths(cls: type, data: dict) -> dict:
    """A model section given as a plain string is its path: ``teacher=smollm2-135m-instruct``."""
    hints = typing.get_type_hints(cls)
    return {k: {"path": v} if isinstance(v, str) and k in hints and dataclasses.is_dataclass(hints[k])
            and "path" in {f.name for f in dataclasses.fields(hints[k])} else v for k, v in data.items()}


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    data = _apply_renames(cls, _expand_paths(cls, data), prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"in '{prefix.rstrip('.')}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{prefix}{key}'; allowed keys {where}: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        if isinstance(node.get(part), str):  # a section given as its path, then one of its keys
            node[part] = {"path": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    data: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. objective.k=8")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from None
        _set_dotted(data, key.strip(), value)
    return data


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        # A section given as a string is its path: it sets the path and keeps the section's other keys.
        if isinstance(v, str) and isinstance(out.get(k), dict):
            v = {"path": v}
        elif isinstance(v, dict) and isinstance(out.get(k), str):
            out[k] = {"path": out[k]}
        if isinstance(v, dict) and isinstance(out.get(k), dict) and v:
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, saved: dict | None = None) -> T:
    """Build ``cls`` from defaults < ``base`` < YAML file < ``key=value`` overrides, validate, resolve ``auto``.

    ``saved``: the resolved config of a run being resumed; ``auto`` dtypes then keep the values it used.
    """
    data = dict(base or {})
    if path:
        try:
            data = deep_merge(data, load_yaml(path))
        except ConfigError:
            raise
    data = deep_merge(data, parse_overrides(overrides or []))
    try:
        cfg = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    if hasattr(cfg, "validate"):
        cfg.validate()
    if dataclasses.is_dataclass(cfg):
        from .hardware import resolve_config

        resolve_config(cfg, saved=saved if saved is not None else _resumed_run_config(cfg))
    return cfg


def _resumed_run_config(cfg: Any) -> dict | None:
    """The saved ``config.yaml`` of the run that ``run.resume=true`` continues, if there is one."""
    run = getattr(cfg, "run", None)
    if not getattr(run, "resume", False) or not getattr(run, "out_dir", None):
        return None
    path = Path(run.out_dir) / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None  # no readable config: resume's own checks report what is missing
    return saved if isinstance(saved, dict) else None


def dump_yaml(cfg: Any) -> str:
    """The config as YAML, headed by one comment line per dtype resolved from ``auto`` and why."""
    from .hardware import precision_lines

    head = "".join(f"# {line}\n" for line in precision_lines(cfg))
    return head + yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def describe_renames(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(old dotted key, new dotted key) of every renamed key of ``cls`` and its sections."""
    rows = [(prefix + old, prefix + new) for old, new in renamed_keys(cls).items()]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe_renames(hints[f.name], prefix + f.name + ".")
    return rows


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for the README's config reference and ``opdkit config``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
        text = f.metadata.get("help", "")
        if choices:
            text += f" ({' / '.join(choices)})"
        rows.append((prefix + f.name, repr(default), text))
    return rows
