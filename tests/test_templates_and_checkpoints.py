"""Teacher-side chat templates, template kwargs, LR schedules and atomic checkpoints."""

import pytest
import torch

from opdkit.checkpoint import latest_checkpoint, save_checkpoint
from opdkit.config import DistillConfig, load_config
from opdkit.data import render_prompt
from opdkit.tiny import CHATML, char_tokenizer, save_tiny, tiny_llama
from opdkit.train import Distiller, lr_lambda
from tests.conftest import tiny_overrides

THINK_TEMPLATE = CHATML.replace(
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n' }}{% endif %}")
TEACHER_TEMPLATE = "{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
                   "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}"


def test_chat_template_kwargs_pass_through():
    tok = char_tokenizer(chat_template=THINK_TEMPLATE)
    msgs = [{"role": "user", "content": "hi"}]
    plain = tok.decode(render_prompt(tok, msgs))
    nothink = tok.decode(render_prompt(tok, msgs, {"enable_thinking": False}))
    assert "<think>" not in plain and nothink.endswith("<think>\n\n</think>\n")


@pytest.fixture()
def template_dirs(tmp_path, tokenizer):
    teacher_tok = char_tokenizer(chat_template=TEACHER_TEMPLATE)
    save_tiny(tiny_llama(len(tokenizer), seed=0), tokenizer, tmp_path / "student")
    save_tiny(tiny_llama(len(teacher_tok), seed=1), teacher_tok, tmp_path / "teacher")
    return {"student": tmp_path / "student", "teacher": tmp_path / "teacher"}


def test_teacher_scores_with_its_own_template_on_the_same_response_tokens(template_dirs, prompts_file, tmp_path):
    cfgs = {mode: load_config(DistillConfig, None, tiny_overrides(template_dirs, prompts_file, tmp_path / mode,
                                                                  **{"teacher.chat_template": mode}))
            for mode in ("student", "own")}
    d_student, d_own = Distiller(cfgs["student"]), Distiller(cfgs["own"])
    ex = d_own.train_set[0]
    own_text = d_own.teacher_tokenizer.decode(ex.teacher_ids)
    assert own_text.startswith("### user: ") and own_text.endswith("### assistant: ")
    assert d_student.tokenizer.decode(d_student.train_set[0].teacher_ids).startswith("<|im_start|>")
    # Same rollout, scored under both renderings: response positions align, values differ only through context.
    rollout = d_own.rollout([0, 1], seed=3)
    own, stud = d_own.score(rollout), d_student.score(rollout)
    assert own.sampled_logp.shape == stud.sampled_logp.shape == rollout.response_ids.shape
    assert not torch.allclose(own.sampled_logp[rollout.response_mask], stud.sampled_logp[rollout.response_mask])
    # Scoring directly with the teacher on its own prompt + the response equals the engine's result.
    prompt = d_own.train_set[0].teacher_ids
    resp = rollout.response_ids[0][rollout.response_mask[0]]
    with torch.no_grad():
        logits = d_own.teacher_model(input_ids=torch.tensor([prompt + resp.tolist()])).logits[0].float()
    direct = torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(resp)], -1)
    expected = direct.gather(-1, resp[:, None]).squeeze(-1)
    torch.testing.assert_close(own.sampled_logp[0][rollout.response_mask[0]], expected, rtol=1e-3, atol=1e-3)


def test_lr_schedules_by_hand():
    warm = lr_lambda("constant", 4, 20)
    assert [warm(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = lr_lambda("cosine", 0, 10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    lin = lr_lambda("linear", 2, 12)
    assert lin(2) == 1.0 and lin(7) == pytest.approx(0.5)


def test_checkpoint_write_is_atomic(tmp_path, tokenizer, monkeypatch):
    model = tiny_llama(len(tokenizer), seed=0)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    first = save_checkpoint(tmp_path, 1, model=model, tokenizer=tokenizer, optimizer=opt, scheduler=sched,
                            sampler_state={"epoch": 0, "position": 4})
    assert latest_checkpoint(tmp_path) == first

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model=model, tokenizer=tokenizer, optimizer=opt, scheduler=sched,
                        sampler_state={"epoch": 0, "position": 8})
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
