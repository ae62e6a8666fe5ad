"""The one-step-off pipeline (``run.pipeline: one_step_off``): the rollout of step t+1 is sampled on a worker
thread, from weights at most one optimizer step old, while step t is scored by the teacher and trained.

With ``sync`` (the default) there is no pipeline object at all and the step is today's sequential one. With
``one_step_off`` a step takes the rollout launched during the previous step, then launches the next one:

    step t:   wait for rollout t  ->  sync sampler if due  ->  launch rollout t+1  ->  score t, train t, update
    worker:                                                   [ rollout t+1 from weights after update t-1 ]

The sampling model is a copy that only the worker reads while a rollout is in flight, so the weight sync that
follows update t is *deferred* until rollout t+1 is done (``after_update`` marks it due; the next
``rollout_for`` or ``drain`` applies it). A step therefore trains on samples exactly one update old after the
first (logged as ``pipeline/staleness``); the sampling-vs-training log-prob mismatch (``rollout/logp_mismatch``)
and ``objective.is_correction=truncated`` read the rollout's recorded sampling log-probs, so they measure and
correct that staleness with no extra code.

Checkpoint consistency: the batch drawn for the in-flight rollout belongs to no trained step yet, so the
sampler the loop and checkpoints see (``AheadSampler``) reports the state *before* it; loading a state (the
loop's rewind on an interrupt, a resume) first drops the in-flight rollout and hands its batch back. Evaluation
and saving drain first (the sampling copy then holds the trained weights and nobody else uses it), keeping the
finished rollout for the next step, so a run with evaluations or saves samples exactly what one without does.
A resumed run redraws the in-flight batch (same prompts) but samples it from the checkpoint's weights.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

import torch

from .data import PromptSampler
from .engines.base import Rollout

__all__ = ["AheadSampler", "OneStepOff", "PIPELINES", "build_pipeline"]


class AheadSampler:
    """The prompt sampler as the loop and checkpoints see it: a batch drawn ahead for a rollout that no step has
    taken yet counts as not drawn (``state_dict`` is the state before it)."""

    def __init__(self, inner: PromptSampler, on_reset: Callable[[], None]):
        self.inner, self.on_reset = inner, on_reset
        self.before: dict | None = None  # the state before the batch drawn ahead, while it is untaken

    def draw_ahead(self) -> list[int]:
        self.before = self.inner.state_dict()
        return self.inner.next_batch()

    def take(self) -> None:
        """The batch drawn ahead now belongs to a step (the loop rewinds it if that step fails)."""
        self.before = None

    def give_back(self) -> None:
        if self.before is not None:
            self.inner.load_state_dict(self.before)
            self.before = None

    def next_batch(self) -> list[int]:
        return self.inner.next_batch()

    def state_dict(self) -> dict:
        return dict(self.before) if self.before is not None else self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.on_reset()  # a rollout in flight was drawn from the state being replaced
        self.inner.load_state_dict(state)


@dataclass
class InFlight:
    step: int
    version: int      # optimizer updates applied to the weights it is sampled from
    future: Future    # -> (Rollout, seconds the worker spent on it)


class OneStepOff:
    """Rollouts one step ahead on a worker thread with its own torch threads.

    ``sample(indices, step) -> Rollout`` runs on the worker; ``sync() -> metrics`` copies the trained weights
    into the sampling model and runs on the caller's thread, only while no rollout is in flight."""

    def __init__(self, sampler: PromptSampler, sample: Callable[[list[int], int], Rollout],
                 sync: Callable[[], dict], total_steps: int, threads: int):
        self.sampler = AheadSampler(sampler, on_reset=self._drop)
        self.sample, self.sync, self.total_steps = sample, sync, total_steps
        self.threads, self.main_threads = threads, torch.get_num_threads()
        self.version = self.sampling_version = 0
        self.sync_due = False
        self.inflight: InFlight | None = None
        self.pool: ThreadPoolExecutor | None = None

    # -- the step's side --------------------------------------------------------------------------------

    def rollout_for(self, step: int, metrics: dict) -> Rollout:
        """Step ``step``'s rollout (sampled ahead, or now on the first step), then launch step + 1's."""
        if self.inflight is not None and self.inflight.step != step:
            self._drop()  # steps run out of order (tests, a caller driving opd_step): start over
        if self.inflight is None:
            self._launch(step)
        job = self.inflight
        try:
            rollout, seconds = job.future.result()  # a worker error surfaces here, before this step's update
        except BaseException:
            self._drop()
            raise
        self.inflight = None
        self.sampler.take()
        # optimizer updates between the weights that sampled this batch and the weights it trains
        metrics["pipeline/staleness"] = float(self.version - job.version)
        metrics["time/rollout_worker"] = seconds  # the rollout's own time; time/rollout is the wait for it
        metrics.update(self._sync_if_due())
        if step < self.total_steps:
            self._launch(step + 1)  # overlaps this step's scoring and training
        return rollout

    def after_update(self) -> dict:
        """An update was applied: sync the sampling model now, or after the rollout in flight."""
        self.version += 1
        if self.inflight is not None:
            self.sync_due = True
            return {}
        return self._sync()

    def drain(self) -> None:
        """Before evaluation or a save: the in-flight rollout finished (its result kept), the sampler synced."""
        if self.inflight is not None:
            wait([self.inflight.future])  # its error, if any, is raised by the step that takes it
        self._sync_if_due()

    def close(self) -> None:
        """Hand the untrained in-flight batch back to the prompt sampler and stop the worker."""
        self._drop()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        torch.set_num_threads(self.main_threads)  # the worker's count is also torch's default for new threads

    # -- internals --------------------------------------------------------------------------------------

    def _launch(self, step: int) -> None:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="opdkit-rollout",
                                           initializer=torch.set_num_threads, initargs=(self.threads,))
        indices = self.sampler.draw_ahead()

        def job() -> tuple[Rollout, float]:
            start = time.perf_counter()
            return self.sample(indices, step), time.perf_counter() - start

        self.inflight = InFlight(step, self.sampling_version, self.pool.submit(job))

    def _drop(self) -> None:
        if self.inflight is not None:
            wait([self.inflight.future])  # a running torch op cannot be cancelled; its result is discarded
            self.inflight = None
            self.sampler.give_back()
        self._sync_if_due()

    def _sync_if_due(self) -> dict:
        return self._sync() if self.sync_due else {}

    def _sync(self) -> dict:
        out = self.sync()
        self.sampling_version, self.sync_due = self.version, False
        return out


def own_sampling_model(engine, student) -> None:
    """Give an HF engine that samples with the trained module itself (same dtype, no LoRA) a copy: the worker
    samples while the optimizer updates the student."""
    if getattr(engine, "model", None) is student:
        engine.model = copy.deepcopy(student).requires_grad_(False)


def one_step_off(d) -> OneStepOff:
    """The pipeline of a ``Distiller``."""
    from .train import step_seed

    own_sampling_model(d.engine, d.student)
    return OneStepOff(d.sampler, lambda indices, step: d.rollout(indices, step_seed(d.cfg.run.seed, step)),
                      d.sync_sampler, d.cfg.run.steps, d.cfg.run.rollout_threads or torch.get_num_threads())


# run.pipeline -> builder; sync has no pipeline: the step samples, scores and trains in sequence
PIPELINES: dict[str, Callable | None] = {"sync": None, "one_step_off": one_step_off}


def build_pipeline(d) -> OneStepOff | None:
    builder = PIPELINES[d.cfg.run.pipeline]
    return None if builder is None else builder(d)
