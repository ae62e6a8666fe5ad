"""opdkit rollout: rejection filters on crafted responses, retries, and resuming without losing finished work."""

import json

import pytest

from opdkit.cli import main
from opdkit.config import ConfigError, load_config
from opdkit.recipes.rollout import FilterConfig, RolloutRecipeConfig, rejection_reason, repeated_span, run_rollout
from opdkit.tiny import char_tokenizer, save_tiny, tiny_llama
from tests.conftest import write_jsonl

CORRECT = "12 + 35 = 47, so the answer is \\boxed{47}."


@pytest.mark.parametrize("text, truncated, reason", [
    (CORRECT, True, "truncated"),  # a cut-off response is rejected whatever its content
    ("12 + 35 = 47, so the sum is 47.", False, "no_answer"),  # no \boxed and no "Answer:" line
    ("Let me add. " + "I add the tens and then the ones. " * 6 + "\\boxed{47}", False, "repetitive"),
    ("12 + 35 = 46\n\\boxed{46}", False, None),  # wrong but well-formed: kept unless keep_correct_only
    (CORRECT, False, None),
    ("12 + 35 = 47\nAnswer: 47", False, None),  # the DAPO "Answer:" line counts as a final answer
])
def test_rejection_reason_on_crafted_responses(text, truncated, reason):
    assert rejection_reason(text, truncated, "47", FilterConfig()) == reason


def test_keep_correct_only_rejects_wrong_answers_with_math_verify():
    cfg = FilterConfig(keep_correct_only=True)
    assert rejection_reason("so \\boxed{46}", False, "47", cfg) == "wrong_answer"
    assert rejection_reason("so \\boxed{\\frac{1}{2}}", False, "0.5", cfg) is None  # equivalent forms match
    assert rejection_reason("so \\boxed{47}", False, "\\boxed{47}", cfg) is None


def test_repeated_span_definition():
    loop = "The answer is 5. " * 6  # period 17: the 40-char spans starting at 0, 17, 34, 51 are equal
    assert repeated_span(loop) is not None and repeated_span(loop[:90]) is None  # 40 + 3*17 = 91 chars needed
    assert repeated_span("1" * 43) == "1" * 40 and repeated_span("1" * 42) is None
    assert repeated_span("ab\n" * 5 + "ab " * 60) is not None  # changing whitespace does not hide a loop
    honest = ("We need 3x + 2 = 11. Subtract 2: 3x = 9. Divide by 3: x = 3. Check: 3*3 + 2 = 11, correct. "
              "So x = 3 and 2x = 6. Then 2x + 1 = 7.")
    assert repeated_span(honest) is None
    three = "Next I add the tens, then I add the ones. " * 3  # period 42 > 40: three occurrences only
    assert repeated_span(three) is None and repeated_span(three, min_repeats=3) is not None
    assert repeated_span(loop, span_chars=0) is None


def boosted_tiny(tokenizer, boosts: dict[int, float], seed: int = 3):
    """A tiny random model whose logits for the given token ids are ~boost at every position (untied head)."""
    import torch

    model = tiny_llama(len(tokenizer), seed=seed, tie=False)
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([tokenizer("What is 3+4?")["input_ids"]])).last_hidden_state[0].mean(0)
        for token, boost in boosts.items():
            model.lm_head.weight[token] = boost * h / h.norm() ** 2
    return model


@pytest.fixture(scope="module")
def boxed_model(tmp_path_factory):
    """A tiny model with a single token '\\boxed{7}', boosted (like EOS) so that samples end in every way:
    truncated, without an answer, repeating the answer token, and accepted."""
    root = tmp_path_factory.mktemp("boxed")
    tok = char_tokenizer(extra_tokens=["\\boxed{7}"])
    model = boosted_tiny(tok, {tok.eos_token_id: 3.5, tok.convert_tokens_to_ids("\\boxed{7}"): 4.5})
    save_tiny(model, tok, root / "model")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"What is 3+4? ({i})", "answer": "7"} for i in range(6)])
    return root / "model", prompts


def _cfg(model, prompts, out, **extra):
    base = {"model.path": model, "data.train": prompts, "output.path": out, "rollout.n": 2,
            "rollout.max_new_tokens": 12, "rollout.temperature": 1.0, "rollout.top_p": 1.0,
            "rollout.batch_size": 5, "model.dtype": "float32", "filter.repetition_chars": 9,
            "filter.repetition_count": 2, "filter.max_attempts": 3}
    base.update(extra)
    return load_config(RolloutRecipeConfig, None, [f"{k}={v}" for k, v in base.items()])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rollout_writes_sft_rows_with_exact_rejection_counts_and_resumes(boxed_model, tmp_path):
    model, prompts = boxed_model
    out = tmp_path / "full.jsonl"
    # A seed whose samples end in every way (repetitive ones are rare); chosen again when sampling changed to
    # counter-based noise (opdkit/noise.py).
    seed = {"rollout.seed": 3}
    stats = run_rollout(_cfg(model, prompts, out, **seed))
    accepted, abandoned = _rows(out), _rows(tmp_path / "full.rejected.jsonl")
    assert stats["accepted"] == len(accepted) and stats["abandoned"] == len(abandoned)
    assert stats["accepted"] + stats["abandoned"] == stats["slots"] == 12
    assert sum(stats["rejected"].values()) == stats["attempts"] - stats["accepted"]
    assert stats["accepted"] >= 3 and min(stats["rejected"][r] for r in ("truncated", "no_answer", "repetitive")) > 0
    assert json.loads((tmp_path / "full.stats.json").read_text()) == stats
    for row in accepted:
        assert row["messages"][-1]["role"] == "assistant" and "\\boxed{7}" in row["messages"][-1]["content"]
        prompt = row["messages"][-2]["content"]  # the boxed instruction was added: the prompt had none
        assert prompt.startswith("What is 3+4?") and prompt.endswith("within \\boxed{}.")
        assert row["answer"] == "7" and row["correct"] == 1.0 and len(row["rejections"]) == row["attempt"]
    for row in abandoned:
        assert len(row["rejections"]) == 3  # every attempt used

    # Interrupted run: the first two rows survived plus a torn line. Resuming finishes the remaining slots only
    # and, since every (prompt, slot, attempt) has its own seed, ends with the uninterrupted run's data.
    part = tmp_path / "part.jsonl"
    lines = out.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:2]) + lines[2][:15])
    with pytest.raises(ConfigError, match="output.resume=true"):
        run_rollout(_cfg(model, prompts, part, **seed))
    resumed = run_rollout(_cfg(model, prompts, part, **seed, **{"output.resume": "true"}))
    key = lambda r: (r["prompt_index"], r["sample"])  # noqa: E731
    assert sorted(map(key, _rows(part))) == sorted(map(key, accepted))
    assert {key(r): r["messages"][-1]["content"] for r in _rows(part)} == \
        {key(r): r["messages"][-1]["content"] for r in accepted}
    assert resumed["accepted"] == stats["accepted"] and resumed["rejected"] == stats["rejected"]


def test_rollout_cli_two_prompts_to_parquet(boxed_model, tmp_path, capsys):
    import pyarrow.parquet as pq

    model, prompts = boxed_model
    out = tmp_path / "sft.parquet"
    code = main(["rollout", f"model.path={model}", f"data.train={prompts}", f"output.path={out}", "data.limit=2",
                 "rollout.max_new_tokens=6", "filter.require_answer=false", "filter.drop_truncated=false",
                 "filter.repetition_chars=0", "model.dtype=float32"])
    assert code == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 2 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert json.loads(capsys.readouterr().out)["accepted"] == 2


def test_keep_correct_only_needs_answers(boxed_model, tmp_path, capsys):
    model, _ = boxed_model
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.warns(FutureWarning, match="'data.path' is deprecated .* use 'data.train'"):  # the old key still works
        code = main(["rollout", f"model.path={model}", f"data.path={prompts}", f"output.path={tmp_path / 'o.jsonl'}",
                     "filter.keep_correct_only=true"])
    assert code == 1 and "needs reference answers" in capsys.readouterr().err
