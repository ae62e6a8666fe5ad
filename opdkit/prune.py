"""Make a smaller student by dropping whole decoder layers.

Which layers go matters enormously: keeping every other layer of SmolLM2-135M gives perplexity ~10^6, while
greedily dropping the layer whose removal hurts held-out perplexity least keeps it usable (platform notes
§2). ``greedy_keep_list`` does that search on a small built-in English text set; ``prune_layers`` applies a
keep-list and returns an ordinary transformers model.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch

from .errors import InvalidInput

log = logging.getLogger(__name__)

# Held-out text for the perplexity search: varied, plain English, no downloads.
CALIBRATION_TEXTS = [
    "The capital of France is Paris, a city known for its museums, its cafes and the river Seine that runs "
    "through its centre. Millions of visitors come every year to see the Eiffel Tower and the Louvre.",
    "To make a cup of tea, boil fresh water, warm the pot, add one spoon of leaves for each cup and let it "
    "steep for three to five minutes before pouring.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to produce "
    "glucose and oxygen. It takes place mainly in the leaves.",
    "If a train travels at sixty miles per hour for two hours, it covers one hundred and twenty miles. Speed "
    "multiplied by time gives the distance travelled.",
    "She opened the old wooden door slowly and found a small garden full of roses, with a stone bench under "
    "an apple tree and birds singing in the branches.",
    "Python is a popular programming language. A function is defined with the def keyword, followed by its "
    "name, its parameters in parentheses and a colon.",
]
HELDOUT_TEXTS = [
    "The human heart pumps blood through the body. It has four chambers: two atria and two ventricles, which "
    "work together to keep oxygen moving to every organ.",
    "On Saturday morning we walked to the market, bought apples, bread and cheese, and had a picnic in the "
    "park next to the lake.",
]


def decoder_layers(model) -> torch.nn.ModuleList:
    base = getattr(model, model.base_model_prefix)
    if not hasattr(base, "layers"):
        raise InvalidInput(f"{type(model).__name__} has no `{model.base_model_prefix}.layers`; layer pruning supports "
                           f"Llama-style decoders (Llama, Qwen2/3, Mistral, SmolLM, ...)")
    return base.layers


def prune_layers(model, keep: list[int]):
    """A copy of ``model`` with only the decoder layers in ``keep`` (in the given order, renumbered)."""
    layers = decoder_layers(model)
    n = len(layers)
    bad = [i for i in keep if not 0 <= i < n]
    if bad or not keep or len(set(keep)) != len(keep):
        raise InvalidInput(f"keep-list {keep} must name distinct layers in 0..{n - 1}")
    pruned = copy.deepcopy(model)
    new_layers = torch.nn.ModuleList([decoder_layers(pruned)[i] for i in keep])
    for j, layer in enumerate(new_layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = j  # the KV cache indexes layers by this number
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = j
    getattr(pruned, pruned.base_model_prefix).layers = new_layers
    pruned.config.num_hidden_layers = len(keep)
    if getattr(pruned.config, "layer_types", None):
        pruned.config.layer_types = [pruned.config.layer_types[i] for i in keep]
    return pruned


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str]) -> float:
    """Token-weighted perplexity of ``texts`` (each scored on its own)."""
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
        out = model(input_ids=ids, labels=ids)
        n = ids.shape[1] - 1
        total += float(out.loss) * n
        count += n
    return float(torch.exp(torch.tensor(total / max(count, 1))))


@torch.no_grad()
def greedy_keep_list(model, tokenizer, layers: int, texts: list[str] | None = None) -> tuple[list[int], list[float]]:
    """Drop layers one at a time, each time the one whose removal raises perplexity least.

    Returns the keep-list and the perplexity after each removal. Cost: Σ_{n=layers+1}^{L} n evaluations.
    """
    texts = texts or CALIBRATION_TEXTS
    keep = list(range(len(decoder_layers(model))))
    if not 0 < layers <= len(keep):
        raise InvalidInput(f"--layers must be between 1 and {len(keep)}, got {layers}")
    original = decoder_layers(model)
    base = getattr(model, model.base_model_prefix)
    trajectory = []
    try:
        while len(keep) > layers:
            best = None
            for drop in keep:
                trial = [i for i in keep if i != drop]
                base.layers = torch.nn.ModuleList([original[i] for i in trial])
                for j, i in enumerate(trial):
                    original[i].self_attn.layer_idx = j
                ppl = perplexity(model, tokenizer, texts)
                if best is None or ppl < best[0]:
                    best = (ppl, drop)
            keep.remove(best[1])
            trajectory.append(best[0])
            log.info("dropped layer %d: %d layers left, perplexity %.1f", best[1], len(keep), best[0])
    finally:
        base.layers = original
        for j, layer in enumerate(original):
            layer.self_attn.layer_idx = j
    return keep, trajectory


def prune_command(model_name: str, *, layers: int | None, out: str, keep: str | None) -> dict:
    from .models import load_causal_lm, load_tokenizer, resolve_model_path
    from .tracking import console

    if (layers is None) == (keep is None):
        raise InvalidInput("give exactly one of --layers N (greedy search) or --keep 0,1,5,... (explicit keep-list)")
    path = resolve_model_path(model_name)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, "float32")
    model.eval()
    start = time.perf_counter()
    before = perplexity(model, tokenizer, HELDOUT_TEXTS)
    if keep is not None:
        keep_list = [int(x) for x in keep.split(",") if x.strip()]
    else:
        console.print(f"searching which {len(decoder_layers(model)) - layers} layers to drop ...")
        keep_list, _ = greedy_keep_list(model, tokenizer, layers)
    pruned = prune_layers(model, keep_list)
    after = perplexity(pruned, tokenizer, HELDOUT_TEXTS)
    Path(out).mkdir(parents=True, exist_ok=True)
    pruned.save_pretrained(out)
    tokenizer.save_pretrained(out)
    result = {"keep": keep_list, "layers": len(keep_list), "heldout_ppl_before": before, "heldout_ppl_after": after,
              "params": sum(p.numel() for p in pruned.parameters()), "seconds": time.perf_counter() - start}
    import json

    (Path(out) / "prune.json").write_text(json.dumps(result, indent=2))
    console.print(f"kept layers {keep_list}: held-out perplexity {before:.1f} -> {after:.1f}, "
                  f"{result['params'] / 1e6:.1f}M parameters, saved to {out}")
    return result
