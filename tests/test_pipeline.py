"""run.pipeline: sync is the sequential step bit for bit; one_step_off samples from weights exactly one update old,
corrects for it, keeps the prompt sampler consistent through evaluations, saves, interrupts and resume, and
learns like sync."""

import json
import math

import pytest
import torch

from opdkit.checkpoint import latest_checkpoint
from opdkit.config import ConfigError, DistillConfig, load_config
from opdkit.data import PromptSampler
from opdkit.evaluation import decode_responses
from opdkit.loop import apply_update
from opdkit.pipeline import AheadSampler
from opdkit.train import Distiller, step_seed
from tests.conftest import tiny_overrides
from tests.test_train import _params, exact_reverse_kl, make, prompts, sharp_dirs  # noqa: F401  (fixtures)

OFF = {"run.pipeline": "one_step_off"}


def _sequential_step(d: Distiller, step: int):
    """Today's step composed by hand: rollout, teacher scoring, update, optimizer step, weight sync in sequence."""
    rollout = d.rollout(d.sampler.next_batch(), step_seed(d.cfg.run.seed, step))
    scores = d.score(rollout)
    rewards = d.outcome_rewards(rollout, decode_responses(d.tokenizer, rollout.response_ids, rollout.response_mask))
    loss, _ = d.update(rollout, scores, rewards)
    apply_update(d.trainable_parameters(), d.optimizer, d.scheduler, loss, d.cfg.optim.max_grad_norm)
    d.engine.sync_weights(d.student)
    return loss, rollout


@pytest.mark.parametrize("sampling_dtype", ["float32", "bfloat16"])  # the student itself / a separate copy
def test_sync_is_the_sequential_step_bit_for_bit(sharp_dirs, prompts, tmp_path, sampling_dtype):
    a = make(sharp_dirs, prompts, tmp_path / "a", **{"run.pipeline": "sync", "student.sampling_dtype": sampling_dtype,
                                                    "objective.is_correction": "truncated"})
    b = make(sharp_dirs, prompts, tmp_path / "b", **{"student.sampling_dtype": sampling_dtype,
                                                    "objective.is_correction": "truncated"})
    assert a.pipeline is None and isinstance(a.sampler, PromptSampler)
    for step in (1, 2, 3):
        metrics, batch = a.opd_step(step)
        loss, rollout = _sequential_step(b, step)
        assert metrics["opd/loss"] == loss and "pipeline/staleness" not in metrics
        assert torch.equal(batch.rollout.response_ids, rollout.response_ids)
        assert torch.equal(batch.rollout.sampling_logp, rollout.sampling_logp)
    assert torch.equal(_params(a.student), _params(b.student))


def test_one_step_off_samples_from_weights_one_update_old_and_corrects_for_it(sharp_dirs, prompts, tmp_path):
    clip = 1.5
    d = make(sharp_dirs, prompts, tmp_path / "p", **OFF, **{"run.steps": 3, "objective.is_correction": "truncated",
                                                           "objective.is_clip": clip})
    assert d.engine.model is not d.student  # the worker samples a copy while the optimizer updates the student
    ref = make(sharp_dirs, prompts, tmp_path / "ref", **{"objective.is_correction": "truncated",
                                                         "objective.is_clip": clip})
    m1, b1 = d.opd_step(1)
    after_1 = {k: v.clone() for k, v in d.student.state_dict().items()}
    _, ref_b1 = ref.opd_step(1)
    assert m1["pipeline/staleness"] == 0.0  # nothing to overlap with yet: the first rollout is on-policy
    assert torch.equal(b1.rollout.response_ids, ref_b1.rollout.response_ids)
    m2, b2 = d.opd_step(2)
    ref_m2, _ = ref.opd_step(2)
    assert m2["pipeline/staleness"] == 1.0
    # step 2 was sampled while step 1 trained, i.e. from the initial weights: a fresh, untrained Distiller's sample
    fresh = make(sharp_dirs, prompts, tmp_path / "fresh")
    fresh.sampler.next_batch()
    stale = fresh.rollout(fresh.sampler.next_batch(), step_seed(fresh.cfg.run.seed, 2))
    assert torch.equal(b2.rollout.response_ids, stale.response_ids)
    assert torch.equal(b2.rollout.sampling_logp, stale.sampling_logp)
    # the mismatch metric sees the staleness (fp32 sampling: on policy it is rounding only) ...
    assert m2["rollout/logp_mismatch_abs"] > 1e-3 > 100 * ref_m2["rollout/logp_mismatch_abs"]
    # ... and the truncated importance weight is computed against the stale sampling log-probs
    mask = b2.rollout.response_mask
    w = torch.exp(b2.student_logp_sampled - b2.rollout.sampling_logp).clamp(max=clip)
    assert m2["opd/is_weight_mean"] == pytest.approx(float(w[mask].mean()), rel=1e-5)
    assert m2["opd/is_clipped_frac"] == pytest.approx(float((w[mask] >= clip).float().mean()), abs=1e-6)
    assert m2["opd/is_weight_mean"] != pytest.approx(1.0, abs=1e-3)
    m3, b3 = d.opd_step(3)
    assert m3["pipeline/staleness"] == 1.0 and d.pipeline.inflight is None  # the last step launches nothing
    # step 3 was sampled from the weights after update 1: the deferred sync did reach the sampling copy
    fresh.student.load_state_dict(after_1)
    fresh.engine.sync_weights(fresh.student)
    assert torch.equal(b3.rollout.response_ids, fresh.rollout(fresh.sampler.next_batch(),
                                                              step_seed(fresh.cfg.run.seed, 3)).response_ids)
    assert all(math.isfinite(m[k]) for m in (m1, m2, m3) for k in ("opd/loss", "optim/grad_norm"))


def test_a_skipped_update_is_not_counted_as_staleness(sharp_dirs, prompts, tmp_path, monkeypatch):
    d = make(sharp_dirs, prompts, tmp_path / "p", **OFF, **{"run.steps": 4})
    original = Distiller.update

    def nan_at_step_2(self, *a, **kw):
        loss, batch = original(self, *a, **kw)
        return (float("nan"), batch) if self.completed == 1 else (loss, batch)

    monkeypatch.setattr(Distiller, "update", nan_at_step_2)
    staleness = [d.opd_step(step)[0]["pipeline/staleness"] for step in (1, 2, 3, 4)]
    # step 3 was sampled after update 1 while step 2 trained; step 2 applied nothing, so it trains update 1's weights
    assert staleness == [0.0, 1.0, 0.0, 1.0]


def _run_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_one_step_off_lowers_the_reverse_kl_like_sync(sharp_dirs, prompts, tmp_path):
    results = {}
    for mode in ("sync", "one_step_off"):
        d = make(sharp_dirs, prompts, tmp_path / mode, **{"run.pipeline": mode, "run.steps": 8,
                                                         "objective.name": "reverse_kl"})
        fixed = d.engine.generate([ex.prompt_ids for ex in d.train_set[:6]], n=1, temperature=1.0, top_p=1.0,
                                  max_new_tokens=8, topk=0, seed=123)
        before = exact_reverse_kl(d, fixed)
        d.run()
        results[mode] = exact_reverse_kl(d, fixed) / before
        if mode == "one_step_off":
            assert [row["pipeline/staleness"] for row in _run_metrics(tmp_path / mode)] == [0.0] + [1.0] * 7
            assert d.pipeline.pool is None and d.pipeline.inflight is None  # the worker is stopped after run()
    assert results["sync"] < 0.85 and results["one_step_off"] < 0.85, results
    assert results["one_step_off"] == pytest.approx(results["sync"], abs=0.15), results


def test_evaluations_and_saves_drain_without_changing_what_is_trained(sharp_dirs, prompts, tmp_path):
    plain = make(sharp_dirs, prompts, tmp_path / "plain", **OFF, **{"run.steps": 4, "eval.prompts": 4})
    plain.run()
    busy = make(sharp_dirs, prompts, tmp_path / "busy", **OFF, **{"run.steps": 4, "eval.prompts": 4,
                                                                  "eval.every": 1, "run.save_every": 1})
    busy.run()
    assert any("eval/reverse_kl" in row for row in _run_metrics(tmp_path / "busy") if row["step"] == 2)
    assert torch.equal(_params(plain.student), _params(busy.student))


# -- interrupt and resume: the same prompts as an uninterrupted run ------------------------------------------------

def _trained_prompts(monkeypatch) -> list[list[int]]:
    """Record the prompt indices of every batch that reaches the optimizer."""
    seen, original = [], Distiller.update

    def update(self, rollout, *a, **kw):
        out = original(self, rollout, *a, **kw)
        seen.append((self.completed + 1, sorted(set(rollout.example_index))))
        return out

    monkeypatch.setattr(Distiller, "update", update)
    return seen


def _make_run(dirs, prompts, out, **extra) -> Distiller:
    cfg = load_config(DistillConfig, None, tiny_overrides(dirs, prompts, out, **{
        "eval.prompts": 0, "optim.lr": 1e-2, "student.compute_dtype": "float32", "student.sampling_dtype": "float32",
        "rollout.n": 2, "rollout.prompts_per_step": 3, "run.steps": 5, **OFF, **extra}))
    return Distiller(cfg)


# where the interrupt lands in step 3 (rollout 4 is in flight by then), and the checkpoint it must leave
POINTS = {"before_the_update": ("update", 2, "step_000002"), "after_the_update": ("core_metrics", 3, "step_000003")}


@pytest.mark.parametrize("point", list(POINTS))
def test_interrupted_one_step_off_run_resumes_with_the_prompts_of_an_uninterrupted_run(sharp_dirs, prompts, tmp_path,
                                                                                       monkeypatch, point):
    seen = _trained_prompts(monkeypatch)
    _make_run(sharp_dirs, prompts, tmp_path / "ref").run()
    reference = [p for _, p in seen]
    assert len({tuple(p) for p in reference}) == 5  # shuffled: a replayed or skipped batch would show
    seen.clear()

    method, completed, expected = POINTS[point]
    original = getattr(Distiller, method)

    def interrupt(self, *a, **kw):
        if self.completed == completed and not getattr(interrupt, "fired", False):
            interrupt.fired = True
            assert self.pipeline.inflight is not None and self.pipeline.inflight.step == 4
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(Distiller, method, interrupt)
    interrupted = _make_run(sharp_dirs, prompts, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    done = int(expected[-1])
    assert latest_checkpoint(tmp_path / "run").name == expected
    # the in-flight batch went back to the sampler: in memory and in the checkpoint, the state after `done` batches
    after_done = PromptSampler(len(interrupted.train_set), 3, interrupted.cfg.run.seed, interrupted.cfg.data.shuffle)
    for _ in range(done):
        after_done.next_batch()
    assert interrupted.sampler.before is None and interrupted.sampler.inner.state_dict() == after_done.state_dict()
    saved = torch.load(latest_checkpoint(tmp_path / "run") / "trainer_state.pt", weights_only=False)["sampler"]
    assert saved == after_done.state_dict()

    trained_before_interrupt = [p for step, p in seen if step <= done]
    seen.clear()
    resumed = _make_run(sharp_dirs, prompts, tmp_path / "run", **{"run.resume": True})
    resumed.run()
    assert trained_before_interrupt + [p for _, p in seen] == reference
    assert [row["step"] for row in _run_metrics(tmp_path / "run") if "opd/loss" in row] == [1, 2, 3, 4, 5]


# -- pieces -------------------------------------------------------------------------------------------------

def test_ahead_sampler_reports_the_state_before_an_untaken_batch():
    resets = []
    s = AheadSampler(PromptSampler(10, 3, seed=0, shuffle=True), on_reset=lambda: resets.append(1))
    plain = PromptSampler(10, 3, seed=0, shuffle=True)
    assert s.next_batch() == plain.next_batch()
    start = plain.state_dict()
    ahead = s.draw_ahead()
    assert ahead == plain.next_batch() and s.state_dict() == start  # drawn, but not yet any step's
    s.take()
    assert s.state_dict() == plain.state_dict()  # taken by a step: now drawn
    s.draw_ahead()
    s.give_back()
    assert s.state_dict() == plain.state_dict() and s.inner.state_dict() == plain.state_dict()
    s.load_state_dict(start)
    assert resets == [1] and s.next_batch() == ahead


@pytest.mark.parametrize("extra, key", [({"objective.prune": "truncate"}, "objective.prune=truncate"),
                                        ({"run.rollout_threads": 0}, "run.rollout_threads")])
def test_unsupported_pipeline_settings_are_config_errors(tiny_dirs, prompts, tmp_path, extra, key):
    with pytest.raises(ConfigError, match=key):
        load_config(DistillConfig, None, tiny_overrides(tiny_dirs, prompts, tmp_path / "r", **OFF, **extra))


def test_worker_uses_its_own_torch_threads(sharp_dirs, prompts, tmp_path, monkeypatch):
    counts = []
    original = Distiller.rollout

    def rollout(self, *a, **kw):
        counts.append(torch.get_num_threads())
        return original(self, *a, **kw)

    monkeypatch.setattr(Distiller, "rollout", rollout)
    main = torch.get_num_threads()
    d = make(sharp_dirs, prompts, tmp_path / "t", **OFF, **{"run.steps": 2, "run.rollout_threads": 3})
    d.opd_step(1)
    d.opd_step(2)
    d.pipeline.close()
    assert counts == [3, 3] and torch.get_num_threads() == main
