"""Padding-free packed passes: the same teacher scores, student losses and gradients as the padded batch."""

import torch

from opdkit.candidates import Candidates
from opdkit.objectives import ReverseKL
from opdkit.packing import enable_varlen_attention, pack_rows
from opdkit.engines.hf_teacher import HFTeacher
from opdkit.student import TeacherLogits, student_forward
from opdkit.tiny import tiny_llama

PROMPTS = [[1, 40, 41, 42, 43], [1, 50], [1, 60, 61]]
RESPONSES = torch.tensor([[7, 8, 9, 2, 2, 2], [10, 11, 12, 13, 14, 15], [16, 2, 2, 2, 2, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)


def test_pack_rows_hand_case():
    ids, pos, cu, out = pack_rows([[1, 2], [3]], torch.tensor([[4, 5, 0], [6, 7, 8]]),
                                  torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    # row 0: prompt 1 2 + response 4 (its last valid token 5 is never an input); row 1: 3 + 6 7
    assert ids.tolist() == [[1, 2, 4, 3, 6, 7]] and pos.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert cu.tolist() == [0, 3, 6]
    assert out.tolist() == [1, 2, 3, 4, 5]  # the positions predicting 4, 5 and 6, 7, 8


def _scores(model, packed, at_ids):
    teacher = HFTeacher(model, vocab_size=model.config.vocab_size, pad_id=2, packed=packed)
    assert teacher.packed == packed
    return teacher.score(PROMPTS, RESPONSES, MASK, k=4, student_topk_ids=at_ids, keep_hidden=True)


def test_packed_teacher_scores_equal_padded(tokenizer):
    model = tiny_llama(len(tokenizer), seed=21).eval()
    at_ids = torch.randint(0, len(tokenizer), (3, 6, 3), generator=torch.Generator().manual_seed(0))
    padded = _scores(model, False, at_ids)
    packed = _scores(model, True, at_ids)
    assert model.config._attn_implementation == "opdkit_varlen_sdpa"
    for name in ("sampled_logp", "topk_logp", "logp_at_student_topk", "entropy"):
        torch.testing.assert_close(getattr(packed, name)[MASK], getattr(padded, name)[MASK], rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.topk_ids[MASK], padded.topk_ids[MASK])
    torch.testing.assert_close(packed.hidden[MASK], padded.hidden[MASK], rtol=1e-5, atol=1e-5)


def _loss_and_grads(student, teacher, packed):
    student.zero_grad(set_to_none=True)
    t_scores = HFTeacher(teacher, vocab_size=teacher.config.vocab_size, pad_id=2).score(
        PROMPTS, RESPONSES, MASK, k=0, keep_hidden=True)
    at_ids = torch.randint(0, student.config.vocab_size, (3, 6, 4), generator=torch.Generator().manual_seed(1))
    out = student_forward(student, PROMPTS, RESPONSES, MASK, pad_id=2, vocab_size=student.config.vocab_size,
                          candidates=Candidates(at_ids), chunk_size=5, compute_dtype=None, objective=ReverseKL(),
                          teacher=TeacherLogits(t_scores.hidden, lambda h: teacher.lm_head(h).float()),
                          packed=packed)
    w = torch.linspace(0.5, 1.5, 18).view(3, 6)  # distinct weights: every position's gradient matters
    loss = (out.full_loss * w).sum() - (out.logp_sampled * w).sum() + out.logp_at.exp().sum()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in student.named_parameters()}, out


def test_packed_student_losses_and_gradients_equal_padded(tokenizer):
    student, teacher = tiny_llama(len(tokenizer), seed=22), tiny_llama(len(tokenizer), seed=23).eval()
    loss_pad, grads_pad, out_pad = _loss_and_grads(student, teacher, False)
    assert enable_varlen_attention(student)
    loss_pack, grads_pack, out_pack = _loss_and_grads(student, teacher, True)
    assert abs(loss_pack - loss_pad) < 1e-4 * abs(loss_pad)
    torch.testing.assert_close(out_pack.entropy, out_pad.entropy, rtol=1e-5, atol=1e-5)
    for name, g in grads_pad.items():
        torch.testing.assert_close(grads_pack[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # padded calls of a model with varlen attention keep their results (sampling, evaluation)
    loss_again, grads_again, _ = _loss_and_grads(student, teacher, False)
    assert loss_again == loss_pad and all(torch.equal(grads_again[n], g) for n, g in grads_pad.items())
