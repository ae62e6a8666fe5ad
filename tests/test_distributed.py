"""Two processes under torchrun (gloo, CPU), data-parallel (ddp) or sharded (fsdp2), end with the same weights as
one process on the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides


def _run(args: list[str], nproc: int, env_extra: dict | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "opdkit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "opdkit", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _weights(run_dir):
    return load_file(str(run_dir / "final_model" / "model.safetensors"))


@pytest.mark.parametrize("objective", ["topk", "sampled", "reverse_kl"])
def test_two_process_run_matches_single_process(tmp_path, tiny_dirs, prompts_file, objective):
    # A large AdamW epsilon keeps Adam from turning float-rounding-sized gradients (~1e-12 on rarely used
    # embedding rows, summed in a different order across ranks) into full-size updates.
    common = {"run.steps": 3, "rollout.prompts_per_step": 4, "rollout.n": 2, "optim.lr": 1e-2, "optim.eps": 1e-4,
              "student.compute_dtype": "float32", "student.sampling_dtype": "float32", "eval.prompts": 0,
              "optim.micro_batch_size": 3, "objective.name": objective}
    _run(["distill", *tiny_overrides(tiny_dirs, prompts_file, tmp_path / "single", **common)], 1)
    _run(["distill", *tiny_overrides(tiny_dirs, prompts_file, tmp_path / "ddp", **common)], 2)
    _run(["distill", *tiny_overrides(tiny_dirs, prompts_file, tmp_path / "fsdp2",
                                     **common, **{"distributed.strategy": "fsdp2"})], 2)
    single, ddp, fsdp2 = (_weights(tmp_path / d) for d in ("single", "ddp", "fsdp2"))
    initial = load_file(str(tiny_dirs["student"] / "model.safetensors"))
    moved = max(float((single[k] - initial[k]).abs().max()) for k in single)
    assert moved > 1e-3  # training really happened
    assert single.keys() == ddp.keys() == fsdp2.keys()  # the sharded run exports an ordinary HF model too
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(fsdp2[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    # Metrics are reduced over ranks: the logged step losses agree with the single-process run.
    import json

    def losses(d):
        return [json.loads(x)["opd/loss"] for x in (d / "metrics.jsonl").read_text().splitlines()
                if "opd/loss" in x]
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-4, abs=1e-6)
    assert losses(tmp_path / "fsdp2") == pytest.approx(losses(tmp_path / "single"), rel=1e-4, abs=1e-6)


def test_resume_with_another_world_size(tmp_path, tiny_dirs, prompts_file):
    common = {"rollout.prompts_per_step": 4, "optim.lr": 1e-2, "optim.eps": 1e-4, "student.compute_dtype": "float32",
              "student.sampling_dtype": "float32", "eval.prompts": 0}
    _run(["distill", *tiny_overrides(tiny_dirs, prompts_file, tmp_path / "a", **{**common, "run.steps": 4})], 1)
    _run(["distill", *tiny_overrides(tiny_dirs, prompts_file, tmp_path / "b", **{**common, "run.steps": 2})], 2)
    _run(["distill", *tiny_overrides(tiny_dirs, prompts_file, tmp_path / "b",
                                     **{**common, "run.steps": 4, "run.resume": True})], 1)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
