"""Engine plumbing that needs no vLLM: log-prob records -> tensors, the served-teacher client against a local
OpenAI-style HTTP server (batching, retries with backoff, timeouts, identity checks), capability errors,
routed teachers and their per-teacher metrics."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from opdkit.config import ConfigError, DistillConfig, ObjectiveConfig, TeacherConfig, load_config
from opdkit.data import render_prompt
from opdkit.engines.logprobs import EngineOutputError, assemble_rollout, scores_from_prompt_logprobs, top_ids
from opdkit.engines.routing import route_metrics
from opdkit.engines.server import ServerError, ServerTeacher
from opdkit.objectives import check_teacher_supports
from opdkit.models import TokenizerMismatchError, load_causal_lm
from opdkit.engines.hf_teacher import HFTeacher
from opdkit.tiny import save_tiny, tiny_llama
from opdkit.train import Distiller
from tests.conftest import tiny_overrides, write_jsonl

# -- log-prob records -> tensors ---------------------------------------------------------------------------


def test_top_ids_orders_by_rank_and_skips_the_sampled_token_outside_the_top_k():
    entry = {7: (-5.0, 9), 3: (-0.5, 1), 4: (-1.0, 2), 5: (-1.5, 3)}  # 7 was scored but is rank 9
    assert top_ids(entry, 3, "x") == [3, 4, 5]
    assert top_ids(entry, 2, "x") == [3, 4]
    with pytest.raises(EngineOutputError, match="returned 3 top-k entries, expected 4"):
        top_ids(entry, 4, "x")


def test_scores_from_prompt_logprobs_places_values_at_valid_positions():
    response = torch.tensor([[5, 3, 2], [4, 2, 2]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    entries = [
        [{5: (-2.0, 4), 3: (-0.1, 1), 4: (-0.2, 2)}, {3: (-0.3, 1), 4: (-0.9, 2)}, {2: (-0.05, 1), 9: (-3.0, 2)}],
        [{4: (-0.7, 2), 6: (-0.6, 1)}, {2: (-0.4, 1), 3: (-1.1, 2)}],
    ]
    s = scores_from_prompt_logprobs(entries, response, mask, 2, vocab_size=10)
    torch.testing.assert_close(s.sampled_logp, torch.tensor([[-2.0, -0.3, -0.05], [-0.7, -0.4, 0.0]]))
    assert s.topk_ids.tolist() == [[[3, 4], [3, 4], [2, 9]], [[6, 4], [2, 3], [0, 0]]]
    assert s.topk_logp[0, 2].tolist() == pytest.approx([-0.05, -3.0])
    assert s.logp_at_student_topk is None and s.entropy is None and s.hidden is None
    with pytest.raises(EngineOutputError, match="beyond the 9 ids it shares"):
        scores_from_prompt_logprobs(entries, response, mask, 2, vocab_size=9)
    with pytest.raises(EngineOutputError, match="row 1 has 2 response tokens but 1"):
        scores_from_prompt_logprobs([entries[0], entries[1][:1]], response, mask, 2, vocab_size=10)


def test_assemble_rollout_masks_to_the_first_eos_and_flags_truncation():
    # pad == eos == 2: masks must come from lengths, not from id == pad
    outputs = [([5, 2], [{5: (-1.0, 1), 6: (-2.0, 2)}, {2: (-0.5, 1), 5: (-3.0, 2)}]),
               ([6, 7, 8], [{6: (-0.2, 1), 5: (-2.5, 2)}, {7: (-0.3, 1), 5: (-1.5, 2)}, {8: (-4.0, 3), 5: (-0.1, 1),
                                                                                          6: (-0.2, 2)}])]
    r = assemble_rollout([[1, 9], [1, 9]], outputs, eos_ids=[2], pad_id=2, topk=2, example_index=[0, 0],
                         group_size=2)
    assert r.response_ids.tolist() == [[5, 2, 2], [6, 7, 8]]
    assert r.response_mask.tolist() == [[True, True, False], [True, True, True]]
    assert r.truncated.tolist() == [False, True]
    torch.testing.assert_close(r.sampling_logp, torch.tensor([[-1.0, -0.5, 0.0], [-0.2, -0.3, -4.0]]))
    assert r.topk_ids[1, 2].tolist() == [5, 6]
    with pytest.raises(EngineOutputError, match="after an EOS"):
        assemble_rollout([[1]], [([2, 5], [{2: (0.0, 1)}, {5: (0.0, 1)}])], eos_ids=[2], pad_id=2, topk=0,
                         example_index=[0], group_size=1)


# -- which objectives a teacher engine supports ----------------------------------------------------------

SERVED = frozenset({"sampled", "topk"})


def test_served_teacher_refuses_objectives_it_cannot_feed_and_lists_the_available_ones():
    with pytest.raises(ValueError) as e:
        check_teacher_supports(ObjectiveConfig(name="topk", strategy="student"), SERVED, "server")
    msg = str(e.value)
    assert "objective.name=topk with objective.strategy=student needs the teacher's log-probs at the student's " \
           "top-k ids, which teacher.engine=server cannot provide" in msg
    assert msg.endswith("Available with teacher.engine=server: sampled, topk with objective.strategy=teacher, "
                        "teacher_topk_forward_kl")
    with pytest.raises(ValueError, match="reverse_kl needs the teacher's hidden states"):
        check_teacher_supports(ObjectiveConfig(name="reverse_kl"), SERVED, "vllm")
    for ok in (ObjectiveConfig(name="sampled"), ObjectiveConfig(name="topk", strategy="teacher"),
               ObjectiveConfig(name="teacher_topk_forward_kl")):
        check_teacher_supports(ok, SERVED, "server")
    # a local HF teacher can feed everything
    full = frozenset({"sampled", "topk", "at_ids", "entropy", "hidden"})
    for name in ("sampled", "topk", "reverse_kl", "forward_kl", "jsd", "teacher_topk_forward_kl"):
        check_teacher_supports(ObjectiveConfig(name=name), full, "hf")



def test_every_engine_declares_its_interface_and_inherits_the_optional_defaults(tokenizer):
    from opdkit.engines.base import RolloutEngine, Teacher
    from opdkit.engines.hf_rollout import GatheredRolloutEngine, HFRolloutEngine
    from opdkit.engines.routing import RoutedTeacher
    from opdkit.engines.vllm_engine import VLLMRolloutEngine, VLLMTeacher

    # subclassed explicitly (the protocols are not runtime-checkable: their mro says so)
    assert all(RolloutEngine in c.__mro__ for c in (HFRolloutEngine, GatheredRolloutEngine, VLLMRolloutEngine))
    assert all(Teacher in c.__mro__ for c in (HFTeacher, ServerTeacher, VLLMTeacher, RoutedTeacher))
    model = tiny_llama(len(tokenizer), seed=0)
    teacher, engine = HFTeacher(model, vocab_size=len(tokenizer), pad_id=2), HFRolloutEngine(
        model, eos_ids=[2], pad_id=2, sampling_dtype=torch.float32)
    # the trainer calls the optional methods on every engine: the defaults do nothing
    assert teacher.check_sources(["a"], [0], "x") is None and engine.last_sync is None
    assert teacher.metrics(["a"], torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2), torch.zeros(1, 2)) == {}
    with pytest.raises(NotImplementedError, match="ServerTeacher returns no hidden states"):
        Teacher.head_logits(ServerTeacher.__new__(ServerTeacher), torch.zeros(1, 4))
    assert RoutedTeacher.check_sources is not Teacher.check_sources and RoutedTeacher.metrics is not Teacher.metrics


def test_engine_configs_are_validated(tiny_dirs, prompts_file, tmp_path):
    base = tiny_overrides(tiny_dirs, prompts_file, tmp_path)
    with pytest.raises(ConfigError, match="teacher.temperature=2.0 with teacher.engine=server"):
        load_config(DistillConfig, None, base + ["teacher.engine=server", "teacher.url=http://127.0.0.1:1/v1",
                                                  "teacher.temperature=2.0"])
    with pytest.raises(ConfigError, match="teacher.route.code: engine server needs url"):
        load_config(DistillConfig, None, base + ["teacher.route={code: {engine: server}}"])
    with pytest.raises(ConfigError, match="unknown config key 'teacher.route.code.pth'"):
        load_config(DistillConfig, None, base + ["teacher.route={code: {pth: x}}"])
    with pytest.raises(ConfigError, match="needs teacher.chat_template=student"):
        load_config(DistillConfig, None, base + [f"teacher.route={{a: {tiny_dirs['teacher']}}}",
                                                  "teacher.chat_template=own"])
    with pytest.raises(ConfigError, match="teacher.concurrency must be > 0"):
        load_config(DistillConfig, None, base + ["teacher.concurrency=0"])


# -- the served-teacher client against a local OpenAI-style server ------------------------------------------


def fake_logprob(position: int, token: int) -> float:
    return -0.1 * ((token + position) % 10) - 1.0


def fake_prompt_logprobs(ids: list[int], k: int) -> list:
    """vLLM's prompt_logprobs of one sequence: ``fake_logprob`` at each token, ids 3..3+k-1 as the top-k."""
    rows = [None]
    for j in range(1, len(ids)):
        top = {str(3 + r): {"logprob": -0.01 * (r + 1), "rank": r + 1} for r in range(k)}
        top.setdefault(str(ids[j]), {"logprob": fake_logprob(j, ids[j]), "rank": k + 5})
        rows.append(top)
    return rows


class FakeTeacherServer:
    """Speaks the part of vLLM's OpenAI API the client uses; prompt log-probs come from ``logprobs(ids, k)``
    (``fake_prompt_logprobs`` unless a test sets another) for each sequence on its own. Can fail, stall, or lie
    about itself; ``on_completion(prompts)``, if set, sees each scoring request as it arrives."""

    def __init__(self, tokenizer, model="fake-teacher"):
        self.tokenizer, self.model = tokenizer, model
        self.fail_next, self.delay, self.tokenize_shift = 0, 0.0, 0
        self.batch_sizes: list[int] = []
        self.logprobs, self.on_completion = fake_prompt_logprobs, None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, {"data": [{"id": server.model}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if self.path == "/tokenize":
                    ids = server.tokenizer(req["prompt"], add_special_tokens=False)["input_ids"]
                    return self._send(200, {"tokens": [i + server.tokenize_shift for i in ids]})
                if server.on_completion is not None:
                    server.on_completion(req["prompt"])
                if server.fail_next:
                    server.fail_next -= 1
                    return self._send(503, {"error": "overloaded"})
                time.sleep(server.delay)
                if req["prompt_logprobs"] > 5:
                    return self._send(400, {"error": "requested prompt_logprobs exceeds max logprobs (5)"})
                server.batch_sizes.append(len(req["prompt"]))
                choices = [{"index": n, "text": "", "prompt_logprobs": server.logprobs(ids, req["prompt_logprobs"])}
                           for n, ids in enumerate(req["prompt"])]
                self._send(200, {"choices": choices[::-1]})  # order must come from "index"

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def fake_server(tokenizer):
    server = FakeTeacherServer(tokenizer)
    yield server
    server.close()


def served(url, tokenizer, **kw) -> ServerTeacher:
    teacher = ServerTeacher(TeacherConfig(engine="server", url=url, **kw), tokenizer=tokenizer, vocab_size=100)
    teacher.backoff = 0.01
    return teacher


def _batch(tokenizer):
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("a", "bb", "ccc", "d", "ee")]
    response = torch.tensor([[10, 11, 2], [12, 2, 2], [13, 14, 15], [16, 2, 2], [17, 18, 2]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return prompts, response, mask


def test_server_teacher_batches_requests_and_reads_prompt_logprobs(fake_server, tokenizer):
    teacher = served(fake_server.url, tokenizer, request_batch_size=2, concurrency=2)
    assert teacher.model == "fake-teacher"
    prompts, response, mask = _batch(tokenizer)
    s = teacher.score(prompts, response, mask, k=3)
    assert sorted(fake_server.batch_sizes) == [1, 2, 2]
    for i, p in enumerate(prompts):
        for t in range(int(mask[i].sum())):
            assert float(s.sampled_logp[i, t]) == pytest.approx(fake_logprob(len(p) + t, int(response[i, t])))
    assert s.sampled_logp[1, 2] == 0 and not s.topk_ids[1, 2].any()
    assert s.topk_ids[0, 0].tolist() == [3, 4, 5]
    assert s.topk_logp[0, 0].tolist() == pytest.approx([-0.01, -0.02, -0.03])


def test_server_teacher_retries_with_backoff_then_fails_clearly(fake_server, tokenizer):
    teacher = served(fake_server.url, tokenizer, max_retries=3)
    prompts, response, mask = _batch(tokenizer)
    fake_server.fail_next = 2  # two 503s, then success
    start = time.perf_counter()
    teacher.score(prompts[:1], response[:1], mask[:1], k=2)
    assert time.perf_counter() - start >= 0.01 + 0.02  # backoff 0.01 s, then 0.02 s
    assert fake_server.fail_next == 0
    fake_server.fail_next = 10
    with pytest.raises(ServerError, match=r"failed 4 times \(teacher.max_retries=3.*HTTP 503"):
        teacher.score(prompts[:1], response[:1], mask[:1], k=2)


def test_server_teacher_times_out(fake_server, tokenizer):
    teacher = served(fake_server.url, tokenizer, max_retries=1, timeout=0.2)
    prompts, response, mask = _batch(tokenizer)
    fake_server.delay = 1.0
    with pytest.raises(ServerError, match="failed 2 times.*teacher.timeout=0.2s.*Timeout"):
        teacher.score(prompts[:1], response[:1], mask[:1], k=2)


def test_server_teacher_passes_on_request_errors_with_a_hint(fake_server, tokenizer):
    teacher = served(fake_server.url, tokenizer)
    prompts, response, mask = _batch(tokenizer)
    with pytest.raises(ServerError, match=r"HTTP 400.*exceeds max logprobs.*--max-logprobs >= objective.k"):
        teacher.score(prompts[:1], response[:1], mask[:1], k=8)


def test_server_teacher_refuses_a_wrong_model_or_tokenizer(fake_server, tokenizer):
    with pytest.raises(ServerError, match="teacher.served_model='other' is not served by .* it serves: fake-teacher"):
        served(fake_server.url, tokenizer, served_model="other")
    fake_server.tokenize_shift = 1
    with pytest.raises(TokenizerMismatchError, match="tokenizes differently from the student.*first difference at "
                                                     "position 0"):
        served(fake_server.url, tokenizer)


def test_server_teacher_fails_clearly_when_nothing_listens(tokenizer):
    with pytest.raises(ServerError, match="failed 2 times.*ConnectionError"):
        served("http://127.0.0.1:9/v1", tokenizer, max_retries=1)


# -- routed teachers -----------------------------------------------------------------------------------------


def test_route_metrics_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    student = torch.tensor([[-1.0, -2.0, 9.0], [-1.0, -1.0, -1.0], [-3.0, 9.0, 9.0]])
    teacher = torch.tensor([[-2.0, -2.0, 0.0], [-1.5, -1.5, -1.5], [-1.0, 0.0, 0.0]])
    m = route_metrics(["math", "code/py", "math"], mask, student, teacher)
    assert m["teacher/math/token_frac"] == pytest.approx(3 / 6)
    assert m["teacher/code_py/token_frac"] == pytest.approx(3 / 6)
    assert m["teacher/math/reverse_kl"] == pytest.approx((1.0 + 0.0 - 2.0) / 3)
    assert m["teacher/code_py/reverse_kl"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def routed_dirs(tmp_path_factory, tokenizer, tiny_dirs):
    root = tmp_path_factory.mktemp("routed")
    save_tiny(tiny_llama(len(tokenizer), seed=7), tokenizer, root / "chat_teacher")
    rows = [{"prompt": f"What is {a}+{a}?", "answer": str(2 * a), "data_source": "math" if a % 3 else "chat"}
            for a in range(12)]
    return {**tiny_dirs, "chat_teacher": root / "chat_teacher",
            "prompts": write_jsonl(root / "prompts.jsonl", rows)}


def test_routed_teachers_score_each_row_with_its_own_teacher_and_log_per_teacher_metrics(routed_dirs, tmp_path):
    d = routed_dirs
    cfg = load_config(DistillConfig, None, tiny_overrides(d, d["prompts"], tmp_path / "run", **{
        "teacher.route": f"{{math: {d['teacher']}, chat: {{path: {d['chat_teacher']}, chunk_size: 7}}}}",
        "eval.prompts": 0, "run.steps": 2}))
    dist = Distiller(cfg)
    assert dist.teacher.teachers["chat"].chunk_size == 7
    ro = dist.rollout(list(range(4)), seed=1)
    sources = [dist.train_set[i].source for i in ro.example_index]
    assert set(sources) == {"math", "chat"}
    got = dist.score(ro)
    for value, path in (("math", d["teacher"]), ("chat", d["chat_teacher"])):
        ref = HFTeacher(load_causal_lm(path, cfg.teacher.dtype), vocab_size=dist.vocab_size, pad_id=dist.pad_id).score(
            ro.prompt_ids, ro.response_ids, ro.response_mask, k=dist.k, student_topk_ids=ro.topk_ids)
        rows = torch.tensor([s == value for s in sources])
        torch.testing.assert_close(got.sampled_logp[rows], ref.sampled_logp[rows])
        torch.testing.assert_close(got.logp_at_student_topk[rows], ref.logp_at_student_topk[rows])
    summary = dist.run()
    assert summary["steps"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in rows:
        fracs = {k: v for k, v in m.items() if k.endswith("/token_frac")}
        assert sum(fracs.values()) == pytest.approx(1.0)
        # the token-weighted per-teacher reverse KLs add up to the step's reverse KL
        total = sum(v * m[k.replace("token_frac", "reverse_kl")] for k, v in fracs.items())
        assert total == pytest.approx(m["opd/reverse_kl"], abs=1e-5)


def test_a_row_without_a_teacher_is_refused_before_training(routed_dirs, tmp_path):
    d = routed_dirs
    cfg = load_config(DistillConfig, None, tiny_overrides(d, d["prompts"], tmp_path / "run", **{
        "teacher.route": f"{{math: {d['teacher']}}}", "eval.prompts": 0}))
    with pytest.raises(ValueError, match=r"prompts.jsonl row 1 has data_source='chat', which has no teacher: "
                                         r"teacher.route has teachers for 'math'"):
        Distiller(cfg)


@pytest.mark.parametrize("name,overrides", [
    ("scale-out.yaml", ["teacher.url=http://teacher-host:8000/v1"]),
    ("multi-teacher.yaml", ["teacher.route.code.url=http://10.0.0.7:8000/v1"]),
])
def test_example_configs_load(name, overrides):
    from pathlib import Path

    import opdkit

    path = Path(opdkit.__file__).parent / "configs" / name
    cfg = load_config(DistillConfig, path, ["student.path=/models/s", "data.train=d.parquet", *overrides])
    if cfg.teacher.route:
        from opdkit.engines.routing import route_teacher_configs

        routes = route_teacher_configs(cfg)
        assert routes["code"].url == "http://10.0.0.7:8000/v1" and routes["code"].engine == "server"
        assert routes["math"].path == "/models/math-teacher" and routes["math"].engine == "hf"
    else:
        assert cfg.teacher.engine == "server" and cfg.rollout.engine == "vllm"
