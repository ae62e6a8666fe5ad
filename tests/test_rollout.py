"""Rollout: masks, truncation, top-p, KV-cache decoding and sampling statistics."""

import torch

from opdkit.engines.hf_rollout import HFRolloutEngine, filter_top_p, response_mask_from_eos, sample
from opdkit.lm import left_pad
from opdkit.tiny import tiny_llama


def test_mask_ends_at_first_eos_even_when_pad_equals_eos():
    # EOS = pad = 2. Row 0 ends at position 2 (inclusive); row 1 never ends; row 2 ends immediately.
    tokens = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2]])
    mask, ended = response_mask_from_eos(tokens, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_filter_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_top_p(probs.log(), 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # .5 < .7, .5+.3 crosses it: keep both
    assert filter_top_p(probs.log(), 1.0).isfinite().all()


def _greedy_without_cache(model, prompt, steps):
    ids = torch.tensor([prompt])
    out = []
    for _ in range(steps):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        out.append(int(nxt))
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return out


@torch.no_grad()
def test_kv_cache_greedy_matches_recomputation_with_left_padding(tokenizer):
    model = tiny_llama(len(tokenizer), seed=3).eval()
    prompts = [[1, 40, 41, 42, 43, 44], [1, 50]]
    resp, mask, _, _, trunc = sample(model, prompts, max_new_tokens=6, eos_ids=[len(tokenizer) + 5], pad_id=2,
                                     greedy=True)
    for i, p in enumerate(prompts):
        assert resp[i].tolist() == _greedy_without_cache(model, p, 6)
    assert trunc.all() and mask.all()


@torch.no_grad()
def test_sampling_logp_topk_and_determinism(tokenizer):
    model = tiny_llama(len(tokenizer), seed=4).eval()
    prompts = [[1, 40, 41], [1, 50, 51, 52]]
    a = sample(model, prompts, max_new_tokens=5, eos_ids=[2], pad_id=2, temperature=0.8, topk=3,
               seeds=[7, 8])
    b = sample(model, prompts, max_new_tokens=5, eos_ids=[2], pad_id=2, temperature=0.8, topk=3,
               seeds=[7, 8])
    assert torch.equal(a[0], b[0])
    resp, mask, logp, topk, _ = a
    ids, attn = left_pad(prompts, 2)
    full = torch.cat([ids, resp], 1)
    logits = model(input_ids=full, attention_mask=torch.cat([attn, torch.ones_like(resp)], 1),
                   position_ids=(torch.cat([attn, torch.ones_like(resp)], 1).cumsum(-1) - 1).clamp(min=0)).logits
    P = ids.shape[1]
    step_logits = logits[:, P - 1:P - 1 + resp.shape[1]]
    expected = torch.log_softmax(step_logits / 0.8, -1).gather(-1, resp[..., None]).squeeze(-1)
    torch.testing.assert_close(logp[mask], expected[mask], rtol=1e-4, atol=1e-4)
    assert torch.equal(topk[mask], step_logits.topk(3, -1).indices[mask])


@torch.no_grad()
def test_sampled_first_tokens_follow_the_model_distribution(tokenizer):
    model = tiny_llama(len(tokenizer), seed=5).eval()
    with torch.no_grad():
        w = model.lm_head.weight
        w.mul_(8.0)  # sharpen the random model so a few tokens carry most of the mass
    prompt = [1, 40, 41]
    n = 3000
    resp, *_ = sample(model, [prompt] * n, max_new_tokens=1, eos_ids=[2], pad_id=2,
                      seeds=list(range(n)))
    probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
    freq = torch.bincount(resp[:, 0], minlength=len(probs)).float() / n
    top = probs.topk(3).indices
    # 3000 draws: standard error <= sqrt(.25/3000) ≈ .009; allow 4 standard errors
    assert (freq[top] - probs[top]).abs().max() < 0.04


def test_engine_n_samples_per_prompt_and_bf16_copy_sync(tokenizer):
    student = tiny_llama(len(tokenizer), seed=6)
    engine = HFRolloutEngine(student, eos_ids=[2], pad_id=2, sampling_dtype=torch.bfloat16)
    ro = engine.generate([[1, 40], [1, 50, 51]], n=3, temperature=1.0, top_p=1.0, max_new_tokens=4, topk=2, seed=0,
                         example_index=[7, 9])
    assert len(ro) == 6 and ro.example_index == [7, 7, 7, 9, 9, 9] and ro.group_size == 3
    assert ro.prompt_ids[0] == ro.prompt_ids[2] == [1, 40]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5)
    engine.sync_weights(student)
    for (name, p), q in zip(student.named_parameters(), engine.model.parameters()):
        torch.testing.assert_close(p.to(torch.bfloat16), q, msg=name)


@torch.no_grad()
def test_row_samples_do_not_depend_on_batch_composition(tokenizer):
    model = tiny_llama(len(tokenizer), seed=7).eval()
    alone = sample(model, [[1, 40, 41]], max_new_tokens=6, eos_ids=[2], pad_id=2, seeds=[11])[0]
    batched = sample(model, [[1, 50, 51, 52, 53], [1, 40, 41]], max_new_tokens=6, eos_ids=[2], pad_id=2,
                     seeds=[5, 11])[0]
    assert torch.equal(batched[1, :alone.shape[1]], alone[0])


@torch.no_grad()
def test_min_new_tokens_suppresses_eos(tokenizer):
    model = tiny_llama(len(tokenizer), seed=8).eval()
    with torch.no_grad():
        model.lm_head.weight[2].fill_(0.5)  # make EOS (id 2) the likeliest token everywhere
        model.model.norm.weight.fill_(5.0)
    early = sample(model, [[1, 40]] * 4, max_new_tokens=6, eos_ids=[2], pad_id=2, seeds=[0, 1, 2, 3])
    forced = sample(model, [[1, 40]] * 4, max_new_tokens=6, eos_ids=[2], pad_id=2, seeds=[0, 1, 2, 3],
                    min_new_tokens=6)
    assert early[1].sum() < 24  # EOS ends rows early without the floor
    assert forced[1].all() and forced[4].all()  # all 6 tokens generated, no EOS: truncated


def _assert_same_samples(a, b):
    resp_a, mask_a, logp_a, top_a, trunc_a = a
    resp_b, mask_b, logp_b, top_b, trunc_b = b
    assert torch.equal(resp_a, resp_b) and torch.equal(mask_a, mask_b) and torch.equal(trunc_a, trunc_b)
    torch.testing.assert_close(logp_a, logp_b, rtol=1e-5, atol=1e-6)
    assert torch.equal(top_a[mask_a], top_b[mask_b])


@torch.no_grad()
def test_compaction_drops_finished_rows_without_changing_any_row(tokenizer):
    model = tiny_llama(len(tokenizer), seed=9).eval()
    prompts = [[1, 40, 41], [1, 50, 51, 52, 53], [1, 60], [1, 44, 45, 46]]
    eos = list(range(2, 40))  # many EOS ids: rows end at different steps
    kw = dict(max_new_tokens=12, eos_ids=eos, pad_id=2, topk=3, seeds=[3, 4, 5, 6], temperature=1.2)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[0]), with_kwargs=True)
    compacted = sample(model, prompts, compact=True, **kw)
    n_compact = list(calls)
    calls.clear()
    full = sample(model, prompts, compact=False, **kw)
    hook.remove()
    lengths = compacted[1].sum(-1)
    assert len(set(lengths.tolist())) > 1  # rows did finish at different steps
    _assert_same_samples(compacted, full)
    # decode batches shrink as rows finish; without compaction every step runs all 4 rows
    assert set(calls) == {4} and n_compact[-1] < 4 and sum(n_compact) < sum(calls)
    # a row's sample does not depend on which other rows are still alive: alone, it samples the same
    for i, p in enumerate(prompts):
        alone = sample(model, [p], **{**kw, "seeds": [kw["seeds"][i]]})
        n = int(lengths[i])
        assert torch.equal(alone[0][0, :n], compacted[0][i, :n])
        torch.testing.assert_close(alone[2][0, :n], compacted[2][i, :n], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_shared_prefill_equals_per_row_prefill(tokenizer):
    model = tiny_llama(len(tokenizer), seed=10).eval()
    prompts = [[1, 40, 41]] * 3 + [[1, 50, 51, 52, 53]] * 3
    kw = dict(max_new_tokens=8, eos_ids=[2, 30, 31], pad_id=2, topk=4, seeds=list(range(6)))
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, k: widths.append(tuple(k["input_ids"].shape)),
                                           with_kwargs=True)
    shared = sample(model, prompts, share_prefill=True, **kw)
    assert widths[0] == (2, 5)  # the prefill ran once per distinct prompt
    hook.remove()
    _assert_same_samples(shared, sample(model, prompts, share_prefill=False, **kw))
    assert len({tuple(r) for r in shared[0][:3].tolist()}) > 1  # the copies still sample independently
