"""Nothing lost, nothing lied about: interrupts at every point of a step, SIGTERM, fatal errors, NaN weights,
resume config checks, damaged checkpoints and torn logs (issue 16). Tiny fp32 models; each run is a few steps."""

import json
import os
import signal

import pytest
import torch

from opdkit import loop as loop_mod
from opdkit import train as train_mod
from opdkit.checkpoint import latest_checkpoint, save_checkpoint
from opdkit.config import ConfigError, load_config
from opdkit.engines.server import ServerError
from opdkit.tiny import save_tiny, tiny_llama
from opdkit.train import Distiller, TrainingDiverged
from tests.conftest import addition_rows, tiny_distiller, tiny_overrides, write_jsonl

STEPS = 4


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("p") / "prompts.jsonl", addition_rows(30))


def make(dirs, prompts, out, **extra) -> Distiller:
    return tiny_distiller(dirs, prompts, out, **{"run.steps": STEPS, **extra})


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def logged_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_dirs, prompts, tmp_path_factory):
    """The weights of an uninterrupted run of STEPS steps."""
    d = make(tiny_dirs, prompts, tmp_path_factory.mktemp("ref") / "run")
    d.run()
    return params(d.student)


def resume_and_compare(tiny_dirs, prompts, run, reference, **extra) -> Distiller:
    resumed = make(tiny_dirs, prompts, run, **{"run.resume": True, **extra})
    resumed.run()
    torch.testing.assert_close(params(resumed.student), reference, rtol=0, atol=0)
    assert logged_steps(run) == list(range(1, STEPS + 1))  # every step logged once: none lost, none twice
    return resumed


# -- 1. an interrupt at every point of a step, then resume == uninterrupted ---------------------------------

def _raise_at_step_3(original, exc=KeyboardInterrupt, completed=2):
    """``original`` raising ``exc`` once during step 3 (``completed`` is 2 before its update, 3 after)."""
    def wrapped(self, *a, **kw):
        if self.completed == completed and not getattr(wrapped, "fired", False):
            wrapped.fired = True
            raise exc
        return original(self, *a, **kw)
    return wrapped


# (where the interrupt lands, the checkpoint it must leave): before the update the step is dropped, after it the
# step is complete and saved.
POINTS = {
    "before_rollout": ("rollout", 2, "step_000002"),
    "in_backward": ("update", 2, "step_000002"),
    "after_optimizer_step": ("_finish_step", 3, "step_000003"),  # weight sync, gather, diagnostics, metrics
    "in_the_metrics": ("core_metrics", 3, "step_000003"),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_interrupt_in_a_distiller_phase_then_resume_equals_uninterrupted(tiny_dirs, prompts, tmp_path, reference,
                                                                          monkeypatch, point):
    method, completed, expected = POINTS[point]
    monkeypatch.setattr(Distiller, method, _raise_at_step_3(getattr(Distiller, method), completed=completed))
    with pytest.raises(KeyboardInterrupt):
        make(tiny_dirs, prompts, tmp_path / "run").run()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run").name == expected
    resume_and_compare(tiny_dirs, prompts, tmp_path / "run", reference)


def test_interrupt_inside_diagnostics_keeps_the_applied_step(tiny_dirs, prompts, tmp_path, reference, monkeypatch,
                                                            capsys):
    # The issue's reproduction: before the fix this saved step 3's weights under the name step_000002.
    original, calls = train_mod.step_diagnostics, []

    def diagnostics(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(train_mod, "step_diagnostics", diagnostics)
    with pytest.raises(KeyboardInterrupt):
        make(tiny_dirs, prompts, tmp_path / "run").run()
    monkeypatch.undo()
    assert "interrupted: checkpoint of step 3 saved" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run").name == "step_000003"
    row3 = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row3["step"] == 3 and row3["run/interrupted"] == 1.0 and row3["optim/skipped"] == 0.0
    resume_and_compare(tiny_dirs, prompts, tmp_path / "run", reference)


def test_interrupt_during_a_periodic_save_then_resume_equals_uninterrupted(tiny_dirs, prompts, tmp_path, reference,
                                                                          monkeypatch):
    calls = []

    def save(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # the periodic save of step 3
            raise KeyboardInterrupt
        return save_checkpoint(*a, **kw)

    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    with pytest.raises(KeyboardInterrupt):
        make(tiny_dirs, prompts, tmp_path / "run", **{"run.save_every": 1}).run()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run").name == "step_000003"  # written again on the way out
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    resume_and_compare(tiny_dirs, prompts, tmp_path / "run", reference, **{"run.save_every": 1})


def test_a_second_ctrl_c_during_the_interrupt_save_says_no_checkpoint_was_written(tiny_dirs, prompts, tmp_path,
                                                                                  monkeypatch, capsys):
    monkeypatch.setattr(Distiller, "update", _raise_at_step_3(Distiller.update))

    def save(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    with pytest.raises(KeyboardInterrupt):
        make(tiny_dirs, prompts, tmp_path / "run").run()
    err = capsys.readouterr().err
    assert "interrupted again while saving: NO checkpoint was written for step 2" in err
    assert "the newest one on disk is none" in err


# -- 4. SIGTERM ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["in_backward", "during_the_update"])
def test_sigterm_writes_a_checkpoint_and_exits_143(tiny_dirs, prompts, tmp_path, reference, monkeypatch, capsys,
                                                   where):
    from opdkit.cli import main

    if where == "in_backward":
        original = Distiller.update

        def update(self, *a, **kw):
            if self.completed == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # delivered here: the step is dropped
            return original(self, *a, **kw)

        monkeypatch.setattr(Distiller, "update", update)
        expected = "step_000002"
    else:
        original_update, sent = loop_mod.apply_update, []

        def apply_update(*a, **kw):
            if len(sent) == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # held until the step is recorded: the step is kept
            sent.append(1)
            return original_update(*a, **kw)

        monkeypatch.setattr(loop_mod, "apply_update", apply_update)
        expected = "step_000003"
    before = signal.getsignal(signal.SIGTERM)
    code = main(["distill"] + tiny_overrides(tiny_dirs, prompts, tmp_path / "run", **{
        "eval.prompts": 0, "optim.lr": 1e-2, "student.compute_dtype": "float32", "student.sampling_dtype": "float32",
        "rollout.n": 2, "run.steps": STEPS}))
    monkeypatch.undo()
    assert code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM: checkpoint of step {expected[-1]} saved" in err and "stopped by SIGTERM" in err
    assert signal.getsignal(signal.SIGTERM) is before  # the loop restores the handler it replaced
    assert latest_checkpoint(tmp_path / "run").name == expected
    resume_and_compare(tiny_dirs, prompts, tmp_path / "run", reference)


# -- 5. a fatal error saves the last completed step ------------------------------------------------------

def test_a_fatal_teacher_error_saves_the_last_completed_step(tiny_dirs, prompts, tmp_path, reference, monkeypatch,
                                                              capsys):
    monkeypatch.setattr(Distiller, "score", _raise_at_step_3(
        Distiller.score, ServerError("teacher server http://x/v1/completions failed 6 times")))
    with pytest.raises(ServerError):
        make(tiny_dirs, prompts, tmp_path / "run").run()
    monkeypatch.undo()
    assert "stopped by an error at step 3 (ServerError): checkpoint of step 2 saved" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"
    resume_and_compare(tiny_dirs, prompts, tmp_path / "run", reference)


# -- 2. NaN: never saved as good, skipped steps logged as NaN ---------------------------------------------

def test_an_update_that_makes_the_weights_non_finite_stops_and_saves_nothing(tiny_dirs, prompts, tmp_path):
    d = make(tiny_dirs, prompts, tmp_path / "run", **{"optim.lr": 1e38, "run.save_every": 1})
    with pytest.raises(TrainingDiverged, match=r"step 1: the update made the weights non-finite .* they are not "
                                               r"saved. Last good checkpoint: none"):
        d.run()
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert not (tmp_path / "run" / "final_model").exists()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["step"] == 1 and row["optim/nonfinite_weights"] == 1.0


def test_checkpoints_on_disk_are_finite_when_a_later_update_overflows(tiny_dirs, prompts, tmp_path, monkeypatch):
    d = make(tiny_dirs, prompts, tmp_path / "run", **{"run.save_every": 1})
    original = loop_mod.apply_update

    def poison(params, optimizer, scheduler, loss, max_grad_norm):
        out = original(params, optimizer, scheduler, loss, max_grad_norm)
        if d.completed == 2:
            with torch.no_grad():
                params[0].mul_(float("inf"))
        return out

    monkeypatch.setattr(loop_mod, "apply_update", poison)
    with pytest.raises(TrainingDiverged, match=r"step 3: .*Last good checkpoint: .*step_000002"):
        d.run()
    from safetensors.torch import load_file

    for ckpt in (tmp_path / "run" / "checkpoints").glob("step_*"):
        weights = load_file(ckpt / "model" / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), ckpt


def test_a_skipped_step_logs_its_loss_as_nan(tiny_dirs, prompts, tmp_path, monkeypatch):
    original = Distiller.update

    def nan_grads(self, *a, **kw):
        loss, batch = original(self, *a, **kw)
        if self.completed == 1:
            for p in self.student.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return loss, batch  # a finite loss with a non-finite gradient: the step trains nothing

    monkeypatch.setattr(Distiller, "update", nan_grads)
    make(tiny_dirs, prompts, tmp_path / "run", **{"run.steps": 3}).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["optim/skipped"] for r in rows] == [0.0, 1.0, 0.0]
    assert rows[1]["opd/loss"] == "nan" and isinstance(rows[0]["opd/loss"], float)


# -- 3. resume with a changed config ----------------------------------------------------------------------

def test_resume_refuses_a_changed_non_cadence_key_and_records_a_cadence_change(tiny_dirs, prompts, tmp_path,
                                                                              reference, capsys):
    make(tiny_dirs, prompts, tmp_path / "run", **{"run.steps": 2}).run()
    resumed = make(tiny_dirs, prompts, tmp_path / "run", **{"run.resume": True, "objective.name": "reverse_kl",
                                                             "optim.lr": 5e-3})
    with pytest.raises(ConfigError, match=r"changed config: objective.name: 'topk' -> 'reverse_kl'; optim.lr: 0.01 -> "
                                          r"0.005\. .*run.resume_override=true"):
        resumed.run()
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"  # refused before anything was trained
    resume_and_compare(tiny_dirs, prompts, tmp_path / "run", reference, **{"run.save_every": 3})
    assert "resume at step 2: run.steps 2 -> 4 applied" in capsys.readouterr().err
    history = [json.loads(line) for line in (tmp_path / "run" / "config_history.jsonl").read_text().splitlines()]
    assert history == [{"resumed_at_step": 2, "override": False,
                        "changes": {"run.save_every": [0, 3], "run.steps": [2, 4]}}]


def test_resume_override_applies_a_changed_lr_for_real_and_records_it(tiny_dirs, prompts, tmp_path):
    make(tiny_dirs, prompts, tmp_path / "run", **{"run.steps": 2}).run()
    make(tiny_dirs, prompts, tmp_path / "run", **{"run.resume": True, "run.resume_override": True,
                                                  "optim.lr": 5e-3, "run.steps": 3}).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["optim/lr"] for r in rows] == [1e-2, 1e-2, 5e-3]  # before the fix: 0.01 while config.yaml said 0.005
    assert "lr: 0.005" in (tmp_path / "run" / "config.yaml").read_text()
    history = json.loads((tmp_path / "run" / "config_history.jsonl").read_text())
    assert history["override"] is True and history["changes"]["optim.lr"] == [1e-2, 5e-3]


def test_resume_with_another_student_names_the_model_the_run_was_started_with(tiny_dirs, prompts, tmp_path,
                                                                               tokenizer):
    other = tmp_path / "wider"
    save_tiny(tiny_llama(len(tokenizer), seed=0, hidden=32, heads=2, kv_heads=1), tokenizer, other)
    make(tiny_dirs, prompts, tmp_path / "run", **{"run.steps": 1}).run()
    with pytest.raises(ConfigError, match=r"student.path: '.*student' -> '.*wider'"):
        make(tiny_dirs, prompts, tmp_path / "run", **{"run.resume": True, "student.path": other}).run()
    with pytest.raises(ConfigError, match=rf"step_000001 was written for a different model: this run was started "
                                          rf"with student.path={tiny_dirs['student']}"):
        make(tiny_dirs, prompts, tmp_path / "run", **{"run.resume": True, "student.path": other,
                                                      "run.resume_override": True}).run()


# -- 6/7. damaged files and leftovers --------------------------------------------------------------------

def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_intact_one(tiny_dirs, prompts, tmp_path,
                                                                              reference, capsys):
    make(tiny_dirs, prompts, tmp_path / "run", **{"run.steps": 2, "run.save_every": 1}).run()
    weights = tmp_path / "run" / "checkpoints" / "step_000002" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    resume_and_compare(tiny_dirs, prompts, tmp_path / "run", reference, **{"run.save_every": 1})
    err = capsys.readouterr().err
    assert "step_000002 is damaged: model.safetensors is truncated" in err
    assert "resumed from" in err and "step_000001 (step 1) (the newest intact checkpoint" in err


def test_no_intact_checkpoint_is_a_clear_error(tiny_dirs, prompts, tmp_path):
    make(tiny_dirs, prompts, tmp_path / "run", **{"run.steps": 1}).run()
    state = tmp_path / "run" / "checkpoints" / "step_000001" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"no checkpoint in .* is intact: step_000001 \(trainer_state.pt is "
                                          r"unreadable"):
        make(tiny_dirs, prompts, tmp_path / "run", **{"run.resume": True}).run()


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tiny_dirs, prompts, tmp_path, reference, capsys):
    make(tiny_dirs, prompts, tmp_path / "run", **{"run.steps": 2}).run()
    with (tmp_path / "run" / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "opd/lo')  # a crash mid-write
    resume_and_compare(tiny_dirs, prompts, tmp_path / "run", reference)
    assert "metrics.jsonl: dropped a torn last line 3" in capsys.readouterr().err


def test_a_bad_metrics_line_in_the_middle_names_the_file_and_line(tmp_path):
    from opdkit.tracking import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "x\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not valid JSON"):
        read_metrics(tmp_path)


def test_an_unwritable_out_dir_fails_before_the_models_load(tiny_dirs, prompts, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"run.out_dir=.*a_file/run is not writable"):
        make({"student": tmp_path / "no-such-model", "teacher": tiny_dirs["teacher"]}, prompts, blocker / "run")


def test_leftover_tmp_dirs_are_removed_at_start(tiny_dirs, prompts, tmp_path, capsys):
    make(tiny_dirs, prompts, tmp_path / "run", **{"run.steps": 1}).run()
    left = tmp_path / "run" / "checkpoints" / ".tmp-killed"
    (left / "model").mkdir(parents=True)
    make(tiny_dirs, prompts, tmp_path / "run", **{"run.resume": True, "run.steps": 1})
    assert not left.exists()
    assert "removed 1 unfinished checkpoint write(s)" in capsys.readouterr().err


def test_resuming_a_finished_run_keeps_the_before_numbers_and_logs_no_duplicate_eval(tiny_dirs, prompts, tmp_path):
    common = {"run.steps": 1, "eval.prompts": 4}
    first = make(tiny_dirs, prompts, tmp_path / "run", **common).run()
    again = make(tiny_dirs, prompts, tmp_path / "run", **{**common, "run.resume": True}).run()
    for key in ("eval_before", "eval_after", "reverse_kl_before", "reverse_kl_after", "accuracy_before"):
        assert again[key] == first[key], key
    assert logged_steps(tmp_path / "run") == [0, 1, 1]  # before-eval, step 1, after-eval: once each


# -- 6. a served teacher that answers 200 with the wrong body -------------------------------------------------

class _Resp:
    def __init__(self, body):
        self.status_code, self.body = 200, body
        self.text = body if isinstance(body, str) else json.dumps(body)

    def json(self):
        if isinstance(self.body, str):
            return json.loads(self.body)  # raises a ValueError, as requests does
        return self.body


class _Session:
    """Answers /models and /tokenize correctly and /completions with ``completions``."""

    def __init__(self, tokenizer, models=None, completions=None):
        self.tokenizer, self.models, self.completions = tokenizer, models, completions

    def request(self, method, url, json=None, timeout=None):
        if url.endswith("/models"):
            return _Resp(self.models if self.models is not None else {"data": [{"id": "t"}]})
        if url.endswith("/tokenize"):
            return _Resp({"tokens": self.tokenizer(json["prompt"], add_special_tokens=False)["input_ids"]})
        return _Resp(self.completions)


def _server_teacher(tokenizer, session):
    from opdkit.config import TeacherConfig
    from opdkit.engines.server import ServerTeacher

    return ServerTeacher(TeacherConfig(engine="server", url="http://t:8000/v1"), tokenizer=tokenizer,
                         vocab_size=len(tokenizer), session=session)


def test_a_served_teacher_answering_non_json_names_the_url(tokenizer):
    with pytest.raises(ServerError, match=r"teacher server http://t:8000/v1/models answered HTTP 200 with a body "
                                          r"that is not JSON \('<html>hello'\): teacher.url must be"):
        _server_teacher(tokenizer, _Session(tokenizer, models="<html>hello"))


def test_a_served_teacher_answering_without_choices_names_the_url_and_endpoint(tokenizer):
    teacher = _server_teacher(tokenizer, _Session(tokenizer, completions={"object": "error"}))
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ServerError, match=r"teacher server http://t:8000/v1/completions answered without 'choices' "
                                          r"\(keys: object\)"):
        teacher.score([[5, 6, 7]], torch.tensor([[8, 9]]), mask, k=0)


# -- 7. data errors: rows counted from 1, mapped columns that do not exist, the probe's hint -------------------

def test_rows_count_from_1_like_jsonl_lines(tmp_path, tokenizer):
    from opdkit.data import DatasetError, load_prompts

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"text": "c"}])
    with pytest.raises(DatasetError, match=r"d.jsonl, row 3: no prompt found"):  # the third row, line 3
        load_prompts(path, tokenizer)


def test_a_mapped_column_that_does_not_exist_is_named(tmp_path, tokenizer):
    from opdkit.data import DatasetError, load_prompts

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "solution": "1"}])
    with pytest.raises(DatasetError, match=r"d.jsonl: columns maps answer to the column 'nonexist', which does not "
                                           r"exist in any row; columns present: prompt, solution"):
        load_prompts(path, tokenizer, columns={"answer": "nonexist"}, columns_option="columns")


def test_the_probe_without_answers_hints_at_mapping_the_answer_column():
    from opdkit.probe import ProbeThresholds, decide
    from tests.test_probe import _numbers

    reasons = " ".join(decide(_numbers(accuracy=None), ProbeThresholds())["reasons"])
    assert "the prompts have no answers" in reasons and "map it with columns={answer: <column>}" in reasons


# -- the same loop drives SFT ------------------------------------------------------------------------------

@pytest.mark.parametrize("method,completed,expected", [("forward_backward", 2, "step_000002"),
                                                       ("step_samples", 3, "step_000003")],
                         ids=["before_the_update", "after_the_update"])
def test_sft_interrupted_anywhere_resumes_exactly(tiny_dirs, tmp_path, monkeypatch, method, completed, expected):
    from opdkit.recipes.sft import SFTConfig, SFTTrainer
    from tests.test_recipes_sft import _overrides

    rows = [{"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]}
            for a in range(4) for b in range(3)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)

    def trainer(out, **extra):
        return SFTTrainer(load_config(SFTConfig, None, _overrides(tiny_dirs["student"], data, out, **extra)))

    straight = trainer(tmp_path / "a")
    straight.run()
    monkeypatch.setattr(SFTTrainer, method, _raise_at_step_3(getattr(SFTTrainer, method), completed=completed))
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "b").run()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "b").name == expected
    resumed = trainer(tmp_path / "b", **{"run.resume": True})
    resumed.run()
    torch.testing.assert_close(params(resumed.model), params(straight.model), rtol=0, atol=0)
    assert logged_steps(tmp_path / "b") == [1, 2, 3, 4]
