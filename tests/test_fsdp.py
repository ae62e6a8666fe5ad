"""FSDP2 (distributed.strategy=fsdp2) on CPU (gloo): sharded checkpoints that resume exactly with another number
of processes and survive a rank killed mid-write, the 1-rank check the GPU script runs, and the memory table.

fsdp2 == ddp == one process after N steps is tested in tests/test_distributed.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

from opdkit.fsdp import FAULT_ENV, check_fsdp2_single_gpu
from opdkit.memory import ModelShape, format_table, memory_table
from tests.conftest import tiny_overrides
from tests.test_distributed import _run, _weights

COMMON = {"rollout.prompts_per_step": 4, "optim.lr": 1e-2, "optim.eps": 1e-4, "student.compute_dtype": "float32",
          "student.sampling_dtype": "float32", "eval.prompts": 0, "run.threads": 1}


def test_sharded_checkpoints_resume_across_world_sizes_and_survive_a_killed_rank(tmp_path, tiny_dirs, prompts_file):
    def args(out, **kw):
        return ["distill", *tiny_overrides(tiny_dirs, prompts_file, tmp_path / out, **{**COMMON, **kw})]

    _run(args("ref", **{"run.steps": 4}), 1)  # uninterrupted, one process, no sharding

    # 2 ranks, a checkpoint every step; rank 1 is SIGKILLed after writing its shard of step 3.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "opdkit",
           *args("killed", **{"run.steps": 4, "run.save_every": 1, "distributed.strategy": "fsdp2"})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_ENV: "3:1"}
    assert subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600).returncode != 0
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    assert not (ckpts / "step_000003").exists() and (ckpts / ".tmp-step_000003" / "dcp").is_dir()
    assert sorted(p.name for p in (ckpts / "step_000002" / "dcp").glob("*.distcp")) == ["__0_0.distcp",
                                                                                        "__1_0.distcp"]
    # 2 -> 1: the previous checkpoint resumes in a plain single process and ends where the reference ends.
    _run(args("killed", **{"run.steps": 4, "run.resume": True}), 1)
    # 1 -> 2: a 1-rank fsdp2 run's checkpoint resumes on 2 ranks.
    _run(args("grow", **{"run.steps": 2, "distributed.strategy": "fsdp2"}), 1)
    _run(args("grow", **{"run.steps": 4, "run.resume": True, "distributed.strategy": "fsdp2"}), 2)
    ref = _weights(tmp_path / "ref")
    for run in ("killed", "grow"):
        other = _weights(tmp_path / run)
        assert other.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(other[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"{run}: {k}")


def test_fsdp2_one_rank_equals_unsharded():
    result = check_fsdp2_single_gpu("cpu", steps=2)
    assert result["ok"], result
    assert result["max_weight_change"] > 1e-3 and result["max_abs_weight_diff"] < 1e-6
    json.dumps(result)  # the GPU script writes it as JSON


# -- the memory table ---------------------------------------------------------------------------------------

QWEN3_8B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
            "tie_word_embeddings": False}


def _hf_param_count(config) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [
    {"model_type": "llama", "vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
     "num_key_value_heads": 2, "intermediate_size": 128, "tie_word_embeddings": True},
    # SmolLM2-135M
    {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
     "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "tie_word_embeddings": True},
    QWEN3_8B,
], ids=["tiny", "smollm2-135m", "qwen3-8b"])
def test_parameter_count_from_config_matches_transformers(config):
    assert ModelShape.from_hf_config(config).param_count() == _hf_param_count(config)


def test_memory_table_arithmetic_by_hand():
    s = ModelShape(vocab=100, hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, tied=True)
    # per layer: q 8*8 + k,v 2*8*4 + o 8*8 + mlp 3*8*16 + norms 2*8 = 592; root: 100*8 + 8 = 808
    assert s.layer_params() == 592 and s.param_count() == 2 * 592 + 808
    rows = dict((w, b) for w, b, _ in memory_table(student=s, world_size=4, strategy="fsdp2", rollout_rows=3,
                                                  max_len=10, param_dtype="float32", sampling_dtype="bfloat16",
                                                  compute_dtype="bfloat16"))
    assert rows["student weights"] == 1992 * 4 // 4 and rows["optimizer (AdamW moments)"] == 2 * 1992
    assert rows["fsdp2 gathered units (transient)"] == 808 * 4 + 2 * 592 * 2  # fp32 root + two bf16 layers
    assert rows["sampler copy of the student"] == 1992 * 2
    assert rows["rollout KV cache"] == 3 * 10 * (2 * 2 * 1 * 4 * 2)  # rows * tokens * (k+v) * layers * kv * hd * 2B
    ddp = dict((w, b) for w, b, _ in memory_table(student=s, world_size=4, strategy="ddp"))
    assert ddp["student weights"] == 1992 * 4 and ddp["sampler copy of the student"] == 0


RSS_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from opdkit.tiny import tiny_llama
from opdkit.train import make_optimizer
from opdkit.config import OptimConfig

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

shape = json.loads(sys.argv[1])
# warm up imports, the autograd engine and the fused AdamW kernel on a small model first
warm = tiny_llama(64, layers=1, hidden=16, heads=2, kv_heads=1, intermediate=32)
warm(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits.float().logsumexp(-1).mean().backward()
warm_opt, _ = make_optimizer(warm.parameters(), OptimConfig(lr=1e-3), 1)
warm_opt.step()
del warm, warm_opt, _
r0 = rss()
model = tiny_llama(shape["vocab"], layers=shape["layers"], hidden=shape["hidden"], heads=shape["heads"],
                   kv_heads=shape["kv_heads"], intermediate=shape["intermediate"], tie=True)
r1 = rss()
ids = torch.randint(0, shape["vocab"], (1, 8))
model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
r2 = rss()
opt, _ = make_optimizer(model.parameters(), OptimConfig(lr=1e-3), 1)
opt.step()
r3 = rss()
print(json.dumps({"weights": r1 - r0, "grads": r2 - r1, "optimizer": r3 - r2}))
"""


def _measured(shape: dict) -> dict:
    # A fixed mmap threshold returns every large freed block (activations) to the OS, so RSS deltas count
    # the tensors that stay alive.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, json.dumps(shape)], capture_output=True, text=True,
                         env=env, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _check_rss(shape: dict, rel: float):
    s = ModelShape(vocab=shape["vocab"], hidden=shape["hidden"], layers=shape["layers"], heads=shape["heads"],
                   kv_heads=shape["kv_heads"], head_dim=shape["hidden"] // shape["heads"],
                   intermediate=shape["intermediate"], tied=True)
    table = {w: b for w, b, _ in memory_table(student=s)}
    measured = _measured(shape)
    for row, key in (("student weights", "weights"), ("student grads", "grads"),
                     ("optimizer (AdamW moments)", "optimizer")):
        assert measured[key] == pytest.approx(table[row], rel=rel), (key, measured, table)


def test_memory_table_matches_measured_rss_tiny_family():
    # the tiny Llama of opdkit.tiny, widened to ~6M parameters (24 MB in fp32) so RSS resolves it
    _check_rss({"vocab": 4096, "hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 1024}, 0.1)


@pytest.mark.slow
def test_memory_table_matches_measured_rss_135m_shape():
    _check_rss({"vocab": 49152, "hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "intermediate": 1536}, 0.05)


def test_memory_table_printed_format():
    s = ModelShape.from_hf_config(QWEN3_8B)
    text = format_table(memory_table(student=s, world_size=8, strategy="fsdp2"), 8)
    assert "student weights" in text and "GiB" in text and "total on device" in text


@pytest.mark.parametrize("override, message", [
    ("student.lora_rank=8", "LoRA"), ("rollout.engine=vllm", "rollout.engine=hf"),
    ("distributed.strategy=zero3", "distributed.strategy"),
])
def test_fsdp2_config_errors_name_the_option(override, message):
    from opdkit.config import ConfigError, DistillConfig, load_config

    base = ["student.path=s", "teacher.path=t", "data.train=d.jsonl", "distributed.strategy=fsdp2"]
    with pytest.raises(ConfigError, match=message):
        load_config(DistillConfig, None, base + [override])
