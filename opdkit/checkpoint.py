"""Checkpoints: HF-format model + optimizer + scheduler + RNG + data position, written atomically.

Layout: ``RUN_DIR/checkpoints/step_000010/{model/, trainer_state.pt, meta.json}`` (``distributed.strategy=fsdp2``
writes sharded ``dcp/`` instead of ``model/``, see ``opdkit.fsdp``). A checkpoint is first
written to a hidden temporary directory and then renamed, so a crash mid-write never leaves a checkpoint
that looks complete. ``RUN_DIR/checkpoints/latest`` names the newest one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import CheckpointMismatch
from .lm import is_peft

CHECKPOINTS = "checkpoints"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_model(model, tokenizer, out: Path) -> None:
    """Save an ordinary HF model directory (LoRA adapters are merged so any tool can load it)."""
    out.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        from .lora import save_merged

        save_merged(model, out)
    else:
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def save_checkpoint(run_dir: Path, step: int, *, model, tokenizer, optimizer, scheduler, sampler_state: dict,
                    extra: dict | None = None, keep: int = 2) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        save_model(model, tokenizer, tmp / "model")
        if is_peft(model):  # also keep the adapter weights themselves for exact resume
            from .lora import adapter_state_dict

            torch.save(adapter_state_dict(model), tmp / "adapter_state.pt")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "sampler": sampler_state, "rng": rng_state(), "step": step, "extra": extra or {}},
                   tmp / "trainer_state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "trainer_state.pt").is_file():
            return path
    complete = sorted(p for p in root.glob("step_*") if (p / "trainer_state.pt").is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; return the trainer state (step, sampler, extra)."""
    from safetensors.torch import load_file

    from .fsdp import is_sharded, is_sharded_checkpoint, load_sharded_checkpoint

    if is_sharded_checkpoint(path):  # written by distributed.strategy=fsdp2; DCP re-shards to this run's layout
        return load_sharded_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    if is_sharded(model):
        raise RuntimeError(f"checkpoint {path} holds full (ddp / single-process) state; resume it with "
                           f"distributed.strategy=ddp, or start the fsdp2 run from its model directory "
                           f"{path / 'model'}")

    if is_peft(model):
        from .lora import load_adapter_state

        load_adapter_state(model, torch.load(path / "adapter_state.pt", map_location="cpu", weights_only=False))
    else:
        weights: dict[str, torch.Tensor] = {}
        for shard in sorted((path / "model").glob("*.safetensors")):
            weights.update(load_file(shard))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # Tied embeddings are stored once; anything else missing means a different model.
        missing = [m for m in missing if "lm_head" not in m]
        if missing or unexpected:
            raise CheckpointMismatch(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")
    # map_location: tensors saved from any device load on the CPU (a resume on a CPU-only host, or on ranks
    # that would otherwise all load onto cuda:0); load_state_dict then copies them to each parameter's device.
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


# -- verification, fallback and cleanup (resume) ------------------------------------------------------------


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """Complete checkpoints (``trainer_state.pt`` written), newest step first."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted((p for p in root.glob("step_*") if (p / "trainer_state.pt").is_file()), reverse=True)


def _safetensors_problem(path: Path) -> str | None:
    """Whether the header parses and the file is as long as the header says (a truncated file is not)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"{path.name} is truncated ({size} bytes, header of {n})"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} has an unreadable header ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} is truncated ({size} bytes, {8 + n + end} expected)"
    return None


def _zip_problem(path: Path) -> str | None:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:  # torch.save writes a zip whose directory is at the end
            zf.infolist()
    except (OSError, zipfile.BadZipFile) as e:
        return f"{path.name} is unreadable ({e})"
    return None


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with a checkpoint directory, or None if its files are whole (cheap: no tensor is read)."""
    path = Path(path)
    if (path / "dcp").is_dir():  # sharded (distributed.strategy=fsdp2): DCP writes .metadata after every shard
        if not (path / "dcp" / ".metadata").is_file() or not list((path / "dcp").glob("*.distcp")):
            return "incomplete sharded checkpoint (dcp/.metadata or dcp/*.distcp missing)"
        return _zip_problem(path / "trainer_state.pt")
    shards = sorted((path / "model").glob("*.safetensors"))
    adapter = path / "adapter_state.pt"
    if not shards and not adapter.is_file():
        return "no model weights (model/*.safetensors)"
    for shard in shards:
        problem = _safetensors_problem(shard)
        if problem:
            return problem
    for f in ([adapter] if adapter.is_file() else []) + [path / "trainer_state.pt"]:
        problem = _zip_problem(f)
        if problem:
            return problem
    return None


def remove_partial_writes(run_dir: Path) -> int:
    """Delete the hidden temporary directories a kill during a checkpoint write leaves; return how many."""
    root = Path(run_dir) / CHECKPOINTS
    stale = list(root.glob(".tmp-*")) if root.is_dir() else []
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(stale)
