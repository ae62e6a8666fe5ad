"""opdkit eval: pass@k and avg@n on canned scores with hand-computed values, prompt preparation, gap recovery,
and a run of the command on a tiny model."""

import json
from math import comb

import pytest

from opdkit.cli import main
from opdkit.recipes.benchmark import gap_recovery, gap_recovery_report, pass_at_k, summarise
from opdkit.recipes.common import PromptsConfig, load_recipe_prompts, prepare_messages, select_rows
from tests.conftest import SHARED_DATA, write_jsonl


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 is the fraction correct
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(4, 1, 4) == 1.0  # n - c < k: some draw of 4 always holds the correct one
    for n, c, k in [(16, 3, 4), (16, 1, 8), (10, 7, 3)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summarise_canned_scores():
    # three problems, n = 4: 1/4, 2/4 and 0/4 correct
    scores = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    out = summarise(scores, [1, 2, 4])
    assert out["avg@4"] == pytest.approx((0.25 + 0.5 + 0) / 3)
    assert out["pass@1"] == pytest.approx(out["avg@4"])
    assert out["pass@2"] == pytest.approx((0.5 + 5 / 6 + 0) / 3)
    assert out["pass@4"] == pytest.approx(2 / 3)


def test_gap_recovery():
    assert gap_recovery(before=0.2, after=0.5, teacher=0.6) == pytest.approx(0.75)
    assert gap_recovery(0.2, 0.1, 0.6) == pytest.approx(-0.25)  # regression is negative recovery
    assert gap_recovery(0.3, 0.4, 0.3) is None
    res = lambda a, b: {"benchmarks": {"A": {"avg@4": a}, "B": {"avg@4": b}}}  # noqa: E731
    report = gap_recovery_report(res(0.1, 0.3), res(0.4, 0.4), res(0.7, 0.5))
    assert report["benchmarks"]["A"]["gap_recovery"] == pytest.approx(0.5)
    assert report["benchmarks"]["B"]["gap_recovery"] == pytest.approx(0.5)
    assert report["average"]["gap_recovery"] == pytest.approx((0.4 - 0.2) / (0.6 - 0.2))


def test_suffix_only_where_the_prompt_lacks_an_answer_format():
    cfg = PromptsConfig(train="x")
    plain = prepare_messages([{"role": "user", "content": "What is 2+2?"}], cfg)
    assert plain[-1]["content"] == "What is 2+2? Please reason step by step, and put your final answer within \\boxed{}."
    for text in ("What is 2+2? Put it in \\boxed{}.", "What is 2+2?\n\nRemember to put your answer after \"Answer:\"."):
        assert prepare_messages([{"role": "user", "content": text}], cfg)[-1]["content"] == text
    shot = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "\\boxed{2}"}]
    out = prepare_messages([{"role": "user", "content": "2+2?"}], PromptsConfig(train="x", fewshot=shot, add_suffix="never"))
    assert out == shot + [{"role": "user", "content": "2+2?"}]


def test_subset_selection_is_seeded():
    assert select_rows(10, None, None) == list(range(10)) and select_rows(10, 3, None) == [0, 1, 2]
    a, b = select_rows(500, 50, 0), select_rows(500, 50, 0)
    assert a == b and len(set(a)) == 50 and a != list(range(50)) and select_rows(500, 50, 1) != a


@pytest.mark.skipif(not (SHARED_DATA / "eval").is_dir(), reason="../shared/data is absent")
def test_verl_benchmarks_load_with_answers(tokenizer):
    for name in ("AIME24", "AMC23", "MATH-500"):
        prompts, rows = load_recipe_prompts(PromptsConfig(train=str(SHARED_DATA / "eval" / name / "test.parquet"),
                                                          limit=5, subset_seed=0, max_prompt_length=4096), tokenizer)
        assert len(prompts) == 5 and all(ex.answer for ex in prompts.examples)
        assert all(ex.messages[-1]["content"].endswith("within \\boxed{}.") for ex in prompts.examples)


def test_eval_cli_on_a_tiny_model_and_gap_recovery(tiny_dirs, tmp_path, capsys):
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"problem": f"What is {i}+1?", "solution": str(i + 1)}
                                                   for i in range(6)])
    out = tmp_path / "res.json"
    code = main(["eval", "--limit", "4", f"model.path={tiny_dirs['student']}", "model.dtype=float32",
                 f"benchmarks=[{{name: toy, path: {bench}, columns: {{prompt: problem, answer: solution}}}}]",
                 "rollout.n=3", "rollout.max_new_tokens=5", "rollout.batch_size=5", "pass_k=[1, 2]",
                 f"output={out}"])
    assert code == 0
    report = json.loads(out.read_text())
    toy = report["benchmarks"]["toy"]
    assert toy["problems"] == 4 and toy["samples_per_problem"] == 3 and {"avg@3", "pass@1", "pass@2"} <= set(toy)
    assert report["settings"]["temperature"] == 0.7 and report["settings"]["top_p"] == 0.95
    samples = [json.loads(line) for line in (tmp_path / "res.samples.jsonl").read_text().splitlines()]
    # truncated means the cap was reached; a response may also end with EOS exactly at the cap
    assert len(samples) == 12 and all(s["tokens"] == 5 for s in samples if s["truncated"])
    assert all(s["tokens"] <= 5 for s in samples) and any(s["truncated"] for s in samples)
    capsys.readouterr()
    for name, value in (("before", 0.2), ("after", 0.5), ("teacher", 0.6)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"benchmarks": {"toy": {"avg@3": value}}}))
    assert main(["gap-recovery", "--before", str(tmp_path / "before.json"), "--after", str(tmp_path / "after.json"),
                 "--teacher", str(tmp_path / "teacher.json")]) == 0
    assert json.loads(capsys.readouterr().out)["benchmarks"]["toy"]["gap_recovery"] == pytest.approx(0.75)
    no_answers = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "What is 1+1?"}])
    assert main(["eval", f"model.path={tiny_dirs['student']}", f"benchmarks=[{no_answers}]"]) == 1
    assert "row 1: no reference answer" in capsys.readouterr().err
