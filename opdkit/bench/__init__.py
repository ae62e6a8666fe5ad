"""``opdkit bench``: opdkit's OPD step against TRL's ``DistillationTrainer`` on identical work, plus scaling curves.

Every measurement runs in its own subprocess (clean peak RSS, no warm caches shared between sides), and the
two sides alternate so that drift in machine load hits both. Two workloads run by default: ``fixed`` (every
response forced to ``--new-tokens``) and ``math`` (DAPO-Math prompts, n samples per prompt, responses stop at
EOS; reported also as useful response tokens per second). Results: ``OUT/bench.json`` and ``OUT/bench.md``
(median seconds per step and per phase, tokens per second, peak RSS, ratios opdkit/TRL), and with
``--scaling`` the curves against response length and k, the teacher-scoring memory against length, and the
fraction of the machine's measured matmul throughput each phase reaches.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from .workers import BenchSettings


#: the interpreter of the TRL side (``--trl-python``): TRL may live in its own environment
TRL_PYTHON = {"python": sys.executable}


def run_worker(side: str, s: BenchSettings, out_dir: Path, tag: str) -> dict:
    out = out_dir / f"raw-{tag}.json"
    code = ("import sys; from opdkit.bench.workers import worker_main; "
            "worker_main(sys.argv[1], sys.argv[2], sys.argv[3])")
    python = TRL_PYTHON["python"] if side == "trl" else sys.executable
    proc = subprocess.run([python, "-c", code, side, json.dumps(asdict(s)), str(out)],
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
    # useful tokens/s per run: that run's response tokens over its time (the sides sample different lengths)
    rate = statistics.median(sum(r["tokens"]) / sum(r["step_seconds"]) for r in runs)
    return {"step_seconds": step, "step_seconds_runs": per_run, "phases": phases, "tokens_per_step": tokens,
            "tokens_per_second": rate, "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
            "dtype_policy": runs[0]["dtype_policy"]}


def math_prompt_rows(path: str | Path, count: int) -> list[dict]:
    """The first ``count`` DAPO-Math prompts as chat rows with answers (the ``math`` workload's prompt file)."""
    from ..data import DatasetError, read_rows

    rows = read_rows(path)[:count]
    if len(rows) < count:
        raise DatasetError(f"{path}: the math workload needs {count} prompts, the file has {len(rows)}")
    out = []
    for i, r in enumerate(rows):
        messages = r.get("prompt")
        if not isinstance(messages, list) or not messages:
            raise DatasetError(f"{path}, row {i}: 'prompt' must be a list of chat messages (the DAPO-Math schema)")
        answer = (r.get("reward_model") or {}).get("ground_truth")
        out.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages], "answer": answer})
    return out


def default_settings(out_dir: Path, workload: str = "fixed", math_prompts: str = "", **overrides) -> BenchSettings:
    """Settings of one workload; writes its prompt file into ``out_dir``."""
    from ..demo import PRUNED15_KEEP, TEACHER, demo_prompts, pruned_student
    from ..models import resolve_model_path

    teacher = resolve_model_path(TEACHER)
    student = pruned_student(teacher, PRUNED15_KEEP)
    s = BenchSettings(student=str(student), teacher=str(teacher), workload=workload, **overrides)
    prompts = out_dir / f"prompts-{workload}.jsonl"
    if workload == "math":
        rows = math_prompt_rows(math_prompts, s.batch * (s.warmup + s.steps))
    else:
        rows = demo_prompts()[0]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return replace(s, prompts=str(prompts))


def compare(s: BenchSettings, out_dir: Path, repeats: int, sides: tuple[str, ...] = ("opdkit", "trl")) -> dict:
    """Alternating runs of each side (the order rotates every repeat); ratios of each opdkit side to TRL."""
    out_dir.mkdir(parents=True, exist_ok=True)
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
                                "tokens_per_second": x["tokens_per_second"] / t["tokens_per_second"],
                                **{f"{ph}_time": x["phases"][ph] / t["phases"][ph] for ph in t["phases"]}}
                         for side, x in summary.items() if side != "trl"}
    return summary


TITLES = {"opdkit": "opdkit (HF rollouts)", "opdkit-vllm": "opdkit (vLLM rollouts)",
          "opdkit-async": "opdkit (HF, one_step_off)", "trl": "TRL DistillationTrainer"}


def markdown(summary: dict, s: BenchSettings, repeats: int) -> str:
    ours = list(summary["ratios"])
    cols = ours + ["trl"]
    header = "| | " + " | ".join(TITLES[c] for c in cols) + " | " + " | ".join(f"{c} / TRL" for c in ours) + " |"
    if s.workload == "math":
        work = (f"workload `math`: {s.batch} DAPO-Math prompts x {s.n} samples per step, responses stop at EOS "
                f"(at most {s.new_tokens} new tokens), seed {s.seed} on both sides")
    else:
        work = f"workload `fixed`: batch {s.batch}, {s.new_tokens} new tokens (fixed length)"
    lines = [f"Same work on every side: student = 15-layer pruned SmolLM2 (81M), teacher = SmolLM2-135M-Instruct, "
             f"{work}, full-vocabulary reverse KL "
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
    lines.append(row("response tokens per step", lambda x: x["tokens_per_step"],
                     lambda c: summary[c]["tokens_per_step"] / summary["trl"]["tokens_per_step"], ".0f"))
    lines.append(row("useful tokens per second", lambda x: x["tokens_per_second"],
                     lambda c: r[c]["tokens_per_second"], ".1f", True))
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
    p.add_argument("--workloads", default="fixed,math",
                   help="comma-separated: fixed (fixed-length responses), math (DAPO-Math, n per prompt, stop at EOS)")
    p.add_argument("--math-prompts", default="../shared/data/dapo-math-17k.parquet",
                   help="prompt file of the math workload (DAPO-Math parquet schema)")
    p.add_argument("--math-batch", type=int, default=2, help="math workload: prompts per step")
    p.add_argument("--math-n", type=int, default=4, help="math workload: samples per prompt")
    p.add_argument("--math-new-tokens", type=int, default=256, help="math workload: maximum response length")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of both sides")
    p.add_argument("--trl-python", default=sys.executable,
                   help="Python interpreter of the TRL side (TRL may live in its own virtual environment)")
    p.add_argument("--opdkit-extra", action="append", default=[],
                   help="extra opdkit key=value override of the opdkit side (repeatable)")
    p.add_argument("--trl-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="TRL's precision: bfloat16 is bf16=True autocast; auto: what opdkit's precision policy picks "
                        "on this machine (bf16 only where it is native and measured faster)")
    p.add_argument("--vllm", action="store_true", help="also run opdkit with vLLM rollouts (needs the vllm extra)")
    p.add_argument("--one-step-off", action="store_true",
                   help="also run opdkit with run.pipeline=one_step_off (its rollout worker uses --threads more)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: all cores)")
    p.add_argument("--ablation", action="store_true",
                   help="also time each less-work optimisation off and on, phase by phase, on the math workload")
    p.add_argument("--skip-compare", action="store_true", help="only the scaling curves")
    p.add_argument("--scaling", action="store_true", help="also measure the curves against length and k")
    p.add_argument("--quick", action="store_true", help="short scaling sweep (lengths 64-256, k 1-64)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from ..tracking import console
    from .scaling import run_scaling

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    TRL_PYTHON["python"] = args.trl_python
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in ("fixed", "math")]
    if bad or not workloads:
        raise SystemExit(f"--workloads: unknown workload(s) {bad or workloads}; use fixed and/or math")
    from ..hardware import describe_machine, fast_bf16, hardware_record

    trl_dtype = fast_bf16("cpu").dtype if args.trl_dtype == "auto" else args.trl_dtype
    common = dict(steps=args.steps, warmup=args.warmup, trl_bf16=trl_dtype == "bfloat16", threads=args.threads,
                  seed=args.seed, extra=list(args.opdkit_extra))
    settings = {"fixed": lambda: default_settings(out, "fixed", batch=args.batch, new_tokens=args.new_tokens, **common),
                "math": lambda: default_settings(out, "math", args.math_prompts, batch=args.math_batch, n=args.math_n,
                                                 new_tokens=args.math_new_tokens, **common)}
    per_workload = {w: settings[w]() for w in workloads}
    s = per_workload["fixed"] if "fixed" in per_workload else settings["fixed"]()  # the scaling curves' base
    machine = hardware_record()
    report: dict = {"settings": {w: asdict(x) for w, x in per_workload.items()}, "date": time.strftime("%Y-%m-%d %H:%M"),
                    "hardware": machine}
    md = [f"Machine: {describe_machine(machine)}; transformers {machine['transformers']}, "
          f"vLLM {machine['vllm'] or 'not installed'}; {report['date']}. Each side at its own best precision here "
          f"(opdkit dtype auto -> {machine['auto_dtype']}, TRL {trl_dtype}).\n"]
    console.print(md[0])
    if not args.skip_compare:
        sides = ("opdkit",) + (("opdkit-vllm",) if args.vllm else ()) + \
            (("opdkit-async",) if args.one_step_off else ()) + ("trl",)
        report["compare"] = {}
        for w, ws in per_workload.items():
            console.print(f"workload {w}: comparing opdkit and TRL, {args.repeats} alternating runs each")
            report["compare"][w] = compare(ws, out / w, args.repeats, sides)
            md.append(markdown(report["compare"][w], ws, args.repeats))
            console.print(md[-1], highlight=False)
    if args.ablation:
        from .ablation import run_ablation

        ms = per_workload["math"] if "math" in per_workload else settings["math"]()
        report["ablation"], ablation_md = run_ablation(ms, repeats=max(2, min(args.repeats, 3)))
        md.append(ablation_md)
        console.print(ablation_md, highlight=False)
    if args.scaling:
        report["scaling"], scaling_md = run_scaling(replace(s, steps=2, warmup=1), out, quick=args.quick)
        md.append(scaling_md)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text("\n".join(md))
    console.print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0
