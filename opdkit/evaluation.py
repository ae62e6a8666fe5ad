"""Held-out evaluation during distillation: exact reverse KL to the teacher on greedy student responses.

For each held-out prompt the student answers greedily; both models then score that response and the exact
full-vocabulary KL(p_t‖q_t) is averaged over its tokens, computed chunk by chunk from hidden states (no
(B, T, V) tensor). Where the prompts have answers, accuracy counts only an explicit final answer.
"""

from __future__ import annotations

import torch

from . import objectives as obj
from .answers import score_response
from .student import student_forward


def decode_responses(tokenizer, response_ids: torch.Tensor, mask: torch.Tensor,
                     skip_special_tokens: bool = True) -> list[str]:
    return [tokenizer.decode(row[m].tolist(), skip_special_tokens=skip_special_tokens)
            for row, m in zip(response_ids, mask)]


@torch.no_grad()
def evaluate(*, student, engine, teacher, tokenizer, examples, teacher_prompts, max_new_tokens: int,
             batch_size: int, pad_id: int, vocab_size: int, chunk_size: int = 512) -> tuple[dict, list[dict]]:
    """Return (metrics, samples). ``teacher_prompts`` are the teacher's prompt ids for the same examples;
    with ``teacher=None`` only accuracy and length are measured."""
    kl_sum, tokens, correct, graded, lengths, samples = 0.0, 0, 0.0, 0, [], []
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
                                         head_dtype=torch.float32, full_fn=obj.reverse_kl,
                                         teacher_hidden=scores.hidden, teacher_head=teacher.head_logits).full_loss
                kl_sum += float(row_kl[ro.response_mask].sum())
            tokens += int(ro.response_mask.sum())
            texts = decode_responses(tokenizer, ro.response_ids, ro.response_mask)
            for ex, text, n_tok, trunc, kl, m in zip(batch, texts, ro.response_mask.sum(-1).tolist(),
                                                     ro.truncated.tolist(), row_kl, ro.response_mask):
                score = score_response(text, ex.answer)
                if score is not None:
                    correct, graded = correct + score, graded + 1
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
    return metrics, samples
