"""The one-step-off pipeline and the truncated importance weight; sync stays the sequential loop bit for bit."""

import math

import pytest
import torch

from opdkit.objectives import truncated_importance_weight
from tests.test_train import _params, make, prompts, sharp_dirs  # noqa: F401  (fixtures)


def test_truncated_importance_weight_hand_values():
    train = torch.log(torch.tensor([[0.5, 0.1, 0.3]]))
    sampled = torch.log(torch.tensor([[0.25, 0.2, 0.3]]))
    w = truncated_importance_weight(train, sampled, 1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 2 (capped), 0.5, 1
    assert torch.equal(truncated_importance_weight(train, sampled, 0.0), torch.ones(1, 3))
    t = train.clone().requires_grad_()
    assert not truncated_importance_weight(t, sampled, 2.0).requires_grad


def _sequential_step(d, step):
    """The pre-pipeline OPD step: rollout, teacher scoring, update, optimizer step, one after another."""
    from opdkit.train import step_seed

    rollout = d.rollout(d.sampler.next_batch(), step_seed(d.cfg.run.seed, step))
    scores = d.score(rollout)
    loss, _ = d.update(rollout, scores, None)
    d.optimizer_step(loss)
    return loss, rollout


def test_sync_pipeline_is_the_sequential_loop_bit_for_bit(sharp_dirs, prompts, tmp_path):
    a = make(sharp_dirs, prompts, tmp_path / "a", **{"run.pipeline": "sync"})
    b = make(sharp_dirs, prompts, tmp_path / "b")
    for step in (1, 2, 3):
        metrics, batch = a.opd_step(step)
        loss, rollout = _sequential_step(b, step)
        assert metrics["opd/loss"] == loss and metrics["pipeline/staleness"] == 0.0
        assert torch.equal(batch.rollout.response_ids, rollout.response_ids)
    assert torch.equal(_params(a.student), _params(b.student))


def test_one_step_off_samples_from_weights_one_step_old(sharp_dirs, prompts, tmp_path):
    d = make(sharp_dirs, prompts, tmp_path / "p", **{"run.pipeline": "one_step_off", "run.steps": 3,
                                                    "objective.is_correction": 2.0})
    ref = make(sharp_dirs, prompts, tmp_path / "ref")  # same initial weights, never trained
    m1, b1 = d.opd_step(1)
    m2, b2 = d.opd_step(2)
    assert (m1["pipeline/staleness"], m2["pipeline/staleness"]) == (0.0, 1.0)
    # step 2 was sampled while step 1 trained, i.e. from the initial weights
    _, ref_b1 = ref.opd_step(1)  # trains ref: its step-2 rollout is then sampled from updated weights
    assert torch.equal(b1.rollout.response_ids, ref_b1.rollout.response_ids)
    fresh = make(sharp_dirs, prompts, tmp_path / "fresh")
    fresh.sampler.next_batch()
    stale, _, _ = fresh.sample_step(fresh.sampler.next_batch(), 2)
    assert torch.equal(b2.rollout.response_ids, stale.response_ids)
    assert torch.equal(b2.rollout.sampling_logp, stale.sampling_logp)
    # the mismatch is measured against the trained weights, and the weights correct for it
    assert m2["pipeline/logp_mismatch_abs"] > 0 and 0 < m2["pipeline/is_weight_mean"] <= 2.0
    m3, _ = d.opd_step(3)
    assert m3["pipeline/staleness"] == 1.0 and d._inflight is None  # the last step launches nothing
    assert all(math.isfinite(m[k]) for m in (m1, m2, m3) for k in ("opd/loss", "optim/grad_norm"))


def test_one_step_off_run_lowers_the_reverse_kl_like_sync(sharp_dirs, prompts, tmp_path):
    from tests.test_train import exact_reverse_kl

    results = {}
    for mode in ("sync", "one_step_off"):
        d = make(sharp_dirs, prompts, tmp_path / mode, **{"run.pipeline": mode, "run.steps": 8,
                                                         "objective.name": "reverse_kl"})
        fixed = d.engine.generate([ex.prompt_ids for ex in d.train_set[:6]], n=1, temperature=1.0, top_p=1.0,
                                  max_new_tokens=8, topk=0, seed=123)
        before = exact_reverse_kl(d, fixed)
        d.run()
        results[mode] = exact_reverse_kl(d, fixed) / before
    assert results["sync"] < 0.85 and results["one_step_off"] < 0.85, results
    assert results["one_step_off"] == pytest.approx(results["sync"], abs=0.15), results
