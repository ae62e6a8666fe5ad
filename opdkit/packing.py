"""Padding-free passes: prompt + response rows packed end to end into one sequence, attention kept per row.

A padded (B, P + T) batch of rollouts spends work on left padding of short prompts and right padding after
each response's EOS; with responses that stop at EOS (math: 50 to 1,000+ tokens in one batch) that is often
most of the batch. Packing runs the decoder once over the S = sum of the rows' real lengths:

* position ids restart at 0 for every row, so rotary embeddings match the padded pass;
* attention stays within a row: ``cu_seq_lens_q/k`` (the flash-attention varlen convention, which
  transformers forwards to the attention function) mark the row boundaries. With ``flash_attention_2`` on GPU
  the kernel reads them directly; on CPU (``sdpa``/``eager``) ``enable_varlen_attention`` installs a thin
  wrapper that runs causal SDPA per row, so no (S, S) score matrix is ever formed. Without either, transformers
  itself derives a block-diagonal mask from the restarting position ids: still exact, only slower.

The last response token of each row is never an input (nothing after it is predicted), so a row costs
len(prompt) + len(response) - 1 positions.
"""

from __future__ import annotations

import torch

_VARLEN = "opdkit_varlen_"


def varlen_attention(base: str):
    """An attention function that runs causal SDPA per packed row when ``cu_seq_lens_q`` is given, else ``base``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:  # an ordinary padded call (evaluation, sampling): the model's own implementation
            fallback = ALL_ATTENTION_FUNCTIONS[base] if base in ALL_ATTENTION_FUNCTIONS else None
            if fallback is None:
                from transformers.models.llama.modeling_llama import eager_attention_forward as fallback
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        # query (1, Hq, S, D), key/value (1, Hkv, S, D); output (1, S, Hq, D) like transformers' functions
        gqa = key.shape[1] != query.shape[1]
        bounds = cu.tolist()
        outs = [torch.nn.functional.scaled_dot_product_attention(
                    query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling,
                    dropout_p=dropout if module.training else 0.0, enable_gqa=gqa)
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return torch.cat(outs, 2).transpose(1, 2).contiguous(), None

    return attention


def enable_varlen_attention(model) -> bool:
    """Route the model's attention through ``varlen_attention`` (CPU sdpa/eager models); True if packing is exact
    and efficient with this model. Padded calls keep their previous implementation's results bit for bit."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from .lm import unwrap_peft

    base_model = unwrap_peft(model)
    cfg = base_model.config
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attn_logit_softcapping", None):
        return False  # per-row SDPA would drop the window / softcap: use the padded pass
    impl = cfg._attn_implementation
    if impl.startswith(_VARLEN) or "flash" in impl:
        return True
    if impl not in ("sdpa", "eager"):
        return False
    name = _VARLEN + impl
    AttentionInterface.register(name, varlen_attention(impl))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    base_model.set_attn_implementation(name)
    return True


def pack_rows(prompt_ids: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack rows into one sequence.

    Args:
        prompt_ids: B prompt token lists.
        response_ids, response_mask: (B, T); the mask is a prefix of each row (tokens up to the first EOS).
    Returns:
        ids (1, S) and position_ids (1, S) long; cu_seqlens (B' + 1,) int32 row boundaries (rows with nothing
        to predict are left out); out_index (N,) long: the packed position predicting each valid response
        token, in the row-major order of ``response_mask`` (N = response_mask.sum()).
    """
    lengths = response_mask.sum(-1).tolist()
    ids, pos, cu, out_index = [], [], [0], []
    for prompt, row, n in zip(prompt_ids, response_ids.tolist(), lengths):
        if n == 0:
            continue
        seq = list(prompt) + row[:n - 1]
        start = cu[-1]
        ids.extend(seq)
        pos.extend(range(len(seq)))
        out_index.extend(range(start + len(prompt) - 1, start + len(seq)))
        cu.append(start + len(seq))
    return (torch.tensor([ids], dtype=torch.long), torch.tensor([pos], dtype=torch.long),
            torch.tensor(cu, dtype=torch.int32), torch.tensor(out_index, dtype=torch.long))


def packed_response_hidden_states(model, prompt_ids: list[list[int]], response_ids: torch.Tensor,
                                  response_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states (N, H) at the positions predicting each valid response token, row-major over
    ``response_mask`` — the same values as ``response_hidden_states(...)[response_mask]``, without padding."""
    from .lm import decoder_and_head

    decoder, _ = decoder_and_head(model)
    device = next(model.parameters()).device
    ids, pos, cu, out_index = pack_rows(prompt_ids, response_ids, response_mask)
    if ids.shape[1] == 0:
        hidden_size = model.get_input_embeddings().weight.shape[1]
        return next(model.parameters()).new_zeros((0, hidden_size))
    cu = cu.to(device)
    longest = int((cu[1:] - cu[:-1]).max())
    hidden = decoder(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=None, use_cache=False,
                     cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest
                     ).last_hidden_state
    return hidden[0, out_index.to(device)]
