"""Teacher scoring and the student's training forward against direct full-logit computations."""

import pytest
import torch

from opdkit import losses as obj
from opdkit.candidates import Candidates
from opdkit.engines.hf_rollout import sample
from opdkit.engines.hf_teacher import HFTeacher
from opdkit.lm import HeadProjection, left_pad
from opdkit.objectives import ReverseKL
from opdkit.student import TeacherLogits, student_forward
from opdkit.tiny import tiny_llama


@pytest.fixture(scope="module")
def pair(tokenizer):
    V = len(tokenizer)
    return tiny_llama(V, seed=0).eval(), tiny_llama(V, seed=1).eval(), V


@pytest.fixture(scope="module")
def batch(pair):
    student, _, V = pair
    prompts = [[1, 10, 11, 12, 13], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35]]
    resp, mask, _, topk, _ = sample(student, prompts, max_new_tokens=9, eos_ids=[2], pad_id=2, topk=5,
                                    seeds=[0, 1, 2])
    mask[1, 4:] = False  # a response that ended early
    return prompts, resp, mask, topk


def direct_logits(model, prompts, resp, temperature=1.0):
    """Full (B, T, V) logits at the positions predicting each response token, computed the obvious way."""
    ids, attn = left_pad(prompts, 2)
    full = torch.cat([ids, resp], 1)
    attn = torch.cat([attn, torch.ones_like(resp)], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=full, attention_mask=attn, position_ids=pos).logits.float()
    P = ids.shape[1]
    return logits[:, P - 1:P - 1 + resp.shape[1]] / temperature


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_teacher_scores_match_direct_computation_and_chunking(pair, batch, temperature):
    _, teacher, V = pair
    prompts, resp, mask, s_top = batch
    with torch.no_grad():
        logp = torch.log_softmax(direct_logits(teacher, prompts, resp, temperature), -1)
    results = []
    for chunk in (2, 10_000):
        scorer = HFTeacher(teacher, vocab_size=V, pad_id=2, temperature=temperature, chunk_size=chunk)
        results.append(scorer.score(prompts, resp, mask, k=4, student_topk_ids=s_top, keep_hidden=True))
    chunked, whole = results
    for field in ("sampled_logp", "topk_logp", "logp_at_student_topk", "entropy"):
        torch.testing.assert_close(getattr(chunked, field), getattr(whole, field))
    m = mask
    torch.testing.assert_close(whole.sampled_logp[m], logp.gather(-1, resp[..., None]).squeeze(-1)[m],
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole.topk_logp[m], logp.topk(4, -1).values[m], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole.logp_at_student_topk[m], logp.gather(-1, s_top)[m], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole.entropy[m], -(logp.exp() * logp).sum(-1)[m], rtol=1e-4, atol=1e-4)
    assert (whole.sampled_logp[~m] == 0).all()
    assert whole.hidden.shape == (*resp.shape, teacher.config.hidden_size)


def test_student_forward_matches_direct_and_chunked_gradients_agree(pair, batch):
    student, teacher, V = pair
    prompts, resp, mask, s_top = batch
    scorer = HFTeacher(teacher, vocab_size=V, pad_id=2, chunk_size=4)
    t_scores = scorer.score(prompts, resp, mask, k=5, student_topk_ids=s_top, keep_hidden=True)
    candidates = Candidates(s_top, t_scores.topk_ids)
    ids = candidates.ids
    with torch.no_grad():
        logp = torch.log_softmax(direct_logits(student, prompts, resp), -1)
    grads, outs = [], []
    for chunk in (3, 10_000):
        student.zero_grad()
        out = student_forward(student, prompts, resp, mask, pad_id=2, vocab_size=V, candidates=candidates,
                              chunk_size=chunk, objective=ReverseKL(),
                              teacher=TeacherLogits(t_scores.hidden, scorer.head_logits))
        (out.logp_at.sum() + out.full_loss.sum() + out.logp_sampled.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
        outs.append(out)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    out = outs[1]
    m = mask
    torch.testing.assert_close(out.logp_at[m].detach(), logp.gather(-1, ids)[m], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logp_sampled[m].detach(), logp.gather(-1, resp[..., None]).squeeze(-1)[m],
                               rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        t_logits = direct_logits(teacher, prompts, resp)
        expected_kl = obj.reverse_kl(direct_logits(student, prompts, resp), t_logits)
    torch.testing.assert_close(out.full_loss[m].detach(), expected_kl[m], rtol=1e-4, atol=1e-4)
    assert (out.full_loss[~m] == 0).all()


def test_one_head_projection_serves_student_and_teacher(pair):
    student, _, V = pair
    hidden = torch.randn(5, student.config.hidden_size, generator=torch.Generator().manual_seed(3))
    frozen = HeadProjection(student, V - 3, temperature=0.7)
    live = HeadProjection(student, V - 3, temperature=0.7, trainable=True)
    expected = student.lm_head(hidden)[:, :V - 3].float() / 0.7
    torch.testing.assert_close(frozen(hidden), expected.detach())
    student.zero_grad(set_to_none=True)
    out = live(hidden)
    torch.testing.assert_close(out.detach(), expected.detach())
    out.sum().backward()  # the student's reaches the live weight; the teacher's holds a detached copy
    assert student.lm_head.weight.grad is not None and not frozen.weight.requires_grad
    student.zero_grad(set_to_none=True)


def test_student_forward_all_masked_batch_has_zero_connected_loss(pair, batch):
    student, _, V = pair
    prompts, resp, mask, _ = batch
    out = student_forward(student, prompts, resp, torch.zeros_like(mask), pad_id=2, vocab_size=V)
    loss = out.logp_sampled.sum()
    loss.backward()  # must not raise: the graph stays connected
    assert loss.item() == 0.0


def test_shared_vocab_slice_renormalises_over_shared_ids(pair, batch):
    # Differently padded embeddings: only the first V' ids are compared, and log-probs normalise over them.
    _, teacher, V = pair
    prompts, resp, mask, _ = batch
    small = V - 3
    scores = HFTeacher(teacher, vocab_size=small, pad_id=2).score(prompts, resp.clamp(max=small - 1), mask, k=3)
    with torch.no_grad():
        logits = direct_logits(teacher, prompts, resp.clamp(max=small - 1))[..., :small]
    expected = torch.log_softmax(logits, -1).topk(3, -1).values
    torch.testing.assert_close(scores.topk_logp[mask], expected[mask], rtol=1e-4, atol=1e-4)
