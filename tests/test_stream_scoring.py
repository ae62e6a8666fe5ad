"""Teacher scoring overlapped with sampling (``teacher.stream_scoring``): the HF sampler reports each row as it
stops, the served teacher sends finished rows while the others still decode, and nothing the step computes
changes: the same samples, the same scores, the same losses, the same errors."""

from __future__ import annotations

import time

import pytest
import torch

from opdkit.config import ConfigError, DistillConfig, load_config
from opdkit.data import render_prompt
from opdkit.engines import hf_rollout
from opdkit.engines.hf_rollout import HFRolloutEngine, sample
from opdkit.engines.server import ServerError, busy_seconds
from opdkit.errors import InvalidInput
from opdkit.tiny import save_tiny, tiny_llama
from opdkit.train import stream_scoring
from tests.conftest import tiny_distiller, tiny_overrides
from tests.test_engines import FakeTeacherServer, served

# Ids that end a response besides <|im_end|> (2): with them the tiny random models stop at many different steps.
EARLY_EOS = [2, *range(20, 30)]


@pytest.fixture()
def server(tokenizer):
    fake = FakeTeacherServer(tokenizer)
    yield fake
    fake.close()


def prompts(tokenizer, count: int) -> list[list[int]]:
    return [render_prompt(tokenizer, [{"role": "user", "content": f"What is {a}+{a + 1}?"}]) for a in range(count)]


def engine(tokenizer, seed: int = 0) -> HFRolloutEngine:
    return HFRolloutEngine(tiny_llama(len(tokenizer), seed=seed), eos_ids=EARLY_EOS, pad_id=2,
                           sampling_dtype=torch.float32)


def generate(eng: HFRolloutEngine, rows: list[list[int]], **kw):
    return eng.generate(rows, n=2, temperature=1.0, top_p=1.0, max_new_tokens=24, topk=4, seed=5, **kw)


# -- 1. the sampler's per-row notification ----------------------------------------------------------------

@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("interval", [1, 8], ids=["cpu-checks", "accelerator-checks"])
def test_each_row_is_reported_once_with_its_final_tokens_and_the_samples_do_not_change(
        tokenizer, monkeypatch, compact, interval):
    # interval 8 is how often the loop checks for finished rows on an accelerator: rows are reported late
    monkeypatch.setattr(hf_rollout, "check_interval", lambda device: interval)
    model = tiny_llama(len(tokenizer), seed=0).eval()
    rows = [p for p in prompts(tokenizer, 4) for _ in range(2)]
    kw = dict(max_new_tokens=14, eos_ids=EARLY_EOS, pad_id=2, topk=4, seeds=hf_rollout.row_seeds(5, 0, 8),
              compact=compact)
    plain = sample(model, rows, **kw)
    reports = []
    notified = sample(model, rows, **kw, on_finished=lambda r, x: reports.append((list(r), [list(y) for y in x])))
    for a, b in zip(plain, notified):
        assert torch.equal(a, b)
    response, mask = notified[0], notified[1]
    got = {row: tokens for rs, xs in reports for row, tokens in zip(rs, xs)}
    assert sorted(r for rs, _ in reports for r in rs) == list(range(8))  # every row, once
    for row in range(8):
        assert got[row] == response[row][mask[row]].tolist()
    lengths = mask.sum(-1)
    assert len(set(lengths.tolist())) >= 4 and bool(notified[4].any())  # rows end at many steps, some truncated
    if interval == 1:  # reported in the order they ended
        order = [r for rs, _ in reports for r in rs]
        assert [int(lengths[r]) for r in order] == sorted(int(lengths[r]) for r in order)
        assert len(reports) == len(set(lengths.tolist()))


# -- 2. the served teacher's stream ------------------------------------------------------------------------

def test_streamed_scores_equal_batch_scores_with_rows_in_finishing_order(server, tokenizer):
    teacher = served(server.url, tokenizer, request_batch_size=3, concurrency=2)
    eng = engine(tokenizer)
    rows = prompts(tokenizer, 4)
    finished = []
    seen = []
    server.on_completion = seen.append
    stream = teacher.stream([p for p in rows for _ in range(2)], k=3)

    def submit(r, x):
        finished.extend(r)
        stream.submit(r, x)

    ro = generate(eng, rows, on_finished=submit)
    streamed = stream.finish(ro.response_ids, ro.response_mask)
    assert len(set(ro.response_mask.sum(-1).tolist())) >= 4  # rows finished at different steps
    stream_requests, server.on_completion = list(seen), None
    batch = teacher.score(ro.prompt_ids, ro.response_ids, ro.response_mask, k=3)
    for f in ("sampled_logp", "topk_ids", "topk_logp", "logp_at_student_topk", "entropy", "hidden"):
        a, b = getattr(streamed, f), getattr(batch, f)
        assert (a is None and b is None) or torch.equal(a, b), f
    # 8 rows, 3 per request: two full requests as rows finished, the remainder at the end
    assert [len(r) for r in stream_requests] == [3, 3, 2]
    # grouped by finishing order: the first three rows to finish, the next three, the last two
    seqs = [tuple(ro.prompt_ids[i] + ro.response_ids[i][ro.response_mask[i]].tolist()) for i in finished]
    groups = {frozenset(seqs[a:b]) for a, b in ((0, 3), (3, 6), (6, 8))}
    assert {frozenset(map(tuple, r)) for r in stream_requests} == groups
    assert finished != sorted(finished)  # which is not row order
    assert streamed.sampled_logp[ro.response_mask].ne(0).all()
    assert 0 < stream.seconds


def test_requests_reach_the_server_while_other_rows_still_decode(server, tokenizer):
    teacher = served(server.url, tokenizer, request_batch_size=2, concurrency=2)
    eng = engine(tokenizer)
    steps = [0]

    def decode_step(module, args, kwargs):  # one forward per decode step; slow enough for a request to land
        steps[0] += 1
        time.sleep(0.02)

    eng.model.register_forward_pre_hook(decode_step, with_kwargs=True)
    arrivals, ends = [], []
    server.on_completion = lambda seqs: arrivals.append(steps[0])
    rows = prompts(tokenizer, 4)
    stream = teacher.stream([p for p in rows for _ in range(2)], k=3)

    def submit(r, x):
        ends.append(steps[0])
        stream.submit(r, x)

    ro = generate(eng, rows, on_finished=submit)
    stream.finish(ro.response_ids, ro.response_mask)
    assert len(arrivals) == 4
    assert arrivals[0] < ends[-1], (arrivals, ends)  # the first request came before the last row stopped
    assert sum(a < steps[0] for a in arrivals) >= 2


def test_server_errors_surface_from_finish_with_the_messages_of_score(server, tokenizer):
    teacher = served(server.url, tokenizer, request_batch_size=2, max_retries=1)
    ro = generate(engine(tokenizer), prompts(tokenizer, 2))
    rows = ro.prompt_ids

    def message(k: int, streamed: bool) -> str:
        with pytest.raises(ServerError) as e:
            if streamed:
                stream = teacher.stream(rows, k=k)
                stream.submit([0, 1], [ro.response_ids[i][ro.response_mask[i]].tolist() for i in (0, 1)])
                stream.finish(ro.response_ids, ro.response_mask)
            else:
                teacher.score(rows, ro.response_ids, ro.response_mask, k=k)
        return str(e.value)

    assert message(8, True) == message(8, False)  # the server refuses k > 5
    assert "--max-logprobs >= objective.k" in message(8, True)
    server.fail_next = 1000
    assert message(3, True) == message(3, False)
    assert "failed 2 times (teacher.max_retries=1" in message(3, True) and "HTTP 503" in message(3, True)
    with pytest.raises(InvalidInput, match="teacher.engine=server cannot return hidden states"):
        teacher.stream(rows, k=3, keep_hidden=True)


def test_a_stream_refuses_a_row_whose_final_tokens_are_not_those_it_sent(server, tokenizer):
    teacher = served(server.url, tokenizer, request_batch_size=4)
    response, mask = torch.tensor([[10, 11, 2], [12, 2, 2]]), torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    stream = teacher.stream([[5, 6], [5, 7]], k=2)
    stream.submit([1], [[12]])  # reported before it stopped: its final response is [12, 2]
    with pytest.raises(RuntimeError, match=r"rollout rows \[1\] were sent .* differ from their final ones"):
        stream.finish(response, mask)
    with pytest.raises(RuntimeError, match="row 0 was submitted for teacher scoring twice"):
        teacher.stream([[5, 6]], k=2).submit([0, 0], [[1], [1]])


def test_busy_seconds_is_the_union_of_the_request_spans():
    assert busy_seconds([]) == 0
    assert busy_seconds([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.2, 3.5)]) == pytest.approx(3.0)


# -- 3. the config key ---------------------------------------------------------------------------------------

def test_stream_scoring_is_on_where_it_applies_and_refused_where_it_cannot(tiny_dirs, prompts_file, tmp_path):
    def cfg(**extra):
        return load_config(DistillConfig, None, tiny_overrides(tiny_dirs, prompts_file, tmp_path, **extra))

    server = {"teacher.engine": "server", "teacher.url": "http://127.0.0.1:1/v1"}
    assert stream_scoring(cfg(**server)) is True
    assert stream_scoring(cfg(**server, **{"teacher.stream_scoring": False})) is False
    assert stream_scoring(cfg()) is False  # a local HF teacher scores whole rollouts
    assert stream_scoring(cfg(**server, **{"run.pipeline": "one_step_off"})) is False
    refused = [({}, "teacher.engine=hf scores whole rollouts"),
               ({**server, "run.pipeline": "one_step_off"}, "run.pipeline=one_step_off already overlaps"),
               ({**server, "rollout.engine": "vllm"}, "rollout.engine=vllm returns the rollout all at once"),
               ({"objective.prune": "truncate"}, "objective.prune=truncate scores the rows with its own teacher")]
    for extra, why in refused:
        with pytest.raises(ConfigError, match=f"teacher.stream_scoring=true cannot apply: .*{why}"):
            stream_scoring(cfg(**extra, **{"teacher.stream_scoring": True}))


# -- 4. a distill step: the same numbers with and without streaming ----------------------------------------

def hf_prompt_logprobs(model):
    """A fake server's ``logprobs``: the tiny HF teacher's prompt log-probs, each sequence scored on its own."""
    def logprobs(ids: list[int], k: int) -> list:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        rows = [None]
        for j in range(1, len(ids)):
            lp = logp[j - 1]
            top = lp.topk(k)
            entry = {str(int(i)): {"logprob": float(v), "rank": r + 1}
                     for r, (v, i) in enumerate(zip(top.values, top.indices))}
            entry.setdefault(str(ids[j]), {"logprob": float(lp[ids[j]]), "rank": int((lp > lp[ids[j]]).sum()) + 1})
            rows.append(entry)
        return rows
    return logprobs


@pytest.fixture(scope="module")
def early_stopping_dirs(tiny_dirs, tokenizer, tmp_path_factory):
    """The tiny student, saved with extra EOS ids so that its responses end at many different steps."""
    student = tiny_llama(len(tokenizer), seed=0)
    student.generation_config.eos_token_id = EARLY_EOS
    path = tmp_path_factory.mktemp("early") / "student"
    save_tiny(student, tokenizer, path)
    return {**tiny_dirs, "student": path}


def distill_steps(dirs, prompts_file, out, server, stream: bool, steps: int = 2):
    d = tiny_distiller(dirs, prompts_file, out, **{
        "teacher.engine": "server", "teacher.url": server.url, "teacher.request_batch_size": 3,
        "teacher.stream_scoring": stream, "objective.name": "topk", "objective.strategy": "teacher",
        "objective.k": 4, "rollout.max_new_tokens": 16})
    d.teacher.backoff = 0.01
    assert d.stream_scoring is stream
    return d, [d.opd_step(step) for step in range(1, steps + 1)]


def test_a_distill_step_is_bit_identical_with_stream_scoring_on_and_off(early_stopping_dirs, prompts_file,
                                                                        tmp_path, server):
    server.logprobs = hf_prompt_logprobs(tiny_llama(len(server.tokenizer), seed=1).eval())
    arrivals: list[float] = []
    server.on_completion = lambda seqs: arrivals.append(time.perf_counter())
    off, off_steps = distill_steps(early_stopping_dirs, prompts_file, tmp_path / "off", server, stream=False)
    on, on_steps = distill_steps(early_stopping_dirs, prompts_file, tmp_path / "on", server, stream=True)
    for (m_off, b_off), (m_on, b_on) in zip(off_steps, on_steps):
        assert len(set(b_on.rollout.response_mask.sum(-1).tolist())) >= 3  # rows end at different steps
        # every figure but the timings, NaN (an undefined AUROC) standing for itself
        numbers = lambda m: {k: "nan" if v != v else v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
        assert numbers(m_on) == numbers(m_off)
        assert torch.equal(b_on.scores.sampled_logp, b_off.scores.sampled_logp)
        for m in (m_on, m_off):
            assert m["time/step"] == pytest.approx(m["time/rollout"] + m["time/teacher_wait"] + m["time/train"])
            assert m["time/teacher"] > 0
        assert m_off["time/teacher"] == m_off["time/teacher_wait"]
    for a, b in zip(on.student.parameters(), off.student.parameters()):
        assert torch.equal(a, b)
    # the streamed run's requests: some arrived while its last rollout was still being sampled
    generate, ended = on.engine.generate, []
    on.engine.generate = lambda *a, **kw: (generate(*a, **kw), ended.append(time.perf_counter()))[0]
    arrivals.clear()
    on.opd_step(3)
    assert arrivals[0] < ended[0]


def test_a_failing_server_stops_a_streamed_step_with_the_message_of_a_batch_step(early_stopping_dirs, prompts_file,
                                                                                 tmp_path, server):
    messages = []
    for stream in (False, True):
        d = tiny_distiller(early_stopping_dirs, prompts_file, tmp_path / str(stream), **{
            "teacher.engine": "server", "teacher.url": server.url, "teacher.max_retries": 0,
            "teacher.stream_scoring": stream, "objective.name": "sampled", "objective.k": 4})
        server.fail_next = 1000
        with pytest.raises(ServerError) as e:
            d.opd_step(1)
        server.fail_next = 0
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "failed 1 times (teacher.max_retries=0" in messages[0]
