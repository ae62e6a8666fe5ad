"""LoRA training of the student via PEFT (``student.lora_rank`` > 0).

Only the adapters train; the base weights stay frozen. Everything outside training sees plain weights with the
adapters merged in: the sampling copy (HF or vLLM) receives ``merged_state_dict`` after each optimizer step, and
``save_merged`` writes an ordinary HF model directory that any tool loads. Checkpoints additionally keep the
adapter tensors themselves (``adapter_state_dict``), so a resumed run continues from exactly the same adapters
(re-extracting them from merged weights would not be possible).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointMismatch, InvalidInput, MissingDependency


def apply_lora(model, student_cfg, seed: int = 0):
    """Wrap ``model`` with LoRA adapters of rank ``student.lora_rank`` on ``student.lora_target_modules``.

    The adapters' random initialisation is seeded (``run.seed``), so every run and every rank starts alike.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MissingDependency("student.lora_rank > 0 needs peft: pip install 'opdkit[lora]'") from None
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in student_cfg.lora_target_modules if m not in names]
    if missing:
        raise InvalidInput(f"student.lora_target_modules: {missing} are not modules of the student "
                           f"({type(model).__name__}); e.g. {sorted(n for n in names if n.endswith('proj'))[:8]}")
    config = LoraConfig(r=student_cfg.lora_rank, lora_alpha=student_cfg.lora_alpha,
                        target_modules=list(student_cfg.lora_target_modules), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    return {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}


@torch.no_grad()
def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict under its plain transformers names, with W + ΔW (= W + s·B·A) for every
    adapted layer. The training model is not modified."""
    base = peft_model.get_base_model()
    layers = _lora_layers(peft_model)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    for name, module in layers.items():
        key = f"{name}.weight"
        delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
        out[key] = out[key] + delta.to(out[key].dtype)
    return out


def save_merged(model, out: Path) -> None:
    """Write an ordinary HF model directory with the adapters merged (the training model is not modified)."""
    base = model.get_base_model()
    state = merged_state_dict(model)
    base.save_pretrained(out, state_dict=state)


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointMismatch(f"the checkpoint's LoRA adapters do not fit the student: unexpected keys "
                                 f"{unexpected[:5]}")
