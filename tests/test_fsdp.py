"""FSDP2 (distributed.strategy=fsdp2) under torchrun on CPU (gloo): equal to ddp and to one process, sharded
checkpoints that resume with another number of processes, and survive a rank killed mid-write."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from tests.test_distributed import _run, _weights

# fp32 everywhere and a large AdamW epsilon (see tests/test_distributed.py): the three runs differ only in the
# order of float sums, which Adam would otherwise amplify on near-zero gradients.
COMMON = {"rollout.prompts_per_step": 4, "rollout.n": 2, "optim.lr": 1e-2, "optim.eps": 1e-4,
          "student.compute_dtype": "float32", "student.sampling_dtype": "float32", "eval.prompts": 0,
          "optim.micro_batch_size": 3, "run.threads": 1}


def _losses(run_dir):
    return [json.loads(x)["opd/loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "opd/loss" in x]


def _assert_same(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k, **(tol or {"rtol": 1e-4, "atol": 1e-5}))


@pytest.mark.parametrize("objective", ["topk", "sampled", "reverse_kl"])
def test_fsdp2_matches_ddp_and_single_process(tmp_path, tiny_dirs, prompts_file, objective):
    cfg = {**COMMON, "run.steps": 3, "objective.name": objective}
    _run(["distill", *tiny_overrides(tiny_dirs, prompts_file, tmp_path / "single", **cfg)], 1)
    _run(["distill", *tiny_overrides(tiny_dirs, prompts_file, tmp_path / "ddp", **cfg)], 2)
    _run(["distill", *tiny_overrides(tiny_dirs, prompts_file, tmp_path / "fsdp",
                                     **cfg, **{"distributed.strategy": "fsdp2"})], 2)
    single, ddp, fsdp = (_weights(tmp_path / d) for d in ("single", "ddp", "fsdp"))
    initial = load_file(str(tiny_dirs["student"] / "model.safetensors"))
    assert max(float((single[k] - initial[k]).abs().max()) for k in single) > 1e-3  # training happened
    _assert_same(single, ddp)
    _assert_same(single, fsdp)
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-4, abs=1e-6)
    # The exported final model is an ordinary HF directory: plain transformers loads it.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final_model")
    assert type(model).__name__ == "LlamaForCausalLM"
