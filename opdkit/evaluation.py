"""Held-out evaluation during distillation: exact reverse KL to the teacher on greedy student responses.

For each held-out prompt the student answers greedily; both models then score that response and the exact
full-vocabulary KL(p_t‖q_t) is averaged over its tokens, computed chunk by chunk from hidden states (no
(B, T, V) tensor). Where the prompts have answers, accuracy counts only an explicit final answer.
"""

from __future__ import annotations

import torch

from .answers import has_final_answer, score_response
from .objectives import ReverseKL
from .student import TeacherLogits, student_forward


def decode_responses(tokenizer, response_ids: torch.Tensor, mask: torch.Tensor,
                     skip_special_tokens: bool = True) -> list[str]:
    return [tokenizer.decode(row[m].tolist(), skip_special_tokens=skip_special_tokens)
            for row, m in zip(response_ids, mask)]


@torch.no_grad()
def evaluate(*, student, engine, teacher, tokenizer, examples, teacher_prompts, max_new_tokens: int,
             batch_size: int, pad_id: int, vocab_size: int, chunk_size: int = 512) -> tuple[dict, list[dict]]:
    """Return (metrics, samples). ``teacher_prompts`` are the teacher's prompt ids for the same examples;
    with ``teacher=None`` only accuracy and length are measured."""
    kl_sum, tokens, correct, graded, answered, lengths, samples = 0.0, 0, 0.0, 0, 0, [], []
    was_training = student.training
    student.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            prompts = [ex.prompt_ids for ex in batch]
            ro = engine.generate(prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, topk=0,
                                 seed=0, greedy=True)
            row_kl = torch.zeros(ro.response_ids.shape)
            if teacher is not None:
                scores = teacher.score(teacher_prompts[start:start + batch_size], ro.response_ids,
                                       ro.response_mask, k=0, keep_hidden=True)
                row_kl = student_forward(student, prompts, ro.response_ids, ro.response_mask, pad_id=pad_id,
                                         vocab_size=vocab_size, chunk_size=chunk_size, compute_dtype=None,
                                         head_dtype=torch.float32, objective=ReverseKL(),
                                         teacher=TeacherLogits(scores.hidden, teacher.head_logits)).full_loss
                kl_sum += float(row_kl[ro.response_mask].sum())
            tokens += int(ro.response_mask.sum())
            texts = decode_responses(tokenizer, ro.response_ids, ro.response_mask)
            for ex, text, n_tok, trunc, kl, m in zip(batch, texts, ro.response_mask.sum(-1).tolist(),
                                                     ro.truncated.tolist(), row_kl, ro.response_mask):
                score = score_response(text, ex.answer)
                if score is not None:
                    correct, graded = correct + score, graded + 1
                    answered += has_final_answer(text)
                lengths.append(n_tok)
                sample = {"prompt": ex.messages[-1]["content"], "response": text, "answer": ex.answer,
                          "correct": score, "truncated": trunc}
                if teacher is not None:
                    sample["reverse_kl"] = float(kl[m].mean()) if n_tok else 0.0
                samples.append(sample)
    finally:
        student.train(was_training)
    metrics = {"eval/len_mean": sum(lengths) / max(len(lengths), 1), "eval/prompts": len(examples)}
    if teacher is not None:
        metrics["eval/reverse_kl"] = kl_sum / max(tokens, 1)
    if graded:
        metrics["eval/accuracy"] = correct / graded
        metrics["eval/answered"] = answered / graded
    return metrics, samples


@torch.no_grad()
def reference_responses(model, prompts: list[list[int]], answers: list[str | None], tokenizer, *, eos_ids: list[int],
                        pad_id: int, max_new_tokens: int, batch_size: int, vocab_size: int | None = None) -> dict:
    """Greedy responses of ``model`` (typically the teacher) to fixed prompts, graded like ``evaluate``.

    Returns a dict with ``response_ids`` (B, T), ``response_mask`` (B, T), ``texts``, and ``accuracy``,
    ``answered`` (fraction with an explicit final answer) and ``len_mean`` over the B prompts.
    """
    from .engines.hf_rollout import sample

    was_training = model.training
    model.eval()
    ids, masks = [], []
    try:
        for start in range(0, len(prompts), batch_size):
            resp, mask, _, _, _ = sample(model, prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                                         eos_ids=eos_ids, pad_id=pad_id, greedy=True, vocab_size=vocab_size)
            ids.append(resp)
            masks.append(mask)
    finally:
        model.train(was_training)
    width = max(r.shape[1] for r in ids)
    response_ids = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=pad_id) for r in ids])
    response_mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1]), value=False) for m in masks])
    texts = decode_responses(tokenizer, response_ids, response_mask)
    scores = [score_response(t, a) for t, a in zip(texts, answers)]
    graded = [s for s in scores if s is not None]
    out = {"response_ids": response_ids, "response_mask": response_mask, "texts": texts,
           "len_mean": float(response_mask.sum(-1).float().mean())}
    if graded:
        out["accuracy"] = sum(graded) / len(graded)
        out["answered"] = sum(has_final_answer(t) for t, s in zip(texts, scores) if s is not None) / len(graded)
    return out


@torch.no_grad()
def reference_reverse_kl(*, student, teacher, prompts: list[list[int]], teacher_prompts: list[list[int]],
                         response_ids: torch.Tensor, response_mask: torch.Tensor, batch_size: int, pad_id: int,
                         vocab_size: int, chunk_size: int = 512) -> float:
    """Exact full-vocabulary reverse KL(q_student || p_teacher) per token on *fixed* responses (B, T).

    Unlike ``evaluate``, which scores the student's own greedy responses, the tokens scored here do not move
    with the student, so a student that stops at once (one-token responses) cannot make the figure small.
    """
    was_training = student.training
    student.eval()
    kl_sum, tokens = 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            sl = slice(start, start + batch_size)
            ids, mask = response_ids[sl], response_mask[sl]
            scores = teacher.score(teacher_prompts[sl], ids, mask, k=0, keep_hidden=True)
            row_kl = student_forward(student, prompts[sl], ids, mask, pad_id=pad_id, vocab_size=vocab_size,
                                     chunk_size=chunk_size, compute_dtype=None, head_dtype=torch.float32,
                                     objective=ReverseKL(),
                                     teacher=TeacherLogits(scores.hidden, teacher.head_logits)).full_loss
            kl_sum += float(row_kl[mask].sum())
            tokens += int(mask.sum())
    finally:
        student.train(was_training)
    return kl_sum / max(tokens, 1)
