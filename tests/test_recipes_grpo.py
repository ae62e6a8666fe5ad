"""opdkit grpo: group-normalised advantages, config wiring (reference KL as the 'teacher'), and a short run on a
tiny model that must raise its verifiable reward."""

import json

import pytest
import torch

from opdkit.answers import score_response
from opdkit.cli import main
from opdkit.config import ConfigError
from opdkit.evaluation import decode_responses
from opdkit.losses import group_advantages
from opdkit.recipes.grpo import grpo_config
from opdkit.tiny import char_tokenizer, save_tiny, tiny_llama
from opdkit.train import Distiller
from tests.conftest import write_jsonl


def test_group_advantages_on_hand_made_groups():
    # group 1: rewards 1, 0, 0, 1 -> mean 0.5, sample std sqrt(1/3): advantages ±0.5/0.5774 = ±0.8660
    # group 2: all equal -> no signal, advantage exactly 0 (not NaN)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=4)
    assert torch.allclose(adv[:4], torch.tensor([0.8660, -0.8660, -0.8660, 0.8660]), atol=1e-3)
    assert torch.equal(adv[4:], torch.zeros(4))
    # group of 3 with one success: mean 1/3, std sqrt(1/3) -> (2/3)/0.5774 = 1.1547 and -(1/3)/0.5774 = -0.5774
    adv = group_advantages(torch.tensor([0.0, 1.0, 0.0]), group_size=3)
    assert torch.allclose(adv, torch.tensor([-0.5774, 1.1547, -0.5774]), atol=1e-3)
    assert abs(float(adv.sum())) < 1e-5  # centred within the group


def test_grpo_config_defaults_and_reference_kl(tmp_path):
    base = ["student.path=s", "data.train=d.jsonl"]
    cfg = grpo_config(None, base)
    assert (cfg.rollout.n, cfg.objective.opd_weight, cfg.objective.outcome_weight) == (8, 0.0, 1.0)
    assert cfg.objective.aggregation == "token_mean" and not cfg.uses_teacher and cfg.rollout.temperature == 1.0
    cfg = grpo_config(None, base + ["rollout.n=4"], kl_coef=0.05)
    assert cfg.rollout.n == 4 and cfg.teacher.path == "s" and cfg.teacher.dtype == cfg.student.param_dtype
    assert cfg.objective.name == "sampled" and cfg.objective.opd_weight == 0.05 and cfg.uses_teacher
    with pytest.raises(ConfigError, match="initial student as the reference"):
        grpo_config(None, base + ["teacher.path=t"], kl_coef=0.05)
    with pytest.raises(ConfigError, match="uses no teacher"):
        grpo_config(None, base + ["teacher.path=t"])


@pytest.fixture(scope="module")
def seven_task(tmp_path_factory):
    """A verifiable task a random tiny model can learn in seconds: every prompt's answer is 7, and the vocabulary
    has one token '\\\\boxed{7}'. A response earns reward 1 iff math-verify finds \\\\boxed{7} in it; a random
    model emits that token in ~6% of 8-token responses."""
    root = tmp_path_factory.mktemp("seven")
    tok = char_tokenizer(extra_tokens=["\\boxed{7}"])
    save_tiny(tiny_llama(len(tok), seed=0), tok, root / "model")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Say seven ({i})", "answer": "7"} for i in range(16)])
    return root / "model", prompts


def _reward_rate(d: Distiller) -> float:
    """Fraction of 128 fresh samples (fixed seed) that math-verify scores correct."""
    ro = d.engine.generate([ex.prompt_ids for ex in d.train_set[:8]], n=16, temperature=1.0, top_p=1.0,
                           max_new_tokens=8, topk=0, seed=999)
    texts = decode_responses(d.tokenizer, ro.response_ids, ro.response_mask)
    return sum(score_response(t, "7") for t in texts) / len(texts)


def test_short_grpo_run_raises_the_mean_reward(seven_task, tmp_path):
    model, prompts = seven_task
    cfg = grpo_config(None, [f"student.path={model}", f"data.train={prompts}", f"run.out_dir={tmp_path / 'run'}",
                             "run.steps=6", "rollout.prompts_per_step=4", "rollout.max_new_tokens=8", "optim.lr=3e-2",
                             "optim.weight_decay=0", "eval.prompts=0", "run.progress=false", "run.tensorboard=false",
                             "student.compute_dtype=float32", "student.sampling_dtype=float32"])
    d = Distiller(cfg)
    before = _reward_rate(d)
    d.run()
    after = _reward_rate(d)
    assert before < 0.15 and after > 0.6, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["rollout/accuracy"] for r in rows]
    assert accuracy[-1] > accuracy[0] and "opd/reverse_kl" not in rows[0]  # no teacher, no KL


def test_grpo_cli_with_reference_kl_two_steps(seven_task, tmp_path, capsys):
    model, prompts = seven_task
    out = tmp_path / "run"
    code = main(["grpo", "--kl-coef", "0.1", f"student.path={model}", f"data.train={prompts}", f"run.out_dir={out}",
                 "run.steps=2", "rollout.prompts_per_step=2", "rollout.n=4", "rollout.max_new_tokens=6",
                 "eval.prompts=2", "eval.max_new_tokens=6", "run.progress=false", "run.tensorboard=false",
                 "optim.lr=1e-2", "student.compute_dtype=float32", "student.sampling_dtype=float32"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "opd/loss" in r]
    # the reference is the initial model itself: KL(pi || pi_ref) is 0 before the first update, then grows
    assert steps[0]["opd/reverse_kl"] == pytest.approx(0.0, abs=1e-5) and steps[1]["opd/reverse_kl"] != 0.0
    assert "rollout/accuracy" in steps[0] and (out / "final_model" / "config.json").is_file()


def test_grpo_needs_answers(seven_task, tmp_path, capsys):
    model, _ = seven_task
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"hi {i}"} for i in range(40)])
    assert main(["grpo", f"student.path={model}", f"data.train={prompts}", f"run.out_dir={tmp_path / 'r'}"]) == 1
    assert "no row has a reference answer" in capsys.readouterr().err
