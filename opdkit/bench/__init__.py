"""``opdkit bench``: opdkit's OPD step against TRL's ``DistillationTrainer`` on identical work, plus scaling curves.

Every measurement runs in its own subprocess (clean peak RSS, no warm caches shared between sides), and the
two sides alternate so that drift in machine load hits both. Results: ``OUT/bench.json`` and ``OUT/bench.md``
(median seconds per step and per phase, tokens per second, peak RSS, ratios opdkit/TRL), and with
``--scaling`` the curves against response length and k, the teacher-scoring memory against length, and the
fraction of the machine's measured matmul throughput each phase reaches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from .workers import BenchSettings


def run_worker(side: str, s: BenchSettings, out_dir: Path, tag: str) -> dict:
    out = out_dir / f"raw-{tag}.json"
    code = ("import sys; from opdkit.bench.workers import worker_main; "
            "worker_main(sys.argv[1], sys.argv[2], sys.argv[3])")
    proc = subprocess.run([sys.executable, "-c", code, side, json.dumps(asdict(s)), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {side} ({tag}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def summarise(runs: list[dict]) -> dict:
    """Median over runs of each run's median step time (and phases), tokens/s and peak RSS."""
    per_run = [statistics.median(r["step_seconds"]) for r in runs]
    phases = {ph: statistics.median(statistics.median(p[ph] for p in r["phases"]) for r in runs)
              for ph in ("rollout", "teacher", "train")}
    tokens = statistics.median(statistics.median(r["tokens"]) for r in runs)
    step = statistics.median(per_run)
    return {"step_seconds": step, "step_seconds_runs": per_run, "phases": phases, "tokens_per_step": tokens,
            "tokens_per_second": tokens / step, "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
            "dtype_policy": runs[0]["dtype_policy"]}


def default_settings(out_dir: Path, **overrides) -> BenchSettings:
    from ..demo import PRUNED15_KEEP, TEACHER, demo_prompts, pruned_student
    from ..models import resolve_model_path

    teacher = resolve_model_path(TEACHER)
    student = pruned_student(teacher, PRUNED15_KEEP)
    prompts = out_dir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in demo_prompts()[0]))
    return BenchSettings(student=str(student), teacher=str(teacher), prompts=str(prompts), **overrides)


def compare(s: BenchSettings, out_dir: Path, repeats: int, sides: tuple[str, ...] = ("opdkit", "trl")) -> dict:
    """Alternating runs of each side (the order rotates every repeat); ratios of each opdkit side to TRL."""
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(repeats):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        for side in order:
            results[side].append(run_worker(side, s, out_dir, f"{side}-{r}"))
            print(f"  run {r + 1}/{repeats} {side}: {statistics.median(results[side][-1]['step_seconds']):.2f} s/step",
                  flush=True)
    return with_ratios({side: summarise(runs) for side, runs in results.items()})


def with_ratios(summary: dict) -> dict:
    """Add ``ratios[side]``: each opdkit side's step time, phase times and peak RSS over TRL's."""
    t = summary["trl"]
    summary["ratios"] = {side: {"step_time": x["step_seconds"] / t["step_seconds"],
                                "peak_rss": x["peak_rss_gb"] / t["peak_rss_gb"],
                                **{f"{ph}_time": x["phases"][ph] / t["phases"][ph] for ph in t["phases"]}}
                         for side, x in summary.items() if side != "trl"}
    return summary


TITLES = {"opdkit": "opdkit (HF rollouts)", "opdkit-vllm": "opdkit (vLLM rollouts)", "trl": "TRL DistillationTrainer"}


def markdown(summary: dict, s: BenchSettings, repeats: int) -> str:
    ours = list(summary["ratios"])
    cols = ours + ["trl"]
    header = "| | " + " | ".join(TITLES[c] for c in cols) + " | " + " | ".join(f"{c} / TRL" for c in ours) + " |"
    lines = [f"Same work on every side: student = 15-layer pruned SmolLM2 (81M), teacher = SmolLM2-135M-Instruct, "
             f"batch {s.batch}, {s.new_tokens} new tokens (fixed length), full-vocabulary reverse KL "
             f"(opdkit `objective.name={s.objective}`, TRL `beta=1`), {s.steps} measured steps after {s.warmup} "
             f"warm-up, median of {repeats} alternating runs, {s.threads or 'all'} torch thread(s) per run.", "",
             header, "|---" * (1 + len(cols) + len(ours)) + "|"]

    def row(name: str, value, ratio, fmt: str, bold: bool = False) -> str:
        vals = [format(value(summary[c]), fmt) for c in cols]
        rats = [(f"**{ratio(c):.2f}**" if bold else f"{ratio(c):.2f}") for c in ours]
        return f"| {name} | " + " | ".join(vals) + " | " + " | ".join(rats) + " |"

    r = summary["ratios"]
    lines.append(row("seconds per step", lambda x: x["step_seconds"], lambda c: r[c]["step_time"], ".2f", True))
    for ph in ("rollout", "teacher", "train"):
        lines.append(row(f"{ph} seconds", lambda x, ph=ph: x["phases"][ph], lambda c, ph=ph: r[c][f"{ph}_time"], ".2f"))
    lines.append(row("tokens per second", lambda x: x["tokens_per_second"],
                     lambda c: summary[c]["tokens_per_second"] / summary["trl"]["tokens_per_second"], ".0f"))
    lines.append(row("peak RSS (GB)", lambda x: x["peak_rss_gb"], lambda c: r[c]["peak_rss"], ".2f", True))
    lines.append("| dtype policy | " + " | ".join(summary[c]["dtype_policy"] for c in cols) + " |" + " |" * len(ours))
    return "\n".join(lines) + "\n"


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="benchmark opdkit against TRL's DistillationTrainer (and scaling curves)")
    p.add_argument("--out", default="runs/bench", help="output directory (bench.json, bench.md, PNG curves)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per side")
    p.add_argument("--steps", type=int, default=4, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per run (not measured)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--trl-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="TRL's precision: bfloat16 is bf16=True autocast; auto: what opdkit's precision policy picks "
                        "on this machine (bf16 only where it is native and measured faster)")
    p.add_argument("--vllm", action="store_true", help="also run opdkit with vLLM rollouts (needs the vllm extra)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: all cores)")
    p.add_argument("--skip-compare", action="store_true", help="only the scaling curves")
    p.add_argument("--scaling", action="store_true", help="also measure the curves against length and k")
    p.add_argument("--quick", action="store_true", help="short scaling sweep (lengths 64-256, k 1-64)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from ..tracking import console
    from .scaling import run_scaling

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ..hardware import describe_machine, fast_bf16, hardware_record

    trl_dtype = fast_bf16("cpu").dtype if args.trl_dtype == "auto" else args.trl_dtype
    s = default_settings(out, batch=args.batch, new_tokens=args.new_tokens, steps=args.steps, warmup=args.warmup,
                         trl_bf16=trl_dtype == "bfloat16", threads=args.threads)
    machine = hardware_record()
    report: dict = {"settings": asdict(s), "date": time.strftime("%Y-%m-%d %H:%M"), "hardware": machine}
    md = [f"Machine: {describe_machine(machine)}; transformers {machine['transformers']}, "
          f"vLLM {machine['vllm'] or 'not installed'}; each side at its own best precision here "
          f"(opdkit dtype auto -> {machine['auto_dtype']}, TRL {trl_dtype}).", ""]
    console.print(md[0])
    if not args.skip_compare:
        console.print(f"comparing opdkit and TRL: {args.repeats} alternating runs each")
        sides = ("opdkit", "opdkit-vllm", "trl") if args.vllm else ("opdkit", "trl")
        report["compare"] = compare(s, out, args.repeats, sides)
        md.append(markdown(report["compare"], s, args.repeats))
        console.print(md[-1], highlight=False)
    if args.scaling:
        report["scaling"], scaling_md = run_scaling(replace(s, steps=2, warmup=1), out, quick=args.quick)
        md.append(scaling_md)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text("\n".join(md))
    console.print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0
