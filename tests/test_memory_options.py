"""Memory options: LoRA (merged weights for sampling and export, adapters for exact resume), gradient
checkpointing (same gradients), the teacher on its own device."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from opdkit.config import DistillConfig, load_config
from opdkit.train import Distiller
from tests.conftest import tiny_overrides

pytest.importorskip("peft")

from opdkit.lora import adapter_state_dict, merged_state_dict  # noqa: E402

LORA = {"student.lora_rank": 4, "student.lora_alpha": 8.0, "optim.lr": 0.05, "eval.prompts": 0,
        "student.compute_dtype": "float32", "student.sampling_dtype": "float32"}


def make(tiny_dirs, prompts_file, out, **extra) -> Distiller:
    return Distiller(load_config(DistillConfig, None, tiny_overrides(tiny_dirs, prompts_file, out, **extra)))


def test_lora_trains_adapters_only_exports_merged_weights_and_resumes_exactly(tiny_dirs, prompts_file, tmp_path):
    d = make(tiny_dirs, prompts_file, tmp_path / "run", **LORA, **{"run.steps": 2})
    trainable = {n for n, p in d.student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in d.student.named_parameters() if not p.requires_grad}
    d.run()
    assert all(torch.equal(p, base_before[n]) for n, p in d.student.named_parameters() if not p.requires_grad)
    merged = merged_state_dict(d.student)
    reference = copy.deepcopy(d.student).merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for name in reference:
        torch.testing.assert_close(merged[name], reference[name], msg=name)
    initial = load_file(str(tiny_dirs["student"] / "model.safetensors"))
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                              initial["model.layers.0.self_attn.q_proj.weight"])  # the adapters did learn
    # the HF sampling copy holds the merged weights after the last optimizer step
    for name, tensor in d.engine.model.state_dict().items():
        torch.testing.assert_close(tensor, merged[name], msg=name)
    # the exported model is a plain HF model that computes what the adapted student computes
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final_model")
    ids = torch.tensor([d.train_set[0].prompt_ids])
    d.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, d.student(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert (ckpt / "adapter_state.pt").is_file() and (ckpt / "model" / "model.safetensors").is_file()

    # resuming from the adapters equals an uninterrupted run (the adapters' init is seeded, so runs start alike)
    resumed = make(tiny_dirs, prompts_file, tmp_path / "run", **LORA, **{"run.steps": 3, "run.resume": True})
    resumed.run()
    whole = make(tiny_dirs, prompts_file, tmp_path / "whole", **LORA, **{"run.steps": 3})
    whole.run()
    a, b = adapter_state_dict(whole.student), adapter_state_dict(resumed.student)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def _gradients(d: Distiller, rollout, scores) -> dict[str, torch.Tensor]:
    d.optimizer.zero_grad(set_to_none=True)
    d.update(rollout, scores, None)
    return {n: p.grad.detach().clone() for n, p in d.student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["topk", "reverse_kl"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_dirs, prompts_file, tmp_path, objective):
    common = {"eval.prompts": 0, "student.compute_dtype": "float32", "objective.name": objective,
              "optim.micro_batch_size": 3}
    plain = make(tiny_dirs, prompts_file, tmp_path / "plain", **common)
    ckpt = make(tiny_dirs, prompts_file, tmp_path / "ckpt", **common, **{"student.gradient_checkpointing": True})
    assert ckpt.student.is_gradient_checkpointing and not plain.student.is_gradient_checkpointing
    rollout = plain.rollout(list(range(4)), seed=5)
    scores = plain.score(rollout)
    g_plain, g_ckpt = _gradients(plain, rollout, scores), _gradients(ckpt, rollout, scores)
    assert set(g_plain) == set(g_ckpt) and len(g_plain) > 10
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_teacher_on_its_own_device(tiny_dirs, prompts_file, tmp_path):
    # On a CPU-only machine the device strings that exist are cpu / cpu:0; on GPUs: teacher.device=cuda:1.
    d = make(tiny_dirs, prompts_file, tmp_path / "run", **{"teacher.device": "cpu:0", "objective.name": "reverse_kl",
                                                            "eval.prompts": 4, "run.steps": 1})
    assert d.teacher.device.type == "cpu"  # torch folds cpu:0 into cpu
    hidden = torch.randn(3, 64)
    assert d.teacher.head_logits(hidden).device == hidden.device
    summary = d.run()
    assert summary["eval_after"]["eval/reverse_kl"] > 0
