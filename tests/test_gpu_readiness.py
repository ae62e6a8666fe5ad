"""Guards of the GPU-readiness fixes that a CPU can check: backend and device choice with CUDA mocked, CPU-mapped
checkpoint loads, scores moved to the student's device (simulated with the meta device), on-device sampling
noise, teacher scoring in row blocks, bucketed gradient all-reduce."""

import os

import pytest
import torch
import torch.distributed as dist

from opdkit import distributed as D
from opdkit.config import ConfigError, DistillConfig, ObjectiveConfig, load_config
from opdkit.candidates import Candidates
from opdkit.objectives import OBJECTIVES, objective_for, token_loss
from opdkit.noise import noise_keys, row_uniforms, sample_with_uniforms
from opdkit.engines.hf_teacher import HFTeacher
from opdkit.engines.base import TeacherScores
from opdkit.student import StudentOutputs
from opdkit.tiny import tiny_llama
from opdkit.train import on_device, rank_devices


# -- distributed backend and devices --------------------------------------------------------------------


def test_backend_follows_the_configured_device():
    assert D.backend_for("cpu") == "gloo"
    assert D.backend_for("cuda") == D.backend_for("cuda:1") == "cpu:gloo,cuda:nccl"
    with pytest.raises(ValueError, match="cpu and cuda"):
        D.backend_for("meta")


@pytest.mark.parametrize("device, backend, set_to", [("cpu", "gloo", None),
                                                     ("cuda:1", "cpu:gloo,cuda:nccl", torch.device("cuda:1"))])
def test_init_from_env_with_cuda_present(monkeypatch, device, backend, set_to):
    """CUDA exists on the machine (mocked); a CPU run still gets gloo and never touches set_device."""
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    info = D.init_from_env(device)
    assert (info.rank, info.world_size) == (1, 2)
    assert calls["init"]["backend"] == backend and calls["init"]["timeout"] == D.TIMEOUT
    assert calls.get("set_device") == set_to and calls["init"].get("device_id") == set_to


def test_devices_are_relative_to_the_local_rank():
    assert D.resolve_device("cpu", local_rank=3, devices_per_rank=2, device_count=0) == "cpu"
    assert D.resolve_device("cuda", local_rank=1, devices_per_rank=1, device_count=2) == "cuda:1"
    assert D.resolve_device("cuda:1", local_rank=1, devices_per_rank=2, device_count=4) == "cuda:3"
    assert D.devices_per_rank(["cuda:0", "cuda:1"]) == 2 and D.devices_per_rank(["cpu", "cuda"]) == 1
    assert D.devices_per_rank(["cpu", "cpu"]) == 0
    # two ranks on a one-GPU machine: rank 1 must fail clearly, not pick an invalid ordinal
    with pytest.raises(ValueError, match="cuda:1, but this machine has 1 visible GPU"):
        D.resolve_device("cuda", local_rank=1, devices_per_rank=1, device_count=1)


def test_rank_devices_of_a_config(monkeypatch):
    cfg = load_config(DistillConfig, None, ["student.path=s", "teacher.path=t", "data.train=d.jsonl",
                                            "student.device=cuda:0", "teacher.device=cuda:1"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_devices(cfg) == ("cuda:2", "cuda:3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="teacher.device='cuda:1'.*visible GPU"):
        rank_devices(cfg)


@pytest.mark.parametrize("value", ["gpu", "mps", "cuda:x"])
def test_bad_device_is_a_config_error(value):
    with pytest.raises(ConfigError, match=f"student.device={value!r}"):
        load_config(DistillConfig, None, ["student.path=s", "teacher.path=t", "data.train=d.jsonl",
                                          f"student.device={value}"])


def test_gradient_buckets_are_bounded_ordered_and_exact(tmp_path):
    grads = [torch.randn(10), torch.randn(3, 4, dtype=torch.float64), torch.randn(30), torch.randn(5),
             torch.randn(2, dtype=torch.float64)]
    buckets = D.gradient_buckets(grads, bucket_bytes=64)
    assert sorted(id(g) for b in buckets for g in b) == sorted(id(g) for g in grads)
    assert [str(b[0].dtype) for b in buckets] == sorted(str(b[0].dtype) for b in buckets)  # stable order
    for b in buckets:
        assert len({g.dtype for g in b}) == 1
        assert len(b) == 1 or sum(g.numel() * g.element_size() for g in b) <= 64
    # Reduced over a real one-process gloo group, many small buckets copy every value back to its place.
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        D.all_reduce_gradients(params, D.DistInfo(0, 2), bucket_bytes=64)  # world 2 claimed: reduce runs
        assert D.all_reduce_sum(2.5, D.DistInfo(0, 2)) == 2.5
    finally:
        dist.destroy_process_group()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


# -- checkpoints ---------------------------------------------------------------------------------------


def test_checkpoint_loads_map_to_cpu(tmp_path, tokenizer, monkeypatch):
    from opdkit import checkpoint as C

    model = tiny_llama(len(tokenizer), seed=0)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.tensor([[1, 5, 6]])).logits.sum().backward()
    opt.step()
    path = C.save_checkpoint(tmp_path, 1, model=model, tokenizer=tokenizer, optimizer=opt, scheduler=sched,
                             sampler_state={"epoch": 0, "position": 4})
    seen = []
    real_load = torch.load

    def load(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    fresh = tiny_llama(len(tokenizer), seed=1)
    opt2 = torch.optim.AdamW(fresh.parameters())
    state = C.load_checkpoint(path, model=fresh, optimizer=opt2,
                              scheduler=torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0))
    assert seen == ["cpu"] and state["step"] == 1
    assert torch.equal(next(fresh.parameters()), next(model.parameters()))


# -- the engine/trainer boundary -----------------------------------------------------------------------


def _scores(B, T, k, device="cpu", hidden=False):
    return TeacherScores(torch.randn(B, T, device=device), torch.randint(0, 9, (B, T, k), device=device),
                         torch.randn(B, T, k, device=device), torch.randn(B, T, k, device=device),
                         torch.randn(B, T, device=device), torch.randn(B, T, 4, device=device) if hidden else None)


def test_teacher_scores_to_moves_every_field():
    s = _scores(2, 3, 4, hidden=True)
    moved = s.to("meta")
    assert all(getattr(moved, f).device.type == "meta" for f in TeacherScores.__dataclass_fields__)
    assert s.to("cpu", hidden=False).hidden is None and s.to("cpu").hidden is s.hidden
    assert s.to("meta").select(torch.tensor([1])).sampled_logp.shape == (1, 3)  # CPU rows index any device


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_inputs_follow_a_student_on_another_device(name):
    """The student's outputs on another device type (meta stands in for CUDA): scores, candidate mask and
    sequence advantages from the engines (CPU) make token_loss fail unless moved with ``on_device``."""
    B, T, k = 2, 3, 4
    dev = torch.device("meta")
    student = StudentOutputs(torch.randn(B, T, device=dev), torch.randn(B, T, 2 * k, device=dev),
                             torch.randn(B, T, device=dev), torch.randn(B, T, device=dev))
    objective = objective_for(ObjectiveConfig(name=name, outcome_weight=0.5))
    scores, s_top, adv = _scores(B, T, k), torch.randint(0, 9, (B, T, k)), torch.randn(B)
    with pytest.raises(RuntimeError, match="device"):
        token_loss(objective, student, scores, Candidates(s_top, scores.topk_ids), adv)
    scores, s_top, adv = on_device(dev, scores, s_top, adv)
    assert token_loss(objective, student, scores, Candidates(s_top, scores.topk_ids), adv).device == dev


def test_distiller_feeds_the_loss_on_the_students_device(tmp_path, tiny_dirs, prompts_file, monkeypatch, device):
    from opdkit import train as T
    from tests.conftest import tiny_overrides

    seen = []
    real = T.token_loss

    def spy(objective, student, teacher, candidates, adv=None, opd_token_weight=None):
        tensors = [t for t in (teacher.sampled_logp, teacher.topk_logp, None if candidates is None else candidates.ids,
                               adv, opd_token_weight) if t is not None]
        seen.append({t.device for t in tensors} | {student.logp_sampled.device})
        return real(objective, student, teacher, candidates, adv, opd_token_weight)

    monkeypatch.setattr(T, "token_loss", spy)
    cfg = load_config(DistillConfig, None, tiny_overrides(tiny_dirs, prompts_file, tmp_path / "run", **{
        "run.steps": 1, "eval.prompts": 0, "objective.outcome_weight": 0.5}))
    distiller = T.Distiller(cfg, log_to_disk=False)
    metrics, batch = distiller.opd_step(1)
    assert seen and all(s == {device if device.index is not None or device.type == "cpu"
                              else torch.device(device.type, 0)} for s in seen)
    assert batch.scores.sampled_logp.device.type == "cpu" and batch.scores.hidden is None  # metrics stay on host
    assert torch.isfinite(torch.tensor(metrics["opd/loss"]))


# -- teacher scoring -----------------------------------------------------------------------------------


def test_teacher_scoring_in_row_blocks_equals_one_forward(tokenizer):
    model = tiny_llama(len(tokenizer), seed=1).eval()
    prompts = [[1, 40 + i] + [50] * (i % 3) for i in range(5)]
    resp = torch.randint(5, 60, (5, 6))
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3, 1, 5, 0])[:, None]
    at = torch.randint(0, 60, (5, 6, 3))
    whole = HFTeacher(model, vocab_size=len(tokenizer), pad_id=2).score(prompts, resp, mask, k=4,
                                                                         student_topk_ids=at, keep_hidden=True)
    blocks = HFTeacher(model, vocab_size=len(tokenizer), pad_id=2, batch_size=2).score(
        prompts, resp, mask, k=4, student_topk_ids=at, keep_hidden=True)
    for f in ("sampled_logp", "topk_logp", "logp_at_student_topk", "entropy"):
        torch.testing.assert_close(getattr(blocks, f), getattr(whole, f), rtol=1e-5, atol=1e-5, msg=f)
    torch.testing.assert_close(blocks.hidden[mask], whole.hidden[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(blocks.topk_ids[mask], whole.topk_ids[mask]) and blocks.sampled_logp[~mask].abs().sum() == 0


def test_teacher_head_runs_on_the_callers_device(tokenizer):
    teacher = HFTeacher(tiny_llama(len(tokenizer), seed=1), vocab_size=len(tokenizer), pad_id=2)
    hidden = torch.randn(3, 64)
    cpu = teacher.head_logits(hidden)
    meta = teacher.head_logits(hidden.to("meta"))  # no copy of the hidden states to the teacher's device
    assert meta.device.type == "meta" and meta.shape == cpu.shape == (3, len(tokenizer))
    assert teacher.head_logits(hidden.to("meta")) is not None and len(teacher._heads) == 2  # head copied once


# -- sampling noise ------------------------------------------------------------------------------------


def test_row_uniforms_are_uniform_independent_and_batch_free():
    seeds = list(range(64))
    keys = noise_keys(seeds, "cpu")
    u = row_uniforms(keys, torch.arange(64))
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    flat = u.flatten().sort().values
    n = flat.numel()
    ks = float((flat - (torch.arange(n, dtype=torch.float64) + 0.5) / n).abs().max())
    assert ks < 1.63 / n ** 0.5  # Kolmogorov-Smirnov at the 1% level
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):  # neighbouring positions, neighbouring seeds
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(float(corr)) < 0.06
    # a pure function of (seed, position): one row alone, or a window of positions, gives the same numbers
    assert torch.equal(row_uniforms(noise_keys([seeds[9]], "cpu"), torch.arange(10, 20))[0], u[9, 10:20])
    # integer tensor ops only: it runs on any device without touching the host (meta has no data at all)
    assert row_uniforms(keys.to("meta"), torch.arange(8, device="meta")).device.type == "meta"


def test_inverse_cdf_sampling_is_exact_on_a_grid_of_uniforms():
    """With the uniforms on a regular grid of N points, id i is returned for exactly its share p_i of them (up to
    one grid point): the defining property of inverse-CDF sampling, across block boundaries and zero ids."""
    torch.manual_seed(0)
    V, N = 1000, 20000
    logits = torch.randn(V) * 2
    logits[[0, 63, 64, 500, 999]] = float("-inf")  # zeros at block edges and at both ends
    logp = torch.log_softmax(logits, -1)
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    ids = sample_with_uniforms(logp.expand(N, V), u, block=64)
    counts = torch.bincount(ids, minlength=V).double()
    assert counts[[0, 63, 64, 500, 999]].sum() == 0
    assert float((counts / N - logp.double().exp()).abs().max()) <= 1.0 / N + 1e-6
    # hand-derived: p = (0.1, 0, 0.6, 0.3) splits (0, 1) into (0, .1], (.1, .7], (.7, 1)
    p = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).log().expand(4, 4)
    got = sample_with_uniforms(p, torch.tensor([0.05, 0.2, 0.69, 0.71], dtype=torch.float64), block=2)
    assert got.tolist() == [0, 2, 2, 3]


@pytest.mark.skipif(os.environ.get("OPDKIT_TEST_DEVICE", "cpu") == "cpu", reason="needs OPDKIT_TEST_DEVICE")
def test_noise_on_the_test_device_equals_cpu(device):
    keys = noise_keys(list(range(8)), "cpu")
    cpu = row_uniforms(keys, torch.arange(16))
    assert torch.equal(row_uniforms(keys.to(device), torch.arange(16, device=device)).cpu(), cpu)


def test_lora_sampling_copy_is_built_in_the_sampling_dtype_and_merged(tokenizer):
    """The LoRA engine's sampling model (built empty in bf16, filled by sync_weights) gives the logits of
    merging a deep copy, the former construction that peaked at 2x the fp32 base."""
    import copy

    from opdkit.config import StudentConfig
    from opdkit.lora import apply_lora
    from opdkit.engines.hf_rollout import HFRolloutEngine

    student = apply_lora(tiny_llama(len(tokenizer), seed=0), StudentConfig(lora_rank=4), seed=0)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)  # non-zero deltas
    engine = HFRolloutEngine(student, eos_ids=[2], pad_id=2, sampling_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())
    head, embed = engine.model.get_output_embeddings().weight, engine.model.get_input_embeddings().weight
    assert head.data_ptr() == embed.data_ptr()  # still tied
    reference = copy.deepcopy(student).merge_and_unload().to(torch.bfloat16).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, rtol=0, atol=0)
