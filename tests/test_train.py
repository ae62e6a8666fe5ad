"""The OPD loop on a tiny pair: learning, micro-batch equivalence, exact resume, NaN and Ctrl-C handling."""

import json

import pytest
import torch

from opdkit.checkpoint import latest_checkpoint
from opdkit.objectives import ReverseKL
from opdkit.student import TeacherLogits, student_forward
from opdkit.tiny import save_tiny, tiny_llama
from opdkit.train import Distiller, TrainingDiverged
from tests.conftest import addition_rows, tiny_distiller, write_jsonl


@pytest.fixture(scope="module")
def sharp_dirs(tmp_path_factory, tokenizer):
    """Tiny student and a *peaked* tiny teacher (scaled head), so the initial reverse KL is large."""
    root = tmp_path_factory.mktemp("sharp")
    save_tiny(tiny_llama(len(tokenizer), seed=0), tokenizer, root / "student")
    teacher = tiny_llama(len(tokenizer), seed=1, tie=False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)
    save_tiny(teacher, tokenizer, root / "teacher")
    return {"student": root / "student", "teacher": root / "teacher"}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("p") / "prompts.jsonl", addition_rows(40))


def make(dirs, prompts, out, **extra) -> Distiller:
    return tiny_distiller(dirs, prompts, out, **{"optim.micro_batch_size": 8, **extra})


def exact_reverse_kl(d: Distiller, rollout) -> float:
    with torch.no_grad():
        scores = d.teacher.score(rollout.prompt_ids, rollout.response_ids, rollout.response_mask, k=0,
                                 keep_hidden=True)
        out = student_forward(d.student, rollout.prompt_ids, rollout.response_ids, rollout.response_mask,
                              pad_id=d.pad_id, vocab_size=d.vocab_size, objective=ReverseKL(),
                              teacher=TeacherLogits(scores.hidden, d.teacher.head_logits))
    return float(out.full_loss[rollout.response_mask].mean())


# Top-k objectives only see the student's top-k; with a vocabulary of ~100 the set must be large enough to hold
# most of a random student's mass (the paper's 97-99% overlap mass), hence k = 64 here.
@pytest.mark.parametrize("extra", [{"objective.k": 64}, {"objective.k": 64, "objective.form": "pg"},
                                   {"objective.name": "sampled"}, {"objective.name": "reverse_kl"}],
                         ids=["topk-kl", "topk-pg", "sampled", "reverse_kl"])
def test_few_steps_lower_reverse_kl_on_a_fixed_batch_and_change_every_parameter(sharp_dirs, prompts, tmp_path,
                                                                                  extra):
    d = make(sharp_dirs, prompts, tmp_path / "run", **extra)
    fixed = d.engine.generate([ex.prompt_ids for ex in d.train_set[:6]], n=1, temperature=1.0, top_p=1.0,
                              max_new_tokens=8, topk=0, seed=123)
    before_kl = exact_reverse_kl(d, fixed)
    before = {n: p.detach().clone() for n, p in d.student.named_parameters()}
    for step in range(1, 9):
        metrics, _ = d.opd_step(step)
        assert metrics["optim/skipped"] == 0.0
    after_kl = exact_reverse_kl(d, fixed)
    assert after_kl < 0.85 * before_kl, (before_kl, after_kl)
    unchanged = [n for n, p in d.student.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("objective", ["topk", "reverse_kl"])
def test_microbatched_accumulation_equals_full_batch(sharp_dirs, prompts, tmp_path, aggregation, objective):
    d = make(sharp_dirs, prompts, tmp_path / "mb", **{"objective.aggregation": aggregation,
                                                     "objective.name": objective, "objective.outcome_weight": 0.5})
    rollout = d.rollout(d.sampler.next_batch(), seed=5)
    scores = d.score(rollout)
    rewards = torch.arange(len(rollout)).remainder(2).float()  # exercises the outcome term too
    results = []
    for mb in (len(rollout), 3):
        d.cfg.optim.micro_batch_size = mb
        d.optimizer.zero_grad(set_to_none=True)
        loss, _ = d.update(rollout, scores, rewards)
        results.append((loss, torch.cat([p.grad.flatten() for p in d.student.parameters()])))
    (loss_full, g_full), (loss_micro, g_micro) = results
    assert loss_micro == pytest.approx(loss_full, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(g_micro, g_full, rtol=1e-4, atol=1e-7)
    assert g_full.abs().max() > 1e-4


def test_interrupted_and_resumed_run_matches_uninterrupted(sharp_dirs, prompts, tmp_path):
    full = make(sharp_dirs, prompts, tmp_path / "full", **{"run.steps": 4})
    full.run()
    part = make(sharp_dirs, prompts, tmp_path / "part", **{"run.steps": 2})
    part.run()
    resumed = make(sharp_dirs, prompts, tmp_path / "part", **{"run.steps": 4, "run.resume": True})
    resumed.run()
    torch.testing.assert_close(_params(resumed.student), _params(full.student), rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert latest_checkpoint(tmp_path / "part").name == "step_000004"


def test_existing_run_is_never_overwritten(sharp_dirs, prompts, tmp_path):
    make(sharp_dirs, prompts, tmp_path / "r", **{"run.steps": 1}).run()
    from opdkit.config import ConfigError

    with pytest.raises(ConfigError, match="already holds a run"):
        make(sharp_dirs, prompts, tmp_path / "r", **{"run.steps": 2})


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(sharp_dirs, prompts, tmp_path, monkeypatch):
    full = make(sharp_dirs, prompts, tmp_path / "full", **{"run.steps": 3})
    full.run()
    d = make(sharp_dirs, prompts, tmp_path / "int", **{"run.steps": 3})
    original = Distiller.update

    def interrupt_in_step_3(self, rollout, scores, rewards):
        if self.completed == 2:  # Ctrl-C arrives during the third step's backward pass
            raise KeyboardInterrupt
        return original(self, rollout, scores, rewards)

    monkeypatch.setattr(Distiller, "update", interrupt_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        d.run()
    monkeypatch.setattr(Distiller, "update", original)
    assert latest_checkpoint(tmp_path / "int").name == "step_000002"
    resumed = make(sharp_dirs, prompts, tmp_path / "int", **{"run.steps": 3, "run.resume": True})
    resumed.run()
    torch.testing.assert_close(_params(resumed.student), _params(full.student), rtol=0, atol=0)


def test_nan_steps_are_skipped_then_the_run_stops_with_last_checkpoint_intact(sharp_dirs, prompts, tmp_path,
                                                                            monkeypatch):
    d = make(sharp_dirs, prompts, tmp_path / "nan", **{"run.steps": 8, "run.save_every": 2,
                                                       "optim.max_bad_steps": 2})
    original = Distiller.update

    def poisoned(self, rollout, scores, rewards):
        loss, batch = original(self, rollout, scores, rewards)
        if self.completed >= 2:
            for p in self.student.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            return float("nan"), batch
        return loss, batch

    monkeypatch.setattr(Distiller, "update", poisoned)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive non-finite steps .* Last good checkpoint: .*step_000002"):
        d.run()
    ckpt = latest_checkpoint(tmp_path / "nan")
    assert ckpt.name == "step_000002"
    weights = torch.cat([p.flatten() for p in d.student.parameters()])
    assert torch.isfinite(weights).all()  # skipped steps never touched the weights
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["optim/skipped"] for r in rows] == [0.0, 0.0, 1.0, 1.0, 1.0]
