"""Objectives on small known distributions: hand-derived values, invariants and equivalences."""

import math

import pytest
import torch

from opdkit import losses as obj
from opdkit.candidates import Candidates, candidate_mask
from opdkit.config import ObjectiveConfig

L = math.log


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_sampled_token_pg_value_and_gradient():
    # p(ŷ) = 0.5, q(ŷ) = 0.25: advantage = log .25 - log .5 = -log 2; loss value = -A = log 2 (ratio ≡ 1)
    s = t([[L(0.5)]]).requires_grad_()
    loss, adv = obj.sampled_token_pg(s, t([[L(0.25)]]))
    assert adv.item() == pytest.approx(-L(2))
    assert loss.item() == pytest.approx(L(2))
    loss.sum().backward()
    assert s.grad.item() == pytest.approx(L(2))  # d(-A log p)/d log p = -A


@pytest.mark.parametrize("weighting,w", [("student_p", [2 / 3, 1 / 3]), ("teacher_p", [3 / 8, 5 / 8]),
                                         ("none", [0.5, 0.5])])
def test_topk_pg_weights_values_and_gradient(weighting, w):
    # Two candidates with full-vocabulary p = (.6, .3), q = (.3, .5).
    # p̄ = (2/3, 1/3), q̄ = (3/8, 5/8); A(v) = w(v)(log q - log p).
    p, q = [0.6, 0.3], [0.3, 0.5]
    s = t([[[L(p[0]), L(p[1])]]]).requires_grad_()
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    loss, adv = obj.topk_pg(s, t([[[L(q[0]), L(q[1])]]]), valid, weighting)
    expected_adv = [w[0] * (L(q[0]) - L(p[0])), w[1] * (L(q[1]) - L(p[1]))]
    assert adv[0, 0].tolist() == pytest.approx(expected_adv, rel=1e-5)
    assert loss.item() == pytest.approx(-sum(expected_adv), rel=1e-5)
    loss.sum().backward()
    assert s.grad[0, 0].tolist() == pytest.approx([-a for a in expected_adv], rel=1e-5)


def test_topk_kl_hand_value():
    # p̄ = (2/3, 1/3), q̄ = (3/8, 5/8): KL = 2/3 log(16/9) + 1/3 log(8/15)
    s = t([[[L(0.6), L(0.3)]]])
    q = t([[[L(0.3), L(0.5)]]])
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    expected = 2 / 3 * L(16 / 9) + 1 / 3 * L(8 / 15)
    assert obj.topk_kl(s, q, valid).item() == pytest.approx(expected, rel=1e-5)


def test_topk_kl_ignores_invalid_slots_and_empty_positions():
    s = t([[[L(0.6), L(0.3), L(0.05)], [L(0.2), L(0.2), L(0.2)]]])
    q = t([[[L(0.3), L(0.5), L(0.1)], [L(0.1), L(0.1), L(0.1)]]])
    valid = torch.tensor([[[True, True, False], [False, False, False]]])
    out = obj.topk_kl(s, q, valid)
    assert out[0, 0].item() == pytest.approx(2 / 3 * L(16 / 9) + 1 / 3 * L(8 / 15), rel=1e-5)
    assert out[0, 1].item() == 0.0


def test_full_vocab_divergences_hand_values():
    p, q = t([[0.7, 0.2, 0.1]]), t([[0.2, 0.5, 0.3]])
    rev = 0.7 * L(0.7 / 0.2) + 0.2 * L(0.2 / 0.5) + 0.1 * L(0.1 / 0.3)
    fwd = 0.2 * L(0.2 / 0.7) + 0.5 * L(0.5 / 0.2) + 0.3 * L(0.3 / 0.1)
    assert obj.reverse_kl(p.log(), q.log()).item() == pytest.approx(rev, rel=1e-5)
    assert obj.forward_kl(p.log(), q.log()).item() == pytest.approx(fwd, rel=1e-5)
    # Disjoint one-hot distributions: m = (1/2, 1/2), JSD_0.5 = 1/2 log 2 + 1/2 log 2 = log 2
    one, other = t([[20.0, -20.0]]), t([[-20.0, 20.0]])
    assert obj.generalized_jsd(one, other, 0.5).item() == pytest.approx(L(2), rel=1e-4)


def test_teacher_topk_forward_kl_hand_value():
    # k=1: q puts .5 on the id, p puts .25. Coarsened q = (.5, .5), p = (.25, .75):
    # KL = .5 log(.5/.25) + .5 log(.5/.75)
    out = obj.teacher_topk_forward_kl(t([[[L(0.25)]]]), t([[[L(0.5)]]]))
    assert out.item() == pytest.approx(0.5 * L(2) + 0.5 * L(2 / 3), rel=1e-5)


@pytest.mark.parametrize("strategy,expected", [
    ("student", {1, 2, 3}), ("teacher", {3, 4, 5}), ("intersection", {3}),
    ("union", {1, 2, 3, 4, 5}), ("symmetric_difference", {1, 2, 4, 5})])
def test_candidate_mask_selects_named_set(strategy, expected):
    s_ids, t_ids = torch.tensor([[[1, 2, 3]]]), torch.tensor([[[3, 4, 5]]])
    valid = candidate_mask(strategy, s_ids, t_ids)
    ids = torch.cat([s_ids, t_ids], -1)[valid].tolist()
    assert set(ids) == expected
    assert len(ids) == len(expected)  # duplicates (3 in union) are masked, never counted twice



def test_candidates_name_the_halves_of_the_layout():
    s_ids, t_ids = torch.tensor([[[1, 2, 3]]]), torch.tensor([[[3, 4, 5]]])
    c = Candidates(s_ids, t_ids)
    assert c.ids.tolist() == [[[1, 2, 3, 3, 4, 5]]] and c.k == 3
    assert torch.equal(c.student(c.ids), s_ids) and torch.equal(c.teacher(c.ids), t_ids)
    values = torch.arange(6.0).view(1, 1, 6)
    assert torch.equal(Candidates.join(c.student(values), c.teacher(values)), values)
    assert torch.equal(c.mask("union"), candidate_mask("union", s_ids, t_ids))
    alone = Candidates.of(s_ids, None)  # a teacher without top-k: the layout is S^p alone
    assert torch.equal(alone.ids, s_ids) and alone.teacher(alone.ids).numel() == 0
    assert Candidates.of(None, t_ids) is None


def test_each_objective_declares_what_it_reads():
    from opdkit.objectives import OBJECTIVES, objective_for

    sets = {name: objective_for(ObjectiveConfig(name=name, strategy="union")).candidate_set() for name in OBJECTIVES}
    assert sets == {"sampled": None, "topk": "union", "reverse_kl": None, "forward_kl": None, "jsd": None,
                    "teacher_topk_forward_kl": "teacher"}
    assert objective_for(ObjectiveConfig(name="sampled", baseline="vopd")).candidate_set() == "student"
    assert {n for n in OBJECTIVES if OBJECTIVES[n]().full_vocab} == {"reverse_kl", "forward_kl", "jsd"}
    with pytest.raises(NotImplementedError, match="topk has no full-vocabulary loss"):
        objective_for(ObjectiveConfig(name="topk")).chunk_loss(torch.zeros(1, 3), torch.zeros(1, 3))


def _random_logits(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2


def _gathered(logits, ids):
    return torch.log_softmax(logits, -1).gather(-1, ids)


ALL_CONFIGS = [
    *(ObjectiveConfig(name="topk", strategy=s, weighting=w, form="pg")
      for s in ("student", "teacher", "intersection", "union", "symmetric_difference")
      for w in ("student_p", "teacher_p", "none")),
    *(ObjectiveConfig(name="topk", strategy=s, form="kl")
      for s in ("student", "teacher", "intersection", "union", "symmetric_difference")),
]


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: f"{c.strategy}-{c.weighting}-{c.form}")
def test_student_equals_teacher_gives_zero_loss_and_gradient(cfg):
    from opdkit.objectives import objective_for
    from opdkit.engines.base import TeacherScores
    from opdkit.student import StudentOutputs

    V, k = 11, 4
    logits = _random_logits((2, 3, V), 0).requires_grad_()
    s_top = logits.detach().topk(k, -1).indices
    t_top = s_top.clone()
    # Same distribution, so identical top-k; also perturb the teacher's top-k order to exercise membership.
    t_top = t_top.flip(-1)
    ids = torch.cat([s_top, t_top], -1)
    student_logp = _gathered(logits, ids)
    teacher_logp = student_logp.detach()
    scores = TeacherScores(sampled_logp=teacher_logp[..., 0], topk_ids=t_top, topk_logp=teacher_logp[..., k:],
                           logp_at_student_topk=teacher_logp[..., :k])
    out = StudentOutputs(logp_sampled=student_logp[..., 0], logp_at=student_logp, entropy=torch.zeros(2, 3))
    loss = objective_for(cfg).token_loss(out, scores, Candidates(s_top, t_top))
    total = obj.aggregate(loss, torch.ones(2, 3), "token_mean")
    total.backward()
    assert abs(total.item()) < 1e-6
    assert logits.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("name", ["sampled", "reverse_kl", "forward_kl", "jsd", "teacher_topk_forward_kl"])
def test_other_objectives_zero_at_equality(name):
    from opdkit.objectives import objective_for
    from opdkit.engines.base import TeacherScores
    from opdkit.student import StudentOutputs

    V, k = 9, 3
    logits = _random_logits((2, 4, V), 1).requires_grad_()
    cfg = ObjectiveConfig(name=name, k=k)
    t_top = logits.detach().topk(k, -1).indices
    sampled = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(logits, -1)
    objective = objective_for(cfg)
    out = StudentOutputs(logp_sampled=logp.gather(-1, sampled[..., None]).squeeze(-1),
                         logp_at=logp.gather(-1, torch.cat([t_top, t_top], -1)), entropy=torch.zeros(2, 4),
                         full_loss=objective.chunk_loss(logits, logits.detach()) if objective.full_vocab else None)
    scores = TeacherScores(sampled_logp=out.logp_sampled.detach(), topk_ids=t_top,
                           topk_logp=logp.detach().gather(-1, t_top))
    loss = obj.aggregate(objective.token_loss(out, scores, Candidates(t_top, t_top)), torch.ones(2, 4), "token_mean")
    loss.backward()
    assert abs(loss.item()) < 1e-5
    assert logits.grad.abs().max().item() < 1e-5


def test_objectives_have_nonzero_gradient_when_models_differ():
    # Guard against the invariants above passing vacuously.
    s_logits = _random_logits((1, 2, 7), 2).requires_grad_()
    q_logits = _random_logits((1, 2, 7), 3)
    obj.reverse_kl(s_logits, q_logits).sum().backward()
    assert s_logits.grad.abs().max() > 1e-3


def test_renormalised_topk_equals_full_reverse_kl_when_k_is_vocab():
    V = 13
    s_logits, q_logits = _random_logits((3, 5, V), 4), _random_logits((3, 5, V), 5)
    ids = s_logits.topk(V, -1).indices
    valid = torch.ones_like(ids, dtype=torch.bool)
    topk = obj.topk_kl(_gathered(s_logits, ids), _gathered(q_logits, ids), valid)
    full = obj.reverse_kl(s_logits, q_logits)
    torch.testing.assert_close(topk, full, rtol=1e-5, atol=1e-6)


def test_pg_form_gradient_equals_exact_reverse_kl_gradient_when_k_is_vocab():
    # With S = V and w = p: Σ p (log p - log q) ∇log p = ∇KL(p‖q), because Σ p ∇log p = ∇Σ p = 0.
    V = 10
    base, q_logits = _random_logits((2, 3, V), 6), _random_logits((2, 3, V), 7)
    ids = base.topk(V, -1).indices
    a = base.clone().requires_grad_()
    loss_pg, _ = obj.topk_pg(_gathered(a, ids), _gathered(q_logits, ids), torch.ones_like(ids, dtype=torch.bool),
                             "student_p")
    loss_pg.sum().backward()
    b = base.clone().requires_grad_()
    obj.reverse_kl(b, q_logits).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_aggregate_by_hand_and_microbatch_sum():
    loss = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert obj.aggregate(loss, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert obj.aggregate(loss, mask, "seq_mean").item() == pytest.approx((2.0 + 4.0) / 2)
    for mode in ("token_mean", "seq_mean"):
        parts = sum(obj.aggregate(loss[i:i + 1], mask[i:i + 1], mode, num_tokens=4, num_sequences=2)
                    for i in range(2))
        assert parts.item() == pytest.approx(obj.aggregate(loss, mask, mode).item())
    assert obj.aggregate(loss, torch.zeros_like(mask), "token_mean").item() == 0.0


def test_group_advantages():
    assert obj.group_advantages(t([1.0, 1.0, 0.0, 0.0]), 2).tolist() == [0.0, 0.0, 0.0, 0.0]
    adv = obj.group_advantages(t([1.0, 0.0]), 2)
    # mean .5, unbiased std sqrt(.5): ±.5/.7071
    assert adv.tolist() == pytest.approx([0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5)], rel=1e-4)
