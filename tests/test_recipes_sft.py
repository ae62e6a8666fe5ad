"""opdkit sft: the assistant-token mask, packing without cross-contamination, learning, exact resume, and handing
the result to opdkit distill."""

import json

import pytest
import torch

from opdkit.cli import main
from opdkit.config import load_config
from opdkit.recipes.sft import SFTConfig, SFTTrainer, Sequence, assistant_token_mask, collate, pack, sft_loss
from opdkit.tiny import tiny_llama
from tests.conftest import write_jsonl

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 5?"},
    {"role": "assistant", "content": "2 + 5 = 7\nAnswer: 7"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6"},
]


def trained_text(tokenizer, messages, turns="all"):
    ids, trained = assistant_token_mask(tokenizer, messages, turns=turns)
    return ids, trained, tokenizer.decode([i for i, t in zip(ids, trained) if t])


def test_mask_is_exactly_the_assistant_turns_and_their_end_token(tokenizer):
    ids, trained, text = trained_text(tokenizer, CONVERSATION)
    assert text == "2 + 5 = 7\nAnswer: 7<|im_end|>6<|im_end|>"
    # Everything else, template included, is untrained: the role headers, the newline after <|im_end|>, the prompt.
    untrained = tokenizer.decode([i for i, t in zip(ids, trained) if not t])
    assert untrained == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 5?<|im_end|>\n"
                         "<|im_start|>assistant\n\n<|im_start|>user\nAnd 3 + 3?<|im_end|>\n<|im_start|>assistant\n\n")
    assert trained_text(tokenizer, CONVERSATION, "last")[2] == "6<|im_end|>"
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)  # rendered once


@pytest.mark.slow
def test_mask_on_smollm2_tokenizer(smollm_dir):
    from opdkit.models import load_tokenizer

    tok = load_tokenizer(smollm_dir)
    ids, trained, text = trained_text(tok, CONVERSATION[1:3])  # SmolLM2 adds its default system turn itself
    assert text == "2 + 5 = 7\nAnswer: 7<|im_end|>"
    first = trained.index(True)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ids[first + sum(trained):]) == "\n"


def _sequences(tokenizer):
    convs = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    return [Sequence(*assistant_token_mask(tokenizer, c), row=i) for i, c in enumerate(convs)]


def test_packed_rows_give_the_padded_loss_and_gradients(tokenizer):
    seqs = _sequences(tokenizer)
    model = tiny_llama(len(tokenizer), seed=0)
    padded = collate([[s] for s in seqs], tokenizer.pad_token_id, packed=False)
    packed = collate(pack(seqs, capacity=1000), tokenizer.pad_token_id, packed=True)
    # trained tokens: 19 + 1 + 1 + 1 (first conversation), 19 + 1 (second), 5 + 1 ("hello<|im_end|>")
    assert packed.input_ids.shape[0] == 1 and padded.targets == packed.targets == 48
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        loss, _ = sft_loss(model, batch, vocab_size=len(tokenizer), chunk_size=5)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        value = float(loss.detach())
        if batch is padded:
            reference = value
    assert value == pytest.approx(reference, rel=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    # The same packed row with positions that do not restart lets later conversations attend to earlier ones.
    leaky = collate(pack(seqs, capacity=1000), tokenizer.pad_token_id, packed=True)
    leaky.position_ids = torch.arange(leaky.input_ids.shape[1])[None]
    leaked = float(sft_loss(model, leaky, vocab_size=len(tokenizer))[0].detach())
    assert abs(leaked - reference) > 100 * abs(value - reference) + 0.05


def test_pack_respects_capacity():
    seqs = [Sequence([0] * n, [True] * n, i) for i, n in enumerate([5, 4, 3, 6, 1])]
    rows = pack(seqs, capacity=9)
    assert [[s.row for s in r] for r in rows] == [[0, 1], [2, 3], [4]]


@pytest.fixture()
def chat_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                          {"role": "assistant", "content": f"{a}+{b}={a + b}. Answer: {a + b}"}]}
            for a in range(4) for b in range(3)]
    return write_jsonl(tmp_path / "chat.jsonl", rows)


def _overrides(model_dir, data, out, **extra):
    base = {"model.path": model_dir, "data.train": data, "run.out_dir": out, "run.steps": 4,
            "optim.micro_batch_size": 2, "optim.grad_accum": 2, "optim.lr": 1e-2, "optim.warmup_steps": 2,
            "model.compute_dtype": "float32", "run.progress": False, "run.tensorboard": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("packing", [False, True])
def test_sft_learns_and_resumes_exactly(tiny_dirs, chat_file, tmp_path, packing):
    straight = SFTTrainer(load_config(SFTConfig, None, _overrides(tiny_dirs["student"], chat_file, tmp_path / "a",
                                                                  **{"data.packing": packing})))
    summary = straight.run()
    assert summary["last_loss"] < summary["first_loss"] * 0.8
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["optim/lr"] == pytest.approx(rows[1]["optim/lr"] / 2)  # warmup
    if not packing:
        assert all(r["sft/sequences"] == 4 for r in rows)  # micro_batch_size 2 x grad_accum 2

    first = SFTTrainer(load_config(SFTConfig, None, _overrides(tiny_dirs["student"], chat_file, tmp_path / "b",
                                                               **{"data.packing": packing, "run.steps": 4,
                                                                  "run.save_every": 2})))
    first.total_steps = 2  # stop after 2 of the 4 scheduled steps, as an interrupted run would
    first.run()
    resumed = SFTTrainer(load_config(SFTConfig, None, _overrides(tiny_dirs["student"], chat_file, tmp_path / "b",
                                                                 **{"data.packing": packing, "run.resume": True})))
    resumed.run()
    assert torch.equal(_weights(resumed.model), _weights(straight.model))


def test_sft_then_distill_cli(tiny_dirs, chat_file, tmp_path, prompts_file):
    out = tmp_path / "sft"
    assert main(["sft", *_overrides(tiny_dirs["student"], chat_file, out, **{"run.steps": 2,
                                                                            "eval.rows": 2})]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_after"]["eval/loss"] < summary["eval_before"]["eval/loss"]
    from tests.conftest import tiny_overrides

    code = main(["distill", *tiny_overrides({"student": out / "final_model", "teacher": tiny_dirs["teacher"]},
                                            prompts_file, tmp_path / "opd", **{"run.steps": 1})])
    assert code == 0 and (tmp_path / "opd" / "final_model" / "config.json").is_file()


def test_sft_rejects_rows_without_a_conversation(tiny_dirs, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert main(["sft", *_overrides(tiny_dirs["student"], bad, tmp_path / "r")]) == 1
    assert "row 1: the conversation has no assistant message" in capsys.readouterr().err


def test_config_reads_exponent_floats_written_without_a_dot():
    # YAML 1.1 loads "1e-3" as a string; optim.lr=1e-3 on the command line must still work.
    cfg = load_config(SFTConfig, None, ["model.path=m", "data.train=d.jsonl", "optim.lr=1e-3"])
    assert cfg.optim.lr == 1e-3
    with pytest.raises(Exception, match="optim.lr must be a number"):
        load_config(SFTConfig, None, ["model.path=m", "data.train=d.jsonl", "optim.lr=fast"])
