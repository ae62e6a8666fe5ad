"""The real-model study (issue 11): pattern rewriting, the zoo's dependencies, the claim verdicts and the probe
table on hand-made numbers, and the quick end-to-end run on SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import pytest

from opdkit.answers import score_response
from opdkit.study.real import (REAL_EXPERIMENTS, check_real_headline, needed_members, pattern_b, position_profile,
                               real_study_config)
from opdkit.study.real_report import add_derived, probe_table, real_claims


def test_pattern_b_rewrites_pattern_a_and_keeps_the_answer():
    a = "12 + 35 = 47. The final answer is \\boxed{47}."
    b = pattern_b(a)
    assert b == "Adding 12 and 35 gives 47. The final answer is \\boxed{47}."
    assert score_response(b, "47") == 1.0
    assert pattern_b("The answer is 47.") is None  # not in pattern A: dropped, not guessed


def test_needed_members_close_over_dependencies_in_build_order():
    by_name = {e.name: e for e in REAL_EXPERIMENTS}
    assert needed_members([by_name["new_capability"]]) == ("base", "rl")
    assert needed_members([by_name["cold_start_B"]]) == ("base", "rl", "rl_B", "base_coldB")
    assert needed_members([by_name["long_responses"]]) == ("base", "pruned")


def test_quick_config_is_the_headline_only():
    cfg = real_study_config([], quick=True)
    assert cfg.experiments == ["new_capability"] and cfg.seeds == 1 and not cfg.probe
    assert real_study_config(["seeds=3"]).seeds == 3


def test_position_profile_averages_the_first_and_last_steps():
    rows = [{"opd/loss": 1.0, "diag/pos_q1/overlap_ratio": v, "diag/pos_q4/overlap_ratio": v / 2}
            for v in (0.2, 0.4, 0.6, 0.8)] + [{"eval/accuracy": 0.5}]
    p = position_profile(rows, window=2)
    assert p["diag/pos_q1/overlap_ratio@start"] == pytest.approx(0.3)
    assert p["diag/pos_q1/overlap_ratio@end"] == pytest.approx(0.7)
    assert p["diag/pos_q4/overlap_ratio@end"] == pytest.approx(0.35)
    assert p["diag/pos_q2/overlap_ratio@start"] is None


def _run(before, after, **extra):
    return {"eval/accuracy@before": before, "eval/accuracy@after": after, **extra}


def test_claim_verdicts_follow_the_numbers():
    cards = {"base": {"greedy_accuracy": 0.40, "sampled_accuracy_T1.0": 0.30, "sampled_accuracy_T0.5": 0.38},
             "rl": {"greedy_accuracy": 0.80}, "rl_B": {"greedy_accuracy": 0.78}}
    sig = {"diag/overlap_token_advantage@start": -0.2, "diag/overlap_token_advantage@end": -0.05,
           "eval/reverse_kl@before": 0.5, "eval/reverse_kl@after": 0.2, "diag/overlap_ratio@start": 0.8}
    results = {
        "new_capability": [_run(0.40, 0.72, **sig), _run(0.40, 0.70, **sig)],  # (0.32 + 0.30) / 2 / 0.4 = 78 %
        "same_pipeline": [_run(0.40, 0.42), _run(0.40, 0.40)],
        "reverse": [_run(0.80, 0.45)],                                         # keeps 12.5 % of the RL gain
        "pattern_B": [_run(0.40, 0.50, **{"diag/overlap_ratio@start": 0.5})],
        "cold_start_B": [_run(0.45, 0.65)],
    }
    add_derived(results, cards)
    assert results["new_capability"][0]["gap_recovery"] == pytest.approx(0.8)
    probes = {"same_pipeline": {"verdict": "change_teacher"}}
    rows = {r["claim"].split(":")[0]: r for r in real_claims(results, cards, probes)}
    assert rows["new capability"]["holds"] == "holds"
    assert rows["same pipeline"]["holds"] == "holds"
    assert rows["reverse distillation"]["holds"] == "holds" and "12% of the RL gain kept" in rows["reverse distillation"]["ours"]
    assert rows["thinking-pattern mismatch"]["holds"] == "holds"
    assert rows["teacher-aligned template"]["holds"] == "not run"
    # the probe saying "distill" to the same-pipeline pair makes that claim only partly hold
    rows = {r["claim"].split(":")[0]: r for r in real_claims(results, cards, {"same_pipeline": {"verdict": "distill"}})}
    assert rows["same pipeline"]["holds"] == "partly"
    # a run that recovers only a third of the gap does not count as "most of the gap"
    weak = {"new_capability": [_run(0.40, 0.53, **sig)]}
    add_derived(weak, cards)
    assert real_claims(weak, cards, {})[0]["holds"] == "partly"


def test_prune_claim_needs_a_faster_step_at_equal_heldout_kl():
    def run(s_per_step, kl_after, **extra):
        return {"seconds_per_step": s_per_step, "eval/reverse_kl@after": kl_after, **extra}

    none = {"long_responses": [run(36.0, 0.45, **{"rollout/tokens@mean": 1140.0})]}
    rows = {r["claim"].split(" (")[0]: r for r in real_claims(none, {}, {})}
    assert "Prune-OPD truncate" not in rows  # the extra row appears only once one of its runs exists
    cut = {"prune/pruned_frac@mean": 0.3, "prune/generated_tokens@mean": 900.0, "prune/kept_tokens@mean": 800.0}
    for t06, holds in (((30.0, 0.46), "holds"),   # faster, KL within 5 %
                       ((30.0, 0.50), "partly"),  # faster, but KL 11 % above
                       ((38.0, 0.60), "does not hold")):
        results = {**none, "long_prune_truncate_t06": [run(*t06, **cut)]}
        row = next(r for r in real_claims(results, {}, {}) if r["claim"].startswith("Prune-OPD"))
        assert row["holds"] == holds, (t06, row)
        assert "pruned share 0.300" in row["ours"] and "trained 800 vs 1140 without" in row["ours"]
    # a threshold at which no row drifted says so, and does not count for or against the claim
    idle = {"prune/pruned_frac@mean": 0.0, "prune/drift_frac@mean": 0.0}
    results = {**none, "long_prune_truncate_t06": [run(37.0, 0.47, **idle)],
               "long_prune_truncate_t07": [run(30.0, 0.46, **cut)]}
    row = next(r for r in real_claims(results, {}, {}) if r["claim"].startswith("Prune-OPD"))
    assert row["holds"] == "holds" and "never fired" in row["ours"].split("; threshold 0.7")[0]


def test_vopd_claim_compares_each_policy_gradient_form_with_and_without_the_baseline():
    def run(kl, grad):
        return {"eval/reverse_kl@after": kl, "optim/grad_norm@mean": grad}

    both = {"pg_topk": [run(0.020, 3.5)], "pg_topk_vopd": [run(0.012, 3.0)],
            "sampled": [run(0.05, 7.0)], "sampled_vopd": [run(0.04, 5.0)]}
    row = next(r for r in real_claims(both, {}, {}) if r["claim"].startswith("vOPD"))
    assert row["holds"] == "holds" and "sampled-token form" in row["ours"] and "top-16" in row["ours"]
    worse = {**both, "sampled_vopd": [run(0.06, 8.0)]}  # the baseline hurts the sampled form
    assert next(r for r in real_claims(worse, {}, {}) if r["claim"].startswith("vOPD"))["holds"] == "partly"
    only_pg = {k: v for k, v in both.items() if k.startswith("pg")}
    row = next(r for r in real_claims(only_pg, {}, {}) if r["claim"].startswith("vOPD"))
    assert row["holds"] == "holds" and "sampled-token" not in row["ours"]


def test_probe_table_scores_the_probe_against_outcomes():
    results = {"new_capability": [{"accuracy_gain": 0.3}], "same_pipeline": [{"accuracy_gain": 0.01}],
               "reverse": [{"accuracy_gain": -0.3}]}
    probes = {"new_capability": {"verdict": "distill"}, "same_pipeline": {"verdict": "distill"},
              "reverse": {"verdict": "change_teacher"}}
    table = {t["experiment"]: t for t in probe_table(results, probes)}
    assert table["new_capability"]["correct"] and table["reverse"]["correct"]
    assert not table["same_pipeline"]["correct"]  # predicted success, the student did not improve


def test_headline_check_fails_when_accuracy_does_not_rise():
    good = {"eval/accuracy@before": 0.4, "eval/accuracy@after": 0.6, "eval/reverse_kl@before": 0.3,
            "eval/reverse_kl@after": 0.1}
    assert check_real_headline(good) == []
    assert check_real_headline({**good, "eval/accuracy@after": 0.4}) == ["held-out accuracy rises"]


def test_quick_real_study_raises_heldout_accuracy(smollm_dir, tmp_path, capsys):
    """``opdkit study --real --quick`` end to end: GRPO makes the teacher, OPD from it improves the base model."""
    from opdkit.cli import main

    rc = main(["study", "--real", "--quick", "--out", str(tmp_path / "real")])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads((tmp_path / "real" / "runs" / "new_capability_s0" / "summary.json").read_text())
    card = json.loads((tmp_path / "real" / "zoo" / "rl" / "card.json").read_text())
    base = json.loads((tmp_path / "real" / "zoo" / "base" / "card.json").read_text())
    assert card["greedy_accuracy"] > base["greedy_accuracy"]  # GRPO gave the teacher a new capability
    assert summary["eval/accuracy@after"] > summary["eval/accuracy@before"]
    assert summary["eval/reverse_kl@after"] < summary["eval/reverse_kl@before"]
