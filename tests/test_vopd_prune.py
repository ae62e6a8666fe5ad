"""vOPD (control-variate baseline), the truncated importance weight and Prune-OPD (overlap-guided pruning)."""

import copy
import math

import pytest
import torch

from opdkit import losses as obj
from opdkit.candidates import candidate_mask
from opdkit.config import ConfigError, DistillConfig, load_config
from opdkit.drift import NO_DRIFT, DriftStop, drift_points, prune_weights, rollout_drift
from opdkit.engines.hf_rollout import row_seeds, sample
from opdkit.engines.hf_teacher import HFTeacher

L = math.log


# -- vOPD ------------------------------------------------------------------------------------------------


def test_vopd_baseline_hand_value():
    # Two slots of a larger vocabulary: p = (.6, .2), q = (.3, .1). p̄ = (3/4, 1/4) and both log-ratios are
    # log(1/2), so b = log(1/2). Over the whole vocabulary it is exactly -KL(p||q).
    s = torch.tensor([[[L(0.6), L(0.2)]]])
    q = torch.tensor([[[L(0.3), L(0.1)]]])
    assert obj.vopd_baseline(s, q, torch.ones(1, 1, 2, dtype=torch.bool)).item() == pytest.approx(L(0.5))
    p_full, q_full = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    kl = float((p_full * (p_full / q_full).log()).sum())
    b = obj.vopd_baseline(p_full.log().view(1, 1, 3), q_full.log().view(1, 1, 3), torch.ones(1, 1, 3, dtype=torch.bool))
    assert b.item() == pytest.approx(-kl, rel=1e-6)


def _per_sample_grads(z, logq, n, baseline_slots, seed=0):
    """Per-sample gradients (n, V) wrt the logits of the sampled-token loss, for y ~ softmax(z)."""
    V = z.shape[0]
    Z = z.detach().expand(n, V).clone().requires_grad_()
    logp = torch.log_softmax(Z, -1)
    y = torch.multinomial(logp.detach().exp(), 1, replacement=True, generator=torch.Generator().manual_seed(seed))
    Q = logq.expand(n, V)
    baseline = None
    if baseline_slots:
        ids = logp.detach().topk(baseline_slots, -1).indices  # the student's top-k (all of V: exact baseline)
        baseline = obj.vopd_baseline(logp.gather(-1, ids).unsqueeze(1), Q.gather(-1, ids).unsqueeze(1),
                                     torch.ones(n, 1, baseline_slots, dtype=torch.bool))
    loss, _ = obj.sampled_token_pg(logp.gather(-1, y), Q.gather(-1, y), baseline)
    loss.sum().backward()
    return Z.grad


# (student p, teacher q, measured variance ratio vOPD / plain). The value baseline is not the variance-optimal
# constant (that is E[D‖∇‖²] / E[‖∇‖²], D = log p − log q): it lowers the variance when the student is flatter
# than the teacher (D > 0 on the many low-p tokens with large ‖∇log p‖), and raises it when a sharp student
# samples tail tokens the teacher also dislikes (D < 0 there, and subtracting KL > 0 makes |D − KL| larger).
REGIMES = {
    "flat_student": ([.4, .3, .2, .05, .03, .02], [.85, .05, .04, .03, .02, .01], 0.46),
    "sharp_student": ([.9, .04, .03, .01, .01, .01], [.3, .5, .1, .05, .03, .02], 2.15),
}


@pytest.mark.parametrize("slots", [6, 3])  # exact value; top-3 approximation
@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_vopd_keeps_the_sampled_gradient_unbiased_and_changes_its_variance(slots, regime):
    p, q, ratio = REGIMES[regime]
    z, logq = torch.tensor(p).log(), torch.tensor(q).log()
    zz = z.clone().requires_grad_()
    obj.reverse_kl(zz.unsqueeze(0), logq.unsqueeze(0)).sum().backward()
    exact = zz.grad  # ∇_z KL(p||q)
    n = 40_000
    plain = _per_sample_grads(z, logq, n, 0)
    vopd = _per_sample_grads(z, logq, n, slots, seed=1)
    for g in (plain, vopd):
        se = g.std(0) / math.sqrt(n)
        assert ((g.mean(0) - exact).abs() <= 4 * se + 1e-6).all(), (g.mean(0), exact)
    measured = vopd.var(0).sum().item() / plain.var(0).sum().item()
    assert measured == pytest.approx(ratio, rel=0.15), measured


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_second_moment_ratio_on_samples_matches_the_closed_form(regime):
    # The probe's measure: Σ (D − c)² ‖e_y − p‖² over sampled tokens, with and without c = KL. Its expectation is
    # Σ_y p(y) (D(y) − c)² ‖e_y − p‖², computed here over the 6 tokens.
    p, q, _ = REGIMES[regime]
    p, q = torch.tensor(p), torch.tensor(q)
    d, kl = (p / q).log(), float((p * (p / q).log()).sum())
    norm2 = 1 - 2 * p + p.square().sum()
    exact = float((p * (d - kl).square() * norm2).sum() / (p * d.square() * norm2).sum())
    y = torch.multinomial(p, 40_000, replacement=True, generator=torch.Generator().manual_seed(0)).view(1, -1)
    n = y.shape[1]
    ratio = obj.pg_second_moment_ratio(p.log()[y], q.log()[y], torch.full((1, n), -kl), p.log().expand(1, n, 6),
                                       torch.ones(1, n, dtype=torch.bool))
    assert ratio == pytest.approx(exact, rel=0.05)
    assert (ratio < 1) == (regime == "flat_student")


def test_probe_recommends_vopd_only_where_it_lowers_the_variance():
    from opdkit.probe import ProbeThresholds, decide
    from tests.test_probe import _numbers

    helps = decide(_numbers(vopd_second_moment_ratio=0.45), ProbeThresholds())
    assert any("objective.baseline=vopd" in step for step in helps["recipe"])
    hurts = decide(_numbers(vopd_second_moment_ratio=1.7), ProbeThresholds())
    assert not any("objective.baseline=vopd" in step for step in hurts["recipe"])


def test_topk_pg_with_vopd_baseline_is_the_gradient_of_eq5():
    # With student_p weights, subtracting b = Σ p̄ (log q - log p) removes the push on the set's total mass:
    # Σ p̄ (D - D̄) ∇log p(v) = ∇ KL(p̄||q̄). Without the baseline the two differ.
    torch.manual_seed(0)
    V, k = 12, 4
    zs, zt = torch.randn(2, 3, V), torch.randn(2, 3, V)
    logq = torch.log_softmax(zt, -1)
    s_ids, t_ids = zs.topk(k, -1).indices, zt.topk(k, -1).indices
    ids = torch.cat([s_ids, t_ids], -1)
    for strategy in ("student", "union", "intersection"):
        valid = candidate_mask(strategy, s_ids, t_ids)
        grads = {}
        for name in ("kl", "pg", "pg_vopd"):
            z = zs.clone().requires_grad_()
            logp = torch.log_softmax(z, -1).gather(-1, ids)
            if name == "kl":
                loss = obj.topk_kl(logp, logq.gather(-1, ids), valid)
            else:
                loss = obj.topk_pg(logp, logq.gather(-1, ids), valid, "student_p", baseline=name == "pg_vopd")[0]
            loss.sum().backward()
            grads[name] = z.grad
        assert torch.allclose(grads["pg_vopd"], grads["kl"], atol=1e-5), strategy
        assert not torch.allclose(grads["pg"], grads["kl"], atol=1e-3), strategy


def test_truncated_is_weight_by_hand():
    train = torch.tensor([[0.0, 0.5, 1.0, -1.0]])
    w = obj.truncated_is_weight(train, torch.zeros(1, 4), clip=2.0)
    assert w.tolist()[0] == pytest.approx([1.0, math.exp(0.5), 2.0, math.exp(-1.0)])


# -- Prune-OPD masks ---------------------------------------------------------------------------------------


def test_drift_points_and_weights_by_hand():
    lo, hi = 0.2, 1.0
    overlap = torch.tensor([[hi, lo, lo, lo, hi, lo],   # run of 2 ends at t = 2
                            [lo, hi, lo, hi, lo, hi],   # never 2 in a row
                            [lo, lo, lo, lo, lo, lo],   # low everywhere, but the response is 1 token long
                            [hi, hi, hi, lo, lo, hi]])  # run of 2 ends at t = 4
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2, 1:] = False
    drift = drift_points(overlap, mask, threshold=0.5, window=2)
    assert drift.tolist() == [2, NO_DRIFT, NO_DRIFT, 4]
    assert drift_points(overlap, mask, 0.5, 1).tolist() == [1, 0, 0, 3]
    assert drift_points(overlap, mask, 0.5, 3).tolist() == [3, NO_DRIFT, NO_DRIFT, NO_DRIFT]
    down = prune_weights(drift, 6, "downweight", 0.5)
    assert down[0].tolist() == [1, 1, 1, 0.5, 0.25, 0.125]
    assert down[1].tolist() == [1] * 6 and down[3].tolist() == [1, 1, 1, 1, 1, 0.5]
    assert prune_weights(drift, 6, "truncate", 0.5)[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert prune_weights(drift, 6, "none", 0.5).eq(1).all()


def test_downweight_scales_the_opd_token_loss():
    from opdkit.config import ObjectiveConfig
    from opdkit.objectives import objective_for, token_loss
    from opdkit.engines.base import TeacherScores
    from opdkit.student import StudentOutputs

    s = StudentOutputs(torch.log(torch.tensor([[0.5, 0.2, 0.4]])), None, torch.zeros(1, 3))
    t = TeacherScores(torch.log(torch.tensor([[0.25, 0.4, 0.1]])))
    objective = objective_for(ObjectiveConfig(name="sampled"))
    w = torch.tensor([[1.0, 0.5, 0.25]])
    assert torch.allclose(token_loss(objective, s, t, None, opd_token_weight=w), token_loss(objective, s, t, None) * w)


# -- Prune-OPD early stop --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tokenizer):
    from opdkit.tiny import tiny_llama

    student, teacher = tiny_llama(len(tokenizer), seed=0).eval(), tiny_llama(len(tokenizer), seed=1).eval()
    prompts = [tokenizer(c)["input_ids"] for c in ("What is 2+3?", "Hi", "Say a long word", "7*8?")]
    return student, teacher, prompts


def _rollout(model, prompts, pad, *, T, k, hook=None, min_new=0):
    return sample(model, prompts, max_new_tokens=T, eos_ids=[2], pad_id=pad, topk=k, seeds=row_seeds(3, 0, len(prompts)),
                  min_new_tokens=min_new, stop_hook=hook)


def test_stream_scores_match_full_scoring_when_nothing_drifts(pair):
    student, _, prompts = pair
    teacher_model = copy.deepcopy(student)  # the same model: overlap 1 everywhere, never drifts
    teacher = HFTeacher(teacher_model, vocab_size=student.config.vocab_size, pad_id=2)
    k, T = 8, 13
    hook = DriftStop(teacher, prompts, k=k, threshold=1.0, window=3, pad_id=2, eos_ids=[2])
    resp, mask, _, top, _ = _rollout(student, prompts, 2, T=T, k=k, hook=hook, min_new=T)
    scores, kept = hook.scores(resp, top)
    assert (hook.drift == NO_DRIFT).all() and torch.equal(kept, mask) and resp.shape[1] == T
    full = teacher.score(prompts, resp, mask, k=k, student_topk_ids=top)
    for f in ("sampled_logp", "topk_logp", "logp_at_student_topk", "entropy"):
        assert torch.allclose(getattr(scores, f), getattr(full, f), atol=1e-4), f
    assert torch.equal(scores.topk_ids[mask], full.topk_ids[mask])


# (threshold, window) -> offline drift points of the fixture's rollout (opdkit.noise sampling): rows stop in
# different chunks, and at (0.15, 5) row 2 never drifts, so the decode loop runs to the end
STOP_CASES = {(0.15, 3): [2, 13, 9, 9], (0.15, 5): [8, 22, NO_DRIFT, 11], (0.3, 4): [3, 6, 9, 6]}


@pytest.mark.parametrize("threshold,W", sorted(STOP_CASES))
def test_early_stop_cuts_rows_where_offline_truncation_would(pair, threshold, W):
    student, teacher_model, prompts = pair
    teacher = HFTeacher(teacher_model, vocab_size=student.config.vocab_size, pad_id=2)
    k, T = 8, 24
    from opdkit.engines.base import Rollout

    # offline: the full rollout, scored, then cut at its drift points
    resp, mask, _, top, _ = _rollout(student, prompts, 2, T=T, k=k, min_new=T)
    full = teacher.score(prompts, resp, mask, k=k, student_topk_ids=top)
    ro = Rollout(prompts, resp, mask, torch.zeros_like(resp, dtype=torch.float), top, torch.zeros(4, dtype=torch.bool))
    drift = rollout_drift(ro, full, k, threshold, W)
    assert drift.tolist() == STOP_CASES[threshold, W]
    offline = mask & prune_weights(drift, T, "truncate", 0).bool()
    # online: the teacher reads each chunk of W tokens during the decode loop
    hook = DriftStop(teacher, prompts, k=k, threshold=threshold, window=W, pad_id=2, eos_ids=[2])
    r2, _, _, top2, _ = _rollout(student, prompts, 2, T=T, k=k, hook=hook, min_new=T)
    scores, kept = hook.scores(r2, top2)
    assert torch.equal(hook.drift, drift)
    n = r2.shape[1]
    assert n == (T if (drift == NO_DRIFT).any() else (int(drift.max()) // W + 1) * W)  # the loop ends early
    assert torch.equal(kept, offline[:, :n]) and not offline[:, n:].any()
    assert torch.equal(r2[kept], resp[:, :n][kept])  # the kept prefix is the same sample
    assert torch.allclose(scores.sampled_logp[kept], full.sampled_logp[:, :n][kept], atol=1e-4)
    # a row stops at the end of the chunk in which it drifted; one drifting in the last, unfinished chunk is
    # found when the rest is read after the loop (it was not stopped, only cut)
    chunk_end = (drift // W + 1) * W
    expected = torch.where((drift != NO_DRIFT) & (chunk_end <= n), chunk_end, torch.full_like(drift, -1))
    assert torch.equal(hook.stopped_at, expected)


def test_every_row_drifting_ends_the_decode_loop_after_one_chunk(pair):
    student, teacher_model, prompts = pair
    teacher = HFTeacher(teacher_model, vocab_size=student.config.vocab_size, pad_id=2)
    hook = DriftStop(teacher, prompts, k=8, threshold=1.01, window=3, pad_id=2, eos_ids=[2])
    resp, _, _, top, _ = _rollout(student, prompts, 2, T=24, k=8, hook=hook, min_new=24)
    _, kept = hook.scores(resp, top)
    assert resp.shape[1] == 3 and kept.sum(-1).tolist() == [3] * 4


# -- configuration and the training loop ------------------------------------------------------------------


def _cfg(tiny_dirs, prompts_file, tmp_path, **extra):
    from tests.conftest import tiny_overrides

    return load_config(DistillConfig, None, tiny_overrides(tiny_dirs, prompts_file, tmp_path / "run", **extra))


@pytest.mark.parametrize("extra,phrase", [
    ({"objective.name": "reverse_kl", "objective.baseline": "vopd"}, "objective.baseline=vopd applies"),
    ({"objective.baseline": "vopd"}, "objective.baseline=vopd applies"),  # topk with form=kl
    ({"objective.is_clip": 0.5}, "objective.is_clip must be >= 1"),
    ({"objective.prune": "downweight", "objective.prune_threshold": 1.5}, "objective.prune_threshold"),
    ({"objective.prune": "truncate", "teacher.engine": "server", "teacher.url": "http://x"}, "prune=truncate"),
])
def test_bad_options_name_themselves(tiny_dirs, prompts_file, tmp_path, extra, phrase):
    with pytest.raises(ConfigError, match=phrase.replace("(", r"\(")):
        _cfg(tiny_dirs, prompts_file, tmp_path, **extra)


def test_distill_steps_log_prune_and_is_metrics(tiny_dirs, prompts_file, tmp_path):
    from opdkit.train import Distiller

    base = {"rollout.max_new_tokens": 12, "rollout.min_new_tokens": 12, "objective.prune_threshold": 1.0,
            "objective.prune_window": 3}
    cfg = _cfg(tiny_dirs, prompts_file, tmp_path, **base, **{"objective.prune": "truncate"})
    m, batch = Distiller(cfg, log_to_disk=False).opd_step(1)
    # overlap < 1 somewhere in most rows of two random models; every stopped row keeps exactly its prefix
    assert m["prune/kept_tokens"] == float(batch.rollout.response_mask.sum())
    assert m["prune/generated_tokens"] >= m["prune/kept_tokens"] and 0 <= m["prune/pruned_frac"] < 1
    assert m["prune/drift_frac"] > 0 and m["prune/tokens_saved_bound"] > 0
    cfg = _cfg(tiny_dirs, prompts_file, tmp_path / "b", **{"objective.name": "sampled", "objective.baseline": "vopd",
                                                           "objective.is_correction": "truncated"})
    m, _ = Distiller(cfg, log_to_disk=False).opd_step(1)
    # on-policy in fp32: the ratio is 1 up to the cached-vs-full forward rounding
    assert m["opd/is_weight_mean"] == pytest.approx(1.0, abs=1e-4) and m["opd/is_clipped_frac"] == 0.0
