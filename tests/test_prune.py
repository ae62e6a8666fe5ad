"""Layer pruning: keep-lists, the greedy perplexity search, and the CLI."""

import json

import pytest
import torch

from opdkit.cli import main
from opdkit.prune import HELDOUT_TEXTS, greedy_keep_list, perplexity, prune_layers
from opdkit.engines.hf_rollout import sample
from opdkit.tiny import save_tiny, tiny_llama


def _identity_layer(model, index):
    """Zero a layer's output projections: the residual stream then passes through it unchanged."""
    layer = model.model.layers[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


@torch.no_grad()
def test_dropping_an_identity_layer_keeps_outputs_and_kv_cache_works(tokenizer):
    model = tiny_llama(len(tokenizer), seed=0, layers=4).eval()
    _identity_layer(model, 2)
    pruned = prune_layers(model, [0, 1, 3]).eval()
    assert pruned.config.num_hidden_layers == 3 and len(model.model.layers) == 4  # the original is untouched
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    torch.testing.assert_close(pruned(input_ids=ids).logits, model(input_ids=ids).logits)
    # Renumbered layer_idx: cached decoding of the pruned model matches the original's.
    a = sample(pruned, [[1, 40, 41]], max_new_tokens=5, eos_ids=[2], pad_id=2, greedy=True)[0]
    b = sample(model, [[1, 40, 41]], max_new_tokens=5, eos_ids=[2], pad_id=2, greedy=True)[0]
    assert torch.equal(a, b)


def test_bad_keep_lists_are_rejected(tokenizer):
    model = tiny_llama(len(tokenizer), seed=0, layers=3)
    for keep in ([0, 0], [5], []):
        with pytest.raises(ValueError, match="keep-list"):
            prune_layers(model, keep)


@torch.no_grad()
def test_greedy_search_drops_the_identity_layer_first(tokenizer):
    # Removing the identity layer leaves perplexity exactly unchanged; removing a random layer changes it, so
    # the greedy choice must be the identity layer unless some removal *lowers* perplexity.
    model = tiny_llama(len(tokenizer), seed=1, layers=4).eval()
    _identity_layer(model, 1)
    texts = ["the quick brown fox", "jumps over the lazy dog"]
    base = perplexity(model, tokenizer, texts)
    keep, trajectory = greedy_keep_list(model, tokenizer, 3, texts)
    others = {d: perplexity(prune_layers(model, [i for i in range(4) if i != d]), tokenizer, texts)
              for d in (0, 2, 3)}
    assert len(keep) == 3 and trajectory[0] <= base + 1e-4
    assert trajectory[0] == pytest.approx(min([base, *others.values()]), rel=1e-6)
    if all(v > base for v in others.values()):
        assert keep == [0, 2, 3]
    assert len(model.model.layers) == 4  # the search restores the model


def test_prune_cli_greedy_and_keep_list(tmp_path, tokenizer):
    save_tiny(tiny_llama(len(tokenizer), seed=2, layers=4), tokenizer, tmp_path / "m")
    assert main(["prune", str(tmp_path / "m"), "--layers", "2", "--out", str(tmp_path / "g")]) == 0
    info = json.loads((tmp_path / "g" / "prune.json").read_text())
    assert info["layers"] == 2 and (tmp_path / "g" / "config.json").is_file()
    assert main(["prune", str(tmp_path / "m"), "--keep", "0,3", "--out", str(tmp_path / "k")]) == 0
    assert json.loads((tmp_path / "k" / "prune.json").read_text())["keep"] == [0, 3]
    assert main(["prune", str(tmp_path / "m"), "--out", str(tmp_path / "x")]) == 1  # neither --layers nor --keep


@pytest.mark.slow
@torch.no_grad()
def test_greedy_keep_list_beats_naive_pruning_on_smollm(smollm_dir):
    from opdkit.demo import PRUNED15_KEEP
    from opdkit.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(smollm_dir), load_causal_lm(smollm_dir)
    model.eval()
    full = perplexity(model, tok, HELDOUT_TEXTS)
    greedy = perplexity(prune_layers(model, PRUNED15_KEEP), tok, HELDOUT_TEXTS)
    every_other = perplexity(prune_layers(model, list(range(0, 30, 2))), tok, HELDOUT_TEXTS)
    assert full < 30 and greedy < 500 and every_other > 20 * greedy, (full, greedy, every_other)
