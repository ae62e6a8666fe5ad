"""One benchmark run per process: opdkit's OPD step or TRL's ``DistillationTrainer`` on identical work.

Each worker loads the models, runs ``warmup`` + ``steps`` optimizer steps on the same prompts with the same
batch, generation length and reverse-KL objective, and returns per-step wall times, the phase split, tokens
and the process's peak RSS. Two workloads (``BenchSettings.workload``):

* ``fixed``: generation is fixed-length (EOS suppressed until ``new_tokens``) on both sides so both do exactly
  the same number of tokens;
* ``math``: DAPO-Math prompts, ``n`` samples per prompt, responses that stop at EOS (at most ``new_tokens``),
  the same seed on both sides. The sides then sample different tokens, so the figure of merit is useful
  (unpadded) response tokens per second next to seconds per step.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class BenchSettings:
    student: str = ""
    teacher: str = ""
    prompts: str = ""
    batch: int = 8
    new_tokens: int = 64
    steps: int = 4
    warmup: int = 1
    lr: float = 5e-5
    objective: str = "reverse_kl"      # opdkit objective.name
    k: int = 16
    trl_bf16: bool = False
    threads: int = 0
    workload: str = "fixed"            # fixed | math (see the module docstring)
    n: int = 1                         # samples per prompt (rows per step = batch * n)
    seed: int = 0
    extra: list = field(default_factory=list)  # extra opdkit key=value overrides


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def min_new_tokens(s: BenchSettings) -> int:
    if s.workload not in ("fixed", "math"):
        raise ValueError(f"unknown benchmark workload {s.workload!r}; use fixed or math")
    return s.new_tokens if s.workload == "fixed" else 0


def run_opdkit(s: BenchSettings, side: str = "opdkit", engine_overrides: tuple = ()) -> dict:
    from ..config import DistillConfig, load_config
    from ..train import Distiller

    overrides = [f"student.path={s.student}", f"teacher.path={s.teacher}", f"data.train={s.prompts}",
                 "eval.prompts=0", f"rollout.prompts_per_step={s.batch}", f"rollout.n={s.n}",
                 f"rollout.max_new_tokens={s.new_tokens}", f"rollout.min_new_tokens={min_new_tokens(s)}",
                 f"objective.name={s.objective}", f"objective.k={s.k}", f"optim.lr={s.lr}",
                 f"optim.micro_batch_size={s.batch * s.n}", "run.out_dir=/tmp/opdkit-bench-unused",
                 f"run.seed={s.seed}", f"run.steps={s.warmup + s.steps}", "data.shuffle=false", *engine_overrides, *s.extra]
    cfg = load_config(DistillConfig, None, overrides)
    d = Distiller(cfg, log_to_disk=False)
    steps, phases, tokens, staleness = [], [], [], []
    for step in range(1, s.warmup + s.steps + 1):
        metrics, _ = d.opd_step(step)
        if step > s.warmup:
            steps.append(metrics["time/step"])
            phases.append({k.split("/")[1]: metrics[f"time/{k.split('/')[1]}"] for k in
                           ("time/rollout", "time/teacher", "time/train")})
            tokens.append(metrics["rollout/tokens"])
            staleness.append(metrics.get("pipeline/staleness", 0.0))
    return {"side": side, "step_seconds": steps, "phases": phases, "tokens": tokens, "staleness": staleness,
            "peak_rss_gb": peak_rss_gb(),
            "dtype_policy": f"student fp32 master + {cfg.student.compute_dtype} autocast, {cfg.student.sampling_dtype} "
                            f"sampling copy ({cfg.rollout.engine}); teacher {cfg.teacher.dtype} with {cfg.teacher.head_dtype} head; "
                            f"student head {cfg.student.head_dtype}"}


def run_trl(s: BenchSettings) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from ..data import read_rows

    rows = read_rows(s.prompts)
    # n samples per prompt as n consecutive copies: TRL then samples each copy independently, as opdkit does
    prompts = [{"prompt": r["messages"] if "messages" in r else [{"role": "user", "content": r["prompt"]}]}
               for r in rows for _ in range(s.n)]
    tok = AutoTokenizer.from_pretrained(s.student, padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(s.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(s.teacher, dtype=torch.float32)
    args = DistillationConfig(
        output_dir="/tmp/opdkit-bench-trl", per_device_train_batch_size=s.batch * s.n, gradient_accumulation_steps=1,
        max_steps=s.warmup + s.steps, learning_rate=s.lr, beta=1.0, temperature=1.0,
        max_completion_length=s.new_tokens, generation_kwargs={"min_new_tokens": min_new_tokens(s)}, seed=s.seed,
        use_cpu=True, bf16=s.trl_bf16, gradient_checkpointing=False, logging_steps=1, report_to=[],
        save_strategy="no", shuffle_dataset=False, dataloader_num_workers=0, disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=Dataset.from_list(prompts), processing_class=tok)
    timings = {"rollout": 0.0, "teacher": 0.0, "tokens": 0}

    def timed(name, fn, predicate=lambda *a, **k: True):
        def wrapper(*a, **k):
            if not predicate(*a, **k):
                return fn(*a, **k)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timings[name] += time.perf_counter() - start
        return wrapper

    generate = timed("rollout", trainer._generate)

    def counted(prompts):
        out = generate(prompts)
        timings["tokens"] += sum(len(c) for c in out[1])  # completion ids, cut after EOS: the useful tokens
        return out

    trainer._generate = counted
    trainer._get_last_hidden_state = timed("teacher", trainer._get_last_hidden_state,
                                           lambda model, *a, **k: model is trainer.teacher_model)
    records: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timings.update(rollout=0.0, teacher=0.0, tokens=0)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            total = time.perf_counter() - self.start
            records.append({"step": total, "rollout": timings["rollout"], "teacher": timings["teacher"],
                            "train": total - timings["rollout"] - timings["teacher"], "tokens": timings["tokens"]})

    trainer.add_callback(StepTimer())
    trainer.train()
    measured = records[s.warmup:]
    return {"side": "trl", "step_seconds": [r["step"] for r in measured],
            "phases": [{k: r[k] for k in ("rollout", "teacher", "train")} for r in measured],
            "tokens": [r["tokens"] for r in measured], "peak_rss_gb": peak_rss_gb(),
            "dtype_policy": "student and teacher fp32" + (", bf16 autocast (bf16=True)" if s.trl_bf16 else "")}


def run_opdkit_vllm(s: BenchSettings) -> dict:
    # vLLM in-process (CPU backend here); its KV cache is counted in the peak RSS, so keep it at 1 GiB
    return run_opdkit(s, "opdkit-vllm", ("rollout.engine=vllm", "rollout.vllm_kv_cache_gib=1"))


def run_opdkit_async(s: BenchSettings) -> dict:
    # the rollout of step t+1 on a worker thread (with as many torch threads as training) while step t trains
    return run_opdkit(s, "opdkit-async", ("run.pipeline=one_step_off",))


WORKERS = {"opdkit": run_opdkit, "opdkit-vllm": run_opdkit_vllm, "opdkit-async": run_opdkit_async, "trl": run_trl}


def worker_main(side: str, settings_json: str, out: str) -> None:
    """Entry point of one benchmark subprocess (``opdkit bench --worker``)."""
    from ..hardware import configure_threads

    s = BenchSettings(**json.loads(settings_json))
    configure_threads(s.threads or None)
    result = WORKERS[side](s)
    result["settings"] = asdict(s)
    Path(out).write_text(json.dumps(result))
