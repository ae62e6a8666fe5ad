"""Run logging: metrics.jsonl (one object per step), samples.jsonl, TensorBoard, and the terminal view."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import InvalidInput

console = Console(stderr=True)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_jsonl_rows(path: Path) -> list[dict]:
    """The rows of a run's .jsonl log. A torn last line (a crash mid-write) is dropped with a warning; a bad line
    elsewhere is an error naming the file and line."""
    lines = path.read_text().splitlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                console.print(f"[yellow]{path}: dropped a torn last line {lineno} (a crash while it was written)[/]",
                              soft_wrap=True, highlight=False)
                continue
            raise InvalidInput(f"{path}, line {lineno}: not valid JSON ({e.msg}); only a torn last line is dropped "
                               f"automatically: repair or delete that line") from None
    return rows


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop rows logged after ``last_step`` (a resumed run re-logs them)."""
    if not path.is_file():
        return
    keep = [row for row in read_jsonl_rows(path) if row.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(row) + "\n" for row in keep))


class Tracker:
    def __init__(self, run_dir: Path, *, tensorboard: bool = True, resume_step: int | None = None,
                 enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self.writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _truncate_jsonl(self.metrics_path, resume_step)
            _truncate_jsonl(self.samples_path, resume_step)
        else:
            for p in (self.metrics_path, self.samples_path):
                p.unlink(missing_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:
                console.print("[yellow]tensorboard is not installed; logging to metrics.jsonl only[/]")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        if not self.enabled or not samples:
            return
        with self.samples_path.open("a") as fh:
            for s in samples:
                fh.write(json.dumps({"step": step, **s}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return read_jsonl_rows(path)


def format_metrics(metrics: dict, keys: list[str]) -> str:
    parts = []
    for key in keys:
        if key in metrics and isinstance(metrics[key], (int, float)):
            parts.append(f"{key.split('/')[-1]}={metrics[key]:.3g}")
    return " ".join(parts)


class StepView:
    """A progress bar on a terminal; one plain line per step elsewhere (CI logs, pipes)."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.enabled, self.total = enabled, total
        self.interactive = enabled and sys.stderr.isatty()
        self.progress = None
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.description}"), console=console)
            self.task = self.progress.add_task("", total=total, completed=start)
            self.progress.start()

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=text)
        else:
            console.print(f"step {step}/{self.total} {text}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
