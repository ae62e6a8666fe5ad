"""The precision policy (dtype `auto`) and the thread policy, with the capability probe faked."""

from __future__ import annotations

import logging

import pytest
import yaml

from opdkit import hardware
from opdkit.config import DistillConfig, dump_yaml, load_config
from opdkit.hardware import Capability, Choice, choose, fast_bf16, resolve_config
from opdkit.probe import ProbeConfig
from opdkit.config import FrozenModelConfig as ModelConfig
from opdkit.recipes.sft import SFTConfig

CPU_AVX2 = Capability("cpu", "AMD EPYC (Zen 3)", False, "AVX2, no native bf16")
CPU_AMX = Capability("cpu", "Intel Xeon (Sapphire Rapids)", True, "AVX512, amx_bf16 avx512_bf16")
GPU_BF16 = Capability("cuda", "NVIDIA H200", True, "sm_90")
GPU_NO_BF16 = Capability("cuda", "Tesla T4", False, "sm_75")


def probes(cap: Capability, speedup: float = 5.0) -> dict:
    def speedup_fn(device):
        return speedup

    return {"capability_fn": lambda device: cap, "speedup_fn": speedup_fn}


@pytest.mark.parametrize("cap, speedup, expected", [
    (CPU_AVX2, 1 / 44, "float32"),       # emulated bf16: never picked
    (CPU_AMX, 5.0, "bfloat16"),          # native and fast
    (CPU_AMX, 1.05, "float32"),          # reports bf16, runs it no faster: the benchmark overrules the flags
    (GPU_BF16, 8.0, "bfloat16"),
    (GPU_NO_BF16, 1.0, "float32"),       # never a silent fall back to float16
])
def test_auto_picks_bf16_only_where_native_and_fast(cap, speedup, expected):
    choice = fast_bf16(cap.device_type, **probes(cap, speedup))
    assert choice.dtype == expected
    assert cap.detail.split(",")[0] in choice.reason


def test_master_weights_and_heads_stay_float32_everywhere():
    for cap in (CPU_AMX, GPU_BF16):
        assert choose("param_dtype", "auto", cap.device_type, **probes(cap)).dtype == "float32"
        assert choose("head_dtype", "auto", cap.device_type, **probes(cap)).dtype == "float32"
        assert choose("compute_dtype", "auto", cap.device_type, **probes(cap)).dtype == "bfloat16"


def test_explicit_value_wins_and_slow_bf16_warns_once(caplog):
    hardware._warned.clear()
    with caplog.at_level(logging.WARNING, logger="opdkit.hardware"):
        for _ in range(3):
            assert choose("dtype", "bfloat16", "cpu", **probes(CPU_AVX2, 1 / 44)) == Choice("bfloat16",
                                                                                             "set explicitly")
    warnings = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    assert len(warnings) == 1 and "44x slower" in warnings[0] and "AMD EPYC" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="opdkit.hardware"):
        choose("dtype", "bfloat16", "cpu", **probes(CPU_AMX))
    assert not caplog.records
    assert choose("dtype", "float32", "cpu", **probes(CPU_AMX)).dtype == "float32"


def test_resolve_config_covers_every_dtype_key_of_every_command():
    cfgs = [DistillConfig(), ProbeConfig(), SFTConfig(), ModelConfig()]
    for cfg in cfgs:
        made = resolve_config(cfg, **probes(CPU_AMX))
        assert made, type(cfg).__name__
        for key, choice in made:
            section = cfg
            for part in key.split("."):
                section = getattr(section, part)
            assert section == choice.dtype in ("float32", "bfloat16"), key
    d = DistillConfig()
    resolve_config(d, **probes(CPU_AVX2))
    assert (d.student.compute_dtype, d.student.sampling_dtype, d.teacher.dtype) == ("float32",) * 3
    d = DistillConfig()
    resolve_config(d, **probes(CPU_AMX))
    assert (d.student.compute_dtype, d.student.sampling_dtype, d.teacher.dtype) == ("bfloat16",) * 3
    assert (d.student.param_dtype, d.student.head_dtype, d.teacher.head_dtype) == ("float32",) * 3


def test_the_device_of_each_section_decides(monkeypatch):
    seen = []

    def capability_fn(device):
        seen.append(str(device))
        return GPU_BF16 if str(device).startswith("cuda") else CPU_AVX2

    d = DistillConfig()
    d.teacher.device = "cuda:0"
    resolve_config(d, capability_fn=capability_fn, speedup_fn=lambda device: 8.0)
    assert d.teacher.dtype == "bfloat16" and d.student.compute_dtype == "float32"
    assert "cuda:0" in seen and "cpu" in seen


def test_saved_config_names_choice_and_reason_and_resume_keeps_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    overrides = ["student.path=s", "teacher.path=t", "data.train=d.jsonl", f"run.out_dir={out}"]
    monkeypatch.setattr(hardware, "capability", lambda device="cpu": CPU_AVX2)
    cfg = load_config(DistillConfig, None, overrides)
    text = dump_yaml(cfg)
    assert "# teacher.dtype: auto -> float32 (CPU AVX2, no native bf16)" in text
    assert "# student.param_dtype: auto -> float32 (master weights" in text
    assert yaml.safe_load(text)["teacher"]["dtype"] == "float32"
    out.mkdir()
    (out / "config.yaml").write_text(text)
    # The same run resumed on a machine with fast bf16 keeps the dtypes it was trained in ...
    monkeypatch.setattr(hardware, "capability", lambda device="cpu": CPU_AMX)
    monkeypatch.setattr(hardware, "bf16_speedup", lambda device="cpu": 5.0)
    resumed = load_config(DistillConfig, None, overrides + ["run.resume=true"])
    assert (resumed.teacher.dtype, resumed.student.compute_dtype) == ("float32", "float32")
    assert "auto -> float32 (kept from the run being resumed)" in dump_yaml(resumed)
    # ... while a new run there picks bf16, and an explicit value is never replaced.
    fresh = load_config(DistillConfig, None, overrides[:-1] + [f"run.out_dir={tmp_path / 'new'}"])
    assert fresh.teacher.dtype == "bfloat16"
    explicit = load_config(DistillConfig, None, overrides + ["run.resume=true", "teacher.dtype=bfloat16"])
    assert explicit.teacher.dtype == "bfloat16"


def test_force_no_bf16_switch(monkeypatch):
    monkeypatch.setenv("OPDKIT_FORCE_NO_BF16", "1")
    cap = hardware.cpu_capability()
    assert not cap.native_bf16 and "OPDKIT_FORCE_NO_BF16=1" in cap.detail
    assert fast_bf16("cpu").dtype == "float32"


def test_benchmark_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(hardware, "measure_bf16_speedup", lambda device="cpu": calls.append(device) or 3.0)
    monkeypatch.setattr(hardware, "capability", lambda device="cpu": CPU_AMX)
    assert hardware.bf16_speedup() == 3.0 and hardware.bf16_speedup() == 3.0
    assert len(calls) == 1 and (tmp_path / "hardware.json").is_file()


def test_micro_benchmark_is_quick_and_positive():
    import time

    start = time.perf_counter()
    ratio = hardware.measure_bf16_speedup("cpu", size=(64, 128, 256), repeats=3)
    assert ratio > 0 and time.perf_counter() - start < 5


def test_threads_share_the_cores_between_local_ranks(monkeypatch):
    monkeypatch.setattr(hardware, "available_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert hardware.default_threads() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert hardware.default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert hardware.default_threads() == 1


def test_vllm_cpu_settings_follow_the_machine(monkeypatch):
    assert hardware.vllm_cpu_kv_cache_gib(3) == 3
    assert hardware.vllm_cpu_kv_cache_gib(0, total_bytes=24 << 30) == 2
    assert hardware.vllm_cpu_kv_cache_gib(0, total_bytes=512 << 30) == 16
    assert hardware.vllm_cpu_kv_cache_gib(0, total_bytes=4 << 30) == 1
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert hardware.vllm_cpu_thread_binding() == "4-7"


def test_hardware_record_names_the_machine():
    record = hardware.hardware_record()
    for key in ("cpu_model", "cpu_capability", "cpu_bf16_flags", "bf16_matmul_speedup", "cores", "torch_threads",
                "torch", "transformers", "auto_dtype"):
        assert key in record
    assert record["cpu_model"] in hardware.describe_machine(record)


def test_a_cuda_config_without_cuda_resolves_to_float32(monkeypatch):
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    assert not hardware.capability("cuda:0").native_bf16
    d = DistillConfig()
    d.student.device = d.teacher.device = "cuda"
    resolve_config(d)
    assert d.student.compute_dtype == d.teacher.dtype == "float32"
