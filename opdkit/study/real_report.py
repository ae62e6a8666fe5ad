"""The real study's report: one row per claim (ours, mean ± std over seeds | holds / partly / does not hold), the
zoo, the probe-vs-outcome table and figures, from the cached run summaries, zoo cards and probe results.

``real_claims(results, cards, probes)`` is pure (numbers in, rows out), so the verdict logic is tested on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..plots import plot_curves
from ..tracking import read_metrics
from .real import REAL_EXPERIMENTS, REAL_EXTRAS
from .report import Results, _lt, fmt, gap_recovery, mean

# An OPD run "worked" (the student got better at the task) when held-out greedy accuracy rose by this much.
SUCCESS_GAIN = 0.05


def teacher_accuracy(exp_name: str, cards: dict) -> float | None:
    """Greedy held-out accuracy of an experiment's teacher (the same-pipeline teacher is ``base`` itself)."""
    exp = next(e for e in REAL_EXPERIMENTS + REAL_EXTRAS if e.name == exp_name)
    return cards.get(exp.teacher, {}).get("greedy_accuracy")


def add_derived(results: Results, cards: dict) -> None:
    """Each run's accuracy gain, its teacher's accuracy and its gap recovery (paper §3.2)."""
    for name, rows in results.items():
        teacher = teacher_accuracy(name, cards)
        for r in rows:
            before, after = r.get("eval/accuracy@before"), r.get("eval/accuracy@after")
            if before is None or after is None:
                continue
            r["accuracy_gain"] = after - before
            if teacher is not None:
                r["teacher_accuracy"] = teacher
                r["gap_recovery"] = gap_recovery(before, after, teacher)


def verdict(*conditions: bool | None) -> str:
    if any(c is None for c in conditions):
        return "not run"
    return "holds" if all(conditions) else ("partly" if any(conditions) else "does not hold")


def _gain(r: Results, e: str) -> float | None:
    return mean(r, e, "accuracy_gain")


def _new_capability(r: Results, cards: dict, probes: dict) -> tuple[str, str]:
    e = "new_capability"
    ours = (f"accuracy {fmt(r, e, 'eval/accuracy@before', 3)} → {fmt(r, e, 'eval/accuracy@after', 3)} (teacher "
            f"{fmt(r, e, 'teacher_accuracy', 3)}): gap recovered {fmt(r, e, 'gap_recovery', 2)}; per step: overlap "
            f"{fmt(r, e, 'diag/overlap_ratio@start', 3)} → {fmt(r, e, 'diag/overlap_ratio@end', 3)}, overlap-token "
            f"advantage {fmt(r, e, 'diag/overlap_token_advantage@start', 3)} → "
            f"{fmt(r, e, 'diag/overlap_token_advantage@end', 3)}, entropy gap {fmt(r, e, 'diag/entropy_gap@start', 3)}"
            f" → {fmt(r, e, 'diag/entropy_gap@end', 3)}, overlap mass (student) "
            f"{fmt(r, e, 'diag/overlap_mass_student@start', 3)} → {fmt(r, e, 'diag/overlap_mass_student@end', 3)}; "
            f"held-out reverse KL {fmt(r, e, 'eval/reverse_kl@before', 3)} → {fmt(r, e, 'eval/reverse_kl@after', 3)}")
    rec = mean(r, e, "gap_recovery")
    adv0, adv1 = mean(r, e, "diag/overlap_token_advantage@start"), mean(r, e, "diag/overlap_token_advantage@end")
    return ours, verdict(None if rec is None else rec >= 0.5,
                         None if adv0 is None else abs(adv1) < abs(adv0),
                         _lt(mean(r, e, "eval/reverse_kl@after"), mean(r, e, "eval/reverse_kl@before")))


def _same_pipeline(r: Results, cards: dict, probes: dict) -> tuple[str, str]:
    a, b = "new_capability", "same_pipeline"
    base = cards.get("base", {})
    hot, cold = base.get("sampled_accuracy_T1.0"), base.get("sampled_accuracy_T0.5")
    probe = probes.get(b, {}).get("verdict")
    ga, gb = _gain(r, a), _gain(r, b)
    ours = (f"teacher = base at T = 0.5: sampled avg@4 {_f(cold)} vs the student's {_f(hot)} at T = 1 (a higher "
            f"score, same greedy answers); accuracy gain {_f(gb, '+.3f')} vs {_f(ga, '+.3f')} from the RL teacher; "
            f"probe verdict before training: {probe or 'not run'}")
    higher = None if hot is None or cold is None else cold > hot
    little = None if ga is None or gb is None else gb < 0.5 * ga
    predicted = None if probe is None else probe != "distill"
    return ours, verdict(higher, little, predicted)


def _reverse(r: Results, cards: dict, probes: dict) -> tuple[str, str]:
    e = "reverse"
    base, rl = cards.get("base", {}).get("greedy_accuracy"), cards.get("rl", {}).get("greedy_accuracy")
    after = mean(r, e, "eval/accuracy@after")
    ours = (f"RL student {fmt(r, e, 'eval/accuracy@before', 3)} → {fmt(r, e, 'eval/accuracy@after', 3)} after OPD from "
            f"the base model ({_f(base)})")
    if None in (base, rl, after):
        return ours, "not run"
    gain = rl - base
    if gain <= 0.02:
        return ours + "; no RL gain to erase", "not run"
    kept = (after - base) / gain
    return ours + f"; {kept:.0%} of the RL gain kept", verdict(kept < 0.5)


def _pattern(r: Results, cards: dict, probes: dict) -> tuple[str, str]:
    a, b, c = "new_capability", "pattern_B", "cold_start_B"
    t_a, t_b = cards.get("rl", {}).get("greedy_accuracy"), cards.get("rl_B", {}).get("greedy_accuracy")
    ours = (f"teacher accuracy {_f(t_b)} (pattern B) vs {_f(t_a)} (A); initial overlap "
            f"{fmt(r, b, 'diag/overlap_ratio@start', 3)} vs {fmt(r, a, 'diag/overlap_ratio@start', 3)}; accuracy "
            f"gain {_f(_gain(r, b), '+.3f')} vs {_f(_gain(r, a), '+.3f')}; after the cold start (SFT on "
            f"{cards.get('base_coldB', {}).get('rollouts_accepted', '?')} filtered pattern-B rollouts): initial overlap "
            f"{fmt(r, c, 'diag/overlap_ratio@start', 3)}, accuracy {fmt(r, c, 'eval/accuracy@before', 3)} → "
            f"{fmt(r, c, 'eval/accuracy@after', 3)} vs {fmt(r, b, 'eval/accuracy@after', 3)} without it")
    equal = None if t_a is None or t_b is None else abs(t_a - t_b) <= 0.1
    less = _lt(_gain(r, b), _gain(r, a))
    recovers = _lt(mean(r, b, "eval/accuracy@after"), mean(r, c, "eval/accuracy@after"))
    return ours, verdict(equal, less, _lt(mean(r, b, "diag/overlap_ratio@start"), mean(r, a, "diag/overlap_ratio@start")),
                         recovers)


def _template(r: Results, cards: dict, probes: dict) -> tuple[str, str]:
    a, b = "new_capability", "template_foreign"
    ours = (f"same RL teacher, prompt re-rendered in an Alpaca template: initial overlap "
            f"{fmt(r, b, 'diag/overlap_ratio@start', 3)} vs {fmt(r, a, 'diag/overlap_ratio@start', 3)} (own template); "
            f"accuracy gain {_f(_gain(r, b), '+.3f')} vs {_f(_gain(r, a), '+.3f')}; probe: "
            f"{probes.get(b, {}).get('verdict', 'not run')}")
    return ours, verdict(_lt(mean(r, b, "diag/overlap_ratio@start"), mean(r, a, "diag/overlap_ratio@start")),
                         _lt(_gain(r, b), _gain(r, a)))


def _long(r: Results, cards: dict, probes: dict) -> tuple[str, str]:
    e, p = "long_responses", "long_prune_truncate"
    q = {i: mean(r, e, f"diag/pos_q{i}/overlap_ratio@start") for i in (1, 4)}
    kl = {(i, t): mean(r, e, f"diag/pos_q{i}/reverse_kl@{t}") for i in (1, 4) for t in ("start", "end")}
    ours = (f"{fmt(r, e, 'rollout/len_mean@mean', 0)}-token responses (DAPO-Math, max 384): overlap first quarter "
            f"{_f(q[1])} vs last {_f(q[4])}; per-token reverse KL q1 {_f(kl[1, 'start'])} → {_f(kl[1, 'end'])}, "
            f"q4 {_f(kl[4, 'start'])} → {_f(kl[4, 'end'])}; Prune-OPD truncate: "
            f"{fmt(r, p, 'seconds_per_step', 1)} vs {fmt(r, e, 'seconds_per_step', 1)} s/step, "
            f"{fmt(r, p, 'rollout/tokens@sum', 0)} vs {fmt(r, e, 'rollout/tokens@sum', 0)} trained tokens, pruned fraction "
            f"{fmt(r, p, 'prune/pruned_frac@mean', 3)} (threshold 0.5: it prunes only where the overlap stays below it)")
    if None in (q[1], q[4], kl[1, "start"], kl[4, "start"], kl[1, "end"], kl[4, "end"]):
        return ours, "not run"
    drop1 = (kl[1, "start"] - kl[1, "end"]) / kl[1, "start"]
    drop4 = (kl[4, "start"] - kl[4, "end"]) / kl[4, "start"]
    return ours + f" (KL falls {drop1:.0%} early vs {drop4:.0%} late)", verdict(q[4] < q[1], drop4 < drop1)


def _vopd(r: Results, cards: dict, probes: dict) -> tuple[str, str]:
    """Each policy-gradient form run with and without the vOPD baseline: held-out KL and gradient norm."""
    ours, outcomes = [], []
    for label, a, b in (("top-16 policy-gradient form", "pg_topk", "pg_topk_vopd"),
                        ("sampled-token form", "sampled", "sampled_vopd")):
        if a not in r and b not in r:
            continue
        ours.append(f"{label} without / with the vOPD baseline: accuracy gain {_f(_gain(r, a), '+.3f')} / "
                    f"{_f(_gain(r, b), '+.3f')}; held-out reverse KL after {fmt(r, a, 'eval/reverse_kl@after', 3)} / "
                    f"{fmt(r, b, 'eval/reverse_kl@after', 3)}; student entropy at the end "
                    f"{fmt(r, a, 'diag/entropy_student@end', 3)} / {fmt(r, b, 'diag/entropy_student@end', 3)}; mean "
                    f"grad norm {fmt(r, a, 'optim/grad_norm@mean', 2)} / {fmt(r, b, 'optim/grad_norm@mean', 2)}")
        outcomes += [_lt(mean(r, b, "eval/reverse_kl@after"), mean(r, a, "eval/reverse_kl@after")),
                     _lt(mean(r, b, "optim/grad_norm@mean"), mean(r, a, "optim/grad_norm@mean"))]
    return "; ".join(ours), verdict(*outcomes)


def _prune(r: Results, cards: dict, probes: dict) -> tuple[str, str]:
    """Prune-OPD truncate where it fires, against no pruning on the same long responses (arXiv 2605.07804)."""
    none = "long_responses"
    ours, outcomes = [], []
    for name in ("long_prune_truncate_t06", "long_prune_truncate_t07"):
        if name not in r:
            continue
        ours.append(
            f"threshold {name[-2]}.{name[-1]}: pruned share {fmt(r, name, 'prune/pruned_frac@mean', 3)}, "
            f"sampled tokens/step {fmt(r, name, 'prune/generated_tokens@mean', 0)}, trained "
            f"{fmt(r, name, 'prune/kept_tokens@mean', 0)} vs {fmt(r, none, 'rollout/tokens@mean', 0)} without; "
            f"s/step {fmt(r, name, 'seconds_per_step', 1)} vs {fmt(r, none, 'seconds_per_step', 1)}; held-out "
            f"reverse KL after {fmt(r, name, 'eval/reverse_kl@after', 3)} vs {fmt(r, none, 'eval/reverse_kl@after', 3)}")
        if not max(mean(r, name, "prune/drift_frac@mean") or 0, mean(r, name, "prune/pruned_frac@mean") or 0):
            ours[-1] += " (never fired: no row drifted, so it is plain OPD plus the streamed teacher)"
            continue
        kl, kl0 = mean(r, name, "eval/reverse_kl@after"), mean(r, none, "eval/reverse_kl@after")
        # "saves time at equal quality": faster per step, held-out KL no more than 5 % above no pruning
        outcomes += [_lt(mean(r, name, "seconds_per_step"), mean(r, none, "seconds_per_step")),
                     None if None in (kl, kl0) else kl <= 1.05 * kl0]
    return "; ".join(ours) or "not run", verdict(*outcomes) if outcomes else "not run"


def _f(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


REAL_CLAIMS = [
    ("new capability: OPD from an RL-improved teacher recovers most of the gap, with the successful-OPD signature",
     _new_capability),
    ("same pipeline: a higher-scoring teacher without new capability transfers little, and the probe predicts it",
     _same_pipeline),
    ("reverse distillation: OPD from the base model into the RL-improved one erases the RL gain", _reverse),
    ("thinking-pattern mismatch: an equally accurate teacher in another pattern transfers less; the off-policy "
     "cold start recovers part", _pattern),
    ("teacher-aligned template: the same teacher under a foreign template teaches less", _template),
    ("long responses: the dense token signal degrades with depth (paper §6)", _long),
]


EXTRA_CLAIMS = [
    (("pg_topk", "pg_topk_vopd", "sampled", "sampled_vopd"), "vOPD (arXiv 2605.07865): the baseline lowers the "
     "policy-gradient forms' gradient norm and held-out KL", _vopd),
    (("long_prune_truncate_t06", "long_prune_truncate_t07"), "Prune-OPD truncate (arXiv 2605.07804): stopping "
     "drifted rows saves time at equal held-out KL", _prune),
]


def real_claims(results: Results, cards: dict, probes: dict) -> list[dict]:
    rows = []
    extras = [(claim, fn) for names, claim, fn in EXTRA_CLAIMS if any(name in results for name in names)]
    for claim, fn in REAL_CLAIMS + extras:
        ours, holds = fn(results, cards, probes)
        rows.append({"claim": claim, "ours": ours, "holds": holds})
    return rows


def probe_table(results: Results, probes: dict) -> list[dict]:
    """The probe's verdict on each pair before training against the outcome of its OPD runs."""
    rows = []
    for name, probe in probes.items():
        gain = _gain(results, name)
        if not probe or gain is None:
            continue
        predicted = probe.get("verdict") == "distill"
        worked = gain >= SUCCESS_GAIN
        rows.append({"experiment": name, "verdict": probe.get("verdict"), "issues": probe.get("issues"),
                     "predicted_success": predicted, "accuracy_gain": gain, "worked": worked,
                     "correct": predicted == worked})
    return rows


def position_figure(results: Results, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = "long_responses"
    if e not in results:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key in zip(axes, ("overlap_ratio", "reverse_kl")):
        for tag, style in (("start", "o-"), ("end", "s--")):
            ys = [mean(results, e, f"diag/pos_q{q}/{key}@{tag}") for q in range(1, 5)]
            ax.plot([1, 2, 3, 4], [float("nan") if y is None else y for y in ys], style, label=f"{tag} of training")
        ax.set_xticks([1, 2, 3, 4], ["q1", "q2", "q3", "q4"])
        ax.set_xlabel("quarter of the response (position)")
        ax.set_title(key.replace("_", " "))
        ax.legend()
    fig.suptitle("long responses: per-position diagnostics (pruned SmolLM2 <- SmolLM2, DAPO-Math)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


CURVES = {
    "signature": (["new_capability", "same_pipeline", "pattern_B", "template_foreign"],
                  ["diag/overlap_ratio", "diag/overlap_token_advantage", "diag/entropy_gap",
                   "diag/overlap_mass_student", "opd/reverse_kl", "optim/grad_norm"]),
    "recovery": (["pattern_B", "cold_start_B", "reverse"],
                 ["diag/overlap_ratio", "diag/entropy_gap", "opd/reverse_kl", "rollout/len_mean"]),
}


# Per-step means the report reads that runs summarised before they were recorded are filled in from metrics.jsonl.
STEP_MEANS = ("rollout/tokens", "prune/generated_tokens", "prune/kept_tokens", "prune/drift_frac", "time/rollout", "time/teacher",
              "time/train")


def load_real_results(out: Path) -> Results:
    results: Results = {}
    for path in sorted((out / "runs").glob("*/summary.json")):
        row = json.loads(path.read_text())
        missing = [k for k in STEP_MEANS if f"{k}@mean" not in row]
        if missing:
            steps = [m for m in read_metrics(path.parent) if "opd/loss" in m]
            for key in missing:
                values = [m[key] for m in steps if isinstance(m.get(key), (int, float))]
                row[f"{key}@mean"] = sum(values) / len(values) if values else None
        results.setdefault(row["experiment"], []).append(row)
    return results


def write_real_report(out: str | Path) -> Path:
    out = Path(out)
    results = load_real_results(out)
    cards = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "zoo").glob("*/card.json"))}
    probes = {p.stem: json.loads(p.read_text()) for p in sorted((out / "probes").glob("*.json"))}
    add_derived(results, cards)
    rows, table = real_claims(results, cards, probes), probe_table(results, probes)
    figs = []
    for name, (exps, keys) in CURVES.items():
        runs = {e: read_metrics(out / "runs" / f"{e}_s0") for e in exps}
        runs = {e: v for e, v in runs.items() if v}
        if runs:
            figs.append(plot_curves(runs, keys, out / "figures" / f"real_{name}.png", title=f"real study: {name}"))
    pos = position_figure(results, out / "figures" / "real_positions.png")
    figs += [pos] if pos else []
    timing = json.loads((out / "timing.json").read_text())[-1] if (out / "timing.json").is_file() else {}
    (out / "results.json").write_text(json.dumps({"claims": rows, "probe_vs_outcome": table, "zoo": cards,
                                                  "probes": probes, "runs": results, "timing": timing}, indent=1))
    lines = ["# opdkit real study report", "", "| claim | ours (mean ± std over seeds) | verdict |", "|---|---|---|"]
    lines += [f"| {r['claim']} | {r['ours']} | {r['holds']} |" for r in rows]
    lines += ["", "## Zoo", "", "| model | recipe | greedy accuracy | answered | response length |", "|---|---|---|---|---|"]
    for name, c in cards.items():
        lines.append(f"| {name} | {c.get('recipe')} | {_f(c.get('greedy_accuracy'))} | {_f(c.get('answered'))} | "
                     f"{_f(c.get('response_len'), '.1f')} |")
    lines += ["", f"## Probe vs outcome (worked = held-out accuracy +{SUCCESS_GAIN:.0%} or more)", "",
              "| experiment | probe verdict | predicted | accuracy gain | worked | probe right? |", "|---|---|---|---|---|---|"]
    lines += [f"| {t['experiment']} | {t['verdict']} | {'works' if t['predicted_success'] else 'fails'} | "
              f"{t['accuracy_gain']:+.3f} | {'yes' if t['worked'] else 'no'} | {'yes' if t['correct'] else 'no'} |"
              for t in table]
    if table:
        right = sum(t["correct"] for t in table)
        lines += ["", f"The probe was right on {right} of {len(table)} pairs."]
    machine = timing.get("machine", {})
    built = sum(c.get("build_seconds", 0) for c in cards.values())
    runs = sum(r.get("wall_seconds") or 0 for rows_ in results.values() for r in rows_)
    probe_s = sum(p.get("seconds") or 0 for p in probes.values())
    lines += ["", f"Compute: zoo {built / 60:.1f} min (sum of the members' build times), probes {probe_s / 60:.1f} min, "
              f"OPD runs {runs / 60:.1f} min: {(built + probe_s + runs) / 60:.1f} min in all on "
              f"{machine.get('cpu_model', '?')} ({machine.get('cpu_capability', '?')}, {machine.get('cores', '?')} cores, "
              f"auto dtype {machine.get('auto_dtype', '?')}); the last invocation took "
              f"{timing.get('total_seconds', float('nan')) / 60:.1f} min (cached members and runs are not redone).",
              "", "## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figs]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
