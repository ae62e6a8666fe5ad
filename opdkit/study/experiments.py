"""The study's OPD experiments: each is one ``opdkit.train.Distiller`` run (or one per seed) between zoo members,
named after the paper claim it tests (paper-method.md §7). Runs are cached: a run directory that holds
``summary.json`` is not run again.

Every run logs the real diagnostics to ``metrics.jsonl`` (``diag/overlap_ratio``, ``diag/overlap_token_advantage``,
``diag/entropy_gap``, ``diag/overlap_mass_*``, ``diag/reward_auroc``, ``optim/grad_norm``, ``opd/loss``, ...) and
evaluates greedily on held-out problems every ``opd.eval_every`` steps (``eval/accuracy``, exact
``eval/reverse_kl``). ``summarise`` reduces one run to start/end values of those curves.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DistillConfig, load_config
from ..tracking import console, read_metrics
from .zoo import Zoo


@dataclass
class OPDConfig:
    """Settings shared by every OPD run of the study (the paper's Table 2, scaled to tiny models)."""

    steps: int = 300
    prompts_per_step: int = 16
    n: int = 2
    lr: float = 5e-4
    k: int = 16
    max_new_tokens: int = 32
    eval_every: int = 25
    eval_prompts: int = 96
    threads: int = 1


@dataclass(frozen=True)
class Experiment:
    name: str
    student: str
    teacher: str
    train: str = "mixed_quiz"
    eval: str = "mixed_quiz"
    overrides: tuple[str, ...] = ()
    key: bool = False  # a key comparison: run with every study seed

    @property
    def needs(self) -> set[str]:
        return {self.student, self.teacher}


EXPERIMENTS: tuple[Experiment, ...] = (
    # successful-OPD signature, gap recovery, overlap mass; new capability vs same pipeline vs pattern mismatch
    Experiment("new_capability", "S0", "T_new", key=True),
    Experiment("same_pipeline", "S0", "T_same", key=True),
    Experiment("pattern_B", "S0", "T_B", key=True),
    # off-policy cold start: SFT on T_B's filtered rollouts, then OPD with T_B
    Experiment("cold_start_B", "S0_coldB", "T_B"),
    # teacher-aligned template: the same problems in a template T_new never saw
    Experiment("template_plain", "S0", "T_new", train="mixed_plain"),
    # top-k candidate sets (paper §4.2)
    Experiment("overlap_only", "S0", "T_new", overrides=("objective.strategy=intersection",)),
    Experiment("non_overlap_only", "S0", "T_new", overrides=("objective.strategy=symmetric_difference",)),
    # support size (paper §6.3): top-16 is new_capability
    Experiment("sampled_token", "S0", "T_new", overrides=("objective.name=sampled",)),
    Experiment("top1", "S0", "T_new", overrides=("objective.k=1",)),
    Experiment("top4", "S0", "T_new", overrides=("objective.k=4",)),
    # Eq. 5 renormalises both models over the set, so with k = 1 its KL is identically 0 (no gradient); the
    # paper's reference code trains top-1 with the policy-gradient form on full-softmax log-probs instead.
    Experiment("top1_pg", "S0", "T_new", overrides=("objective.k=1", "objective.form=pg")),
    Experiment("top16_pg", "S0", "T_new", overrides=("objective.form=pg",)),
    # reverse distillation: the RL-improved student back into its pre-RL checkpoint / a same-data bigger model
    Experiment("reverse_to_pre_rl", "S_RL", "S0"),
    Experiment("reverse_to_same", "S_RL", "T_same"),
)


def run_dir(out: Path, exp: Experiment, seed: int) -> Path:
    return out / "runs" / f"{exp.name}_s{seed}"


def distill_config(zoo: Zoo, exp: Experiment, seed: int, opd: OPDConfig, out: Path) -> DistillConfig:
    base = {
        "student": {"path": str(zoo.model(exp.student)), "compute_dtype": "float32", "sampling_dtype": "float32",
                    "head_dtype": "float32"},
        "teacher": {"path": str(zoo.model(exp.teacher)), "dtype": "float32", "head_dtype": "float32"},
        "data": {"train": str(zoo.data(f"train_{exp.train}")), "eval": str(zoo.data(f"eval_{exp.eval}"))},
        "rollout": {"prompts_per_step": opd.prompts_per_step, "n": opd.n, "max_new_tokens": opd.max_new_tokens},
        "objective": {"k": opd.k},
        "optim": {"lr": opd.lr, "micro_batch_size": opd.prompts_per_step * opd.n},
        "eval": {"prompts": opd.eval_prompts, "max_new_tokens": opd.max_new_tokens, "every": opd.eval_every,
                 "batch_size": 96},
        "run": {"out_dir": str(run_dir(out, exp, seed)), "steps": opd.steps, "seed": seed, "tensorboard": False,
                "progress": False, "threads": opd.threads, "log_samples": 1},
    }
    return load_config(DistillConfig, None, list(exp.overrides), base=base)


def run_experiment(zoo: Zoo, exp: Experiment, seed: int, opd: OPDConfig, out: Path) -> dict:
    """Run (or load the cached result of) one experiment at one seed; returns its summary."""
    from ..train import Distiller

    rd = run_dir(out, exp, seed)
    done = rd / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    if rd.exists():  # an interrupted run: start it again from scratch
        import shutil

        shutil.rmtree(rd)
    console.print(f"[bold]study: {exp.name} seed {seed}: {exp.student} <- {exp.teacher}[/]")
    summary = Distiller(distill_config(zoo, exp, seed, opd, out)).run()
    result = summarise(read_metrics(rd), summary)
    result.update({"experiment": exp.name, "seed": seed, "student": exp.student, "teacher": exp.teacher})
    done.write_text(json.dumps(result, indent=1))
    return result


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.fmean(values) if values else None


# curves summarised as (mean of the first `window` training steps, mean of the last `window`)
SUMMARY_KEYS = ("diag/overlap_ratio", "diag/overlap_token_advantage", "diag/entropy_gap", "diag/overlap_mass_student",
                "diag/overlap_mass_teacher", "diag/reward_auroc", "opd/loss", "opd/reverse_kl", "optim/grad_norm",
                "diag/entropy_student", "rollout/accuracy")


def summarise(rows: list[dict], summary: dict, window: int = 5) -> dict:
    """Start/end values of one run's curves plus its before/after evaluation."""
    train = [r for r in rows if "opd/loss" in r]
    out: dict = {"steps": len(train), "wall_seconds": summary.get("wall_seconds")}
    for key in SUMMARY_KEYS:
        out[f"{key}@start"] = _mean(train[:window], key)
        out[f"{key}@end"] = _mean(train[-window:], key)
        out[f"{key}@mean"] = _mean(train, key)
    grad = [r["optim/grad_norm"] for r in train if "optim/grad_norm" in r]
    out["optim/grad_norm@max"] = max(grad) if grad else None
    for key in ("accuracy", "reverse_kl"):
        out[f"eval/{key}@before"] = summary.get(f"{key}_before")
        out[f"eval/{key}@after"] = summary.get(f"{key}_after")
    return out


def load_results(out: Path) -> dict[str, list[dict]]:
    """{experiment name: [summary per seed]} of every finished run under ``out``."""
    results: dict[str, list[dict]] = {}
    for path in sorted((out / "runs").glob("*/summary.json")):
        row = json.loads(path.read_text())
        results.setdefault(row["experiment"], []).append(row)
    return results


@dataclass
class Plan:
    experiments: list[Experiment] = field(default_factory=list)
    seeds: int = 3

    def runs(self) -> list[tuple[Experiment, int]]:
        return [(e, s) for e in self.experiments for s in range(self.seeds if e.key else 1)]
