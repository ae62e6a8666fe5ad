"""scripts/gpu-check.sh --cpu: the GPU smoke checks run end to end in their CPU dry mode and write one JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_mode_passes_and_reports(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(ROOT / "scripts" / "gpu-check.sh"), "--cpu", str(out)], capture_output=True,
                            text=True, env=env, timeout=600)
    assert out.is_file(), result.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = {c["name"]: c.get("error") for c in report["checks"] if not c["passed"]}
    assert result.returncode == 0 and report["passed"] and not failed, (failed, result.stderr[-2000:])
    checks = {c["name"]: c["figures"] for c in report["checks"]}
    assert report["mode"] == "cpu-dry" and report["device"] == "cpu"
    assert {"token_loss_every_objective", "distiller_steps", "cross_device", "sampling_speed_and_greedy_parity",
            "one_rank_process_group", "torchrun_launches", "resume", "memory_real_vocab",
            "sft_packed_equals_padded", "eval_and_rollout_recipes", "tiny_pair_matches_cpu",
            "step_cost_0p5b_pair", "precision_policy", "fsdp2_one_device_equals_no_sharding"} <= set(checks)
    assert checks["fsdp2_one_device_equals_no_sharding"]["max_abs_weight_diff"] < 1e-5
    # the suite runs as on a CPU without native bf16 (conftest), so auto resolved to fp32, with its reason
    assert any("auto -> float32" in line for line in checks["precision_policy"]["resolved"])
    # figures that the checks measured, not just their verdicts
    assert all(v == 0.0 for v in checks["token_loss_every_objective"]["max_abs_diff"].values())  # CPU vs CPU
    assert len(checks["token_loss_every_objective"]["max_abs_diff"]) >= 10
    assert checks["resume"]["exact"] and checks["one_rank_process_group"]["backend"] == "gloo"
    sampling = checks["sampling_speed_and_greedy_parity"]
    assert sampling["greedy_agreement"] == 1.0 and 0 < sampling["noise_share"] < 1
    assert checks["torchrun_launches"]["too_many_ranks"] == "fails with a clear message"
    step = checks["step_cost_0p5b_pair"]
    assert step["step_seconds"] > 0 and {"rollout", "teacher", "train", "optimizer"} <= set(step)
    assert all(s["losses"][0] == s["losses"][0] for s in checks["distiller_steps"].values())


def test_a_failing_check_does_not_stop_the_others(tmp_path, monkeypatch):
    from opdkit import gpucheck

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpucheck, "CHECKS", [("broken", broken), ("fine", lambda ctx: {"x": 1})])
    report = gpucheck.run_checks(__import__("torch").device("cpu"), small=True)
    assert [(c["name"], c["passed"]) for c in report["checks"]] == [("broken", False), ("fine", True)]
    assert report["checks"][0]["error"] == "RuntimeError: boom" and not report["passed"]
