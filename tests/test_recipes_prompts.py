"""Prompt selection: bare questions, template rewriting, mixing, the arithmetic set, and dedup with the real
all-MiniLM-L6-v2 embedder."""

import json
from collections import Counter

import pytest

from opdkit.cli import main
from opdkit.config import ConfigError, load_config
from opdkit.data import DatasetError, read_rows
from opdkit.recipes.prompts import (DAPO_TEMPLATE, ArithmeticConfig, RewriteConfig, apportion, arithmetic_rows,
                                    fill_template, mix_rows, rewrite_rows, strip_template)
from tests.conftest import SHARED_DATA, write_jsonl

QUESTION = "Find $x$ if $2^x = \\frac{1}{8}$."
BOXED = QUESTION + " Please reason step by step, and put your final answer within \\boxed{}."


def dapo_row(question=QUESTION, answer="-3"):
    return {"data_source": "math_dapo", "prompt": [{"role": "user", "content": fill_template(DAPO_TEMPLATE, question)}],
            "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule"}, "extra_info": {"index": "a"}}


@pytest.mark.parametrize("text, name", [
    (fill_template(DAPO_TEMPLATE, QUESTION), "dapo"),
    (BOXED, "boxed"),
    (QUESTION + " Please reason step by step, and put your final answer within \\boxed{{}}.", "boxed"),  # repo typo
    (QUESTION + "\nLet's think step by step and output the final answer within \\boxed{}.", "boxed_lets_think"),
])
def test_strip_template_recovers_the_bare_question(text, name):
    assert strip_template(text) == (QUESTION, name)


def test_strip_template_leaves_plain_text_alone():
    assert strip_template("  " + QUESTION + " ") == (QUESTION, None)
    # a DAPO prefix without its suffix is not the DAPO template
    assert strip_template(fill_template(DAPO_TEMPLATE, QUESTION).split("\n\nRemember")[0])[1] is None


def test_rewrite_dapo_to_the_boxed_template():
    rows, found = rewrite_rows([dapo_row(), dapo_row("What is $1+1$?", "2")], RewriteConfig(input="x", output="y.jsonl"))
    assert found == {"dapo": 2}
    assert rows[0]["prompt"] == [{"role": "user", "content": BOXED}]
    assert rows[0]["extra_info"] == {"index": "a", "question": QUESTION}
    assert rows[1]["reward_model"]["ground_truth"] == "2"  # everything else is kept
    back, _ = rewrite_rows(rows, RewriteConfig(input="x", output="y.jsonl", template="dapo"))
    assert back[0]["prompt"] == dapo_row()["prompt"]  # and back again, exactly
    with pytest.raises(DatasetError, match="row 1: no known template"):
        rewrite_rows([{"prompt": "plain question"}], RewriteConfig(input="x", output="y.jsonl"))
    kept, found = rewrite_rows([{"prompt": "plain question"}], RewriteConfig(input="x", output="y.jsonl",
                                                                            unrecognised="keep"))
    assert kept == [{"prompt": "plain question " + BOXED[len(QUESTION) + 1:], "question": "plain question"}]


@pytest.mark.skipif(not (SHARED_DATA / "dapo-math-17k.parquet").is_file(), reason="../shared/data is absent")
def test_rewrite_cli_on_real_dapo_rows(tmp_path, capsys):
    out = tmp_path / "dapo_boxed.parquet"
    assert main(["prompts", "rewrite", f"input={SHARED_DATA / 'dapo-math-17k.parquet'}", f"output={out}",
                 "limit=50"]) == 0
    assert json.loads(capsys.readouterr().out)["templates_found"] == {"dapo": 50}
    for row in read_rows(out):
        content = row["prompt"][0]["content"]
        assert content == row["extra_info"]["question"] + " " + BOXED[len(QUESTION) + 1:]
        assert "Answer:" not in content and not content.startswith("Solve the following")


def test_apportion_is_exact_and_proportional():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(100, [3, 1]) == [75, 25]
    assert sum(apportion(17, [0.2, 0.3, 0.5])) == 17


def test_mix_draws_by_ratio_without_repeats_and_is_seeded(tmp_path):
    a = [{"prompt": f"a{i}", "answer": str(i)} for i in range(40)]
    b = [dapo_row(f"b{i}") for i in range(10)]
    sources = [("a.jsonl", a, {}), ("b.parquet", b, {})]
    rows, counts = mix_rows(sources, [3, 1], total=20, seed=0, replacement=False)
    assert counts == [15, 5] and Counter(r["extra_info"]["source_file"] for r in rows) == {"a.jsonl": 15,
                                                                                           "b.parquet": 5}
    assert len({(r["extra_info"]["source_file"], r["extra_info"]["row"]) for r in rows}) == 20
    assert {r["extra_info"]["question"] for r in rows if r["data_source"] == "math_dapo"} <= {f"b{i}" for i in range(10)}
    assert mix_rows(sources, [3, 1], 20, 0, False)[0] == rows and mix_rows(sources, [3, 1], 20, 1, False)[0] != rows
    # default total: as many rows as the ratio allows without repeats (b's 10 rows limit it to 40)
    assert len(mix_rows(sources, [3, 1], None, 0, False)[0]) == 40
    with pytest.raises(ConfigError, match="b.parquet has 10 rows but the mix needs 25"):
        mix_rows(sources, [1, 1], 50, 0, False)


def test_mix_cli_writes_one_parquet_schema(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "answer": str(i)} for i in range(8)])
    b = write_jsonl(tmp_path / "b.jsonl", [dapo_row(f"b{i}") for i in range(8)])
    out = tmp_path / "mix.parquet"
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(f"sources:\n  - {{path: {a}, weight: 1}}\n  - {{path: {b}, weight: 3}}\noutput: {out}\ntotal: 8\n")
    assert main(["prompts", "mix", "--config", str(cfg)]) == 0
    rows = read_rows(out)
    assert len(rows) == 8 and sum(r["data_source"] == "math_dapo" for r in rows) == 6
    assert main(["prompts", "mix", "--config", str(cfg), "sources=[{path: x, weight: -1}]"]) == 2
    assert "sources[0].weight must be a positive number" in capsys.readouterr().err


def test_arithmetic_rows_are_distinct_checkable_and_one_shot():
    rows = arithmetic_rows(ArithmeticConfig(output="x.jsonl", count=50, ops=["+", "-", "*"], seed=1))
    assert len({r["messages"][-1]["content"] for r in rows}) == 50
    for r in rows:
        a, op, b = r["messages"][-1]["content"].split("?")[0].split()[2:5]
        assert r["answer"] == str(eval(f"{a}{op}{b}")) and 10 <= int(a) <= 99
        assert r["messages"][1]["content"] == "12 + 35 = 47. The final answer is \\boxed{47}."
    assert arithmetic_rows(ArithmeticConfig(output="x.jsonl", count=3, one_shot=False))[0]["messages"][0]["role"] == "user"


def test_arithmetic_cli_writes_a_disjoint_heldout_set(tmp_path):
    assert main(["prompts", "arithmetic", f"output={tmp_path / 'a.jsonl'}", "count=30", "heldout=10", "digits=1"]) == 0
    train, test = read_rows(tmp_path / "a.jsonl"), read_rows(tmp_path / "a.heldout.jsonl")
    assert len(train) == 30 and len(test) == 10
    assert not {r["messages"][-1]["content"] for r in train} & {r["messages"][-1]["content"] for r in test}
    with pytest.raises(ConfigError):
        load_config(ArithmeticConfig, None, ["output=x.jsonl", "ops=[/]"])


# --------------------------------------------------------------------------------------------------
# dedup with the real embedder
# --------------------------------------------------------------------------------------------------

REFERENCE = ["What is the sum of the first 100 positive integers?", "Find all real x such that x^2 - 5x + 6 = 0.",
             "How many ways can 5 people sit around a round table?", "Let f(x) = 3x + 2. Find f(7)."]
CANDIDATES = [
    ("  what is the SUM of the first 100 positive   integers? ", "exact", 0),  # same after normalisation
    ("Find every real number x with x^2 - 5x + 6 = 0.", "embedding", 1),  # paraphrase
    ("In how many ways can five people be seated around a circular table?", "embedding", 2),  # paraphrase
    ("Compute the derivative of sin(x) e^x.", None, None),
    ("A train travels 60 miles per hour for 3 hours. How far does it go?", None, None),
    ("Find all real x such that x^2 - 7x + 12 = 0.", None, None),  # same wording, another problem
]


@pytest.fixture(scope="module")
def embedder():
    from opdkit.recipes.dedup import load_embedder

    return load_embedder()


@pytest.mark.slow
def test_dedup_finds_planted_duplicates_and_keeps_distinct_prompts(embedder, tmp_path):
    from opdkit.recipes.dedup import deduplicate

    result = deduplicate([c[0] for c in CANDIDATES], REFERENCE, embedder, threshold=0.85)
    assert result.keep == [reason is None for _, reason, _ in CANDIDATES]
    by_row = {d["row"]: d for d in result.dropped}
    for i, (text, reason, ref) in enumerate(CANDIDATES):
        if reason:
            assert by_row[i]["reason"] == reason and by_row[i]["nearest_reference"] == REFERENCE[ref]
            assert by_row[i]["question"] == text and by_row[i]["cosine"] >= 0.85
    assert result.cosines[3] < 0.5 and result.cosines[4] < 0.5  # unrelated questions are far apart
    # The paper's threshold 0.6 is aggressive: it also drops the same template with other numbers.
    assert not deduplicate([CANDIDATES[5][0]], REFERENCE, embedder, threshold=0.6).keep[0]


@pytest.mark.slow
def test_dedup_cli_compares_bare_questions_across_templates(tmp_path, capsys):
    ref = write_jsonl(tmp_path / "ref.jsonl", [dapo_row(q) for q in REFERENCE])  # DAPO template
    cand = write_jsonl(tmp_path / "cand.jsonl", [
        {"prompt": [{"role": "user", "content": fill_template("{question} Please reason step by step, and put your "
                                                              "final answer within \\boxed{}.", q)}],
         "extra_info": {"question": q}} for q, _, _ in CANDIDATES[:2]] + [{"prompt": CANDIDATES[3][0]}])
    out = tmp_path / "kept.jsonl"
    assert main(["dedup", f"input={cand}", f"reference={ref}", f"output={out}", "threshold=0.85",
                 "cache_embeddings=false"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dropped_by_reason"] == {"exact": 1, "embedding": 1} and summary["kept"] == 1
    assert summary["questions_from"]["reference"] == {"dapo": 4}
    assert read_rows(out) == [{"prompt": CANDIDATES[3][0]}]
    dropped = read_rows(tmp_path / "kept.dropped.jsonl")
    assert [d["nearest_reference"] for d in dropped] == REFERENCE[:2]
