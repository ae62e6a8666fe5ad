"""GPU smoke checks (``scripts/gpu-check.sh``): the ten checks of the GPU-readiness note plus CPU parity and the
cost of a ~0.5B pair, each a named function returning its figures, all results in one JSON file.

Every model is built in-process (tiny Llamas and a random-weight ~0.5B Llama with Qwen2.5-0.5B's shape): the
GPU machine has no network and no GGUF. ``--cpu`` runs the same checks on the CPU at small sizes (the test suite
does, in well under a minute); GPU-only parts (cross-GPU placement, CUDA memory) then report what they skipped.

A check is ``@check("name")`` on a function of a ``Context`` that returns a dict of figures and raises
(``CheckFailed`` or anything else) to fail; one failure does not stop the others.

    python -m opdkit.gpucheck --out gpu-check.json [--cpu] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


class CheckFailed(AssertionError):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass
class Context:
    device: torch.device
    small: bool  # --cpu: small sizes
    root: Path
    cache: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def tiny_dirs(self) -> dict[str, Path]:
        """Saved tiny student (seed 0) and teacher (seed 1), char tokenizer, and a prompt file."""
        if "tiny" not in self.cache:
            from .tiny import char_tokenizer, save_tiny, tiny_llama

            tok = char_tokenizer()
            dirs = {}
            for name, seed in (("student", 0), ("teacher", 1)):
                save_tiny(tiny_llama(len(tok), seed=seed), tok, self.root / name)
                dirs[name] = self.root / name
            rows = [{"prompt": f"What is {a}+{b}?", "answer": str(a + b)} for a in range(5) for b in range(5)]
            dirs["prompts"] = self.root / "prompts.jsonl"
            dirs["prompts"].write_text("".join(json.dumps(r) + "\n" for r in rows))
            self.cache["tiny"] = dirs
        return self.cache["tiny"]

    def overrides(self, out: Path, **extra) -> list[str]:
        d = self.tiny_dirs()
        base = {"student.path": d["student"], "teacher.path": d["teacher"], "data.train": d["prompts"],
                "run.out_dir": out, "run.steps": 2, "rollout.prompts_per_step": 4, "rollout.max_new_tokens": 8,
                "eval.prompts": 0, "run.progress": False, "run.tensorboard": False, "objective.k": 8,
                "student.device": str(self.device), "teacher.device": str(self.device)}
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]


CHECKS: list[tuple[str, Callable[[Context], dict]]] = []


def check(name: str):
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


def _distill(ctx: Context, out: Path, **extra):
    from .config import DistillConfig, load_config
    from .train import Distiller

    cfg = load_config(DistillConfig, None, ctx.overrides(out, **extra))
    return Distiller(cfg)


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


def _cli(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=timeout)


# -- 1. every objective's token loss on the device equals the CPU's ----------------------------------------

@check("token_loss_every_objective")
def token_loss_every_objective(ctx: Context) -> dict:
    from .config import ObjectiveConfig
    from .candidates import Candidates
    from .objectives import OBJECTIVES, objective_for, token_loss
    from .engines.base import TeacherScores
    from .student import StudentOutputs
    from .train import on_device

    g = torch.Generator().manual_seed(0)
    B, T, k, V = 4, 6, 8, 64
    s_top, t_top = torch.randint(0, V, (B, T, k), generator=g), torch.randint(0, V, (B, T, k), generator=g)
    logp = lambda *shape: -torch.rand(*shape, generator=g) * 5  # noqa: E731
    student = StudentOutputs(logp(B, T), logp(B, T, 2 * k), torch.rand(B, T, generator=g), torch.rand(B, T, generator=g))
    scores = TeacherScores(logp(B, T), t_top, logp(B, T, k), logp(B, T, k), torch.rand(B, T, generator=g))
    adv = torch.randn(B, generator=g)
    figures = {}
    for name in sorted(OBJECTIVES):
        for strategy in (["union", "intersection", "student", "teacher", "symmetric_difference"]
                         if name == "topk" else ["union"]):
            cfg = ObjectiveConfig(name=name, strategy=strategy, outcome_weight=0.5)
            objective = objective_for(cfg)
            ref = token_loss(objective, student, scores, Candidates(s_top, t_top), adv)
            dev_student = StudentOutputs(*(t.to(ctx.device) for t in (student.logp_sampled, student.logp_at,
                                                                        student.entropy, student.full_loss)))
            sc, s_dev, ad = on_device(ctx.device, scores, s_top, adv)
            got = token_loss(objective, dev_student, sc, Candidates(s_dev, sc.topk_ids), ad)
            expect(got.device.type == ctx.device.type, f"{name}: loss on {got.device}")
            diff = float((got.cpu() - ref).abs().max())
            figures[f"{name}/{strategy}"] = diff
            torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-6, msg=f"{name}/{strategy}")
    return {"max_abs_diff": figures}


# -- 2. Distiller steps on the device: topk in bf16, then reverse_kl with LoRA and gradient checkpointing -----

@check("distiller_steps")
def distiller_steps(ctx: Context) -> dict:
    out = {}
    for label, extra in (("topk_bf16", {"objective.name": "topk", "student.compute_dtype": "bfloat16",
                                        "eval.prompts": 4, "eval.max_new_tokens": 8}),
                         ("reverse_kl_lora_gc", {"objective.name": "reverse_kl", "student.lora_rank": 4,
                                                 "student.gradient_checkpointing": True, "eval.prompts": 4,
                                                 "eval.max_new_tokens": 8})):
        d = _distill(ctx, ctx.root / f"steps_{label}", **extra)
        before = _weights(d.student)
        losses = [d.opd_step(step)[0]["opd/loss"] for step in (1, 2)]
        expect(all(map(lambda x: x == x and abs(x) < 1e6, losses)), f"{label}: losses {losses}")
        moved = float((_weights(d.student) - before).abs().max())
        expect(moved > 0, f"{label}: the weights did not change")
        held_out = d.evaluate()[0]  # the held-out evaluation (greedy rollout + full-vocab KL) on the device
        expect(held_out.get("eval/reverse_kl", -1) >= 0, f"{label}: eval metrics {held_out}")
        out[label] = {"losses": losses, "max_weight_change": moved, "eval_reverse_kl": held_out["eval/reverse_kl"]}
    return out


# -- 3. student and teacher on different devices ------------------------------------------------------------

@check("cross_device")
def cross_device(ctx: Context) -> dict:
    if not ctx.cuda:
        return {"skipped": "needs a GPU: with --cpu both sides are the CPU (checked by distiller_steps)"}
    out = {}
    for s_dev, t_dev in ((str(ctx.device), "cpu"), ("cpu", str(ctx.device))):
        for objective in ("topk", "reverse_kl"):
            label = f"student_{s_dev}/teacher_{t_dev}/{objective}"
            d = _distill(ctx, ctx.root / label.replace("/", "_").replace(":", ""), **{
                "objective.name": objective, "student.device": s_dev, "teacher.device": t_dev})
            out[label] = d.opd_step(1)[0]["opd/loss"]
    return {"losses": out}


# -- 4. sampling speed at a real vocabulary; greedy equals the CPU ----------------------------------------

@check("sampling_speed_and_greedy_parity")
def sampling_speed_and_greedy_parity(ctx: Context) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from .noise import noise_keys, row_uniforms, sample_with_uniforms
    from .engines.hf_rollout import row_seeds, sample

    V, B, T = (4096, 4, 16) if ctx.small else (151_936, 64, 128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model = model.eval().to(ctx.device)
    prompts = [[1] + [(i * 31 + j * 7) % (V - 3) + 3 for j in range(12)] for i in range(B)]
    kw = dict(max_new_tokens=T, eos_ids=[-1], pad_id=0, seeds=row_seeds(0, 0, B), min_new_tokens=T, topk=16)
    sample(model, prompts, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    ctx.sync()
    start = time.perf_counter()
    resp = sample(model, prompts, **kw)[0]
    ctx.sync()
    per_token = (time.perf_counter() - start) / T
    expect(resp.shape == (B, T), f"sampled shape {tuple(resp.shape)}")
    # the noise and the draw alone, at the same shapes
    keys = noise_keys(row_seeds(0, 0, B), ctx.device)
    logprobs = torch.log_softmax(torch.randn(B, V, device=ctx.device), -1)
    ctx.sync()
    start = time.perf_counter()
    for t in range(T):
        sample_with_uniforms(logprobs, row_uniforms(keys, torch.arange(t, t + 1, device=ctx.device))[:, 0])
    ctx.sync()
    noise_per_token = (time.perf_counter() - start) / T
    # greedy on the device equals greedy on the CPU (float32, a few rows)
    rows, steps = prompts[:4], 16
    greedy = dict(max_new_tokens=steps, eos_ids=[-1], pad_id=0, greedy=True)
    dev_tokens = sample(model, rows, **greedy)[0]
    cpu_tokens = sample(model.cpu(), rows, **greedy)[0]
    agree = float((dev_tokens == cpu_tokens).float().mean())
    expect(agree == 1.0, f"greedy tokens agree on {agree:.3f} of positions")
    return {"vocab": V, "batch": B, "tokens": T, "ms_per_token": 1000 * per_token,
            "noise_and_draw_ms_per_token": 1000 * noise_per_token, "noise_share": noise_per_token / per_token,
            "greedy_agreement": agree}


# -- 5. a one-rank process group on the configured backend ------------------------------------------------

@check("one_rank_process_group")
def one_rank_process_group(ctx: Context) -> dict:
    import torch.distributed as dist

    from . import distributed as D

    backend = D.backend_for(str(ctx.device))
    kwargs = {"device_id": ctx.device} if ctx.cuda else {}
    if ctx.cuda:
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(backend, init_method=f"file://{ctx.root / 'pg-store'}", rank=0, world_size=1,
                            timeout=D.TIMEOUT, **kwargs)
    try:
        claim = D.DistInfo(0, 2)  # world_size 2 claimed, so the collectives run; one real rank sums to itself
        params = [torch.nn.Parameter(torch.randn(1000, device=ctx.device)) for _ in range(3)]
        params.append(torch.nn.Parameter(torch.randn(10, device=ctx.device, dtype=torch.bfloat16)))
        for p in params:
            p.grad = torch.randn_like(p)
        before = [p.grad.clone() for p in params]
        D.all_reduce_gradients(params, claim, bucket_bytes=4096)
        expect(all(torch.equal(p.grad, b) for p, b in zip(params, before)), "all_reduce_gradients changed values")
        expect(D.all_reduce_sum(3.5, claim) == 3.5, "all_reduce_sum")
        expect(D.all_gather_objects({"a": torch.ones(2)}, claim)[0]["a"].sum() == 2, "all_gather_objects")
        D.barrier(claim)
    finally:
        dist.destroy_process_group()
    return {"backend": backend}


# -- 6. torchrun: two processes for one GPU fail clearly; the CPU path with CUDA hidden works -------------

@check("torchrun_launches")
def torchrun_launches(ctx: Context) -> dict:
    visible = torch.cuda.device_count() if ctx.cuda else 0
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "opdkit",
           "distill"]
    figures = {"visible_gpus": visible}
    if ctx.small:  # rank 1 of two, in this process (no CUDA here): the same ConfigError, without two launches
        from .config import ConfigError

        saved = os.environ.get("LOCAL_RANK")
        os.environ["LOCAL_RANK"] = "1"
        try:
            _distill(ctx, ctx.root / "tr_bad", **{"student.device": "cuda", "teacher.device": "cuda"})
            raise CheckFailed("rank 1 asking for cuda on a machine without a second GPU did not fail")
        except ConfigError as exc:
            expect("visible GPU" in str(exc), f"unclear error: {exc}")
        finally:
            os.environ.pop("LOCAL_RANK") if saved is None else os.environ.__setitem__("LOCAL_RANK", saved)
        figures["too_many_ranks"] = "fails with a clear message"
    elif visible < 2:  # two ranks asking for cuda on fewer GPUs than ranks
        bad = _cli(run + ctx.overrides(ctx.root / "tr_bad", **{"student.device": "cuda", "teacher.device": "cuda"}))
        clear = "visible GPU" in bad.stderr + bad.stdout
        expect(bad.returncode != 0 and clear, f"2 ranks on {visible} GPU(s): rc {bad.returncode}, "
                                              f"stderr tail {bad.stderr[-600:]}")
        figures["too_many_ranks"] = "fails with a clear message"
    if ctx.small:  # the dry mode's budget; tests/test_distributed.py runs two CPU ranks in the suite
        figures["cpu_two_ranks_cuda_hidden"] = "skipped in --cpu mode"
        return figures
    ok = _cli(run + ctx.overrides(ctx.root / "tr_cpu", **{"student.device": "cpu", "teacher.device": "cpu",
                                                           "run.steps": 1, "student.compute_dtype": "float32"}),
              env={"CUDA_VISIBLE_DEVICES": ""})
    expect(ok.returncode == 0, f"2-process CPU run with CUDA hidden failed: {ok.stderr[-800:]}")
    figures["cpu_two_ranks_cuda_hidden"] = "ok"
    return figures


# -- 7. exact resume on the device; the checkpoint loads with CUDA hidden ---------------------------------

@check("resume")
def resume(ctx: Context) -> dict:
    common = {"student.compute_dtype": "float32", "student.sampling_dtype": "float32", "optim.lr": 1e-2,
              "run.save_every": 2}
    # CUDA's atomics (gather/index backward) sum in a varying order; exact resume needs deterministic kernels
    # (CUBLAS_WORKSPACE_CONFIG is set by scripts/gpu-check.sh before CUDA starts).
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        a = _distill(ctx, ctx.root / "res_a", **{**common, "run.steps": 4})
        a.run()
        b = _distill(ctx, ctx.root / "res_b", **{**common, "run.steps": 2})
        b.run()
        c = _distill(ctx, ctx.root / "res_b", **{**common, "run.steps": 4, "run.resume": True})
        c.run()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    diff = float((_weights(a.student) - _weights(c.student)).abs().max())
    expect(diff <= 1e-6, f"4 steps vs 2 + resume differ by {diff:g}")
    from .checkpoint import latest_checkpoint

    path = latest_checkpoint(ctx.root / "res_b")
    code = ("import pathlib, sys, torch; from opdkit.checkpoint import load_checkpoint; from opdkit.models import "
            "load_causal_lm; m = load_causal_lm(sys.argv[1] + '/model', 'float32'); o = torch.optim.AdamW("
            "m.parameters()); s = torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1.0); "
            "print(load_checkpoint(pathlib.Path(sys.argv[1]), model=m, optimizer=o, scheduler=s)['step'])")
    if ctx.cuda:
        hidden = _cli([sys.executable, "-c", code, str(path)], env={"CUDA_VISIBLE_DEVICES": "",
                                                                     "PYTHONPATH": os.pathsep.join(sys.path)})
        expect(hidden.returncode == 0 and hidden.stdout.strip().endswith("4"),
               f"loading {path} with CUDA hidden: {hidden.stderr[-800:]}")
    else:  # no CUDA in this process anyway: load it here
        from .checkpoint import load_checkpoint

        opt = torch.optim.AdamW(a.student.parameters())
        state = load_checkpoint(path, model=a.student, optimizer=opt,
                                scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0))
        expect(state["step"] == 4, f"checkpoint step {state['step']}")
    return {"max_abs_diff_4_vs_2_plus_2": diff, "exact": diff == 0.0, "loads_with_cuda_hidden": True}


# -- 8. memory of scoring and training at a real vocabulary -----------------------------------------------

def _opd_pair(ctx: Context, *, layers: int, hidden: int, inter: int, heads: int, kv: int, V: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=V, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True)
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(**cfg)).to(ctx.device)
    torch.manual_seed(1)
    teacher = LlamaForCausalLM(LlamaConfig(**cfg)).to(device=ctx.device, dtype=torch.bfloat16).eval()
    teacher.requires_grad_(False)
    return student, teacher


def _phases(ctx: Context, student, teacher, *, B: int, T: int, P: int, k: int, V: int, sample_tokens: int = 0):
    """One OPD step by hand (rollout of ``sample_tokens`` or random responses, scoring, loss, backward, AdamW),
    with seconds and CUDA peak memory per phase."""
    from .config import ObjectiveConfig
    from .candidates import Candidates
    from .losses import aggregate
    from .objectives import objective_for, token_loss
    from .engines.hf_rollout import HFRolloutEngine
    from .engines.hf_teacher import HFTeacher
    from .student import student_forward
    from .train import on_device

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (P,), generator=g).tolist() for _ in range(B)]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=ctx.cuda)
    figures: dict = {}

    def phase(name, fn):
        ctx.sync()
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        ctx.sync()
        figures[name] = {"seconds": time.perf_counter() - start}
        if ctx.cuda:
            figures[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return result

    if sample_tokens:
        engine = HFRolloutEngine(student, eos_ids=[-1], pad_id=0, sampling_dtype=torch.bfloat16, vocab_size=V)
        ro = phase("rollout", lambda: engine.generate(prompts, n=1, temperature=1.0, top_p=1.0,
                                                      max_new_tokens=sample_tokens, topk=k, seed=0,
                                                      min_new_tokens=sample_tokens))
        resp, mask, s_top = ro.response_ids, ro.response_mask, ro.topk_ids
        del engine
    else:
        resp = torch.randint(3, V, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.bool)
        s_top = torch.randint(0, V, (B, T, k), generator=g)
    teach = HFTeacher(teacher, vocab_size=V, pad_id=0, chunk_size=1024, batch_size=8)
    scores = phase("teacher", lambda: teach.score(prompts, resp, mask, k=k, student_topk_ids=s_top))
    objective = objective_for(ObjectiveConfig(name="topk", k=k, strategy="union"))

    def train():
        sc, top = on_device(next(student.parameters()).device, scores, s_top)
        candidates = Candidates(top, sc.topk_ids)
        n = float(mask.sum())
        for rows in torch.arange(B).split(max(1, B // 4)):
            out = student_forward(student, [prompts[i] for i in rows], resp[rows], mask[rows], pad_id=0,
                                  vocab_size=V, candidates=candidates.select(rows), chunk_size=512,
                                  compute_dtype=torch.bfloat16)
            loss = aggregate(token_loss(objective, out, sc.select(rows), candidates.select(rows)), mask[rows].to(out.logp_sampled.device),
                             "token_mean", n, float(B))
            loss.backward()
        return float(loss.detach())

    loss = phase("train", train)
    phase("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    figures["loss"] = loss
    figures["step_seconds"] = sum(v["seconds"] for v in figures.values() if isinstance(v, dict))
    return figures


@check("memory_real_vocab")
def memory_real_vocab(ctx: Context) -> dict:
    V, B, T, k = (2048, 4, 32, 16) if ctx.small else (151_936, 32, 512, 16)
    H = 64 if ctx.small else 896
    student, teacher = _opd_pair(ctx, layers=4, hidden=H, inter=4 * H, heads=4 if ctx.small else 14,
                                 kv=2, V=V)
    figures = _phases(ctx, student, teacher, B=B, T=T, P=16, k=k, V=V)
    bound = B * T * V * 4
    figures["full_logits_bytes_bound_gib"] = bound / 2**30
    if ctx.cuda:
        peak = max(v["peak_gib"] for v in figures.values() if isinstance(v, dict))
        expect(peak * 2**30 < bound, f"peak {peak:.2f} GiB reaches B*T*V*4 = {bound / 2**30:.2f} GiB")
        figures["peak_gib"] = peak
    else:
        figures["peak_gib"] = "not measured on the CPU"
    return figures


# -- 9. SFT on the device: packed equals padded, then a few steps -----------------------------------------

@check("sft_packed_equals_padded")
def sft_packed_equals_padded(ctx: Context) -> dict:
    from .recipes.sft import Sequence, assistant_token_mask, collate, pack, sft_loss
    from .tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    convs = [[{"role": "user", "content": f"what is {i}+{i}?"}, {"role": "assistant", "content": str(2 * i) * (i + 1)}]
             for i in range(4)]
    seqs = [Sequence(*assistant_token_mask(tok, c), row=i) for i, c in enumerate(convs)]
    model = tiny_llama(len(tok), seed=0).to(ctx.device)
    batches = {"padded": collate([[s] for s in seqs], tok.pad_token_id, packed=False),
               "packed": collate(pack(seqs, capacity=1000), tok.pad_token_id, packed=True)}
    results = {}
    for name, batch in batches.items():
        model.zero_grad()
        loss, _ = sft_loss(model, batch, vocab_size=len(tok), chunk_size=7)
        loss.backward()
        results[name] = (float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()]))
    loss_diff = abs(results["packed"][0] - results["padded"][0])
    grad_diff = float((results["packed"][1] - results["padded"][1]).abs().max())
    expect(loss_diff <= 1e-4 * abs(results["padded"][0]) and grad_diff <= 1e-4, f"loss {loss_diff}, grad {grad_diff}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss, _ = sft_loss(model, batches["packed"], vocab_size=len(tok))
        (loss / batches["packed"].targets).backward()
        opt.step()
        losses.append(float(loss.detach()) / batches["packed"].targets)
    expect(losses[-1] < losses[0], f"SFT losses {losses}")
    return {"loss_diff": loss_diff, "grad_max_abs_diff": grad_diff, "step_losses": losses}


# -- 10. opdkit eval and the rollout recipe on the device --------------------------------------------------

@check("eval_and_rollout_recipes")
def eval_and_rollout_recipes(ctx: Context) -> dict:
    from .cli import main

    d = ctx.tiny_dirs()
    bench = ctx.root / "bench.jsonl"
    bench.write_text("".join(json.dumps({"problem": f"What is {i}+1?", "solution": str(i + 1)}) + "\n"
                             for i in range(6)))
    out = ctx.root / "eval.json"
    code = main(["eval", "--limit", "4", f"model.path={d['student']}", f"model.device={ctx.device}",
                 f"benchmarks=[{{name: toy, path: {bench}, columns: {{prompt: problem, answer: solution}}}}]",
                 "rollout.n=4", "rollout.max_new_tokens=32", "pass_k=[1, 2]", f"output={out}"])
    expect(code == 0, f"opdkit eval exited {code}")
    toy = json.loads(out.read_text())["benchmarks"]["toy"]
    expect(toy["problems"] == 4 and toy["samples_per_problem"] == 4, f"eval report {toy}")
    rollout_out = ctx.root / "rollout.jsonl"
    code = main(["rollout", f"model.path={d['student']}", f"data.train={d['prompts']}", f"output.path={rollout_out}",
                 "data.limit=2", f"model.device={ctx.device}", "rollout.max_new_tokens=8",
                 "filter.require_answer=false", "filter.drop_truncated=false", "filter.repetition_chars=0"])
    expect(code == 0, f"opdkit rollout exited {code}")
    rows = [json.loads(x) for x in rollout_out.read_text().splitlines()]
    expect(len(rows) >= 2, f"rollout wrote {len(rows)} rows")
    return {"eval_pass@1": toy.get("pass@1"), "rollout_rows": len(rows)}


# -- parity with the CPU and the cost of a ~0.5B pair ------------------------------------------------------

@check("tiny_pair_matches_cpu")
def tiny_pair_matches_cpu(ctx: Context) -> dict:
    """HF rollouts, teacher scores and two training steps on the device against the same run on the CPU."""
    from .engines.hf_rollout import sample

    if not ctx.cuda:
        return {"skipped": "the device is the CPU"}
    # optim.eps 1e-4: Adam would turn rounding-sized gradient differences (~1e-12) into lr-sized updates
    common = {"student.compute_dtype": "float32", "student.sampling_dtype": "float32", "teacher.dtype": "float32",
              "optim.lr": 1e-2, "optim.eps": 1e-4}
    runs = {}
    for dev in ("cpu", str(ctx.device)):
        d = _distill(ctx, ctx.root / f"parity_{dev.replace(':', '')}", **{**common, "student.device": dev,
                                                                            "teacher.device": dev})
        idx = d.sampler.next_batch()
        ro = d.rollout(idx, 123)
        scores = d.score(ro).to("cpu", hidden=False)
        greedy = sample(d.engine.model, [d.train_set[i].prompt_ids for i in idx], max_new_tokens=8,
                        eos_ids=d.eos_ids, pad_id=d.pad_id, greedy=True)[0]
        steps = [d.opd_step(s) for s in (1, 2)]
        losses = [m["opd/loss"] for m, _ in steps]
        step_tokens = [b.rollout.response_ids for _, b in steps]
        runs[dev] = (ro, scores, greedy, losses, _weights(d.student), step_tokens)
    (c_ro, c_sc, c_gr, c_loss, c_w, c_tok), (g_ro, g_sc, g_gr, g_loss, g_w, g_tok) = (runs["cpu"],
                                                                                    runs[str(ctx.device)])
    expect(torch.equal(c_gr, g_gr), "greedy rollouts differ")
    same_rows = [i for i in range(len(c_ro)) if torch.equal(c_ro.response_ids[i], g_ro.response_ids[i])]
    sampled_agree = len(same_rows) / len(c_ro)
    score_diff = float((c_sc.sampled_logp[same_rows] - g_sc.sampled_logp[same_rows]).abs().max()) if same_rows else None
    weight_diff = float((c_w - g_w).abs().max())
    same_steps = all(torch.equal(a, b) for a, b in zip(c_tok, g_tok))
    expect(sampled_agree >= 0.5, f"only {sampled_agree:.2f} of sampled rows agree with the CPU")
    expect(score_diff is None or score_diff < 1e-3, f"teacher scores differ by {score_diff}")
    # a sample that flips at a CDF boundary (logits differ by ~1e-6 across devices) trains on other tokens
    expect(not same_steps or weight_diff < 5e-3, f"weights after 2 identical steps differ by {weight_diff}")
    return {"sampled_rows_identical": sampled_agree, "teacher_sampled_logp_max_diff": score_diff,
            "losses_cpu": c_loss, "losses_device": g_loss, "training_rollouts_identical": same_steps,
            "weights_max_diff_after_2_steps": weight_diff}


@check("step_cost_0p5b_pair")
def step_cost_0p5b_pair(ctx: Context) -> dict:
    """Qwen2.5-0.5B's shape (24 layers, H 896, V 151,936, ~0.5B parameters), random weights: one OPD step."""
    if ctx.small:
        shape = dict(layers=2, hidden=64, inter=128, heads=4, kv=2, V=1024)
        sizes = dict(B=4, T=16, P=8, k=8, sample_tokens=16)
    else:
        shape = dict(layers=24, hidden=896, inter=4864, heads=14, kv=2, V=151_936)
        sizes = dict(B=16, T=256, P=64, k=16, sample_tokens=256)
    student, teacher = _opd_pair(ctx, **shape)
    params = sum(p.numel() for p in student.parameters())
    figures = _phases(ctx, student, teacher, V=shape["V"], **sizes)
    figures.update({"parameters": params, **{f"size_{k}": v for k, v in sizes.items()}})
    if ctx.cuda:
        figures["peak_gib"] = max(v["peak_gib"] for v in figures.values() if isinstance(v, dict) and "peak_gib" in v)
    return figures


# -- 13. the precision policy: `auto` resolves to bf16 on a bf16 GPU, and the config records why ----------

@check("precision_policy")
def precision_policy(ctx: Context) -> dict:
    from .config import DistillConfig, load_config
    from .hardware import bf16_speedup, capability, precision_lines

    cfg = load_config(DistillConfig, None, ctx.overrides(ctx.root / "precision"))
    cap = capability(ctx.device)
    figures = {"device": cap.name, "detail": cap.detail, "native_bf16": cap.native_bf16,
               "resolved": precision_lines(cfg)}
    if cap.native_bf16:
        figures["bf16_matmul_speedup"] = round(bf16_speedup(ctx.device), 2)
    if ctx.cuda and cap.native_bf16:
        expect(cfg.teacher.dtype == cfg.student.compute_dtype == cfg.student.sampling_dtype == "bfloat16",
               f"auto did not pick bf16 on {cap.name}: {figures['resolved']}")
    expect(cfg.student.param_dtype == cfg.student.head_dtype == cfg.teacher.head_dtype == "float32",
           "master weights and heads must resolve to float32")
    expect(all("auto ->" in line for line in figures["resolved"]), "every auto key must say what it chose and why")
    return figures


# -- 14. FSDP2 over one rank equals the unsharded student ---------------------------------------------------

@check("fsdp2_one_device_equals_no_sharding")
def fsdp2_one_device_equals_no_sharding(ctx: Context) -> dict:
    from .fsdp import check_fsdp2_single_gpu

    figures = check_fsdp2_single_gpu(str(ctx.device))
    expect(figures["ok"], f"fsdp2 on one {ctx.device.type} rank differs from no sharding: weights "
                          f"{figures['max_abs_weight_diff']:.2e} apart after {figures['steps']} steps")
    return figures


def run_checks(device: torch.device, small: bool, only: list[str] | None = None) -> dict:
    results = []
    with tempfile.TemporaryDirectory(prefix="opdkit-gpucheck-") as tmp:
        ctx = Context(device, small, Path(tmp))
        for name, fn in CHECKS:
            if only and name not in only:
                continue
            start = time.perf_counter()
            entry: dict = {"name": name}
            try:
                entry["figures"] = fn(ctx)
                entry["passed"] = True
            except Exception as exc:  # noqa: BLE001 - a failing check is reported, the others still run
                entry.update(passed=False, error=f"{type(exc).__name__}: {exc}"[:4000],
                             traceback=traceback.format_exc()[-4000:])
            entry["seconds"] = round(time.perf_counter() - start, 3)
            results.append(entry)
            print(f"{'PASS' if entry['passed'] else 'FAIL'} {name} ({entry['seconds']:.1f} s)"
                  + ("" if entry["passed"] else f": {entry['error'][:300]}"), flush=True)
    import transformers

    return {"device": str(device), "mode": "cpu-dry" if small else "gpu",
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "passed": all(r["passed"] for r in results), "checks": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opdkit.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--cpu", action="store_true", help="dry mode: the same checks on the CPU at small sizes")
    p.add_argument("--only", nargs="*", help="names of the checks to run (default: all)")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device is visible: run with --cpu for the dry mode", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    report = run_checks(device, small=args.cpu, only=args.only)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{sum(r['passed'] for r in report['checks'])}/{len(report['checks'])} checks passed -> {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
