"""The one training loop of every recipe (OPD, GRPO, SFT): resume, step, NaN guard, eval cadence, checkpoints,
Ctrl-C/SIGTERM, final export.

A recipe (``Distiller``, ``SFTTrainer``) supplies a *step function*, ``forward_backward(step)``, which draws
the step's batch and accumulates gradients without touching the weights, and returns the step loss and a
``finish`` callback that computes the step's metrics once the update is applied. The loop applies the update
itself (``apply_update``), so the moment a step changes the weights, the optimizer and the schedule is one
place, and that is also where the step is recorded as complete (``recipe.completed``). The guarantees follow
from that single commit point:

* An interrupt (Ctrl-C, SIGTERM, any exception) *before* the commit leaves the weights untouched: the loop
  rewinds the data sampler and drops the gradients, so the step will be drawn again. One *after* the commit
  (weight sync, diagnostics, logging, evaluation, a periodic save) keeps the step: it is complete. Either way
  the checkpoint written on the way out is a step boundary, and a resumed run equals an uninterrupted one.
  Signals that arrive during the commit itself are held until it is recorded.
* Only finite weights are ever written: a step whose loss or gradient norm is not finite is skipped (weights
  unchanged, its loss logged as NaN); a step whose update leaves non-finite weights stops the run at once.
* Resume compares the new config with the saved one (``check_resume_config``), verifies checkpoints and falls
  back to the newest intact one, and refuses a checkpoint written for another model with a message naming it.

Simplifications: after an exception other than an interrupt, multi-process runs do not write a checkpoint (the
other ranks may be anywhere), and a skipped step still advances the sampler and the LR schedule.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import yaml

from .errors import UserError
from .checkpoint import checkpoints_newest_first, remove_partial_writes, verify_checkpoint
from .config import ConfigError, dump_yaml, upgrade_keys
from .fsdp import all_ranks_true, clip_grad_norm, local_shards
from .tracking import StepView, Tracker, console, format_metrics, read_metrics


def say(text: str) -> None:
    # One unbroken line per message: paths stay whole and logs stay greppable.
    console.print(text, soft_wrap=True, highlight=False)


class TrainingDiverged(UserError, RuntimeError):
    """The loss stopped being finite; the message says where and what to try."""


class Preempted(KeyboardInterrupt):
    """SIGTERM (what SLURM and Kubernetes send before preemption), handled like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# -- the update: the commit point of a step ----------------------------------------------------------------


def apply_update(params: list[torch.Tensor], optimizer, scheduler, loss: float, max_grad_norm: float) -> dict:
    """Clip, step the optimizer only if the loss and gradient norm are finite, drop the grads, advance the LR."""
    grad_norm = clip_grad_norm(params, max_grad_norm or float("inf"))
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    lr = scheduler.get_last_lr()[0]
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"optim/grad_norm": grad_norm, "optim/lr": lr, "optim/skipped": 0.0 if finite else 1.0}


def weights_finite(params: list[torch.Tensor]) -> bool:
    """One reduction over all parameters (an overflowing norm counts as non-finite too: such weights are junk)."""
    if not params:
        return True
    local, sharded = local_shards(params)
    norms = torch._foreach_norm(local)
    finite = bool(torch.isfinite(torch.stack([n.float().cpu() for n in norms])).all())
    return all_ranks_true(finite) if sharded else finite


def reapply_hyperparameters(optimizer, scheduler, fresh: list[dict], fresh_base_lrs: list[float]) -> None:
    """After loading a checkpoint, use the *new* config's lr/betas/eps/weight decay (the loaded optimizer and
    scheduler states carry the old ones), at the resumed position of the (new) schedule."""
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
    scheduler.base_lrs = list(fresh_base_lrs)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


HYPERPARAMETERS = ("lr", "initial_lr", "betas", "eps", "weight_decay")


# -- resume: the config check -----------------------------------------------------------------------------

# Never compared: they say how to start, not what is trained.
RESUME_KEYS = {"run.resume", "run.resume_override"}


def config_changes(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, new)}`` for every top-level-section key whose value differs."""
    old_flat, new_flat = _sections(saved), _sections(new)
    keys = sorted((set(old_flat) | set(new_flat)) - RESUME_KEYS)
    return {k: (old_flat.get(k), new_flat.get(k)) for k in keys if old_flat.get(k) != new_flat.get(k)}


def _sections(tree: dict) -> dict[str, Any]:
    """``section.key -> value`` (two levels, as every config here is: dict-valued keys stay whole)."""
    out: dict[str, Any] = {}
    for section, keys in (tree or {}).items():
        if isinstance(keys, dict):
            out.update({f"{section}.{k}": v for k, v in keys.items()})
        else:
            out[section] = keys
    return out


def check_resume_config(saved: dict, new: dict, cadence: set[str], override: bool) -> dict[str, tuple]:
    """The changes a resume may apply; raises ``ConfigError`` on a change outside ``cadence`` unless ``override``."""
    changes = config_changes(saved, new)
    refused = {k: v for k, v in changes.items() if k not in cadence}
    if refused and not override:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(f"run.resume=true with a changed config: {listed}. A resumed run must train what the "
                          f"checkpoint was trained with; only {', '.join(sorted(cadence))} may change. Restore those "
                          f"keys, start a new run.out_dir, or pass run.resume_override=true to apply the change from "
                          f"here on (recorded in config_history.jsonl)")
    return changes


def check_writable(run_dir: Path, option: str = "run.out_dir") -> None:
    """Fail before any model loads if the run directory cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{option}={run_dir} is not writable ({e.strerror or e}): choose a directory you can "
                          f"write to") from None


def prepare_run_dir(run_dir: Path, option: str = "run.out_dir") -> None:
    """Before the models load: the directory is writable, and half-written checkpoints of a killed run are gone."""
    check_writable(run_dir, option)
    removed = remove_partial_writes(run_dir)
    if removed:
        say(f"[yellow]removed {removed} unfinished checkpoint write(s) in {run_dir} left by a killed run[/]")


# -- the recipe interface -------------------------------------------------------------------------------


class Recipe(Protocol):
    """What the loop drives (``Distiller`` and ``SFTTrainer``)."""

    run_dir: Path
    writes: bool        # this process writes files (rank 0 of a run that logs to disk)
    log_to_disk: bool   # the run writes checkpoints at all (the same on every rank)
    sampler: Any
    optimizer: Any
    scheduler: Any
    completed: int      # the last step whose update is applied
    bad_steps: int      # consecutive skipped (non-finite) steps

    def trainable_parameters(self) -> list[torch.Tensor]: ...
    def forward_backward(self, step: int) -> tuple[float, Callable[[dict], tuple[dict, Any]]]: ...
    def step_samples(self, batch: Any) -> list[dict]: ...
    def evaluate(self) -> tuple[dict, list[dict]]: ...
    def save(self, step: int) -> Path | None: ...
    def load(self, path: Path) -> dict: ...
    def after_restore(self) -> None: ...
    def export(self) -> None: ...
    def barrier(self) -> None: ...


@dataclass
class LoopSettings:
    total_steps: int
    config: Any                      # the typed config: compared on resume, written to config.yaml
    resume: bool = False
    resume_override: bool = False
    cadence_keys: set[str] = field(default_factory=set)  # keys a resume may change
    model_key: str = "student.path"
    loss_key: str = "opd/loss"
    view_keys: list[str] = field(default_factory=list)
    max_grad_norm: float = 1.0
    max_bad_steps: int = 3
    save_every: int = 0
    eval_every: int = 0
    tensorboard: bool = True
    progress: bool = True
    is_main: bool = True
    distributed: bool = False
    lr_hint: str = "Lower optim.lr"


@dataclass
class LoopResult:
    start: int
    before: dict
    samples_before: list
    after: dict
    samples_after: list
    history: list[dict]  # the metrics of each step run by this process
    wall_seconds: float


class TrainingLoop:
    def __init__(self, recipe: Recipe, settings: LoopSettings):
        self.r, self.s = recipe, settings
        self.saved_step = -1       # the step of the checkpoint this process wrote last
        self.logged_step = 0       # the last step whose metrics row is written
        self.partial: dict = {}    # metrics of the committed step, for the row an interrupt writes
        self.updating = False      # inside optimizer.step(): the weights are half-updated
        self.held_signal: int | None = None
        self.shielded = False

    # -- signals ----------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if self.shielded:  # the commit finishes first (see _commit)
            self.held_signal = signum
            return
        self._raise_for(signum)

    @staticmethod
    def _raise_for(signum: int):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Preempted(signum)

    @contextmanager
    def signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextmanager
    def _commit_section(self):
        self.shielded = True
        try:
            yield
        finally:
            self.shielded = False
        if self.held_signal is not None:
            signum, self.held_signal = self.held_signal, None
            self._raise_for(signum)

    # -- one step -------------------------------------------------------------------------------------

    def _commit(self, step: int, loss: float) -> dict:
        r = self.r
        params = r.trainable_parameters()
        with self._commit_section():
            self.updating = True
            optim = apply_update(params, r.optimizer, r.scheduler, loss, self.s.max_grad_norm)
            self.updating = False
            r.bad_steps = r.bad_steps + 1 if optim["optim/skipped"] else 0
            self.partial = {self.s.loss_key: loss if not optim["optim/skipped"] else float("nan"), **optim}
            r.completed = step
        if not optim["optim/skipped"] and not weights_finite(params):
            last = self._last_checkpoint()
            raise TrainingDiverged(
                f"step {step}: the update made the weights non-finite (loss={loss}, grad_norm="
                f"{optim['optim/grad_norm']}); they are not saved. Last good checkpoint: {last or 'none'}. "
                f"{self.s.lr_hint}, or inspect {self.r.run_dir}/samples.jsonl")
        return optim

    def _step(self, step: int, tracker: Tracker, view: StepView, history: list[dict]) -> None:
        s, r = self.s, self.r
        loss, finish = r.forward_backward(step)
        optim = self._commit(step, loss)
        metrics, batch = finish(optim)
        if optim["optim/skipped"]:
            # The loss of a skipped step trained nothing; log it as what it is.
            metrics[s.loss_key] = float("nan")
            if s.is_main:
                say(f"[yellow]step {step}: non-finite loss or gradient (loss={loss}, grad_norm="
                    f"{optim['optim/grad_norm']}); step skipped[/]")
            if r.bad_steps > s.max_bad_steps:
                self._log(tracker, step, metrics)
                last = self._last_checkpoint()
                raise TrainingDiverged(
                    f"{r.bad_steps} consecutive non-finite steps (limit optim.max_bad_steps={s.max_bad_steps}); "
                    f"stopping. Last good checkpoint: {last or 'none'}. {s.lr_hint}, check teacher.temperature, "
                    f"or inspect {r.run_dir}/samples.jsonl")
        if s.eval_every and step % s.eval_every == 0 and step < s.total_steps:
            metrics.update(r.evaluate()[0])
        self._log(tracker, step, metrics)
        tracker.log_samples(step, r.step_samples(batch))
        history.append(metrics)
        view.update(step, format_metrics(metrics, s.view_keys))
        # A checkpoint is only written after a good step, so "the last checkpoint" is always a good one.
        if s.save_every and step % s.save_every == 0 and r.log_to_disk and not r.bad_steps:
            self._save(step)

    def _log(self, tracker: Tracker, step: int, metrics: dict) -> None:
        tracker.log(step, metrics)
        self.logged_step = step

    # -- checkpoints ------------------------------------------------------------------------------------

    def _last_checkpoint(self) -> Path | None:
        found = checkpoints_newest_first(self.r.run_dir)
        return found[0] if found else None

    def _save(self, step: int) -> Path | None:
        if not weights_finite(self.r.trainable_parameters()):  # never write non-finite weights as "good"
            raise TrainingDiverged(f"refusing to save step {step}: the weights are not finite")
        path = self.r.save(step)
        self.saved_step = step
        return path

    def _save_on_exit(self, why: str) -> None:
        """The checkpoint of the last completed step, on the way out of an interrupted or failed run."""
        r = self.r
        if not r.log_to_disk or r.completed <= max(self.saved_step, self.start):
            if self.s.is_main and r.log_to_disk and r.completed == 0:
                say(f"[yellow]{why} before the first step completed: nothing to save[/]")
            elif self.s.is_main and r.log_to_disk:
                say(f"[yellow]{why}: the last completed step {r.completed} is already saved; continue "
                    f"with run.resume=true[/]")
            return
        try:
            path = self._save(r.completed)
        except KeyboardInterrupt:
            last = self._last_checkpoint()
            say(f"[red]{why}, then interrupted again while saving: NO checkpoint was written for step "
                f"{r.completed}; the newest one on disk is {last or 'none'}[/]")
            raise
        if self.s.is_main:
            say(f"[yellow]{why}: checkpoint of step {r.completed} saved at {path}; continue with "
                f"run.resume=true[/]")

    def _rewind(self, sampler_before: dict, step: int) -> None:
        if self.r.completed < step:  # the step in flight never reached the update: forget its batch
            self.r.sampler.load_state_dict(sampler_before)
            self.r.optimizer.zero_grad(set_to_none=True)

    # -- resume ------------------------------------------------------------------------------------------

    def _resume(self) -> int:
        s, r = self.s, self.r
        saved_cfg = r.run_dir / "config.yaml"
        saved = yaml.safe_load(saved_cfg.read_text()) if saved_cfg.is_file() else None
        saved = upgrade_keys(type(s.config), saved)  # a run saved under old key names resumes as saved
        new = yaml.safe_load(dump_yaml(s.config))
        changes = {} if saved is None else check_resume_config(saved, new, s.cadence_keys, s.resume_override)
        candidates = checkpoints_newest_first(r.run_dir)
        if not candidates:
            raise ConfigError(f"run.resume=true but {r.run_dir} has no checkpoint to resume from")
        fresh = [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in r.optimizer.param_groups]
        fresh_base = list(r.scheduler.base_lrs)
        damaged = []
        for path in candidates:
            problem = verify_checkpoint(path)
            if problem:
                damaged.append((path.name, problem))
                if s.is_main:
                    say(f"[yellow]checkpoint {path} is damaged: {problem}; trying the previous one[/]")
                continue
            try:
                state = r.load(path)
            except RuntimeError as e:
                if "size mismatch" not in str(e) and "does not match the model" not in str(e):
                    raise
                started = _sections(saved or {}).get(s.model_key, "unknown (no config.yaml)")
                now = _sections(new).get(s.model_key)
                raise ConfigError(f"{path} was written for a different model: this run was started with "
                                  f"{s.model_key}={started}, and {s.model_key}={now} does not fit it. Resume with "
                                  f"the model the run was started with, or choose another run.out_dir") from None
            break
        else:
            raise ConfigError(f"run.resume=true but no checkpoint in {r.run_dir}/checkpoints is intact: "
                              f"{'; '.join(f'{name} ({why})' for name, why in damaged)}")
        start = int(state["step"])
        if s.resume_override:
            reapply_hyperparameters(r.optimizer, r.scheduler, fresh, fresh_base)
        r.completed = start
        r.after_restore()
        if s.is_main:
            note = f" (the newest intact checkpoint; skipped {', '.join(n for n, _ in damaged)})" if damaged else ""
            say(f"resumed from {path} (step {start}){note}")
            for key, (old, value) in changes.items():
                kind = "applied" if key in s.cadence_keys else "applied (run.resume_override=true)"
                say(f"resume at step {start}: {key} {old!r} -> {value!r} {kind}")
        if changes and r.writes:
            with (r.run_dir / "config_history.jsonl").open("a") as fh:
                fh.write(json.dumps({"resumed_at_step": start, "override": bool(s.resume_override),
                                     "changes": {k: list(v) for k, v in changes.items()}}, default=str) + "\n")
        return start

    # -- the loop -----------------------------------------------------------------------------------------

    def run(self) -> LoopResult:
        s, r = self.s, self.r
        wall_start = time.perf_counter()
        self.start = start = self._resume() if s.resume else 0
        self.saved_step = start
        logged = read_metrics(r.run_dir) if s.resume and r.writes else []
        if r.writes:
            r.run_dir.mkdir(parents=True, exist_ok=True)
            (r.run_dir / "config.yaml").write_text(dump_yaml(s.config))
        tracker = Tracker(r.run_dir, tensorboard=s.tensorboard, resume_step=start if s.resume else None,
                          enabled=r.writes)
        before, samples_before = {}, []
        if start == 0:
            before, samples_before = r.evaluate()
            if before:
                tracker.log(0, before)
        else:  # the evaluation before training was logged by the run that started it
            before = _eval_row(logged, 0)
        view = StepView(s.total_steps, start, enabled=s.progress and s.is_main)
        history: list[dict] = []
        r.completed = step = start
        self.logged_step = start
        sampler_before = r.sampler.state_dict()
        try:
            with self.signals():
                for step in range(start + 1, s.total_steps + 1):
                    sampler_before = r.sampler.state_dict()
                    self.partial = {}
                    self._step(step, tracker, view, history)
        except KeyboardInterrupt as e:
            view.close()
            self._rewind(sampler_before, step)
            self._log_partial(tracker)
            why = f"stopped by {e.args[0]}" if isinstance(e, Preempted) else "interrupted"
            try:
                self._save_on_exit(why)
            finally:
                tracker.close()
            raise
        except TrainingDiverged:
            view.close()
            self._log_partial(tracker, {"optim/nonfinite_weights": 1.0})
            tracker.close()
            raise
        except Exception as e:
            view.close()
            self._rewind(sampler_before, step)
            self._log_partial(tracker)
            try:
                if not s.distributed and not self.updating:
                    self._save_on_exit(f"stopped by an error at step {step} ({type(e).__name__})")
            except Exception as save_error:  # the original error is the one to report
                say(f"[red]could not save a checkpoint after the error: {save_error}[/]")
            finally:
                tracker.close()
            raise
        view.close()
        if r.log_to_disk and s.total_steps > start:
            self._save(s.total_steps)
        if start >= s.total_steps and _eval_row(logged, s.total_steps):
            after, samples_after = _eval_row(logged, s.total_steps), []  # a finished run: not evaluated twice
        else:
            after, samples_after = r.evaluate()
            if after:
                tracker.log(s.total_steps, after)
        tracker.close()
        r.export()
        r.barrier()
        return LoopResult(start, before, samples_before, after, samples_after, history,
                          time.perf_counter() - wall_start)

    def _log_partial(self, tracker: Tracker, flag: dict | None = None) -> None:
        """The row of a step that completed its update but was stopped before its metrics were written."""
        if self.r.completed > self.logged_step and self.partial:
            tracker.log(self.r.completed, {**self.partial, **(flag or {"run/interrupted": 1.0})})
            self.logged_step = self.r.completed


def _eval_row(rows: list[dict], step: int) -> dict:
    """The ``eval/`` metrics logged at ``step`` (the last such row)."""
    found: dict = {}
    for row in rows:
        if row.get("step") == step and any(k.startswith("eval/") for k in row):
            found = {k: v for k, v in row.items() if k.startswith("eval/")}
    return found
