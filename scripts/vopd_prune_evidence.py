"""Evidence for docs/vopd-and-prune.md on the study task (opdkit/study): vOPD and Prune-OPD against plain OPD.

    python scripts/vopd_prune_evidence.py zoo       OUT   # S0, T_new, T_B (the study's zoo, default settings)
    python scripts/vopd_prune_evidence.py variance  OUT   # gradient variance at equal batch size, S0 <- T_new
    python scripts/vopd_prune_evidence.py vopd      OUT   # training runs, 3 seeds (cached per run)
    python scripts/vopd_prune_evidence.py prune     OUT   # longer responses: none / downweight / truncate
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

from opdkit.study import task
from opdkit.study.experiments import Experiment, OPDConfig, distill_config, run_experiment
from opdkit.recipes.common import write_rows
from opdkit.study.zoo import Zoo, ZooConfig

SEEDS = (0, 1, 2)
VOPD_STEPS = 150
VOPD_RUNS = {  # name -> overrides
    "sampled": ("objective.name=sampled",),
    "sampled_vopd": ("objective.name=sampled", "objective.baseline=vopd"),
    "top16_pg": ("objective.form=pg",),
    "top16_pg_vopd": ("objective.form=pg", "objective.baseline=vopd"),
}
# Longer responses: problems of depth 8-12 (the zoo trains at depth 1-3), so responses run ~50-80 tokens and both
# models drift off the chains they know; max 128 new tokens.
LONG_DEPTH = (8, 12)
LONG_TOKENS = 128
PRUNE_STEPS = 60
PRUNE_RUNS = {
    "none": (),
    "downweight": ("objective.prune=downweight", "objective.prune_threshold=0.5", "objective.prune_window=8"),
    "truncate": ("objective.prune=truncate", "objective.prune_threshold=0.5", "objective.prune_window=8"),
}


def zoo(out: Path) -> Zoo:
    return Zoo(out / "zoo", ZooConfig())


def cmd_zoo(out: Path) -> None:
    torch.set_num_threads(1)
    zoo(out).build(("S0", "T_new", "T_B"))


def long_data(z: Zoo) -> None:
    if z.data("train_long_quiz").is_file():
        return
    held = task.make_problems(64, ops=("up", "down"), depth=LONG_DEPTH, seed=9001)
    write_rows(z.data("eval_long_quiz"), [task.prompt_row(p, "quiz") for p in held])
    train = task.make_problems(1000, ops=("up", "down"), depth=LONG_DEPTH, seed=9002, exclude={p.key for p in held})
    write_rows(z.data("train_long_quiz"), [task.prompt_row(p, "quiz") for p in train])


def cmd_variance(out: Path, batches: int = 24) -> None:
    """Gradients of R independent step batches (16 prompts x 2 rollouts) at S0, each objective with and without
    vOPD on the *same* rollouts; total variance = Σ_params Var_R(g)."""
    from opdkit.train import Distiller

    torch.set_num_threads(1)
    z = zoo(out)
    rows = {}
    for form, overrides in (("sampled", ("objective.name=sampled",)), ("top16_pg", ("objective.form=pg",))):
        exp = Experiment(f"var_{form}", "S0", "T_new", overrides=overrides)
        cfg = distill_config(z, exp, 0, OPDConfig(), out / "variance")
        d = Distiller(cfg, log_to_disk=False)
        grads = {"none": [], "vopd": []}
        for r in range(batches):
            ro = d.rollout(d.sampler.next_batch(), 10_000 + r)
            scores = d.score(ro)
            for baseline in grads:
                d.cfg.objective.baseline = baseline
                d.update(ro, scores, None)
                grads[baseline].append(torch.cat([p.grad.flatten() for p in d.student.parameters()]))
                d.optimizer.zero_grad(set_to_none=True)
        stats = {}
        for baseline, gs in grads.items():
            g = torch.stack(gs)
            mean = g.mean(0)
            stats[baseline] = {"total_variance": float(g.var(0).sum()), "mean_grad_norm": float(mean.norm()),
                               "mean_sq_norm": float(g.square().sum(1).mean())}
        cos = torch.nn.functional.cosine_similarity(torch.stack(grads["none"]).mean(0),
                                                    torch.stack(grads["vopd"]).mean(0), 0)
        stats["variance_ratio"] = stats["vopd"]["total_variance"] / stats["none"]["total_variance"]
        stats["mean_cosine"] = float(cos)
        rows[form] = stats
        print(form, json.dumps(stats, indent=1))
    (out / "variance.json").write_text(json.dumps({"batches": batches, "batch_rows": 32, **rows}, indent=1))


def cmd_vopd(out: Path, only: str | None = None) -> None:
    torch.set_num_threads(1)
    z = zoo(out)
    opd = OPDConfig(steps=VOPD_STEPS)
    for name, overrides in VOPD_RUNS.items():
        if only and name != only:
            continue
        for seed in SEEDS:
            run_experiment(z, Experiment(name, "S0", "T_new", overrides=overrides), seed, opd, out / "vopd")


def cmd_prune(out: Path, only: str | None = None) -> None:
    torch.set_num_threads(1)
    z = zoo(out)
    long_data(z)
    opd = OPDConfig(steps=PRUNE_STEPS, max_new_tokens=LONG_TOKENS, eval_every=0, eval_prompts=64)
    for name, overrides in PRUNE_RUNS.items():
        if only and name != only:
            continue
        for seed in SEEDS:
            exp = Experiment(f"prune_{name}", "S0", "T_new", train="long_quiz", eval="long_quiz", overrides=overrides)
            run_experiment(z, exp, seed, opd, out / "prune")


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
    if (out / "variance.json").is_file():
        tables["variance"] = json.loads((out / "variance.json").read_text())
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
    (out / "tables.json").write_text(json.dumps(tables, indent=1))
    print(json.dumps(tables, indent=1))


if __name__ == "__main__":
    command, where = sys.argv[1], Path(sys.argv[2])
    started = time.perf_counter()
    {"zoo": cmd_zoo, "variance": cmd_variance, "vopd": cmd_vopd, "prune": cmd_prune,
     "report": cmd_report}[command](where, *sys.argv[3:])
    print(f"{command}: {time.perf_counter() - started:.0f} s")
