"""The demo's code path on tiny models: summary keys, the fixed-reference KL, and its equivalences."""

from __future__ import annotations

import json
import math

import pytest
import torch

from opdkit.demo import gap_closed, run_demo

TINY = ["run.steps=2", "rollout.prompts_per_step=4", "rollout.max_new_tokens=8", "eval.prompts=4",
        "eval.max_new_tokens=8", "eval.batch_size=4", "eval.every=0", "run.tensorboard=false",
        "run.progress=false", "run.save_every=0", "objective.k=8"]
FP32 = ["student.compute_dtype=float32", "student.sampling_dtype=float32", "teacher.dtype=float32"]
KEYS = ["accuracy_before", "accuracy_after", "teacher_accuracy", "heldout_problems", "answered_before",
        "answered_after", "response_len_before", "response_len_after", "reverse_kl_before", "reverse_kl_after",
        "reference_reverse_kl_before", "reference_reverse_kl_after", "steps", "seconds_per_step",
        "phase_seconds_median", "wall_seconds", "final_model"]


def test_demo_summary_on_tiny_models(tiny_dirs, tmp_path):
    summary = run_demo(str(tmp_path / "demo"), TINY + FP32, teacher=tiny_dirs["teacher"],
                       student=tiny_dirs["student"])
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for key in KEYS:
        assert key in written, key
    assert written["heldout_problems"] == 4 and summary["steps"] == 2
    for key in ("accuracy_before", "accuracy_after", "teacher_accuracy", "answered_before", "answered_after"):
        assert 0.0 <= written[key] <= 1.0, key
    # Random tiny models of different seeds disagree (a little: both are near uniform), unlike the next test.
    assert written["reference_reverse_kl_before"] > 1e-3
    assert written["response_len_before"] > 0 and math.isfinite(written["reverse_kl_after"])
    assert (tmp_path / "demo" / "final_model" / "config.json").is_file()


def test_demo_student_equal_to_teacher_has_zero_reference_kl(tiny_dirs, tmp_path):
    """With the teacher as its own student (all fp32), the KL on the teacher's responses is 0 before training,
    and the student's greedy accuracy and length before training are the teacher's."""
    summary = run_demo(str(tmp_path / "same"), TINY + FP32, teacher=tiny_dirs["teacher"],
                       student=tiny_dirs["teacher"])
    assert summary["reference_reverse_kl_before"] == pytest.approx(0.0, abs=1e-5)
    assert summary["reverse_kl_before"] == pytest.approx(0.0, abs=1e-5)
    assert summary["accuracy_before"] == summary["teacher_accuracy"]
    assert summary["response_len_before"] == pytest.approx(summary["teacher_response_len"])


def test_reference_kl_on_own_responses_equals_evaluate(tiny_dirs, tmp_path):
    """reference_reverse_kl on the student's own greedy responses is evaluate()'s eval/reverse_kl."""
    from opdkit.config import DistillConfig, load_config
    from opdkit.evaluation import evaluate, reference_responses, reference_reverse_kl
    from opdkit.train import Distiller
    from tests.conftest import addition_rows, write_jsonl

    tmp = tmp_path
    prompts = write_jsonl(tmp / "p.jsonl", addition_rows(12))
    cfg = load_config(DistillConfig, None, [f"student.path={tiny_dirs['student']}",
                                            f"teacher.path={tiny_dirs['teacher']}", f"data.train={prompts}",
                                            f"run.out_dir={tmp / 'run'}", "eval.prompts=5", "eval.max_new_tokens=10",
                                            "student.sampling_dtype=float32", "teacher.dtype=float32"])
    d = Distiller(cfg, log_to_disk=False)
    kw = dict(eos_ids=d.eos_ids, pad_id=d.pad_id, max_new_tokens=10, vocab_size=d.vocab_size)
    own = reference_responses(d.student, [x.prompt_ids for x in d.eval_set], [x.answer for x in d.eval_set],
                              d.tokenizer, batch_size=2, **kw)
    metrics, _ = evaluate(student=d.student, engine=d.engine, teacher=d.teacher, tokenizer=d.tokenizer,
                          examples=d.eval_set, teacher_prompts=[x.teacher_ids for x in d.eval_set], max_new_tokens=10,
                          batch_size=5, pad_id=d.pad_id, vocab_size=d.vocab_size)
    kl = reference_reverse_kl(student=d.student, teacher=d.teacher, prompts=[x.prompt_ids for x in d.eval_set],
                              teacher_prompts=[x.teacher_ids for x in d.eval_set], response_ids=own["response_ids"],
                              response_mask=own["response_mask"], batch_size=3, pad_id=d.pad_id,
                              vocab_size=d.vocab_size)
    assert kl == pytest.approx(metrics["eval/reverse_kl"], rel=1e-4)
    assert own["len_mean"] == pytest.approx(metrics["eval/len_mean"])
    assert own["accuracy"] == metrics["eval/accuracy"] and own["answered"] == metrics["eval/answered"]
    # Batching the generation differently pads differently but gives the same responses.
    whole = reference_responses(d.student, [x.prompt_ids for x in d.eval_set], [x.answer for x in d.eval_set],
                                d.tokenizer, batch_size=5, **kw)
    assert whole["texts"] == own["texts"]
    assert torch.equal(whole["response_mask"].sum(-1), own["response_mask"].sum(-1))


def test_gap_closed():
    assert gap_closed(0.0, 0.5, 0.8) == pytest.approx(0.625)
    assert gap_closed(0.2, 0.2, 0.9) == 0.0
    assert gap_closed(0.9, 0.95, 0.8) is None  # no gap to close
    assert gap_closed(None, 0.5, 0.8) is None
