"""A teacher served by any OpenAI-compatible server that returns prompt log-probs, such as ``vllm serve``.

For each rollout row the client sends the student's token ids (prompt ids + response ids) as one token prompt
to ``POST {url}/completions`` with ``max_tokens=1`` and ``prompt_logprobs=k``, and reads, at every response
position, the log-prob of the student's token and the teacher's top-k. Rows are sent ``request_batch_size`` at
a time, ``concurrency`` requests in flight (``ServerStream``: as soon as that many rows finish sampling, with
``teacher.stream_scoring``); failed requests (connection errors, timeouts, HTTP 408/429/5xx)
are retried with exponential backoff, other HTTP errors fail at once with the server's message.

Before the first step the client checks that the server is the teacher it should be: the served model must be
listed by ``GET {url}/models``, and the server's ``/tokenize`` must turn a probe conversation (rendered with the
student's chat template) into exactly the student tokenizer's ids: scoring a student's token ids with a model
that reads them differently would train on garbage.

The served log-probs are vLLM's prompt log-probs: log softmax of the raw logits (``teacher.temperature`` must be
1) computed with the server's head dtype; start ``vllm serve`` with ``--hf-overrides '{"head_dtype":
"float32"}'`` to match the local teacher's fp32 head, and ``--max-logprobs`` >= ``objective.k`` if k > 20.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..data import render_prompt
from ..errors import InvalidInput, MissingDependency
from ..models import TokenizerMismatchError
from .base import Teacher, TeacherScores, TeacherStream
from .logprobs import EngineError, scores_from_prompt_logprobs, sequences_to_score
from .vllm_engine import check_served_temperature

log = logging.getLogger(__name__)

PROBE_MESSAGES = [{"role": "user", "content": "Probe: 17 + 25 = 42? Déjà vu, naïve café. 東京 ok."}]
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class ServerError(EngineError):
    """The teacher server failed, answered with an error, or is not the expected teacher."""


def api_roots(url: str) -> tuple[str, str]:
    """(OpenAI API base, server root): ``http://h:8000/v1`` -> (``http://h:8000/v1``, ``http://h:8000``)."""
    base = url.rstrip("/")
    root = base[:-3] if base.endswith("/v1") else base
    return base, root


def _field(body: dict, key: str, url: str):
    if key not in body:
        raise ServerError(f"teacher server {url} answered without '{key}' (keys: {', '.join(sorted(body)) or 'none'}): "
                          f"it must be an OpenAI-compatible server with prompt_logprobs and /tokenize, e.g. vllm serve")
    return body[key]


class ServerTeacher(Teacher):
    """Scores rollouts with a served teacher. Capabilities: sampled-token log-probs and the teacher's top-k."""

    capabilities = frozenset({"sampled", "topk"})

    def __init__(self, teacher_cfg, *, tokenizer, vocab_size: int, name: str = "teacher", session=None):
        try:
            import requests
        except ImportError:
            raise MissingDependency("teacher.engine=server needs requests: pip install 'opdkit[server]'") from None

        t = teacher_cfg
        check_served_temperature(t.temperature, "server")
        self.base, self.root = api_roots(t.url)
        self.timeout, self.max_retries = t.timeout, t.max_retries
        self.batch_size, self.concurrency = t.request_batch_size, t.concurrency
        self.vocab_size, self.name = vocab_size, name
        self.session = session or requests.Session()
        self.backoff = 0.5  # seconds before the first retry; doubles each time
        self.model = self._check_model(t.served_model)
        self._check_tokenizer(tokenizer)

    # -- HTTP --------------------------------------------------------------------------------------------

    def _request(self, method: str, url: str, payload: dict | None = None) -> dict:
        import requests

        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self.session.request(method, url, json=payload, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = f"{type(e).__name__}: {e}"
                log.warning("teacher server %s: %s (attempt %d of %d)", url, last, attempt + 1, self.max_retries + 1)
                continue
            if resp.status_code in RETRY_STATUS:
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                log.warning("teacher server %s: %s (attempt %d of %d)", url, last, attempt + 1, self.max_retries + 1)
                continue
            if resp.status_code != 200:
                raise ServerError(f"teacher server {url} answered HTTP {resp.status_code}: {resp.text[:500]}"
                                  + _hint(resp.text))
            try:
                body = resp.json()
            except ValueError:  # requests' JSONDecodeError is a ValueError
                raise ServerError(f"teacher server {url} answered HTTP 200 with a body that is not JSON "
                                  f"({resp.text[:200]!r}): teacher.url must be the OpenAI-compatible API of the "
                                  f"server, e.g. http://host:8000/v1 (vllm serve)") from None
            if not isinstance(body, dict):
                raise ServerError(f"teacher server {url} answered with JSON {type(body).__name__}, not an object: "
                                  f"is teacher.url an OpenAI-compatible API (e.g. vllm serve)?")
            return body
        raise ServerError(f"teacher server {url} failed {self.max_retries + 1} times (teacher.max_retries="
                          f"{self.max_retries}, teacher.timeout={self.timeout}s); last error: {last}")

    # -- identity checks -------------------------------------------------------------------------------

    def _check_model(self, wanted: str | None) -> str:
        listed = [m["id"] for m in self._request("GET", f"{self.base}/models").get("data", [])]
        if not listed:
            raise ServerError(f"teacher server {self.base} lists no models")
        if wanted is None:
            if len(listed) > 1:
                log.warning("teacher server %s serves %s; using %s (set teacher.served_model to choose)",
                            self.base, listed, listed[0])
            return listed[0]
        if wanted not in listed:
            raise ServerError(f"teacher.served_model={wanted!r} is not served by {self.base}; it serves: "
                              f"{', '.join(listed)}")
        return wanted

    def _check_tokenizer(self, tokenizer) -> None:
        text = tokenizer.decode(render_prompt(tokenizer, PROBE_MESSAGES))
        own = tokenizer(text, add_special_tokens=False)["input_ids"]
        served = self._request("POST", f"{self.root}/tokenize",
                               {"model": self.model, "prompt": text, "add_special_tokens": False})
        served = _field(served, "tokens", f"{self.root}/tokenize")
        if served != own:
            first = next((i for i, (a, b) in enumerate(zip(own, served)) if a != b), min(len(own), len(served)))
            raise TokenizerMismatchError(
                f"the served teacher {self.model!r} at {self.base} tokenizes differently from the student: on a "
                f"probe conversation the student's tokenizer gives {len(own)} ids and the server {len(served)}, "
                f"first difference at position {first} ({own[first:first + 4]} vs {served[first:first + 4]}). "
                f"The teacher scores the student's token ids, so both must share one tokenizer: serve a teacher "
                f"from the student's model family")

    # -- scoring -----------------------------------------------------------------------------------------

    def _score_batch(self, seqs: list[list[int]], k: int) -> list[list]:
        out = self._request("POST", f"{self.base}/completions",
                            {"model": self.model, "prompt": seqs, "max_tokens": 1, "temperature": 1.0,
                             "prompt_logprobs": k})
        choices = sorted(_field(out, "choices", f"{self.base}/completions"), key=lambda c: c.get("index", 0))
        if len(choices) != len(seqs) or any(c.get("prompt_logprobs") is None for c in choices):
            raise ServerError(f"teacher server {self.base} returned {len(choices)} choices for {len(seqs)} prompts "
                              f"or no prompt_logprobs: it must be an OpenAI-compatible server that supports "
                              f"prompt_logprobs (e.g. vllm serve)")
        return [c["prompt_logprobs"] for c in choices]

    def stream(self, prompt_ids: list[list[int]], *, k: int, keep_hidden: bool = False) -> "ServerStream":
        if keep_hidden:
            raise InvalidInput("teacher.engine=server cannot return hidden states (full-vocabulary objectives need "
                               "teacher.engine=hf)")
        return ServerStream(self, prompt_ids, k)

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor, *,
              k: int, student_topk_ids: torch.Tensor | None = None, keep_hidden: bool = False,
              sources: list[str] | None = None) -> TeacherScores:
        # every row unsubmitted: finish sends them in row order, request_batch_size at a time
        return self.stream(prompt_ids, k=k, keep_hidden=keep_hidden).finish(response_ids, response_mask)


class ServerStream(TeacherStream):
    """Rows of one rollout sent to the server as they finish sampling: a request as soon as
    ``request_batch_size`` finished rows wait (the rest in ``finish``), up to ``concurrency`` in flight, so the
    server scores while the student still decodes. Rows are grouped by finishing order instead of row order;
    each row's log-probs are the server's for that row alone, so the scores equal ``ServerTeacher.score``'s."""

    def __init__(self, teacher: ServerTeacher, prompt_ids: list[list[int]], k: int):
        self.teacher, self.prompt_ids, self.k = teacher, prompt_ids, k
        self.responses: dict[int, list[int]] = {}
        self.waiting: list[int] = []  # finished rows not sent yet
        self.sent: list[tuple[list[int], Future]] = []
        self.spans: list[tuple[float, float]] = []  # (start, end) of each answered request
        self.seconds = 0.0
        requests = -(-len(prompt_ids) // teacher.batch_size)
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(teacher.concurrency, requests)),
                                       thread_name_prefix="opdkit-teacher")

    def submit(self, rows: list[int], responses: list[list[int]]) -> None:
        for row, response in zip(rows, responses):
            if row in self.responses:
                raise RuntimeError(f"rollout row {row} was submitted for teacher scoring twice")
            self.responses[row] = list(response)
            self.waiting.append(row)
        while len(self.waiting) >= self.teacher.batch_size:
            self._send(self.teacher.batch_size)

    def _send(self, count: int) -> None:
        rows, self.waiting = self.waiting[:count], self.waiting[count:]
        seqs = [list(self.prompt_ids[r]) + self.responses[r] for r in rows]
        self.sent.append((rows, self.pool.submit(self._request, seqs)))

    def _request(self, seqs: list[list[int]]) -> list[list]:
        start = time.perf_counter()
        out = self.teacher._score_batch(seqs, self.k)
        self.spans.append((start, time.perf_counter()))
        return out

    @torch.no_grad()
    def finish(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> TeacherScores:
        seqs, lengths = sequences_to_score(self.prompt_ids, response_ids, response_mask)
        results: list = [None] * len(seqs)
        try:
            rest = [i for i in range(len(seqs)) if i not in self.responses]
            self.submit(rest, [seqs[i][len(self.prompt_ids[i]):] for i in rest])
            stale = [row for row, response in self.responses.items()
                     if list(self.prompt_ids[row]) + response != seqs[row]]
            if stale:
                raise RuntimeError(f"rollout rows {stale} were sent for teacher scoring with response tokens that "
                                   f"differ from their final ones: the sampler reported them before they stopped")
            while self.waiting:
                self._send(self.teacher.batch_size)
            for rows, future in self.sent:  # in the order sent: the first failed request raises
                for row, logprobs in zip(rows, future.result()):
                    results[row] = logprobs
        finally:
            self.close()
        start = time.perf_counter()
        entries = [[{int(tid): (float(v["logprob"]), int(v.get("rank") or 0)) for tid, v in pos.items()}
                    for pos in row[len(p):len(p) + n]]
                   for row, p, n in zip(results, self.prompt_ids, lengths)]
        scores = scores_from_prompt_logprobs(entries, response_ids, response_mask, self.k, self.teacher.vocab_size,
                                             f"teacher server {self.teacher.base}")
        self.seconds = busy_seconds(self.spans) + time.perf_counter() - start
        return scores

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time at least one request was in flight."""
    total, covered = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > covered:
            total += end - max(start, covered)
            covered = end
    return total


def _hint(text: str) -> str:
    if "logprobs" in text and ("max" in text or "exceed" in text):
        return " (start the server with --max-logprobs >= objective.k)"
    if "maximum context length" in text or "max_model_len" in text:
        return " (start the server with a larger --max-model-len)"
    return ""
