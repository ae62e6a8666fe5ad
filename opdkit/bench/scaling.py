"""Scaling curves: opdkit's step time and peak memory against response length and k, top-k vs full vocabulary;
teacher-scoring memory against length (chunked top-k vs materialised logits); and the fraction of the machine's
measured matmul throughput each phase reaches."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from .workers import BenchSettings


class RSSPeak:
    """Peak resident memory of this process while the ``with`` block runs, by polling /proc every 2 ms.

    ``ru_maxrss`` cannot measure a phase: it is the peak since the process started (model loading included).
    """

    def __enter__(self):
        import threading

        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss_bytes())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth_gb(self) -> float:
        return (self.peak - self.base) / 1024 ** 3


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _scoring_memory_worker(teacher: str, length: int, mode: str, batch: int) -> dict:
    """Peak RSS growth while scoring ``batch`` x ``length`` response tokens (run in its own process)."""
    import torch

    from ..models import load_causal_lm
    from ..engines.hf_teacher import HFTeacher

    model = load_causal_lm(Path(teacher), "bfloat16")
    model.eval()
    prompts = [[1] + [100 + i for i in range(40)]] * batch
    resp = torch.randint(200, 40000, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.bool)
    V = model.get_output_embeddings().weight.shape[0]
    warm = HFTeacher(model, vocab_size=V, pad_id=2)
    warm.score(prompts, resp[:, :8], mask[:, :8], k=16)  # allocator and kernel warm-up outside the measurement
    start = time.perf_counter()
    with torch.no_grad(), RSSPeak() as rss:
        if mode == "topk":
            out = warm.score(prompts, resp, mask, k=16)
            kept = sum(t.numel() * t.element_size() for t in (out.sampled_logp, out.topk_ids, out.topk_logp, out.entropy))
        else:  # what a naive implementation keeps: full-vocabulary log-probs of every response position
            ids = torch.cat([torch.tensor(prompts), resp], 1)
            logits = model(input_ids=ids).logits[:, len(prompts[0]) - 1:-1].float()
            logp = torch.log_softmax(logits, -1)
            kept = logp.numel() * logp.element_size()
    return {"length": length, "mode": mode, "peak_growth_gb": rss.growth_gb, "kept_mb": kept / 2 ** 20,
            "seconds": time.perf_counter() - start}


def scoring_memory(teacher: str, length: int, mode: str, batch: int = 8) -> dict:
    code = ("import sys, json; from opdkit.bench.scaling import _scoring_memory_worker as w; "
            "print(json.dumps(w(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))")
    proc = subprocess.run([sys.executable, "-c", code, teacher, str(length), mode, str(batch)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matmul_peak_tflops(n: int = 1536, repeats: int = 5) -> dict:
    """Measured dense matmul throughput of this machine (fp32 and bf16), the denominator of utilisation."""
    import torch

    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        out[name] = 2 * n ** 3 / sorted(times)[len(times) // 2] / 1e12
    return out


def phase_flops(s: BenchSettings, prompt_len: float) -> dict:
    """Approximate FLOPs per phase of one opdkit step (2·params·tokens per forward, backward = 2 forwards)."""
    from transformers import AutoConfig

    def dims(path):
        c = AutoConfig.from_pretrained(path)
        per_layer = 4 * c.hidden_size * c.hidden_size * (1 + c.num_key_value_heads / c.num_attention_heads) / 2 \
            + 3 * c.hidden_size * c.intermediate_size
        return c.num_hidden_layers * per_layer, c.hidden_size * c.vocab_size

    body_s, head_s = dims(s.student)
    body_t, head_t = dims(s.teacher)
    B, Lr, Lp = s.batch, s.new_tokens, prompt_len
    rollout = 2 * body_s * B * (Lp + Lr) + 2 * head_s * B * (Lr + 1)
    teacher = 2 * body_t * B * (Lp + Lr) + 2 * head_t * B * Lr
    head_passes = 4 + (2 if s.objective in ("reverse_kl", "forward_kl", "jsd") else 0)  # fwd, recompute, 2 bwd (+ teacher head twice)
    train = 3 * 2 * body_s * B * (Lp + Lr) + head_passes * 2 * head_s * B * Lr
    return {"rollout": rollout, "teacher": teacher, "train": train}


SCORING_MEMORY_LENGTHS = [64, 128, 256, 512, 1024]  # cheap (one teacher forward each), so always the full range


def mean_prompt_length(s: BenchSettings) -> float:
    """Mean rendered prompt length of the benchmark's prompts, in the student's tokens."""
    from ..data import load_prompts
    from ..models import load_tokenizer

    examples = load_prompts(s.prompts, load_tokenizer(s.student)).examples
    return sum(len(e.prompt_ids) for e in examples) / len(examples)


def run_scaling(s: BenchSettings, out_dir: Path, quick: bool = False) -> tuple[dict, str]:
    from ..tracking import console
    from . import run_worker

    lengths = [64, 128, 256] if quick else [64, 128, 256, 512, 1024]
    ks = [1, 4, 16, 64] if quick else [1, 4, 16, 64, 256]
    result: dict = {"length": [], "k": [], "scoring_memory": []}
    for length in lengths:
        for objective in ("topk", "reverse_kl"):
            r = run_worker("opdkit", replace(s, new_tokens=length, objective=objective), out_dir,
                           f"len{length}-{objective}")
            row = {"length": length, "objective": objective, "step_seconds": min(r["step_seconds"]),
                   "phases": r["phases"][-1], "peak_rss_gb": r["peak_rss_gb"]}
            result["length"].append(row)
            console.print(f"  length {length} {objective}: {row['step_seconds']:.2f} s/step, {row['peak_rss_gb']:.2f} GB")
    for k in ks:
        r = run_worker("opdkit", replace(s, objective="topk", k=k), out_dir, f"k{k}")
        result["k"].append({"k": k, "step_seconds": min(r["step_seconds"]), "peak_rss_gb": r["peak_rss_gb"]})
        console.print(f"  k {k}: {result['k'][-1]['step_seconds']:.2f} s/step")
    result["scoring_memory"] = measure_scoring_memory(s)
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)  # the same threads as the workers, for a fair utilisation
    peaks = matmul_peak_tflops()
    base = next(r for r in result["length"] if r["length"] == s.new_tokens and r["objective"] == "topk")
    flops = phase_flops(s, prompt_len=mean_prompt_length(s))
    result["matmul_peak_tflops"] = peaks
    result["utilisation"] = {ph: flops[ph] / base["phases"][ph] / 1e12 / peaks["bfloat16"] for ph in flops}
    plot_scaling(result, out_dir / "scaling.png")
    return result, scaling_markdown(result, s)


def measure_scoring_memory(s: BenchSettings) -> list[dict]:
    return [scoring_memory(s.teacher, length, mode, s.batch) for length in SCORING_MEMORY_LENGTHS
            for mode in ("topk", "full")]


def plot_scaling(result: dict, out_png: Path) -> None:
    from ..plots import plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for objective, style in (("topk", "o-"), ("reverse_kl", "s--")):
        rows = [r for r in result["length"] if r["objective"] == objective]
        axes[0].plot([r["length"] for r in rows], [r["step_seconds"] for r in rows], style, label=objective)
        axes[1].plot([r["length"] for r in rows], [r["peak_rss_gb"] for r in rows], style, label=objective)
    axes[2].plot([r["k"] for r in result["k"]], [r["step_seconds"] for r in result["k"]], "o-")
    for mode, style in (("topk", "o-"), ("full", "s--")):
        rows = [r for r in result["scoring_memory"] if r["mode"] == mode]
        axes[3].plot([r["length"] for r in rows], [r["peak_growth_gb"] for r in rows], style,
                     label="top-16, chunked (opdkit)" if mode == "topk" else "full-vocab log-probs")
    titles = ("step time (s) vs new tokens", "peak RSS (GB) vs new tokens", "step time (s) vs k (top-k OPD)",
              "teacher scoring: peak RSS growth (GB) vs new tokens")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7) if ax.get_legend_handles_labels()[0] else None
        ax.set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def scaling_markdown(result: dict, s: BenchSettings) -> str:
    lengths = sorted({r["length"] for r in result["length"]})
    md = ["", f"Scaling (batch {s.batch}, opdkit only, step time = fastest of {s.steps} measured steps):", "",
          "| new tokens | top-k s/step | full-vocab s/step | top-k peak RSS GB | full-vocab peak RSS GB |",
          "|---|---|---|---|---|"]
    for length in lengths:
        t = next(r for r in result["length"] if r["length"] == length and r["objective"] == "topk")
        f = next(r for r in result["length"] if r["length"] == length and r["objective"] == "reverse_kl")
        md.append(f"| {length} | {t['step_seconds']:.2f} | {f['step_seconds']:.2f} | {t['peak_rss_gb']:.2f} | "
                  f"{f['peak_rss_gb']:.2f} |")
    md += ["", "| k | s/step |", "|---|---|"] + [f"| {r['k']} | {r['step_seconds']:.2f} |" for r in result["k"]]
    md += ["", f"Teacher scoring memory (batch {s.batch}): what is kept after scoring, and the peak RSS growth while "
           "scoring (polled every 2 ms):", "",
           "| new tokens | top-16 kept MiB | top-16 peak growth GB | full log-probs kept MiB | full peak growth GB |",
           "|---|---|---|---|---|"]
    for length in sorted({r["length"] for r in result["scoring_memory"]}):
        t = next(r for r in result["scoring_memory"] if r["length"] == length and r["mode"] == "topk")
        f = next(r for r in result["scoring_memory"] if r["length"] == length and r["mode"] == "full")
        md.append(f"| {length} | {t['kept_mb']:.2f} | {t['peak_growth_gb']:.2f} | {f['kept_mb']:.0f} | "
                  f"{f['peak_growth_gb']:.2f} |")
    peaks = result["matmul_peak_tflops"]
    md += ["", f"Measured matmul peak: {peaks['float32']:.2f} TFLOP/s fp32, {peaks['bfloat16']:.2f} TFLOP/s bf16. "
           "Fraction of the bf16 peak reached per phase (approximate FLOP counts, top-k, "
           f"{s.new_tokens} new tokens): " + ", ".join(f"{ph} {u:.0%}" for ph, u in result["utilisation"].items()),
           "", "![scaling](scaling.png)"]
    return "\n".join(md) + "\n"
