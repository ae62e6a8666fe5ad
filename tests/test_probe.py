"""``opdkit probe`` on tiny models trained here in a few seconds, on a synthetic task with known answers.

Task: "Copy n." (n = 0..19). The student writes the right format ("Answer: m") but a random m, so it has
no capability; teachers answer correctly:

* ``compatible``: the student's format and chat template;
* ``thinker``: another output pattern, "<think>n</think>\\boxed{n}" (a thinking-pattern mismatch);
* ``templated``: the student's format, but trained on its own chat template ("User: ... Assistant: "),
  which its tokenizer declares.
"""

import json
import math
import random

import pytest
import torch

from opdkit.cli import main
from opdkit.config import load_config
from opdkit.data import render_prompt
from opdkit.models import load_causal_lm
from opdkit.probe import (RESULT_KEYS, ProbeConfig, ProbeThresholds, capability, decide, distribution, rank,
                          run_probe, self_check)
from opdkit.engines.hf_rollout import sample
from opdkit.engines.hf_teacher import HFTeacher
from opdkit.tiny import char_tokenizer, save_tiny, tiny_llama
from tests.conftest import write_jsonl

PLAIN = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
         "{% else %}{{ 'Assistant: ' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
NUMBERS = list(range(20))
FORMATS = {
    "random_answer": lambda n, rng: f"Answer: {rng.randint(0, 19)}",
    "answer": lambda n, rng: f"Answer: {n}",
    "think_boxed": lambda n, rng: f"<think>{n}</think>\\boxed{{{n}}}",
}


def messages(n):
    return [{"role": "user", "content": f"Copy {n}."}]


def train_tiny(tokenizer, fmt: str, *, seed: int, steps: int = 200, lr: float = 6e-3):
    """Supervised fine-tuning of a fresh tiny Llama on (prompt, response) pairs, loss on response tokens."""
    rng = random.Random(seed)
    batches = []
    for _ in range(4):  # a few draws of the (possibly random) responses, cycled
        seqs, targets = [], []
        for n in NUMBERS:
            prompt = render_prompt(tokenizer, messages(n))
            response = tokenizer(FORMATS[fmt](n, rng), add_special_tokens=False)["input_ids"] + [2]
            seqs.append(prompt + response)
            targets.append([False] * len(prompt) + [True] * len(response))
        width = max(map(len, seqs))
        ids = torch.tensor([s + [2] * (width - len(s)) for s in seqs])
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        loss_at = torch.tensor([t + [False] * (width - len(t)) for t in targets])
        batches.append((ids, attn, loss_at[:, 1:]))
    model = tiny_llama(len(tokenizer), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        ids, attn, loss_at = batches[step % len(batches)]
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[loss_at], ids[:, 1:][loss_at])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster and immune to a busy second core
    root = tmp_path_factory.mktemp("probe_task")
    tok = char_tokenizer(extra_tokens=["<think>", "</think>"])
    plain = char_tokenizer(extra_tokens=["<think>", "</think>"], chat_template=PLAIN)
    dirs = {}
    for name, fmt, tokenizer, seed in (("student", "random_answer", tok, 0), ("compatible", "answer", tok, 1),
                                       ("thinker", "think_boxed", tok, 2), ("templated", "answer", plain, 3)):
        save_tiny(train_tiny(tokenizer, fmt, seed=seed), tokenizer, root / name)
        dirs[name] = str(root / name)
    dirs["prompts"] = str(write_jsonl(root / "copy.jsonl", [{"prompt": f"Copy {n}.", "answer": str(n)}
                                                            for n in NUMBERS]))
    dirs["root"] = root
    yield dirs
    torch.set_num_threads(threads)


PROBE_ARGS = ["k=8", "rollout.max_new_tokens=16", "rollout.n=2", "student.dtype=float32",
              "student.sampling_dtype=float32", "teacher.dtype=float32"]


@pytest.fixture(scope="module")
def ranked(task):
    out, dump = task["root"] / "probe.json", task["root"] / "dump.jsonl"
    code = main(["probe", "--student", task["student"], "--teachers", task["thinker"], task["compatible"],
                 task["templated"], "--prompts", task["prompts"], "--n-prompts", "20", "--json", str(out),
                 "--dump-rollouts", str(dump), *PROBE_ARGS])
    assert code == 0
    result = json.loads(out.read_text())
    return result, {c["teacher"]: c for c in result["candidates"]}, [json.loads(x) for x in dump.open()]


def test_probe_tells_a_compatible_teacher_from_mismatched_ones(task, ranked):
    result, by, _ = ranked
    good, thinker, templated = by[task["compatible"]], by[task["thinker"]], by[task["templated"]]
    # Same format, new capability: distil.
    assert good["verdict"] == "distill", good["reasons"]
    assert good["accuracy"]["teacher"] > 0.6 and good["accuracy"]["student"] < 0.3
    assert good["accuracy"]["new_capability_share"] > 0.5
    # Another output pattern: low overlap and a thinking mismatch -> off-policy cold start first.
    assert thinker["verdict"] == "cold_start", thinker["reasons"]
    assert any("thinking pattern differs" in r for r in thinker["reasons"])
    assert thinker["overlap_ratio"] < good["overlap_ratio"] - 0.15
    assert thinker["reverse_kl"] > good["reverse_kl"]
    assert thinker["teacher_logp_student_tokens"] < good["teacher_logp_student_tokens"]
    assert thinker["compatibility"]["thinking"]["teacher_rollouts_with_think"] > 0.8
    # Reads the student's template, was trained on its own: align the template first.
    assert templated["verdict"] == "align_template", templated["reasons"]
    assert templated["template_alignment"]["better"] == "own"
    assert templated["template_shift_reverse_kl"] > 0.1 * templated["reverse_kl"]
    assert not templated["compatibility"]["template"]["identical"]
    assert any("teacher.chat_template=own" in r for r in templated["reasons"])
    # Ranking: the compatible teacher first; top-level keys are its numbers.
    assert [x["teacher"] for x in result["ranking"]][0] == task["compatible"]
    assert result["teacher"] == task["compatible"] and result["verdict"] == "distill"
    for r in (result, good, thinker, templated):
        assert set(RESULT_KEYS) <= set(r)
        assert r["self_check"]["passed"] and r["self_check_reverse_kl"] < 1e-5
        assert r["k"] == 8


def test_teacher_reading_its_own_template_is_fine(task):
    result = run_probe(load_config(ProbeConfig, None, [
        f"student={task['student']}", f"teacher={task['templated']}", f"prompts={task['prompts']}",
        "data.limit=20", "teacher.chat_template=own", *PROBE_ARGS]))
    assert result["verdict"] == "distill", result["reasons"]
    assert result["template_alignment"]["configured"] == "own"


def _positions_logp(model, prompt, response):
    """Full-vocabulary log-probs (T, V) predicting each response token, one unpadded sequence."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(response)], -1)


def test_numbers_recompute_from_the_rollout_dump(task, ranked):
    result, by, dump = ranked
    good = by[task["compatible"]]
    student = load_causal_lm(task["student"], "float32").eval()
    teacher = load_causal_lm(task["compatible"], "float32").eval()
    rows = [r for r in dump if r["teacher"] == task["compatible"] and r["kind"] == "student"]
    assert len(rows) == 40  # 20 prompts x 2 samples
    kl_sum = t_logp_sum = tokens = 0.0
    for r in rows:
        log_p = _positions_logp(student, r["prompt_ids"], r["response_ids"])
        log_q = _positions_logp(teacher, r["teacher_prompt_ids"], r["response_ids"])
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        assert kl.tolist() == pytest.approx(r["token_reverse_kl"], abs=1e-4)
        kl_sum += float(kl.sum())
        t_logp_sum += float(log_q.gather(-1, torch.tensor(r["response_ids"])[:, None]).sum())
        tokens += len(r["response_ids"])
    assert good["reverse_kl"] == pytest.approx(kl_sum / tokens, rel=1e-4)
    assert good["reverse_kl_distribution"]["count"] == tokens
    assert good["teacher_logp_student_tokens"] == pytest.approx(t_logp_sum / tokens, rel=1e-4)
    graded = [r["correct"] for r in rows]
    assert good["accuracy"]["student"] == pytest.approx(sum(graded) / len(graded))
    own = [r for r in dump if r["teacher"] == task["compatible"] and r["kind"] == "teacher"]
    assert good["accuracy"]["teacher"] == pytest.approx(sum(r["correct"] for r in own) / len(own))


class ShiftedTeacher:
    """A teacher engine with an off-by-one bug: it scores the response shifted right by one token."""

    def __init__(self, inner):
        self.inner, self.head_logits, self.capabilities = inner, inner.head_logits, inner.capabilities

    def score(self, prompt_ids, response_ids, response_mask, **kw):
        shifted = torch.cat([response_ids[:, :1], response_ids[:, :-1]], 1)
        return self.inner.score(prompt_ids, shifted, response_mask, **kw)


@pytest.fixture(scope="module")
def teacher_rollout(task):
    model = load_causal_lm(task["compatible"], "float32").eval()
    tok = char_tokenizer(extra_tokens=["<think>", "</think>"])
    prompts = [render_prompt(tok, messages(n)) for n in NUMBERS[:8]]
    resp, mask, *_ = sample(model, prompts, max_new_tokens=12, eos_ids=[2], pad_id=2, seeds=list(range(8)))
    return model, prompts, resp, mask


@pytest.mark.parametrize("wrong", ["none", "shifted_by_one", "teacher_temperature_2"])
def test_self_check_passes_on_a_correct_setup_and_fails_loudly_on_a_wrong_one(teacher_rollout, wrong):
    model, prompts, resp, mask = teacher_rollout
    V = model.get_output_embeddings().weight.shape[0]
    engine = HFTeacher(model, vocab_size=V, pad_id=2, temperature=2.0 if wrong == "teacher_temperature_2" else 1.0)
    if wrong == "shifted_by_one":
        engine = ShiftedTeacher(engine)
    check = self_check(model, engine, prompts, resp, mask, pad_id=2, vocab_size=V, temperature=1.0, tolerance=1e-3)
    if wrong == "none":
        assert check.passed and check.reverse_kl < 1e-6 and check.sampled_logratio < 1e-5
        assert "passed" in check.message()
    else:
        # A trained model is peaked: a flattened or misaligned teacher is far away (≥ 0.1 nats/token).
        assert not check.passed and check.reverse_kl > 0.1
        assert check.message().startswith("SELF-CHECK FAILED")


def test_cli_fails_loudly_with_teacher_temperature_2(task, capsys):
    code = main(["probe", "--student", task["student"], "--teacher", task["compatible"], "--prompts",
                 task["prompts"], "--n-prompts", "8", "teacher.temperature=2", *PROBE_ARGS])
    assert code == 3
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["verdict"] == "fix_setup" and result["self_check_reverse_kl"] > 0.1
    assert "SELF-CHECK FAILED" in captured.err


def test_probe_config_file_and_errors(tmp_path, task, capsys):
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(f"student: {task['student']}\nteacher: {task['compatible']}\ndata: {{train: {task['prompts']}, "
                   f"limit: 4}}\nthresholds: {{min_overlap_ratio: 0.5}}\n")
    loaded = load_config(ProbeConfig, cfg, ["k=4", "teacher.temperature=0.5"])
    assert loaded.k == 4 and loaded.thresholds.min_overlap_ratio == 0.5 and loaded.teacher_list == [task["compatible"]]
    assert loaded.data.limit == 4 and loaded.teacher.temperature == 0.5  # "teacher: PATH" is teacher.path: PATH
    # The flat keys of the first probe config still load, each as its key in the shared vocabulary.
    old = tmp_path / "old.yaml"
    old.write_text(f"student: {task['student']}\nteacher: {task['compatible']}\nprompts: {task['prompts']}\n"
                   "n_prompts: 4\nteacher_temperature: 0.5\nmax_new_tokens: 8\nstudent_dtype: float32\n")
    with pytest.warns(FutureWarning) as caught:
        legacy = load_config(ProbeConfig, old)
    assert sorted(str(w.message).split("'")[1] for w in caught) == [
        "max_new_tokens", "n_prompts", "prompts", "student_dtype", "teacher_temperature"]
    assert "use 'data.limit'" in next(str(w.message) for w in caught if "'n_prompts'" in str(w.message))
    assert (legacy.data.train, legacy.data.limit, legacy.teacher.temperature, legacy.rollout.max_new_tokens,
            legacy.student.dtype) == (task["prompts"], 4, 0.5, 8, "float32")
    assert main(["probe", "--config", str(cfg), "thresholds.min_overlap=1"]) == 2
    assert "unknown config key 'thresholds.min_overlap'" in capsys.readouterr().err
    assert main(["probe", "--student", task["student"], "--prompts", task["prompts"]]) == 2
    assert "give a teacher" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Pure pieces, on hand-built inputs
# --------------------------------------------------------------------------------------------------


def test_distribution_by_hand():
    d = distribution(torch.tensor([0.0, 0.5, 1.0, 2.0, 6.0]))
    assert d["count"] == 5 and d["mean"] == pytest.approx(1.9) and d["max"] == 6.0
    assert d["p50"] == pytest.approx(1.0)  # the middle value
    assert d["p25"] == pytest.approx(0.5)  # linear interpolation at rank 0.25 * 4 = 1
    # strictly above: 0.5 -> {1, 2, 6}; 1.0 -> {2, 6}; 5.0 -> {6}
    assert d["frac_above"]["0.5"] == pytest.approx(0.6) and d["frac_above"]["1.0"] == pytest.approx(0.4)
    assert d["frac_above"]["5.0"] == pytest.approx(0.2)


def test_capability_is_pass_at_n_per_prompt():
    # prompt 0: student 0/2, teacher 1/2 -> teacher only; prompt 1: both solve; prompt 2: student only;
    # prompt 3: no answer (None) -> not graded.
    student = [0.0, 0.0, 1.0, 0.0, 1.0, 1.0, None, None]
    teacher = [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, None, None]
    index = [0, 0, 1, 1, 2, 2, 3, 3]
    c = capability(student, index, teacher, index)
    assert c["graded_prompts"] == 3
    assert c["student"] == pytest.approx(3 / 6) and c["teacher"] == pytest.approx(3 / 6)
    assert c["new_capability_share"] == pytest.approx(1 / 3) and c["student_only_share"] == pytest.approx(1 / 3)
    assert capability([None], [0], [None], [0]) is None


def _numbers(**over):
    """A probe result that passes every check; tests change one number at a time."""
    r = {"k": 16, "reverse_kl": 1.0, "overlap_ratio": 0.72, "overlap_mass_student": 0.98,
         "overlap_mass_teacher": 0.97,
         "self_check": {"passed": True, "reverse_kl": 0.0, "message": "ok"},
         "eos": {"student_eos_is_teacher_eos": True, "student_eos_tokens": ["<e>"], "teacher_eos_tokens": ["<e>"],
                 "teacher_logp_student_eos_at_teacher_end": -0.1},
         "template_alignment": None,
         "compatibility": {"thinking": {"student_rollouts_with_think": 0.0, "teacher_rollouts_with_think": 0.0}},
         "accuracy": {"graded_prompts": 32, "student": 0.2, "teacher": 0.6, "new_capability_share": 0.45}}
    r.update(over)
    return r


def _long(length, first, last):
    """Long student responses whose first/last-quarter overlap is ``first``/``last``."""
    return _numbers(rollouts={"student": {"len_mean": length}},
                    by_position={"pos_q1": {"overlap_ratio": first}, "pos_q4": {"overlap_ratio": last}})


def test_prune_advice_only_for_long_responses_whose_overlap_falls():
    drifting = decide(_long(300, 0.80, 0.62), ProbeThresholds())["recipe"]
    assert any("objective.prune=truncate with objective.prune_threshold=0.71" in step for step in drifting)
    for flat in (_long(300, 0.71, 0.72), _long(100, 0.80, 0.62), _numbers()):  # flat, short, no profile
        out = decide(flat, ProbeThresholds())
        assert not any("objective.prune=" in step and "truncate" in step for step in out["recipe"]), out["recipe"]
    assert not any("Prune-OPD" in r or "prune" in r for r in decide(_long(100, 0.8, 0.6), ProbeThresholds())["reasons"])


def _template(better, shift, own_accuracy=0.5):
    rendering = {"accuracy": 0.5, "ended": 1.0, "teacher_logp_own_tokens": -0.5}
    return {"configured": "student", "better": better, "shift_reverse_kl": shift,
            "renderings": {"student": rendering, "own": {**rendering, "accuracy": own_accuracy}}}


@pytest.mark.parametrize("numbers, verdict, phrase", [
    (_numbers(), "distill", "teacher solves 45%"),
    (_numbers(tokenizer_error="different tokenizers"), "incompatible_tokenizer", "incompatible"),
    (_numbers(self_check={"passed": False, "reverse_kl": 0.4, "message": "SELF-CHECK FAILED"}), "fix_setup",
     "SELF-CHECK FAILED"),
    (_numbers(template_alignment=_template("own", 0.3)), "align_template", "teacher.chat_template=own"),
    (_numbers(template_alignment=_template("own", 0.05)), "distill", "too small to act on"),  # 5% of the KL
    (_numbers(template_alignment=_template("own", 0.05, own_accuracy=0.7)), "align_template",
     "accuracy 0.70 vs 0.50"),  # a small shift, but the other rendering makes the teacher 20 points better
    (_numbers(template_alignment=_template("student", 0.5)), "distill", "suits it best"),
    (_numbers(eos={"student_eos_is_teacher_eos": False, "student_eos_tokens": ["<|endoftext|>"],
                   "teacher_eos_tokens": ["<|im_end|>"], "teacher_logp_student_eos_at_teacher_end": -12.0}),
     "align_template", "ends turns with"),
    (_numbers(overlap_ratio=0.45, overlap_mass_student=0.6), "cold_start", "overlap 0.45 < 0.6"),
    (_numbers(overlap_mass_student=0.6), "cold_start", "holds 0.60 of the student's"),
    # peaked models: a low slot-count overlap, but the shared tokens carry the mass -> not a mismatch
    (_numbers(overlap_ratio=0.45), "distill", "disagree only on low-probability tokens"),
    (_numbers(compatibility={"thinking": {"student_rollouts_with_think": 0.0, "teacher_rollouts_with_think": 0.9}}),
     "cold_start", "thinking pattern differs"),
    (_numbers(accuracy={"graded_prompts": 32, "student": 0.5, "teacher": 0.5, "new_capability_share": 0.03}),
     "change_teacher", "no new capability"),
    (_numbers(accuracy={"graded_prompts": 4, "student": 0.0, "teacher": 0.0, "new_capability_share": 0.0}),
     "distill", "capability not judged"),
    (_numbers(accuracy=None), "distill", "no answers"),
    (_numbers(vopd_second_moment_ratio=0.45), "distill", "by 0.45 on these rollouts (< 0.8)"),
    (_numbers(vopd_second_moment_ratio=1.7), "distill", "by 1.70 on these rollouts; keep objective.baseline=none"),
    (_long(300, 0.80, 0.62), "distill", "the overlap falls by 0.18 (≥ 0.05)"),
    (_long(300, 0.71, 0.72), "distill", "it does not fall along the response"),
])
def test_decide_by_hand(numbers, verdict, phrase):
    out = decide(numbers, ProbeThresholds())
    assert out["verdict"] == verdict
    assert any(phrase in r for r in out["reasons"]), out["reasons"]
    last = {"distill": "distil:", "cold_start": "distil:", "align_template": "probe again with the aligned",
            "change_teacher": "another teacher", "fix_setup": "fix the scoring setup",
            "incompatible_tokenizer": "shares the student's tokenizer"}[verdict]
    assert last in out["recipe"][-1], out["recipe"]


def test_decide_lists_every_issue_and_rank_orders_by_the_worst():
    both = decide(_numbers(overlap_ratio=0.3, overlap_mass_teacher=0.5, accuracy={"graded_prompts": 32, "student": 0.5, "teacher": 0.5,
                                                        "new_capability_share": 0.0}), ProbeThresholds())
    assert both["verdict"] == "cold_start" and both["issues"] == ["cold_start", "change_teacher"]
    results = [
        {"teacher": "useless", **_numbers(), **both},
        {"teacher": "mismatched", **_numbers(overlap_ratio=0.4, overlap_mass_student=0.5),
         **decide(_numbers(overlap_ratio=0.4, overlap_mass_student=0.5), ProbeThresholds())},
        {"teacher": "strong", **_numbers(accuracy={"graded_prompts": 32, "student": 0.1, "teacher": 0.9,
                                                    "new_capability_share": 0.8}), "verdict": "distill",
         "issues": []},
        {"teacher": "good", **_numbers(), **decide(_numbers(), ProbeThresholds())},
    ]
    assert [r["teacher"] for r in rank(results)] == ["strong", "good", "mismatched", "useless"]
    assert math.isfinite(rank(results)[0]["overlap_ratio"])


def test_a_misaligned_template_makes_later_findings_provisional():
    out = decide(_numbers(template_alignment=_template("own", 0.5), overlap_ratio=0.3, overlap_mass_student=0.4),
                 ProbeThresholds())
    assert out["verdict"] == "align_template" and out["issues"] == ["align_template"]
    assert any(r.startswith("(with the misaligned template) initial top-16 overlap 0.30") for r in out["reasons"])


def test_print_result_shows_undefined_numbers_as_na(capsys):
    from opdkit.probe import print_result

    r = _numbers(accuracy={"graded_prompts": 32, "student": 0.0, "teacher": 0.3, "new_capability_share": 0.3,
                           "reward_auroc": None})  # AUROC is undefined when no student rollout is correct
    r.update(decide(r, ProbeThresholds()), teacher="T", student="S", self_check_reverse_kl=0.0)
    print_result(r)
    err = capsys.readouterr().err
    assert "accuracy/reward_auroc" in err and "n/a" in err and "verdict: distill" in err
