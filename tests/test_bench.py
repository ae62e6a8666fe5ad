"""Benchmark bookkeeping: medians of per-run medians, ratios, the markdown table and FLOP estimates."""

import pytest

from opdkit.bench import markdown, summarise, with_ratios
from opdkit.bench.workers import BenchSettings


def _run(steps, rollout, rss):
    return {"step_seconds": steps, "phases": [{"rollout": rollout, "teacher": 0.5, "train": 1.0}] * len(steps),
            "tokens": [512] * len(steps), "peak_rss_gb": rss, "dtype_policy": "x"}


def test_summarise_takes_median_of_run_medians():
    runs = [_run([2.0, 4.0, 3.0], 1.0, 2.0), _run([5.0, 5.0, 6.0], 2.0, 3.0), _run([1.0, 1.0, 9.0], 3.0, 4.0)]
    s = summarise(runs)
    assert s["step_seconds_runs"] == [3.0, 5.0, 1.0]
    assert s["step_seconds"] == 3.0 and s["phases"]["rollout"] == 2.0 and s["peak_rss_gb"] == 3.0
    # per run: all its tokens over all its seconds (1536/9, 1536/16, 1536/11); the median of those
    assert s["tokens_per_second"] == pytest.approx(1536 / 11)


def test_markdown_reports_ratios():
    summary = with_ratios({"opdkit": summarise([_run([2.0], 1.0, 1.5)]), "trl": summarise([_run([8.0], 4.0, 3.0)])})
    assert summary["ratios"]["opdkit"] == {"step_time": 0.25, "peak_rss": 0.5, "rollout_time": 0.25,
                                           "teacher_time": 1.0, "train_time": 1.0, "tokens_per_second": 4.0}
    text = markdown(summary, BenchSettings(), repeats=1)
    assert "| seconds per step | 2.00 | 8.00 | **0.25** |" in text
    assert "| peak RSS (GB) | 1.50 | 3.00 | **0.50** |" in text


def test_markdown_has_a_column_and_a_ratio_per_opdkit_side():
    summary = with_ratios({"opdkit": summarise([_run([2.0], 1.0, 1.5)]), "opdkit-vllm": summarise([_run([1.0], 0.5, 2.4)]),
                           "trl": summarise([_run([4.0], 2.0, 3.0)])})
    text = markdown(summary, BenchSettings(), repeats=1)
    assert "| seconds per step | 2.00 | 1.00 | 4.00 | **0.50** | **0.25** |" in text
    assert "| rollout seconds | 1.00 | 0.50 | 2.00 | 0.50 | 0.25 |" in text
    assert "| peak RSS (GB) | 1.50 | 2.40 | 3.00 | **0.50** | **0.80** |" in text


def test_math_prompt_rows_reads_the_dapo_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from opdkit.bench import math_prompt_rows
    from opdkit.data import DatasetError

    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": [{"role": "user", "content": f"q{i}"}], "reward_model": {"ground_truth": str(i), "style": "x"}}
        for i in range(3)]), path)
    assert math_prompt_rows(path, 2) == [{"messages": [{"role": "user", "content": "q0"}], "answer": "0"},
                                         {"messages": [{"role": "user", "content": "q1"}], "answer": "1"}]
    with pytest.raises(DatasetError, match="needs 5 prompts, the file has 3"):
        math_prompt_rows(path, 5)


def test_markdown_names_the_math_workload():
    summary = with_ratios({"opdkit": summarise([_run([2.0], 1.0, 1.5)]), "trl": summarise([_run([8.0], 4.0, 3.0)])})
    text = markdown(summary, BenchSettings(workload="math", batch=2, n=4, new_tokens=256), repeats=1)
    assert "2 DAPO-Math prompts x 4 samples per step, responses stop at EOS (at most 256 new tokens)" in text
    assert "| useful tokens per second | 256.0 | 64.0 | **4.00** |" in text


def test_the_one_step_off_side_trains_on_samples_one_update_old(tiny_dirs, prompts_file):
    from opdkit.bench.workers import WORKERS

    s = BenchSettings(student=str(tiny_dirs["student"]), teacher=str(tiny_dirs["teacher"]), prompts=str(prompts_file),
                      batch=2, new_tokens=8, steps=2, warmup=1, k=4, extra=["run.progress=false"])
    sync, off = WORKERS["opdkit"](s), WORKERS["opdkit-async"](s)
    assert off["side"] == "opdkit-async" and len(off["step_seconds"]) == 2
    # the measured steps (after the warm-up) were sampled while the previous step trained
    assert (sync["staleness"], off["staleness"]) == ([0.0, 0.0], [1.0, 1.0])
    assert "opdkit (HF, one_step_off)" in markdown(with_ratios({"opdkit": summarise([sync]), "opdkit-async":
                                                                 summarise([off]), "trl": summarise([sync])}),
                                                   s, repeats=1)
