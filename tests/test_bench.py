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
    assert s["tokens_per_second"] == pytest.approx(512 / 3.0)


def test_markdown_reports_ratios():
    summary = with_ratios({"opdkit": summarise([_run([2.0], 1.0, 1.5)]), "trl": summarise([_run([8.0], 4.0, 3.0)])})
    assert summary["ratios"]["opdkit"] == {"step_time": 0.25, "peak_rss": 0.5, "rollout_time": 0.25,
                                           "teacher_time": 1.0, "train_time": 1.0}
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
