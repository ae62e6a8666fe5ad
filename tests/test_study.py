"""The reproduction study (issue 7): the synthetic task, the claim verdicts, and the quick end-to-end run."""

from __future__ import annotations

import random

import pytest

from opdkit.answers import score_response
from opdkit.study import task
from opdkit.study.report import claims, gap_recovery, mean
from opdkit.study.run import check_headline, run_study, study_config


def test_problems_are_seeded_disjoint_and_correct():
    a = task.make_problems(50, ops=("up", "down"), depth=3, seed=1)
    assert a == task.make_problems(50, ops=("up", "down"), depth=3, seed=1)
    b = task.make_problems(50, ops=("up", "down"), depth=3, seed=2, exclude={p.key for p in a})
    assert not {p.key for p in a} & {p.key for p in b}
    p = task.Problem(7, (("up", 5), ("down", 3)), "Ada", "red", "clock")
    assert p.results() == [2, 9] and p.answer == 9  # 7+5 = 12 = 2 (mod 10); 2-3 = -1 = 9
    assert task.PATTERNS["A"](p, 9) == "7 + 5 = 2 . 2 - 3 = 9 .\nAnswer: 9"
    assert task.PATTERNS["B"](p, 9) == "7 plus 5 makes 2 ; 2 minus 3 makes 9 ; so \\boxed{ 9 }"
    only_up = task.make_problems(200, ops=("up", "down"), depth=3, seed=3, op_weights=(1.0, 0.0))
    assert all(op == "up" for q in only_up for op, _ in q.steps)


@pytest.mark.parametrize("pattern", ["A", "B"])
def test_tokenizer_round_trip_and_grading(pattern):
    tok = task.word_tokenizer()
    assert len(tok) == len(task.vocabulary()) > 200  # k = 16 is a small fraction of the vocabulary
    rng = random.Random(0)
    for p in task.make_problems(20, ops=("up", "down"), depth=(1, 3), seed=4):
        row = task.sft_row(p, rng.choice(list(task.TEMPLATES)), pattern)
        ids = tok.apply_chat_template(row["messages"], tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        assert tok.unk_token_id not in ids
        response = tok.decode(tok(row["messages"][-1]["content"])["input_ids"], skip_special_tokens=True)
        assert score_response(response, row["answer"]) == 1.0
        wrong = task.PATTERNS[pattern](p, (p.answer + 1) % task.MODULUS)
        assert score_response(wrong, row["answer"]) == 0.0


def test_gap_recovery_and_claim_verdicts():
    assert gap_recovery(0.3, 0.9, 1.0) == pytest.approx(6 / 7)
    assert gap_recovery(0.5, 0.6, 0.51) is None  # the teacher is not ahead: undefined
    run = {"diag/overlap_ratio@start": 0.5, "diag/overlap_ratio@end": 0.6,
           "diag/overlap_token_advantage@start": -0.2, "diag/overlap_token_advantage@end": -0.01,
           "diag/entropy_gap@start": 0.3, "diag/entropy_gap@end": 0.05, "eval/reverse_kl@before": 1.2,
           "eval/reverse_kl@after": 0.1, "eval/accuracy@before": 0.3, "eval/accuracy@after": 1.0,
           "gap_recovery": 1.0, "teacher_accuracy": 1.0, "diag/overlap_mass_student@mean": 0.99,
           "diag/overlap_mass_teacher@mean": 0.97}
    results = {"new_capability": [run, {**run, "diag/overlap_ratio@end": 0.52}]}
    assert mean(results, "new_capability", "diag/overlap_ratio@end") == pytest.approx(0.56)
    rows = {r["claim"]: r for r in claims(results)}
    assert rows["1 successful-OPD signature"]["holds"] == "yes"
    assert "± " in rows["1 successful-OPD signature"]["ours"]
    assert rows["gap recovery of a successful run"]["holds"] == "yes"
    assert rows["7 new capability > same pipeline"]["holds"] == "not run"
    flat = {"new_capability": [{**run, "diag/overlap_ratio@end": 0.4}]}
    assert {r["claim"]: r for r in claims(flat)}["1 successful-OPD signature"]["holds"] == "partly"
    none = {"new_capability": [{**run, "diag/overlap_ratio@end": 0.4, "diag/overlap_token_advantage@end": -0.3,
                                "diag/entropy_gap@end": 0.4, "eval/reverse_kl@after": 1.3}]}
    assert {r["claim"]: r for r in claims(none)}["1 successful-OPD signature"]["holds"] == "no"
    assert check_headline(run) == []
    stalled = {**run, "eval/accuracy@after": 0.3, "diag/entropy_gap@end": 0.4, "diag/overlap_mass_teacher@mean": 0.5}
    assert check_headline(stalled) == ["eval accuracy increases", "overlap mass > 0.9"]


def test_quick_study_shows_the_successful_opd_signature(tmp_path):
    """`opdkit study --quick`: S0 <- T_new on mixed up/down problems; the headline signature must appear."""
    outcome = run_study(study_config([], quick=True), tmp_path)
    result = outcome["results"]["new_capability"][0]
    assert check_headline(result) == [], result
    assert outcome["zoo"]["T_new"]["accuracy"]["mixed_quiz"] > outcome["zoo"]["S0"]["accuracy"]["mixed_quiz"]


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    from opdkit.config import ConfigError, dump_yaml
    from opdkit.study.run import check_cache

    (tmp_path / "study.yaml").write_text(dump_yaml(study_config([])))
    check_cache(study_config(["experiments=[pattern_B]"], seeds=5, threads=2), tmp_path)  # same cached settings
    with pytest.raises(ConfigError, match="opd.lr"):
        check_cache(study_config(["opd.lr=0.01"]), tmp_path)
