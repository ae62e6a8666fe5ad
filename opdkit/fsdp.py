"""FSDP2 sharded training of the student (``distributed.strategy=fsdp2``) and sharded checkpoints.

The student is wrapped with ``torch.distributed.fsdp.fully_shard`` per decoder layer and once at the root, so
each rank keeps 1/world of the weights, gradients and AdamW moments; a layer's full weights exist only while
it runs. The root unit holds the embedding, final norm and vocabulary projection. The chunked head of
``opdkit.student`` runs outside the HF module's ``forward``, so ``shard_student`` registers one extra forward
method, ``opd_sharded_forward(fn, ...)``, with FSDP: it runs ``fn`` (decoder + chunked head + objectives)
between the root unit's pre- and post-forward hooks. The root's weights are therefore gathered for the head,
its backward hooks see the head's outputs, and its gradients are reduce-scattered like every other unit's:
no hand-reduced gradients and no gathered model.

Gradients are *summed* over ranks (the loss is already normalised by global token and sequence counts, as in
``opdkit.distributed``), so an fsdp2 step equals a ddp step and a single process on the same global batch.

The HF sampler keeps its own full copy of the student in ``student.sampling_dtype`` (as it does whenever that
dtype differs from the master weights); after each optimizer step it is refreshed one gathered tensor at a
time. The frozen teacher is replicated per rank (HF engine) or runs on its own engine (vLLM / served).

Checkpoints use ``torch.distributed.checkpoint``: every rank writes its shard into a temporary directory that
rank 0 renames only after all ranks have finished, so a checkpoint is complete or absent; DCP re-shards on
load, so a run resumes with any number of processes (or in a plain single process).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import types
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import CHECKPOINTS, _write_text_atomic, rng_state, set_rng_state
from .distributed import DistInfo, backend_for, barrier

FAULT_ENV = "OPDKIT_FAULT_KILL_DURING_SAVE"  # "STEP:RANK": SIGKILL that rank mid-checkpoint (tests only)


def ensure_process_group(device: str) -> DistInfo:
    """The process group FSDP shards over; a 1-rank group when the run was not launched by torchrun."""
    if not dist.is_initialized():
        backend = backend_for(device)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size())


def decoder_layers(model) -> list[torch.nn.Module]:
    from .lm import decoder_and_head

    decoder, _ = decoder_and_head(model)
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise ValueError(f"distributed.strategy=fsdp2: cannot find the decoder layers of {type(model).__name__} "
                         f"(expected {type(decoder).__name__}.layers)")
    return list(layers)


def _run_fn(self, fn, *args, **kwargs):
    return fn(self, *args, **kwargs)


def shard_student(model, *, device: str, compute_dtype: torch.dtype | None, head_dtype: torch.dtype | None,
                  cpu_offload: bool = False, reshard_after_forward: bool = True):
    """Shard ``model`` in place with FSDP2 over all ranks: one unit per decoder layer plus the root.

    Mixed precision follows the student's dtypes: decoder layers are gathered in ``compute_dtype`` when it
    differs from the master weights (halving all-gather traffic; autocast computes in it anyway), the root
    unit (embedding + head) in ``head_dtype`` so the vocabulary projection keeps its precision. Gradients are
    reduced in fp32. Layer inputs are not cast (``cast_forward_inputs=False``): the residual stream stays in
    the dtype autocast leaves it in (fp32), as without sharding; casting it to bf16 at every layer moved the
    demo's first-step loss by 0.4%.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard, \
        register_fsdp_forward_method

    info = ensure_process_group(device)
    mesh = init_device_mesh(torch.device(device).type, (info.world_size,))
    master = next(model.parameters()).dtype

    def policy(dtype):
        gathered = dtype if dtype is not None and dtype != master else None
        return MixedPrecisionPolicy(param_dtype=gathered, reduce_dtype=torch.float32, cast_forward_inputs=False)

    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy(compute_dtype), offload_policy=offload,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy(head_dtype), offload_policy=offload)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)  # sum, not mean: the loss is normalised globally
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    model.opd_sharded_forward = types.MethodType(_run_fn, model)
    register_fsdp_forward_method(model, "opd_sharded_forward")
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global L2 gradient norm (over all shards) after clipping to ``max_norm``; a plain float on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def local_shards(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """This rank's part of each parameter (detached), and whether any was sharded."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
    return local, any(hasattr(p, "to_local") for p in params)


def all_ranks_true(flag: bool) -> bool:
    """``flag`` AND-ed over ranks, so a check on local shards gives every rank the same answer."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) == 0.0


# -- rollouts -------------------------------------------------------------------------------------------


def rollout_copy(student, sampling_dtype: torch.dtype):
    """A plain, frozen copy of the (not yet sharded) student for the HF sampler."""
    plain = copy.deepcopy(student).to(sampling_dtype)
    plain.requires_grad_(False)
    return plain


# -- checkpoints ----------------------------------------------------------------------------------------


def _maybe_fault(step: int, info: DistInfo) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{step}:{info.rank}":
        os.kill(os.getpid(), signal.SIGKILL)


def save_sharded_checkpoint(run_dir: Path, step: int, *, model, optimizer, scheduler, sampler_state: dict,
                            extra: dict | None = None, keep: int = 2) -> Path:
    """Collective: every rank writes its shard of the model and optimizer; rank 0 commits the directory.

    Layout: ``step_NNNNNN/{dcp/, trainer_state.pt, meta.json}``. Until rank 0 renames ``.tmp-step_NNNNNN``
    (after a barrier that every rank reaches only once its shard is on disk), no reader sees the checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    info = DistInfo(dist.get_rank(), dist.get_world_size())
    root = Path(run_dir) / CHECKPOINTS
    final, tmp = root / f"step_{step:06d}", root / f".tmp-step_{step:06d}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    _maybe_fault(step, info)
    barrier(info)
    if info.is_main:
        torch.save({"scheduler": scheduler.state_dict(), "sampler": sampler_state, "rng": rng_state(),
                    "step": step, "extra": extra or {}}, tmp / "trainer_state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "format": "dcp", "world_size": info.world_size}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / "latest", final.name)
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / "dcp").is_dir()


def load_sharded_checkpoint(path: Path, *, model, optimizer, scheduler) -> dict:
    """Restore a DCP checkpoint into a sharded model (any number of ranks) or a plain one (one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(path) / "dcp"), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = torch.load(Path(path) / "trainer_state.pt", weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return trainer


def export_full_model(model, tokenizer, out: Path) -> None:
    """Collective: gather the full weights to rank 0, which saves an ordinary HF model directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied weights (lm_head = embed_tokens) are stored once, as HF does
            full.pop(name, None)
        seen.add(id(param))
    if dist.get_rank() == 0:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, state_dict=full)
        # save_pretrained records the FSDP subclass (FSDPLlamaForCausalLM); loaders need the HF class.
        config_path = out / "config.json"
        config = json.loads(config_path.read_text())
        config["architectures"] = [c.__name__ for c in type(model).__mro__
                                   if c.__name__ == type(model).__name__.removeprefix("FSDP")][:1] or \
            config.get("architectures")
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    barrier(DistInfo(dist.get_rank(), dist.get_world_size()))


# -- a self-contained check (CPU via gloo, or one GPU) ---------------------------------------------------


def check_fsdp2_single_gpu(device: str = "cuda", steps: int = 3, seed: int = 0) -> dict:
    """FSDP2 over a 1-rank group equals the unsharded student: same losses and weights after ``steps`` AdamW
    steps of the chunked-head student forward (sampled and top-k log-probs) on a tiny Llama built in-process.

    Runs on ``device`` ("cuda", "cuda:0", "cpu"); needs no files. Returns a JSON-able dict with ``ok``.
    """
    import time

    from .candidates import Candidates
    from .student import student_forward
    from .tiny import tiny_llama

    started = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
        torch.backends.cudnn.allow_tf32 = False
    created = not dist.is_initialized()
    vocab, B, P, T = 96, 4, 6, 10
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (P - i % 3,), generator=gen).tolist() for i in range(B)]
    response = torch.randint(3, vocab, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False
    mask[3, 4:] = False
    candidates = Candidates(torch.randint(0, vocab, (B, T, 5), generator=gen))

    def train(model) -> tuple[list[float], dict[str, torch.Tensor]]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4)
        losses = []
        for _ in range(steps):
            out = student_forward(model, prompts, response, mask, pad_id=2, vocab_size=vocab, candidates=candidates,
                                  chunk_size=7, compute_dtype=torch.float32, head_dtype=torch.float32)
            m = mask.to(out.logp_sampled.device)
            loss = -((out.logp_sampled + 0.1 * out.logp_at.mean(-1)) * m).sum() / m.sum()
            loss.backward()
            clip_grad_norm(list(model.parameters()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        weights = {}
        for name, p in model.named_parameters():
            weights[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
        return losses, weights

    try:
        plain = tiny_llama(vocab, seed=seed).to(dev)
        sharded = copy.deepcopy(plain)
        shard_student(sharded, device=device, compute_dtype=torch.float32, head_dtype=torch.float32)
        loss_plain, w_plain = train(plain)
        loss_fsdp, w_fsdp = train(sharded)
        initial = tiny_llama(vocab, seed=seed)
        moved = max(float((w_plain[k] - p.detach()).abs().max()) for k, p in initial.named_parameters())
        diff = max(float((w_plain[k] - w_fsdp[k]).abs().max()) for k in w_plain)
        loss_diff = max(abs(a - b) for a, b in zip(loss_plain, loss_fsdp))
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    return {"check": "fsdp2_single_gpu", "device": str(dev), "steps": steps, "ok": diff < 1e-5 and moved > 1e-3,
            "max_abs_weight_diff": diff, "max_abs_loss_diff": loss_diff, "max_weight_change": moved,
            "losses_plain": loss_plain, "losses_fsdp2": loss_fsdp, "seconds": time.perf_counter() - started}
