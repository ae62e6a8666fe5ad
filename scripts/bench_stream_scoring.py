"""What ``teacher.stream_scoring`` saves: s/step with a served teacher of fixed latency, streaming on vs off.

    PYTHONPATH=. python scripts/bench_stream_scoring.py [OUT.json] [--latency 0.2] [--steps 3] [--tiny]
        [--request-batch-size 2] [--concurrency 2] [--decode-delay 0]

The teacher is the test suite's fake OpenAI-style server (``tests.test_engines.FakeTeacherServer``, so this
needs the dev install), in a process of its own, answering every scoring request after ``--latency`` seconds:
a stand-in for a remote ``vllm serve`` whose compute is elsewhere. The student is the demo's 26-layer SmolLM2
(``--tiny``: the suite's tiny random Llama, whose decoding is too short to hide anything behind;
``--decode-delay S`` adds S seconds of sleep to every forward of the sampling model: a slower student whose
timing no CPU load disturbs, for a structural figure on a shared machine). Both settings run in alternation,
one warm-up step each and then ``--steps`` steps; the result is the median per mode of time/step,
time/rollout, time/teacher (the server's busy time) and time/teacher_wait (what the step waited for it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from opdkit.config import DistillConfig, load_config
from opdkit.demo import STUDENT_KEEP, TEACHER, demo_prompts, pruned_student
from opdkit.models import load_tokenizer, resolve_model_path
from opdkit.tiny import char_tokenizer, save_tiny, tiny_llama
from opdkit.train import Distiller
from tests.test_engines import FakeTeacherServer

KEYS = ("time/step", "time/rollout", "time/teacher", "time/teacher_wait", "time/train")


def student_and_data(tiny: bool, root: Path) -> tuple[Path, Path]:
    rows, _ = demo_prompts()
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if tiny:
        tokenizer = char_tokenizer()
        save_tiny(tiny_llama(len(tokenizer), seed=0), tokenizer, root / "student")
        return root / "student", data
    return pruned_student(resolve_model_path(TEACHER), STUDENT_KEEP), data


def serve(tokenizer_dir: str, latency: float) -> None:
    """The fake teacher (this script with --serve): prints its URL, then serves until stdin closes."""
    server = FakeTeacherServer(load_tokenizer(tokenizer_dir))
    server.delay = latency
    print(server.url, flush=True)
    sys.stdin.read()
    server.close()


def settings(student: Path, data: Path, url: str, out: Path, stream: bool, args) -> list[str]:
    return [f"student.path={student}", f"data.train={data}", f"run.out_dir={out}", "run.progress=false",
            "run.tensorboard=false", "eval.prompts=0", "teacher.engine=server", f"teacher.url={url}",
            f"teacher.request_batch_size={args.request_batch_size}", f"teacher.concurrency={args.concurrency}",
            f"teacher.stream_scoring={str(stream).lower()}",
            "objective.name=topk", "objective.strategy=teacher", "objective.k=4", "rollout.prompts_per_step=4",
            "rollout.n=2", "rollout.max_new_tokens=64", "student.sampling_dtype=float32",
            "student.compute_dtype=float32", "run.threads=1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="bench/stream_scoring.json")
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--request-batch-size", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--decode-delay", type=float, default=0.0)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.latency)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        student, data = student_and_data(args.tiny, root)
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(student), "--latency", str(args.latency)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        url = server.stdout.readline().strip()
        try:
            runs = {mode: Distiller(load_config(DistillConfig, None, settings(student, data, url, root / mode,
                                                                              mode == "on", args)))
                    for mode in ("off", "on")}
            if args.decode_delay:
                for d in runs.values():
                    d.engine.model.register_forward_pre_hook(lambda *_: time.sleep(args.decode_delay))
            per_step: dict[str, list[dict]] = {"off": [], "on": []}
            for step in range(args.steps + 1):  # step 0 warms up; the modes alternate, so load drift hits both
                for mode, d in runs.items():
                    metrics, batch = d.opd_step(step + 1)
                    if step:
                        per_step[mode].append({**{k: metrics[k] for k in KEYS},
                                               "rows_len": batch.rollout.response_mask.sum(-1).tolist()})
        finally:
            server.stdin.close()
            server.wait()
    result = {
        "what": f"s/step with a served teacher answering each request after {args.latency} s, "
                f"teacher.stream_scoring off vs on (median of {args.steps} steps after a warm-up)",
        "student": ("tiny random Llama" if args.tiny else f"demo student ({student.name})")
                   + (f", {args.decode_delay} s of sleep per sampling forward" if args.decode_delay else ""),
        "rows_per_step": 8, "request_batch_size": args.request_batch_size, "concurrency": args.concurrency,
        "max_new_tokens": 64,
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "median": {mode: {k: round(statistics.median(s[k] for s in steps), 3) for k in KEYS}
                   for mode, steps in per_step.items()},
        "steps": per_step,
    }
    off, on = result["median"]["off"]["time/step"], result["median"]["on"]["time/step"]
    result["saved_seconds_per_step"] = round(off - on, 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median"], indent=1), f"\nsaved {off - on:.3f} s/step ({1 - on / off:.0%})")


if __name__ == "__main__":
    main()
