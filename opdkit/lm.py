"""Causal-LM plumbing shared by the student, the teacher engines and the recipes.

A transformers causal LM is split into its decoder stack (prompt + response -> hidden states) and its
vocabulary projection, because opdkit never materialises (B, T, V) logits: the decoder runs once and the head
runs in chunks over the valid response positions (``HeadProjection``). PEFT (LoRA) wrappers are looked
through with ``unwrap_peft``.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch


def is_peft(model) -> bool:
    """Whether ``model`` is a PEFT (LoRA) wrapper."""
    return hasattr(model, "get_base_model")


def unwrap_peft(model):
    """The plain transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if is_peft(model) else model


@torch.no_grad()
def merged_state(model) -> dict[str, torch.Tensor]:
    """State dict of the model as plain transformers weights, with LoRA deltas merged in when present."""
    if not is_peft(model):
        return model.state_dict()
    from .lora import merged_state_dict

    return merged_state_dict(model)


def decoder_and_head(model):
    """The decoder stack (returns hidden states) and the vocabulary projection of a causal LM."""
    base = unwrap_peft(model)
    decoder = getattr(base, base.base_model_prefix)
    return decoder, base.get_output_embeddings()


def final_logit_softcap(model) -> float | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and attention mask with every sequence right-aligned."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def response_hidden_states(model, prompt_ids: list[list[int]], response_ids: torch.Tensor, pad_id: int
                           ) -> torch.Tensor:
    """Final hidden states (B, T, H) at the positions that predict each response token.

    Prompts are left-padded to P; position P-1+t predicts response token t.
    """
    decoder, _ = decoder_and_head(model)
    device = next(model.parameters()).device
    prompts, prompt_mask = left_pad(prompt_ids, pad_id)
    B, T = response_ids.shape
    ids = torch.cat([prompts, response_ids], 1).to(device)
    # Tokens after EOS are masked out of the loss; causal attention keeps them from affecting earlier positions.
    attn = torch.cat([prompt_mask, torch.ones(B, T, dtype=prompt_mask.dtype)], 1).to(device)
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=ids, attention_mask=attn, position_ids=position, use_cache=False).last_hidden_state
    P = prompts.shape[1]
    return hidden[:, P - 1:P - 1 + T]


def scatter_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place (N, ...) values at the True positions of mask (B, T) in a zero (B, T, ...) tensor."""
    out = values.new_zeros(mask.shape + values.shape[1:])
    out[mask] = values
    return out


class HeadProjection:
    """Logits (N, V) of a model's vocabulary projection on hidden states (N, H), restricted to the shared
    vocabulary, divided by ``temperature``, in fp32.

    A teacher's (``trainable=False``) holds its own detached copy of the head weight in ``dtype`` (fp32 by
    default: bf16 logits are spaced ~0.125 apart near |z| = 20, which would quantise every log-ratio OPD uses).
    The student's (``trainable=True``) reads the live weight, so gradients reach it, and casts it to ``dtype``
    (None: as it is) at each call, so under activation checkpointing no cast copy outlives its chunk. The
    projection runs outside any autocast region: its dtype is ``dtype``, not the decoder's.
    """

    def __init__(self, model, vocab_size: int, temperature: float = 1.0, dtype: torch.dtype | None = torch.float32,
                 *, trainable: bool = False):
        _, head = decoder_and_head(model)
        weight = head.weight[:vocab_size]
        bias = None if getattr(head, "bias", None) is None else head.bias[:vocab_size]
        if not trainable:
            weight = weight.detach().to(dtype)
            bias = None if bias is None else bias.detach().to(dtype)
        self.weight, self.bias = weight, bias
        self.temperature, self.dtype = temperature, dtype
        self.softcap = final_logit_softcap(model)

    def to(self, device: torch.device | str) -> "HeadProjection":
        """A copy of this projection with its weight on ``device``."""
        other = copy.copy(self)
        other.weight = self.weight.to(device)
        other.bias = None if self.bias is None else self.bias.to(device)
        return other

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.dtype is not None:
            hidden, weight = hidden.to(self.dtype), weight.to(self.dtype)
            bias = None if bias is None else bias.to(self.dtype)
        device = hidden.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            logits = torch.nn.functional.linear(hidden, weight, bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float() / self.temperature
