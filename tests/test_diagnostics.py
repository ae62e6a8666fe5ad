"""Diagnostics on hand-built distributions; expected values derived in the comments."""

import math

import pytest
import torch

from opdkit import diagnostics as D

L = math.log


def lp(values):
    return torch.tensor(values, dtype=torch.float32).log()


def test_overlap_ratio_by_hand():
    # S^p = {1,2,3,4}, S^q = {3,4,5,6}: |∩| = 2, k = 4 -> 0.5
    inb = D.overlap_membership(torch.tensor([[[1, 2, 3, 4]]]), torch.tensor([[[3, 4, 5, 6]]]))
    assert inb.tolist() == [[[False, False, True, True]]]
    assert D.overlap_ratio(inb, 4).item() == 0.5


def test_overlap_token_advantage_mass_and_maxadv_by_hand():
    # S^p = (a, b, c) with p = (.4, .2, .1); S^q contains a and b but not c; q at (a, b, c) = (.3, .3, .05).
    # I = {a, b}: p̄ = (2/3, 1/3), q̄ = (1/2, 1/2).
    # A(a) = 2/3 log((1/2)/(2/3)) = 2/3 log(3/4); A(b) = 1/3 log((1/2)/(1/3)) = 1/3 log(3/2); Eq.7 = mean of the two.
    s, q = lp([[[0.4, 0.2, 0.1]]]), lp([[[0.3, 0.3, 0.05]]])
    inb = torch.tensor([[[True, True, False]]])
    adv, defined = D.overlap_token_advantage(s, q, inb)
    assert defined.item()
    assert adv.item() == pytest.approx((2 / 3 * L(3 / 4) + 1 / 3 * L(3 / 2)) / 2, rel=1e-5)
    # Overlap masses with unrenormalised probabilities: Σ_I p = .6, Σ_I q = .6
    assert D.overlap_mass(s, inb).item() == pytest.approx(0.6)
    assert D.overlap_mass(q, inb).item() == pytest.approx(0.6)
    # |A(a)| = .1918 > |A(b)| = .1352, so v* = a and p - q = .4 - .3 = .1
    gap, ok = D.maxadv_prob_gap(s, q, inb)
    assert ok.item() and gap.item() == pytest.approx(0.1, abs=1e-6)
    # Reference-code variant: weights renormalised over all of S^p, (.4, .2, .1)/.7, raw log-ratios
    ref = D.overlap_token_advantage_reference(s, q, inb)
    expected = [4 / 7 * L(0.3 / 0.4), 2 / 7 * L(0.3 / 0.2)]
    assert ref[0, 0, :2].tolist() == pytest.approx(expected, rel=1e-5)


def test_eq7_is_minus_kl_over_intersection_size_and_zero_when_aligned():
    s = lp([[[0.5, 0.3, 0.2]]])
    inb = torch.ones(1, 1, 3, dtype=torch.bool)
    adv, _ = D.overlap_token_advantage(s, s, inb)
    assert adv.item() == pytest.approx(0.0, abs=1e-7)
    q = lp([[[0.2, 0.3, 0.5]]])
    kl = 0.5 * L(0.5 / 0.2) + 0.3 * L(1) + 0.2 * L(0.2 / 0.5)
    assert D.overlap_token_advantage(s, q, inb)[0].item() == pytest.approx(-kl / 3, rel=1e-5)


def test_empty_intersection_is_skipped_not_zero():
    # Position 0 shares nothing; position 1 shares one token, whose renormalised p̄ = q̄ = 1 -> advantage 0.
    s, q = lp([[[0.5, 0.5], [0.6, 0.4]]]), lp([[[0.5, 0.5], [0.1, 0.9]]])
    inb = torch.tensor([[[False, False], [True, False]]])
    adv, defined = D.overlap_token_advantage(s, q, inb)
    assert defined.tolist() == [[False, True]]
    per_pos = {"overlap_token_advantage": (adv, defined)}
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert D.reduce_diagnostics(per_pos, mask)["diag/overlap_token_advantage"] == 0.0
    only_empty = torch.tensor([[True, False]])
    assert math.isnan(D.reduce_diagnostics(per_pos, only_empty)["diag/overlap_token_advantage"])  # NaN, not 0
    assert D.overlap_mass(s, inb)[0].tolist() == pytest.approx([0.0, 0.6])


def test_k_larger_than_vocabulary_identical_models_give_full_overlap():
    # Vocabulary of 3 with k = 16: top-k returns the 3 ids; identical models overlap completely (ratio 1).
    logits = torch.tensor([[[1.0, 2.0, 0.5]]])
    ids = logits.topk(min(16, 3), -1).indices
    inb = D.overlap_membership(ids, ids)
    assert D.overlap_ratio(inb, 16).item() == 1.0
    logp = torch.log_softmax(logits, -1).gather(-1, ids)
    assert D.overlap_mass(logp, inb).item() == pytest.approx(1.0)


def test_ties_in_top_k_and_in_the_max_advantage():
    # Uniform distributions tie everywhere; identical ids still give overlap 1 and a well-defined max-adv gap.
    ids = torch.tensor([[[0, 1]]])
    s = lp([[[0.25, 0.25]]])
    inb = D.overlap_membership(ids, ids)
    assert D.overlap_ratio(inb, 2).item() == 1.0
    gap, ok = D.maxadv_prob_gap(s, s, inb)
    assert ok.item() and gap.item() == 0.0


def test_sequence_reward_and_auroc_by_hand():
    # r̄ = mean over valid tokens of log q - log p
    s, q = torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[-0.5, -1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    assert D.sequence_mean_reward(s, q, mask).item() == pytest.approx((0.5 + 1.0) / 2)
    # pairs (pos, neg): (.9,.8) ✓ (.9,.1) ✓ (.3,.8) ✗ (.3,.1) ✓ -> 3/4
    assert D.auroc(torch.tensor([0.9, 0.8, 0.3, 0.1]), torch.tensor([1, 0, 1, 0])) == 0.75
    assert D.auroc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == 0.5  # a tie counts one half
    assert math.isnan(D.auroc(torch.tensor([0.5, 0.2]), torch.tensor([1, 1])))


def test_position_bins_quarters_and_spans():
    bins = D.position_bins(length=10, max_length=16, span=4)
    assert bins["pos_q1"] == (0, 4) and bins["pos_q3"] == (8, 10) and "pos_q4" not in bins  # q4 starts at 12 > 10
    assert bins["pos_0-3"] == (0, 4) and bins["pos_8-11"] == (8, 10)
