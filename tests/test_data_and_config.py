"""Prompt loading (schemas, errors, length filter, sampler) and config loading (types, choices, overrides)."""

import json
import typing

import pytest

from opdkit import config as C
from opdkit.config import ConfigError, DistillConfig, describe, load_config, parse_overrides
from opdkit.data import DatasetError, PromptSampler, load_prompts, read_rows
from tests.conftest import SHARED_DATA, write_jsonl


def test_plain_chat_and_verl_rows(tmp_path, tokenizer):
    rows = [
        {"prompt": "What is 1+1?", "answer": 2},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        {"prompt": [{"role": "user", "content": "Solve x"}], "reward_model": {"ground_truth": "3", "style": "rule"},
         "data_source": "dapo"},
    ]
    ps = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer)
    a, b, c = ps.examples
    assert a.answer == "2" and a.messages == [{"role": "user", "content": "What is 1+1?"}]
    assert b.reference == "Hello" and [m["role"] for m in b.messages] == ["system", "user"]
    assert c.answer == "3" and c.source == "dapo"
    text = tokenizer.decode(a.prompt_ids)
    assert text.count("<|im_start|>") == 2 and text.endswith("<|im_start|>assistant\n")  # template applied once


def test_column_map_suffix_and_system_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "2+2?", "solution": "4"}])
    ex = load_prompts(path, tokenizer, columns={"prompt": "problem", "answer": "solution"},
                      prompt_suffix=" Answer:", system_prompt="S").examples[0]
    assert ex.answer == "4"
    assert ex.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2? Answer:"}]


@pytest.mark.parametrize("row,needle", [
    ({"question": "hi"}, "no prompt found"),
    ({"messages": [{"role": "user"}]}, "message 0 must have string 'role' and 'content'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "must end with a user message"),
    ({"prompt": "   "}, "is empty"),
    ({"prompt": "ok", "answer": {"a": 1}}, "answer must be a string or number"),
])
def test_malformed_row_names_file_and_row(tmp_path, tokenizer, row, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(DatasetError) as err:
        load_prompts(path, tokenizer)
    assert f"{path}, row 2" in str(err.value) and needle in str(err.value)


def test_invalid_json_line_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match=r"bad.jsonl, line 2: not valid JSON"):
        read_rows(path)


def test_long_prompts_skipped_and_counted_or_rejected(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "short"}, {"prompt": "x" * 200}, {"prompt": "tiny"}])
    ps = load_prompts(path, tokenizer, max_prompt_length=60)
    assert len(ps) == 2 and ps.skipped_long == 1
    with pytest.raises(DatasetError, match=r"row 2: prompt has \d+ tokens, over data.max_prompt_length=60"):
        load_prompts(path, tokenizer, max_prompt_length=60, long_prompts="error")


@pytest.mark.skipif(not (SHARED_DATA / "dapo-math-17k.parquet").exists(), reason="shared data folder absent")
def test_real_verl_parquet(tokenizer):
    ps = load_prompts(SHARED_DATA / "dapo-math-17k.parquet", tokenizer, limit=5, max_prompt_length=10_000)
    assert len(ps) == 5 and all(ex.answer for ex in ps.examples) and ps.examples[0].source == "math_dapo"


def test_sampler_is_seeded_covers_epochs_and_resumes():
    a = PromptSampler(10, 4, seed=3)
    seen = [a.next_batch() for _ in range(5)]
    assert sorted(sum(seen[:2], []) + seen[2][:2]) == list(range(10))  # the first epoch covers every prompt once
    b = PromptSampler(10, 4, seed=3)
    b.next_batch(), b.next_batch()
    c = PromptSampler(10, 4, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch() for _ in range(3)] == seen[2:]


BASE = ["student.path=s", "teacher.path=t", "data.train=d.jsonl"]


def test_config_defaults_follow_the_paper():
    cfg = load_config(DistillConfig, None, BASE)
    o = cfg.objective
    assert (o.name, o.k, o.strategy, o.weighting) == ("topk", 16, "student", "student_p")
    assert cfg.teacher.temperature == 1.0 and cfg.rollout.temperature == 1.0


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective: {k: 8, strategy: union}\nrun: {steps: 3}\n")
    cfg = load_config(DistillConfig, path, BASE + ["objective.k=4", "data.chat_template_kwargs={enable_thinking: false}"])
    assert cfg.objective.k == 4 and cfg.objective.strategy == "union" and cfg.run.steps == 3
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    assert load_config(DistillConfig, None, BASE + ["optim.lr=1e-5"]).optim.lr == 1e-5  # YAML reads 1e-5 as text


@pytest.mark.parametrize("override,needle", [
    ("objective.kk=3", "unknown config key 'objective.kk'; allowed keys in 'objective': name, k,"),
    ("objectiv.k=3", "unknown config key 'objectiv'; allowed keys at the top level: student, teacher"),
    ("objective.strategy=both", "objective.strategy: 'both' is not allowed; choose one of: student, teacher"),
    ("objective.k=many", "objective.k must be an integer, got 'many'"),
    ("objective.k=0", "objective.k must be > 0"),
    ("rollout.top_p=1.5", "rollout.top_p must be in (0, 1]"),
    ("objective.form=kl", "use objective.weighting=student_p"),
    ("run.resume=maybe", "run.resume must be true or false"),
    ("nokey", "must look like key=value"),
])
def test_bad_config_values_are_named(override, needle):
    extra = ["objective.weighting=none"] if override == "objective.form=kl" else []
    with pytest.raises(ConfigError) as err:
        load_config(DistillConfig, None, BASE + extra + [override])
    assert needle in str(err.value)


def test_missing_required_paths():
    with pytest.raises(ConfigError, match="student.path is required"):
        load_config(DistillConfig, None, [])


def test_describe_lists_every_leaf_key():
    keys = [row[0] for row in describe(DistillConfig)]
    assert "objective.strategy" in keys and "teacher.chat_template" in keys and len(keys) == len(set(keys))


def test_parse_overrides_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}


def test_literal_choices_match_the_function_tables():
    import typing

    from opdkit import config as C
    from opdkit.candidates import STRATEGIES
    from opdkit.objectives import OBJECTIVES

    hints = typing.get_type_hints(C.ObjectiveConfig)
    assert set(typing.get_args(hints["name"])) == set(OBJECTIVES)
    assert all(OBJECTIVES[name].name == name for name in OBJECTIVES)  # each entry is the objective it names
    assert set(typing.get_args(hints["strategy"])) == set(STRATEGIES)
    json.dumps(C.to_dict(load_config(DistillConfig, None, BASE)))  # the resolved config serialises


def test_renamed_keys_still_load_with_a_warning_naming_the_new_key(tmp_path, capsys):
    from opdkit.cli import COMMAND_CONFIGS, config_class, main
    from opdkit.recipes.benchmark import EvalRecipeConfig
    from opdkit.recipes.rollout import RolloutRecipeConfig

    base = ["model.path=m", f"output.path={tmp_path / 'o.jsonl'}"]
    new = load_config(RolloutRecipeConfig, None, base + ["data.train=p.jsonl", "data.prompt_suffix=S"])
    with pytest.warns(FutureWarning) as caught:
        old = load_config(RolloutRecipeConfig, None, base + ["data.path=p.jsonl", "data.suffix=S"])
    assert old == new and (old.data.train, old.data.prompt_suffix) == ("p.jsonl", "S")
    assert sorted(str(w.message) for w in caught) == [
        f"config key 'data.{a}' is deprecated and will be removed in the next release: use 'data.{b}'"
        for a, b in (("path", "train"), ("suffix", "prompt_suffix"))]
    with pytest.raises(ConfigError, match="'data.path' is the old name of 'data.train': give only 'data.train'"):
        load_config(RolloutRecipeConfig, None, base + ["data.path=a", "data.train=b"])
    # a renamed section: eval's prompts.* keys are now data.*, and keys inside it are renamed too
    with pytest.warns(FutureWarning) as caught:
        cfg = load_config(EvalRecipeConfig, None, ["model.path=m", "benchmarks=[b.jsonl]", "prompts.limit=3",
                                                   "prompts.suffix=S"])
    assert (cfg.data.limit, cfg.data.prompt_suffix) == (3, "S")
    assert [str(w.message).split(":")[-1] for w in caught] == [" use 'data'", " use 'data.prompt_suffix'"]
    with pytest.raises(ConfigError, match="unknown config key 'data.nope'"):
        load_config(EvalRecipeConfig, None, ["model.path=m", "benchmarks=[b.jsonl]", "data.nope=1"])
    # opdkit config COMMAND lists any command's keys, and the old names as deprecated
    assert all(describe(config_class(c)) for c in COMMAND_CONFIGS)
    assert main(["config", "eval"]) == 0
    out = capsys.readouterr().out
    assert "data.prompt_suffix" in out and "rollout.n" in out and "student.path" not in out
    assert [line.split()[0] for line in out.splitlines() if "(deprecated)" in line] == [
        "prompts", "sampling", "data.path", "data.suffix"]


def test_one_vocabulary_across_commands_and_every_old_name_points_at_a_key(tmp_path):
    """The same key means the same thing in every command: each shared section is one type (or extends it), and
    each deprecated name resolves to a key or section that exists."""
    import dataclasses

    from opdkit.cli import COMMAND_CONFIGS, config_class
    from opdkit.probe import ProbeConfig
    from opdkit.recipes.benchmark import EvalRecipeConfig
    from opdkit.recipes.rollout import RolloutRecipeConfig
    from opdkit.recipes.sft import SFTConfig

    def section(cls, name):
        return typing.get_type_hints(cls)[name]

    kinds = {"student": C.ModelConfig, "teacher": C.ModelConfig, "model": C.ModelConfig,
             "data": C.DataFileConfig, "rollout": C.SamplingConfig, "optim": C.OptimConfig, "run": C.RunConfig}
    for cls in (DistillConfig, SFTConfig, RolloutRecipeConfig, EvalRecipeConfig, ProbeConfig):
        names = [f.name for f in dataclasses.fields(cls)]
        for name in names:
            if name in kinds:
                assert issubclass(section(cls, name), kinds[name]), (cls.__name__, name)
    for command in COMMAND_CONFIGS:
        cls = config_class(command)
        keys = {k for k, _, _ in describe(cls)}
        sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
        for old, new in C.describe_renames(cls):
            assert new in keys or new in sections, (command, old, new)
    # sft: run.max_steps is run.steps, and the eval cadence and held-out rows moved into eval.*
    sft = ["model.path=m", "data.train=d.jsonl"]
    with pytest.warns(FutureWarning) as caught:
        old = load_config(SFTConfig, None, sft + ["run.max_steps=7", "run.eval_every=2", "data.eval_rows=3"])
    assert old == load_config(SFTConfig, None, sft + ["run.steps=7", "eval.every=2", "eval.rows=3"])
    assert sorted(str(w.message).split("use ")[-1] for w in caught) == ["'eval.every'", "'eval.rows'", "'run.steps'"]
    # rollout/eval: the sampling section is the rollout section, as in distill
    base = ["model.path=m", f"output.path={tmp_path / 'o.jsonl'}", "data.train=p.jsonl"]
    with pytest.warns(FutureWarning, match="'sampling' is deprecated .* use 'rollout'"):
        legacy = load_config(RolloutRecipeConfig, None, base + ["sampling.n=3", "sampling.temperature=0.5"])
    assert legacy == load_config(RolloutRecipeConfig, None, base + ["rollout.n=3", "rollout.temperature=0.5"])
    # a model section given as a string is its path, and keeps the section's other keys
    merged = load_config(DistillConfig, None, BASE + ["teacher=other", "teacher.temperature=0.5"],
                         base={"teacher": {"path": "t", "chunk_size": 64}})
    assert (merged.teacher.path, merged.teacher.temperature, merged.teacher.chunk_size) == ("other", 0.5, 64)


def test_a_run_saved_under_old_key_names_compares_as_the_same_config():
    from opdkit.loop import config_changes
    from opdkit.recipes.sft import SFTConfig

    new = load_config(SFTConfig, None, ["model.path=m", "data.train=d.jsonl", "run.steps=7", "eval.rows=3"])
    saved = C.to_dict(new)
    saved["run"]["max_steps"] = saved["run"].pop("steps")
    saved["data"]["eval_rows"] = saved["eval"].pop("rows")
    assert config_changes(saved, C.to_dict(new))  # compared raw, the old names look like changes
    assert config_changes(C.upgrade_keys(SFTConfig, saved), C.to_dict(new)) == {}
