"""Evidence for docs/vopd-and-prune.md on the study task (opdkit/study): vOPD and Prune-OPD against plain OPD.

    python scripts/vopd_prune_evidence.py zoo       OUT   # S0, T_new, T_B (the study's zoo, default settings)
    python scripts/vopd_prune_evidence.py variance  OUT   # gradient variance at equal batch size, S0 <- T_new
    python scripts/vopd_prune_evidence.py variance-real OUT [STUDY]  # the same on the real study's base <- rl
    python scripts/vopd_prune_evidence.py vopd      OUT   # training runs, 3 seeds (cached per run)
    python scripts/vopd_prune_evidence.py prune     OUT   # longer responses: none / downweight / truncate
    python scripts/vopd_prune_evidence.py timing    OUT   # interleaved step timing of the prune variants
    python scripts/vopd_prune_evidence.py timing-real OUT [STUDY]  # the same on the real long-response pair
    python scripts/vopd_prune_evidence.py report    OUT   # tables (stdout, OUT/tables.json) and figures

Every run is a ``Distiller`` run built by the study's ``distill_config``; results are cached like the study's.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from opdkit.study.experiments import Experiment, OPDConfig, distill_config, run_experiment
from opdkit.study.zoo import Zoo, ZooConfig

SEEDS = (0, 1, 2)
VOPD_STEPS = 100
VOPD_RUNS = {  # name -> overrides
    "sampled": ("objective.name=sampled",),
    "sampled_vopd": ("objective.name=sampled", "objective.baseline=vopd"),
    "top16_pg": ("objective.form=pg",),
    "top16_pg_vopd": ("objective.form=pg", "objective.baseline=vopd"),
    "top16_kl": (),  # Eq. 5, whose gradient top16_pg_vopd equals (tested): a check, seed 0 only
}
# Longer responses: the task's own responses stop after <= 23 tokens (deeper problems do not help: S0 answers a
# depth-8-12 chain after two steps), so rollouts are forced to 96-128 tokens with rollout.min_new_tokens. Every
# token after the answer is then off-distribution for both models: the drifted tail Prune-OPD is meant to cut.
LONG_TOKENS = 128
LONG = ("rollout.min_new_tokens=96",)
PRUNE_STEPS = 60
PRUNE_RUNS = {
    "none": LONG,
    "downweight": LONG + ("objective.prune=downweight", "objective.prune_threshold=0.5", "objective.prune_window=8"),
    "truncate": LONG + ("objective.prune=truncate", "objective.prune_threshold=0.5", "objective.prune_window=8"),
    # τ = 0.5 was set before any run and never fired (the k = 16 overlap sits at 0.57 at every position here); a
    # sensitivity check one 1/16 step above the mean, where it does fire:
    "truncate_t0.6": LONG + ("objective.prune=truncate", "objective.prune_threshold=0.6", "objective.prune_window=8"),
    "downweight_t0.6": LONG + ("objective.prune=downweight", "objective.prune_threshold=0.6",
                               "objective.prune_window=8"),
}


def zoo(out: Path) -> Zoo:
    return Zoo(out / "zoo", ZooConfig())


def cmd_zoo(out: Path) -> None:
    torch.set_num_threads(1)
    zoo(out).build(("S0", "T_new", "T_B"))


class GradientMoments:
    """Running Σg and Σ|g|² of flattened gradients: total variance Σ_params Var(g) without keeping every gradient
    (a 135M-parameter student's gradients are 0.5 GB each)."""

    def __init__(self):
        self.count, self.total, self.sq_norms = 0, None, []

    def add(self, g: torch.Tensor) -> None:
        g = g.double()
        self.total = g.clone() if self.total is None else self.total.add_(g)
        self.sq_norms.append(float(g.square().sum()))
        self.count += 1

    def stats(self) -> dict:
        mean = self.total / self.count
        mean_sq = statistics.fmean(self.sq_norms)
        # unbiased: Σ_p Var(g_p) = n/(n-1) (E|g|² - |E g|²)
        variance = (mean_sq - float(mean.square().sum())) * self.count / (self.count - 1)
        return {"total_variance": variance, "mean_grad_norm": float(mean.norm()), "mean_sq_norm": mean_sq}


def gradient_variance(d, batches: int, with_probe_ratio: bool) -> dict:
    """Gradients of ``batches`` independent step batches of the Distiller ``d``, with and without vOPD on the
    *same* rollouts (equal batch size); their total variances, ratio and mean-gradient cosine."""
    from opdkit import losses

    moments = {"none": GradientMoments(), "vopd": GradientMoments()}
    probe_ratio = []
    for r in range(batches):
        ro = d.rollout(d.sampler.next_batch(), 10_000 + r)
        scores = d.score(ro)
        for baseline, m in moments.items():
            d.cfg.objective.baseline = baseline
            _, d.step_batch = d.update(ro, scores, None)
            m.add(torch.cat([p.grad.flatten() for p in d.student.parameters() if p.grad is not None]))
            d.optimizer.zero_grad(set_to_none=True)
        if with_probe_ratio:
            b = d.step_batch
            on_student = b.candidates.student(b.student_logp_at)
            base = losses.vopd_baseline(on_student, scores.logp_at_student_topk,
                                        torch.ones_like(scores.logp_at_student_topk, dtype=torch.bool))
            probe_ratio.append(losses.pg_second_moment_ratio(b.student_logp_sampled, scores.sampled_logp, base,
                                                             on_student, ro.response_mask))
    stats = {baseline: m.stats() for baseline, m in moments.items()}
    none, vopd = moments["none"].total, moments["vopd"].total
    stats["variance_ratio"] = stats["vopd"]["total_variance"] / stats["none"]["total_variance"]
    stats["mean_cosine"] = float(torch.nn.functional.cosine_similarity(none, vopd, 0))
    stats["entropy_student"] = float((d.step_batch.student_entropy * ro.response_mask).sum() / ro.response_mask.sum())
    if probe_ratio:
        stats["logit_space_second_moment_ratio"] = statistics.fmean(probe_ratio)
    return stats


FORMS = (("sampled", ("objective.name=sampled",)), ("top16_pg", ("objective.form=pg",)))


def cmd_variance(out: Path, student: str | None = None, tag: str = "S0", batches: int = 24) -> None:
    """Gradient variance at S0 (or ``student``, a model directory) <- T_new, 16 prompts x 2 rollouts per batch;
    also the probe's logit-space second-moment ratio on the same rollouts."""
    from opdkit.train import Distiller

    torch.set_num_threads(1)
    z = zoo(out)
    rows = {}
    for form, overrides in FORMS:
        cfg = distill_config(z, Experiment(f"var_{form}", "S0", "T_new", overrides=overrides), 0, OPDConfig(),
                             out / "variance")
        if student:
            cfg.student.path = student
        rows[form] = gradient_variance(Distiller(cfg, log_to_disk=False), int(batches), form == "sampled")
        print(form, json.dumps(rows[form], indent=1))
    (out / f"variance_{tag}.json").write_text(json.dumps({"student": student or "S0", "batches": int(batches),
                                                          "batch_rows": 32, **rows}, indent=1))


def cmd_variance_real(out: Path, study: str = "/tmp/runs/real", batches: int = 12) -> None:
    """The same measurement on the real study's new-capability pair (SmolLM2-135M base <- its GRPO teacher,
    8 prompts x 2 rollouts per batch, the study's OPD settings); ``study`` is an ``opdkit study --real`` output
    whose zoo is built."""
    from opdkit.study.real import RealOPDConfig, RealZoo, RealZooConfig, real_distill_config
    from opdkit.train import Distiller

    real = RealZoo(Path(study) / "zoo", RealZooConfig())
    rows = {}
    for form, overrides in FORMS:
        cfg = real_distill_config(real, Experiment(f"var_{form}", "base", "rl", train="arith", eval="arith",
                                                   overrides=overrides), 0, RealOPDConfig(), out / "variance_real")
        rows[form] = gradient_variance(Distiller(cfg, log_to_disk=False), int(batches), form == "sampled")
        print(form, json.dumps(rows[form], indent=1))
    out.mkdir(parents=True, exist_ok=True)
    (out / "variance_real.json").write_text(json.dumps({"student": "base", "teacher": "rl", "batches": int(batches),
                                                        "batch_rows": 16, **rows}, indent=1))


def cmd_vopd(out: Path, only: str | None = None, seeds: str | None = None) -> None:
    torch.set_num_threads(1)
    z = zoo(out)
    opd = OPDConfig(steps=VOPD_STEPS, eval_every=0)
    for name, overrides in VOPD_RUNS.items():
        if only and name != only:
            continue
        for seed in (SEEDS if seeds is None else [int(x) for x in seeds.split(",")]):
            run_experiment(z, Experiment(name, "S0", "T_new", overrides=overrides), seed, opd, out / "vopd")


def cmd_prune(out: Path, only: str | None = None, seeds: str | None = None) -> None:
    torch.set_num_threads(1)
    z = zoo(out)
    opd = OPDConfig(steps=PRUNE_STEPS, max_new_tokens=LONG_TOKENS, eval_every=0, eval_prompts=64)
    for name, overrides in PRUNE_RUNS.items():
        if only and name != only:
            continue
        for seed in (SEEDS if seeds is None else [int(x) for x in seeds.split(",")]):
            exp = Experiment(f"prune_{name}", "S0", "T_new", overrides=overrides)
            run_experiment(z, exp, seed, opd, out / "prune")


def interleaved_timing(ds: dict, reps: int) -> dict:
    """Per-phase median step times and tokens of each named Distiller in ``ds``, stepping them in turn (so the
    shared CPU's load drifts alike over all); ``step_time_vs_none`` is against the first."""
    rows: dict = {n: [] for n in ds}
    for step in range(1, reps + 1):
        for n, d in ds.items():
            m, _ = d.opd_step(step)
            rows[n].append(m)
    result = {}
    for n, ms in rows.items():
        result[n] = {k: statistics.median(m[k] for m in ms) for k in
                     ("time/step", "time/rollout", "time/teacher", "time/train", "rollout/tokens", "rollout/len_max")}
        result[n]["generated_tokens"] = statistics.median(m.get("prune/generated_tokens", m["rollout/tokens"])
                                                          for m in ms)
        result[n]["step_times"] = [m["time/step"] for m in ms]
    first = next(iter(ds))
    for n in ds:
        result[n]["step_time_vs_none"] = result[n]["time/step"] / result[first]["time/step"]
    return result


def cmd_timing(out: Path, reps: int = 6) -> None:
    """Step time with and without Prune-OPD, interleaved step by step so that the shared CPU's load drifts alike
    over all variants; reports per-phase medians and tokens."""
    from opdkit.train import Distiller

    torch.set_num_threads(1)
    z = zoo(out)
    opd = OPDConfig(steps=reps, max_new_tokens=LONG_TOKENS, eval_every=0, eval_prompts=0)
    names = ("none", "truncate", "truncate_t0.6", "downweight_t0.6")
    ds = {n: Distiller(distill_config(z, Experiment(f"timing_{n}", "S0", "T_new", overrides=PRUNE_RUNS[n]), 0, opd,
                                      out / "timing"), log_to_disk=False) for n in names}
    result = interleaved_timing(ds, int(reps))
    (out / "timing.json").write_text(json.dumps({"reps": reps, **result}, indent=1))
    print(json.dumps(result, indent=1))


def cmd_timing_real(out: Path, study: str = "/tmp/runs/real", reps: int = 4) -> None:
    """Step time of the real long-response pair (pruned SmolLM2 <- SmolLM2, DAPO-Math, up to 384 tokens) without
    pruning and with Prune-OPD truncate at threshold 0.7, stepping in turn so that load drifts alike over both."""
    from opdkit.study.real import REAL_EXTRAS, REAL_EXPERIMENTS, RealOPDConfig, RealZoo, RealZooConfig, \
        real_distill_config
    from opdkit.train import Distiller

    real = RealZoo(Path(study) / "zoo", RealZooConfig())
    exps = {e.name: e for e in REAL_EXPERIMENTS + REAL_EXTRAS}
    names = ("long_responses", "long_prune_truncate_t07")
    opd = RealOPDConfig(long_steps=int(reps))
    ds = {n: Distiller(real_distill_config(real, exps[n], 0, opd, out / "timing_real"), log_to_disk=False)
          for n in names}
    result = interleaved_timing(ds, int(reps))
    out.mkdir(parents=True, exist_ok=True)
    (out / "timing_real.json").write_text(json.dumps({"reps": int(reps), **result}, indent=1))
    print(json.dumps(result, indent=1))


def _metrics(run: Path) -> list[dict]:
    from opdkit.tracking import read_metrics

    return [r for r in read_metrics(run) if "opd/loss" in r]


def _ms(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def cmd_report(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables: dict = {}
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    tables["variance"] = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("variance_*.json"))}
    # vOPD runs
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    rows = []
    for i, name in enumerate(VOPD_RUNS):
        summ = [json.loads(p.read_text()) for p in sorted((out / "vopd" / "runs").glob(f"{name}_s*/summary.json"))]
        if not summ:
            continue
        row = {"run": name, "seeds": len(summ),
               "acc_before": _ms([s["eval/accuracy@before"] for s in summ]),
               "acc_after": _ms([s["eval/accuracy@after"] for s in summ]),
               "rkl_before": _ms([s["eval/reverse_kl@before"] for s in summ]),
               "rkl_after": _ms([s["eval/reverse_kl@after"] for s in summ]),
               "entropy_end": _ms([s["diag/entropy_student@end"] for s in summ]),
               "grad_norm_mean": _ms([s["optim/grad_norm@mean"] for s in summ]),
               "seconds": _ms([s["wall_seconds"] for s in summ])}
        rows.append(row)
        ax = axes[0] if name.startswith("sampled") else axes[1]
        for s in range(len(summ)):
            m = _metrics(out / "vopd" / "runs" / f"{name}_s{s}")
            ax.plot([r["step"] for r in m], [r["diag/entropy_student"] for r in m], color=f"C{i}", alpha=0.8,
                    label=name if s == 0 else None)
    for ax, title in zip(axes, ("sampled-token OPD", "top-16 policy-gradient form")):
        ax.set(title=title, xlabel="step", ylabel="student entropy (nats/token)", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(figs / "vopd_entropy.png", dpi=90)
    tables["vopd"] = rows
    # Prune-OPD runs
    prow = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, name in enumerate(PRUNE_RUNS):
        dirs = sorted((out / "prune" / "runs").glob(f"prune_{name}_s*"))
        summ = [json.loads((d / "summary.json").read_text()) for d in dirs if (d / "summary.json").is_file()]
        if not summ:
            continue
        per = [_metrics(d) for d in dirs]
        teacher_tok = [statistics.fmean(r.get("prune/generated_tokens", r["rollout/tokens"]) for r in m) for m in per]
        train_tok = [statistics.fmean(r["rollout/tokens"] for r in m) for m in per]
        step_s = [statistics.median(r["time/step"] for r in m) for m in per]
        prow.append({"run": name, "seeds": len(summ),
                     "acc_before": _ms([s["eval/accuracy@before"] for s in summ]),
                     "acc_after": _ms([s["eval/accuracy@after"] for s in summ]),
                     "rkl_after": _ms([s["eval/reverse_kl@after"] for s in summ]),
                     "student_decode_tokens_per_step": _ms(teacher_tok), "teacher_tokens_per_step": _ms(teacher_tok),
                     "train_tokens_per_step": _ms(train_tok), "seconds_per_step_median": _ms(step_s),
                     "rollout_s": _ms([statistics.median(r["time/rollout"] for r in m) for m in per]),
                     "teacher_s": _ms([statistics.median(r["time/teacher"] for r in m) for m in per]),
                     "train_s": _ms([statistics.median(r["time/train"] for r in m) for m in per]),
                     "wall_seconds": _ms([s["wall_seconds"] for s in summ]),
                     "pruned_frac": _ms([statistics.fmean(r.get("prune/pruned_frac", 0.0) for r in m) for m in per]),
                     "drift_frac": _ms([statistics.fmean(r.get("prune/drift_frac", 0.0) for r in m) for m in per])})
        m = per[0]
        axes[0].plot([r["step"] for r in m], [r.get("prune/generated_tokens", r["rollout/tokens"]) for r in m],
                     color=f"C{i}", label=name)
        axes[1].plot([r["step"] for r in m], [r["time/step"] for r in m], color=f"C{i}", label=name)
    axes[0].set(title="teacher-scored tokens per step (seed 0)", xlabel="step")
    axes[1].set(title="seconds per step (seed 0, shared CPU)", xlabel="step")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(figs / "prune_tokens.png", dpi=90)
    tables["prune"] = prow
    if (out / "timing.json").is_file():
        tables["timing"] = json.loads((out / "timing.json").read_text())
    (out / "tables.json").write_text(json.dumps(tables, indent=1))
    (out / "tables.md").write_text(markdown(tables))
    print(json.dumps(tables, indent=1))


def _table(rows: list[dict], columns: dict[str, str]) -> str:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown(tables: dict) -> str:
    parts = [_table(tables.get("vopd", []), {"run": "run", "seeds": "seeds", "acc_after": "accuracy after",
                                             "rkl_after": "reverse KL after", "entropy_end": "student entropy, last 5 steps",
                                             "grad_norm_mean": "mean grad norm", "seconds": "wall s"}),
             _table(tables.get("prune", []), {"run": "run", "seeds": "seeds", "acc_after": "accuracy after",
                                              "rkl_after": "reverse KL after", "drift_frac": "rows drifted",
                                              "teacher_tokens_per_step": "student-sampled = teacher-scored tokens/step",
                                              "train_tokens_per_step": "trained tokens/step",
                                              "pruned_frac": "pruned share", "seconds_per_step_median": "s/step (median)"})]
    timing = tables.get("timing")
    if timing:
        rows = [{"run": n, **{k: f"{v:.3g}" for k, v in t.items()}} for n, t in timing.items() if n != "reps"]
        parts.append(_table(rows, {"run": "run", "time/step": "s/step", "step_time_vs_none": "vs none",
                                   "time/rollout": "rollout s", "time/teacher": "teacher s", "time/train": "train s",
                                   "generated_tokens": "sampled tokens", "rollout/tokens": "trained tokens",
                                   "rollout/len_max": "decode steps"}))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    command, where = sys.argv[1], Path(sys.argv[2])
    started = time.perf_counter()
    {"zoo": cmd_zoo, "variance": cmd_variance, "variance-real": cmd_variance_real, "timing-real": cmd_timing_real,
     "vopd": cmd_vopd, "prune": cmd_prune, "timing": cmd_timing, "report": cmd_report}[command](where, *sys.argv[3:])
    print(f"{command}: {time.perf_counter() - started:.0f} s")
