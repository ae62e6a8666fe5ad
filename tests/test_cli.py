"""The command line: a 2-step distill from a YAML config, and clear errors for bad input."""

import json
import subprocess
import sys

import pytest
import yaml

from opdkit.cli import main
from opdkit.tiny import save_tiny, tiny_llama
from tests.conftest import tiny_overrides, write_jsonl


def _yaml_config(tmp_path, dirs, prompts, out):
    cfg = {"student": {"path": str(dirs["student"])}, "teacher": {"path": str(dirs["teacher"])},
           "data": {"train": str(prompts)}, "rollout": {"prompts_per_step": 4, "max_new_tokens": 8},
           "objective": {"k": 8}, "eval": {"prompts": 4, "max_new_tokens": 8},
           "run": {"out_dir": str(out), "steps": 2, "progress": False}}
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_distill_two_steps_from_yaml(tmp_path, tiny_dirs, prompts_file, capsys):
    out = tmp_path / "run"
    config = _yaml_config(tmp_path, tiny_dirs, prompts_file, out)
    assert main(["distill", "--config", str(config), "objective.strategy=union"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "opd/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("opd/loss", "opd/reverse_kl", "rollout/len_mean", "rollout/eos_frac", "rollout/truncated_frac",
                "optim/grad_norm", "optim/lr", "time/rollout", "time/teacher", "time/train", "diag/overlap_ratio"):
        assert key in steps[0], key
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"]["strategy"] == "union" and saved["run"]["steps"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert {"reverse_kl_before", "reverse_kl_after", "seconds_per_step"} <= set(summary)
    assert (out / "final_model" / "config.json").is_file()
    assert list((out / "tensorboard").glob("events.*"))
    assert (out / "samples.jsonl").read_text().strip()
    assert "resolved config" in capsys.readouterr().err


def test_bad_config_key_is_rejected(tmp_path, tiny_dirs, prompts_file, capsys):
    config = _yaml_config(tmp_path, tiny_dirs, prompts_file, tmp_path / "run")
    assert main(["distill", "--config", str(config), "optim.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.learning_rate'" in err and "lr" in err


def test_malformed_dataset_row_is_rejected(tmp_path, tiny_dirs, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt here"}])
    code = main(["distill", *tiny_overrides(tiny_dirs, bad, tmp_path / "run")])
    assert code == 1
    assert f"{bad}, row 2: no prompt found" in capsys.readouterr().err


def test_tokenizer_mismatch_is_rejected(tmp_path, tiny_dirs, prompts_file, capsys):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(120)}
    vocab.update({"<unk>": 120, "<|im_end|>": 121})
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                    eos_token="<|im_end|>", pad_token="<|im_end|>")
    save_tiny(tiny_llama(len(other), seed=2), other, tmp_path / "other_teacher")
    code = main(["distill", *tiny_overrides(tiny_dirs, prompts_file, tmp_path / "run",
                                            **{"teacher.path": tmp_path / "other_teacher"})])
    assert code == 1
    err = capsys.readouterr().err
    assert "use different tokenizers" in err and "other_teacher" in err and "student" in err


def test_missing_model_is_rejected(tmp_path, tiny_dirs, prompts_file, capsys):
    code = main(["distill", *tiny_overrides(tiny_dirs, prompts_file, tmp_path / "run",
                                            **{"teacher.path": tmp_path / "missing"})])
    assert code == 1 and "not found" in capsys.readouterr().err


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "opdkit", "config"], capture_output=True, text=True, check=True)
    assert "objective.strategy" in out.stdout


@pytest.mark.parametrize("args", [["prune", "x"], ["distill", "--config"]])
def test_argument_errors_exit_nonzero(args):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    from opdkit import errors, prune
    from opdkit.config import ConfigError
    from opdkit.data import DatasetError
    from opdkit.engines.logprobs import EngineError, EngineOutputError
    from opdkit.loop import TrainingDiverged
    from opdkit.models import ModelNotFoundError, TokenizerMismatchError

    # every user-facing class is a UserError and keeps its old builtin base, so older handlers still catch it
    for cls, base in [(ConfigError, ValueError), (DatasetError, ValueError), (ModelNotFoundError, FileNotFoundError),
                      (TokenizerMismatchError, ValueError), (EngineError, RuntimeError),
                      (EngineOutputError, RuntimeError), (TrainingDiverged, RuntimeError),
                      (errors.InvalidInput, ValueError), (errors.MissingDependency, RuntimeError)]:
        assert issubclass(cls, errors.UserError) and issubclass(cls, base), cls

    assert main(["prune", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 1  # neither --layers nor --keep
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("opdkit prune: error: give exactly one of --layers")

    with pytest.raises(errors.InvalidInput):  # -v: a user error shows where it came from too
        main(["-v", "prune", str(tmp_path / "m"), "--out", str(tmp_path / "o")])

    def bug(*args, **kwargs):
        raise ValueError("an opdkit bug, not bad input")

    monkeypatch.setattr(prune, "prune_command", bug)
    with pytest.raises(ValueError, match="an opdkit bug"):  # formerly printed as a user error, hiding the bug
        main(["prune", str(tmp_path / "m"), "--layers", "1", "--out", str(tmp_path / "o")])
