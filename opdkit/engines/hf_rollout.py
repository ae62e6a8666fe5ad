"""The HF rollout engine (``rollout.engine=hf``): the student samples its own responses.

``sample`` is a batched decode loop with a KV cache. Besides the tokens it records, at every response
position, the student's top-k ids (the set S^p_t of the paper, ranked by the untempered logits) and the
log-prob of the sampled token under the sampling distribution, so teacher scoring and the loss need no
extra student forward. ``HFRolloutEngine`` samples with a copy of the student; ``GatheredRolloutEngine`` with a
full copy of an FSDP-sharded student.
"""

from __future__ import annotations

import copy

import torch

from ..lm import is_peft, left_pad, merged_state
from ..noise import noise_keys, row_uniforms, sample_with_uniforms
from .base import Rollout, RolloutEngine


def response_mask_from_eos(tokens: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, T) of tokens up to and including the first EOS, and (B,) whether any EOS occurred.

    Computed from token values and position, never from ``id == pad`` (pad may equal EOS).
    """
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, dtype=tokens.dtype))
    ended_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~ended_before, is_eos.any(-1)


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the smallest set with cumulative probability ≥ top_p to -inf. (B, V) -> (B, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the token that crosses the threshold
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def model_vocab_logits(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    return logits if vocab_size is None else logits[..., :vocab_size]


def unique_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """Distinct prompts in first-seen order and, per row, the index of its prompt: ``rows[i] = uniq[index[i]]``."""
    first: dict[tuple[int, ...], int] = {}
    index = [first.setdefault(tuple(p), len(first)) for p in prompts]
    return [list(k) for k in first], torch.tensor(index, dtype=torch.long)


def select_cache_rows(cache, rows: torch.Tensor) -> None:
    """Keep (or repeat) batch rows ``rows`` of every layer of a KV cache, in place."""
    for layer in cache.layers:
        layer.reorder_cache(rows)


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: list[int], pad_id: int,
           temperature: float = 1.0, top_p: float = 1.0, topk: int = 0, greedy: bool = False,
           seeds: list[int] | None = None, vocab_size: int | None = None, min_new_tokens: int = 0,
           stop_hook=None, share_prefill: bool = True, compact: bool = True, on_finished=None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Batched sampling with a KV cache.

    Args:
        prompts: B token-id lists (left-padded here).
        seeds: one seed per row. A row's noise is a function of its seed and the position only
            (``row_uniforms``, computed on the model's device), so a row's sample does not depend on which other
            rows share its batch or are still decoding (sharded and single-process runs sample alike).
        vocab_size: restrict sampling to ids < vocab_size (the ids shared with the teacher).
        stop_hook: optional f(t, tokens, tops) called after each step with the (B, t+1) tokens and (B, t+1, k)
            top-k ids so far; a (B,) bool it returns stops those rows (they emit pad from then on, and their
            response mask is the hook's business: see ``drift.DriftStop``).
        share_prefill: prefill each distinct prompt once and copy its KV cache to the rows that share it
            (the n samples of a prompt), instead of recomputing it per row.
        compact: drop rows that ended from the decode batch (their KV cache, mask and positions), so a
            finished row costs no further decode steps.
        on_finished: optional f(rows, responses), called once per row as soon as the loop sees it stop, with
            the rows' indices and final response tokens (``FinishedRows``), so a teacher can score them while
            other rows decode. It only reads: the samples are the same with or without it.
    Returns:
        response_ids (B, T), response_mask (B, T), sampling_logp (B, T), topk_ids (B, T, k) or None,
        truncated (B,).
    """
    device = next(model.parameters()).device
    B = len(prompts)
    cache, attn, next_pos, step_logits = _prefill(model, prompts, pad_id, share_prefill, device)
    eos = torch.tensor(eos_ids, device=device)
    if seeds is None:
        seeds = torch.randint(0, 2**62, (B,)).tolist()
    # All of the call's noise at once (B x max_new_tokens numbers): one batch of integer ops, not one per token.
    noise = row_uniforms(noise_keys(seeds, device), torch.arange(max_new_tokens, device=device))
    # "Are rows done?" reads a device value on the host; on an accelerator that sync stalls the launch queue,
    # so it is asked (and the batch compacted) every few tokens there (all-pad columns are trimmed below).
    check_every = check_interval(device)
    finished = None if on_finished is None else FinishedRows(on_finished, B, eos_ids, device)
    alive = torch.arange(B, device=device)                     # original row of each decode-batch row
    decoding = torch.ones(B, dtype=torch.bool, device=device)  # per decode-batch row: not finished yet
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((B, max_new_tokens), device=device)
    tops = None
    steps = 0
    for t in range(max_new_tokens):
        logits = model_vocab_logits(step_logits.float(), vocab_size)
        if t < min_new_tokens:
            logits[:, eos] = float("-inf")
        if topk:
            top = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices
            if tops is None:
                tops = torch.zeros((B, max_new_tokens, top.shape[-1]), dtype=torch.long, device=device)
            tops[alive, t] = top
        tok, logp = _next_token(logits, None if greedy else noise[alive, t], temperature, top_p)
        tok = torch.where(decoding, tok, torch.full_like(tok, pad_id))
        tokens[alive, t] = tok
        logps[alive, t] = torch.where(decoding, logp, torch.zeros_like(logp))
        steps = t + 1
        decoding &= ~torch.isin(tok, eos)
        if stop_hook is not None and (stop := stop_hook(t, tokens[:, :steps], None if tops is None else tops[:, :steps])) is not None:
            decoding &= ~stop.to(device)[alive]
        if (t + 1) % check_every == 0 or stop_hook is not None:
            if finished is not None:
                finished.report(alive[~decoding], tokens[:, :steps])
            if not bool(decoding.any()):
                break
            if compact and not bool(decoding.all()):
                keep = decoding.nonzero().squeeze(-1)
                select_cache_rows(cache, keep)
                alive, attn, next_pos, tok, decoding = alive[keep], attn[keep], next_pos[keep], tok[keep], decoding[keep]
        attn = torch.cat([attn, torch.ones((attn.shape[0], 1), dtype=attn.dtype, device=device)], dim=-1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=cache,
                    use_cache=True)
        step_logits = out.logits[:, -1]
        next_pos = next_pos + 1
    if finished is not None:  # rows at max_new_tokens, and rows that ended after the last check
        finished.report(torch.arange(B, device=device), tokens[:, :steps])
    return _trimmed(tokens[:, :steps].cpu(), logps, tops if topk else None, eos_ids)


def check_interval(device: torch.device) -> int:
    """Decode steps between the loop's "are rows done?" checks on ``device``."""
    return 1 if device.type == "cpu" else 8


class FinishedRows:
    """``sample``'s ``on_finished`` notifications: each row once, at the first check that sees it stopped."""

    def __init__(self, callback, rows: int, eos_ids: list[int], device: torch.device):
        self.callback, self.eos_ids = callback, eos_ids
        self.reported = torch.zeros(rows, dtype=torch.bool, device=device)

    def report(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """rows: (N,) indices of rows that have stopped (some perhaps reported before); tokens: (B, t) so far."""
        new = rows[~self.reported[rows]]
        if not new.numel():
            return
        self.reported[new] = True
        block = tokens[new].cpu()
        # a stopped row emits pad from then on: its response is what precedes its first EOS, or all of it
        mask, _ = response_mask_from_eos(block, self.eos_ids)
        self.callback(new.tolist(), [row[keep].tolist() for row, keep in zip(block, mask)])


def _prefill(model, prompts: list[list[int]], pad_id: int, share_prefill: bool, device: torch.device):
    """The prompts' KV cache, attention mask (B, P), next positions (B, 1) and last logits (B, V), one row per
    prompt; with ``share_prefill`` each distinct prompt runs once and its cache is copied to its rows."""
    from transformers import DynamicCache

    B = len(prompts)
    uniq, expand = unique_prompts(prompts) if share_prefill else (prompts, torch.arange(B))
    ids, attn = left_pad(uniq, pad_id)
    ids, attn = ids.to(device), attn.to(device)
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    # An index tensor, not the int 1: HF slices hidden[:, -1:] for an int, and torch's CPU matmul on that strided
    # (B, 1, H) view expands the head weight to (B, H, V) and copies it (430 MB and 1.4 s for SmolLM2 at B = 8).
    last = torch.tensor([ids.shape[1] - 1], device=device)
    out = model(input_ids=ids, attention_mask=attn, position_ids=position, past_key_values=cache,
                use_cache=True, logits_to_keep=last)
    step_logits = out.logits[:, -1]
    if len(uniq) != B:
        rows = expand.to(device)
        select_cache_rows(cache, rows)
        attn, position, step_logits = attn[rows], position[rows], step_logits[rows]
    return cache, attn, position[:, -1:] + 1, step_logits


def _next_token(logits: torch.Tensor, uniforms: torch.Tensor | None, temperature: float, top_p: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token (B,) and its log-prob (B,) from logits (B, V): greedy when ``uniforms`` is None, else sampled
    at ``temperature`` within ``top_p`` with the rows' noise."""
    if uniforms is None:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logprobs = torch.log_softmax(filter_top_p(logits / temperature, top_p), -1)
    tok = sample_with_uniforms(logprobs, uniforms)
    return tok, logprobs.gather(-1, tok[:, None]).squeeze(-1)


def _trimmed(response: torch.Tensor, logps: torch.Tensor, tops: torch.Tensor | None, eos_ids: list[int]):
    """``sample``'s outputs from the decoded (B, steps) tokens, cut after the last column any row still used."""
    steps = response.shape[1]
    mask, ended = response_mask_from_eos(response, eos_ids)
    width = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else steps  # columns after every row ended
    response, mask = response[:, :width], mask[:, :width]
    sampling_logp = logps[:, :width].cpu().masked_fill(~mask, 0.0)
    topk_ids = tops[:, :width].cpu() if tops is not None else None
    return response, mask, sampling_logp, topk_ids, ~ended


def row_seeds(seed: int, offset: int, count: int) -> list[int]:
    """Seeds of rows offset..offset+count-1 of a step: a row's randomness depends only on (seed, global row)."""
    return [(seed * 2_654_435_761 + (offset + i) * 97_531 + 1) % (2**63 - 1) for i in range(count)]


class HFRolloutEngine(RolloutEngine):
    """Samples with a copy of the student in ``sampling_dtype`` (bf16 halves decode time on CPU).

    The copy shares nothing with the trained weights; ``sync_weights`` copies them over after each optimizer
    step (~10 ms for 80M parameters), so sampling stays exactly on-policy up to the dtype cast.
    """

    def __init__(self, student, *, eos_ids: list[int], pad_id: int, sampling_dtype: torch.dtype,
                 vocab_size: int | None = None, share_prefill: bool = True, compact: bool = True):
        self.eos_ids, self.pad_id, self.vocab_size = eos_ids, pad_id, vocab_size
        self.share_prefill, self.compact = share_prefill, compact
        if is_peft(student):
            # LoRA: sample with a plain model holding the merged weights (names match merged_state_dict), built
            # in sampling_dtype; a deep copy of the fp32 PEFT model before merging would peak at 2x the base.
            self.model = _empty_like_base(student, sampling_dtype)
        elif sampling_dtype == next(student.parameters()).dtype:
            self.model = student  # same dtype, no adapters: sample with the trained module itself
        else:
            self.model = copy.deepcopy(student).to(sampling_dtype)
            self.model.requires_grad_(False)
        self.sync_weights(student)

    @torch.no_grad()
    def sync_weights(self, student) -> None:
        if self.model is student:
            return
        source = merged_state(student)
        target = self.model.state_dict()
        for name, tensor in source.items():
            target[name].copy_(tensor)

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, topk: int, seed: int, greedy: bool = False,
                 example_index: list[int] | None = None, row_offset: int = 0, min_new_tokens: int = 0,
                 stop_hook=None, on_finished=None) -> Rollout:
        rows = [p for p in prompts for _ in range(n)]
        was_training = self.model.training
        self.model.eval()
        try:
            resp, mask, logp, topk_ids, trunc = sample(
                self.model, rows, max_new_tokens=max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id,
                temperature=temperature, top_p=top_p, topk=topk, greedy=greedy,
                seeds=row_seeds(seed, row_offset, len(rows)), min_new_tokens=min_new_tokens,
                vocab_size=self.vocab_size, stop_hook=stop_hook, share_prefill=self.share_prefill,
                compact=self.compact, on_finished=on_finished)
        finally:
            self.model.train(was_training)
        index = [i for i in (example_index or range(len(prompts))) for _ in range(n)]
        return Rollout(rows, resp, mask, logp, topk_ids, trunc, index, n)


def _empty_like_base(peft_model, dtype: torch.dtype):
    """A plain transformers model of the PEFT model's base architecture, in ``dtype`` on the base's device,
    with buffers (e.g. rotary frequencies) copied and weights left for ``sync_weights`` to fill."""
    base = peft_model.get_base_model()
    device = next(base.parameters()).device
    with torch.device("meta"):
        model = type(base)(copy.deepcopy(base.config))
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()  # to_empty gives each module its own tensor, which would untie a shared embedding
    model.generation_config = copy.deepcopy(base.generation_config)
    # Buffers and plain tensor attributes (rotary inv_freq, original_inv_freq) are not weights: take the base's
    # (floating buffers in ``dtype``, as ``Module.to(dtype)`` leaves them on a copied model).
    modules = dict(model.named_modules())
    for name, source in base.named_modules():
        target = modules.get(name.replace(".base_layer", ""))
        if target is None:
            continue
        for attr, value in vars(source).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                setattr(target, attr, value.detach().clone())
        for attr, buf in source.named_buffers(recurse=False):
            if attr in target._buffers:
                target._buffers[attr] = buf.detach().to(dtype if buf.is_floating_point() else buf.dtype, copy=True)
    model.requires_grad_(False)
    model.eval()
    return model


class GatheredRolloutEngine(RolloutEngine):
    """The HF sampler on a full copy of the student, refreshed from the shards after each optimizer step.

    Sampling then needs no collectives, so ranks may stop decoding at different lengths.
    """

    def __init__(self, plain, *, eos_ids: list[int], pad_id: int, vocab_size: int | None):
        self.inner = HFRolloutEngine(plain, eos_ids=eos_ids, pad_id=pad_id,
                                     sampling_dtype=next(plain.parameters()).dtype, vocab_size=vocab_size)
        self.model = self.inner.model

    @torch.no_grad()
    def sync_weights(self, student) -> None:
        target = dict(self.model.named_parameters())
        for name, param in student.named_parameters():
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            target[name].copy_(full)

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)
