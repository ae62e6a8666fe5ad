"""``opdkit eval``: avg@n and pass@k on math benchmarks; ``opdkit gap-recovery`` from three result files.

Protocol of the paper (§3): n samples per problem at temperature 0.7 and top-p 0.95, the instruction
"Please reason step by step, and put your final answer within \\boxed{}." appended to problems that do not
already ask for an answer format, and a response is correct iff its explicit final answer (last ``\\boxed{}``
or ``Answer:`` line) matches the reference under math-verify (``opdkit.answers``).

* avg@n: the mean over problems of the fraction of its n samples that are correct (the paper's metric);
* pass@k: the unbiased estimator of Chen et al. (2021, Codex): with c correct out of n samples,
  pass@k = 1 − C(n−c, k) / C(n, k), averaged over problems (requires k ≤ n);
* gap recovery (§3.2): (after − before) / (teacher − before), per benchmark and on the benchmark average.

Benchmarks are verl parquet files (``prompt`` messages and ``reward_model.ground_truth``, as in
``../shared/data/eval``) or any JSONL/parquet with a column map (``{prompt: problem, answer: answer}``).
Sampling is batched with the KV-cache sampler; each (problem, sample) has its own seed, so results do not
depend on the batch size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from ..answers import extract_answer, score_response
from ..config import ConfigError, FrozenModelConfig, _help
from ..data import DatasetError, row_label
from ..evaluation import decode_responses
from ..models import eos_token_ids, load_causal_lm, load_tokenizer, model_vocab_size, resolve_model_path
from ..engines.hf_rollout import sample
from ..tracking import console
from .common import Progress, PromptsConfig, RecipeSamplingConfig, load_recipe_prompts, write_json, write_rows
from .rollout import slot_seed
from ..hardware import configure_threads


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k)/C(n, k) (Chen et al. 2021).

    Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), which avoids huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def summarise(correct: list[list[float]], ks: list[int]) -> dict:
    """avg@n and pass@k over problems from per-problem lists of 0/1 sample scores (each of length n)."""
    n = len(correct[0])
    if any(len(c) != n for c in correct):
        raise ValueError("every problem needs the same number of samples")
    out = {f"avg@{n}": sum(sum(c) / n for c in correct) / len(correct)}
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, int(sum(c)), k) for c in correct) / len(correct)
    return out


@dataclass
class EvalSamplingConfig(RecipeSamplingConfig):
    """``RecipeSamplingConfig`` with the paper's evaluation defaults."""

    n: int = _help("samples per problem (the paper: 16)", default=16)
    temperature: float = _help("sampling temperature (the paper: 0.7)", default=0.7)
    top_p: float = _help("nucleus threshold (the paper: 0.95)", default=0.95)
    max_new_tokens: int = _help("maximum response length (the paper: 31,744; keep it short on a CPU)", default=1024)
    batch_size: int = _help("sequences sampled together", default=64)
    seed: int = _help("base seed; every (problem, sample) gets its own seed", default=0)


@dataclass
class EvalRecipeConfig:
    RENAMED = {"prompts": "data", "sampling": "rollout"}  # old names, read with a deprecation warning

    model: FrozenModelConfig = field(default_factory=FrozenModelConfig)
    benchmarks: list = _help("benchmark files, or {name, path, columns} mappings; names default to the folder name "
                             "(…/MATH-500/test.parquet -> MATH-500)", default_factory=list)
    data: PromptsConfig = field(default_factory=PromptsConfig)
    rollout: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    pass_k: list = _help("k values of pass@k (each <= rollout.n; default: 1 and n)", default_factory=list)
    output: str = _help("results JSON (per-benchmark metrics); responses go to <output stem>.samples.jsonl",
                        default="runs/eval/results.json")
    save_samples: bool = _help("write every response with its score", default=True)
    threads: Optional[int] = _help("torch CPU threads (default: all cores)", default=None)

    def validate(self) -> None:
        self.model.validate()
        if not self.benchmarks:
            raise ConfigError("benchmarks is required: a list of files, e.g. "
                              "benchmarks=[../shared/data/eval/MATH-500/test.parquet]")
        for i, b in enumerate(self.benchmarks):
            if isinstance(b, dict):
                unknown = set(b) - {"name", "path", "columns"}
                if "path" not in b or unknown:
                    raise ConfigError(f"benchmarks[{i}] must be a file or a mapping with path (and optional name, "
                                      f"columns), got {b!r}")
            elif not isinstance(b, str):
                raise ConfigError(f"benchmarks[{i}] must be a file path, got {b!r}")
        s = self.rollout
        s.validate()
        for k in self.pass_k:
            if not isinstance(k, int) or not 1 <= k <= s.n:
                raise ConfigError(f"pass_k values must be integers in 1..rollout.n={s.n}, got {k!r}")
        if self.data.train:
            raise ConfigError("data.train is not used by opdkit eval: list the files under benchmarks")
        if self.data.limit is not None and self.data.limit <= 0:
            raise ConfigError(f"data.limit must be > 0, got {self.data.limit}")

    def ks(self) -> list[int]:
        return sorted(set(self.pass_k or [1, self.rollout.n]))


def benchmark_specs(cfg: EvalRecipeConfig) -> list[dict]:
    specs = []
    for b in cfg.benchmarks:
        spec = dict(b) if isinstance(b, dict) else {"path": b}
        path = Path(spec["path"])
        spec.setdefault("name", path.parent.name if path.stem in ("test", "train", "data") else path.stem)
        spec.setdefault("columns", {})
        specs.append(spec)
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"benchmark names must be unique, got {names}; give each a name")
    return specs


def evaluate_benchmark(model, tokenizer, spec: dict, cfg: EvalRecipeConfig, *, eos_ids: list[int], pad_id: int,
                       vocab_size: int) -> tuple[dict, list[dict]]:
    """Sample n responses per problem of one benchmark and score them. Returns (metrics, per-response rows)."""
    start = time.perf_counter()
    pcfg = PromptsConfig(**{**cfg.data.__dict__, "train": spec["path"], "columns": spec["columns"]})
    prompts, _ = load_recipe_prompts(pcfg, tokenizer)
    examples = prompts.examples
    missing = [ex.index for ex in examples if ex.answer is None]
    if missing:
        raise DatasetError(f"{row_label(spec['path'], missing[0])}: no reference answer; map the column, e.g. "
                           f"benchmarks=[{{path: {spec['path']}, columns: {{answer: solution}}}}]")
    s = cfg.rollout
    slots = [(i, j) for i in sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt_ids))
             for j in range(s.n)]
    scores = [[0.0] * s.n for _ in examples]
    rows: list[dict] = []
    lengths, truncated, no_answer = [], 0, 0
    progress = Progress(len(slots), 0, spec["name"])
    try:
        for b in range(0, len(slots), s.batch_size):
            batch = slots[b:b + s.batch_size]
            resp, mask, _, _, trunc = sample(
                model, [examples[i].prompt_ids for i, _ in batch], max_new_tokens=s.max_new_tokens, eos_ids=eos_ids,
                pad_id=pad_id, temperature=s.temperature, top_p=s.top_p, vocab_size=vocab_size,
                seeds=[slot_seed(s.seed, examples[i].index, j, 0) for i, j in batch])
            texts = decode_responses(tokenizer, resp, mask)
            for (i, j), text, t, n_tok in zip(batch, texts, trunc.tolist(), mask.sum(-1).tolist()):
                ex = examples[i]
                score = score_response(text, ex.answer)
                scores[i][j] = score
                answer = extract_answer(text)
                lengths.append(n_tok)
                truncated += bool(t)
                no_answer += answer is None
                rows.append({"benchmark": spec["name"], "row": ex.index, "sample": j, "correct": score,
                             "extracted": answer, "answer": ex.answer, "truncated": bool(t), "tokens": int(n_tok),
                             "response": text})
            progress.advance(len(batch), f"avg so far {sum(map(sum, scores)) / max(1, b + len(batch)):.3f}")
    finally:
        progress.close()
    metrics = summarise(scores, cfg.ks())
    metrics.update({"problems": len(examples), "samples_per_problem": s.n, "skipped_long_prompts": prompts.skipped_long,
                    "mean_tokens": sum(lengths) / len(lengths), "truncated_frac": truncated / len(lengths),
                    "no_answer_frac": no_answer / len(lengths), "seconds": time.perf_counter() - start,
                    "path": spec["path"]})
    rows.sort(key=lambda r: (r["row"], r["sample"]))
    return metrics, rows


def run_eval(cfg: EvalRecipeConfig) -> dict:
    configure_threads(cfg.threads)
    specs = benchmark_specs(cfg)
    model_dir = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, cfg.model.dtype).to(cfg.model.device).eval()
    eos_ids, pad_id, vocab = eos_token_ids(tokenizer, model), tokenizer.pad_token_id, model_vocab_size(model)
    results, all_rows = {}, []
    for spec in specs:
        metrics, rows = evaluate_benchmark(model, tokenizer, spec, cfg, eos_ids=eos_ids, pad_id=pad_id,
                                           vocab_size=vocab)
        results[spec["name"]] = metrics
        all_rows += rows
    keys = [f"avg@{cfg.rollout.n}"] + [f"pass@{k}" for k in cfg.ks()]
    average = {k: sum(r[k] for r in results.values()) / len(results) for k in keys}
    s = cfg.rollout
    report = {"model": cfg.model.path, "model_dir": str(model_dir),
              "settings": {"n": s.n, "temperature": s.temperature, "top_p": s.top_p,
                           "max_new_tokens": s.max_new_tokens, "seed": s.seed, "limit": cfg.data.limit,
                           "subset_seed": cfg.data.subset_seed, "suffix": cfg.data.prompt_suffix,
                           "add_suffix": cfg.data.add_suffix, "fewshot_turns": len(cfg.data.fewshot)},
              "benchmarks": results, "average": average, "output": cfg.output}
    out = Path(cfg.output)
    write_json(out, report)
    if cfg.save_samples:
        base = out.with_suffix("")
        write_rows(base.with_name(base.name + ".samples.jsonl"), all_rows)
    return report


def print_results(report: dict) -> None:
    from rich.table import Table

    keys = list(report["average"])
    s = report["settings"]
    table = Table(title=f"{report['model']}: n={s['n']}, T={s['temperature']}, top-p={s['top_p']}, "
                        f"max {s['max_new_tokens']} tokens")
    table.add_column("benchmark", no_wrap=True)
    for col in ["problems", *keys, "tokens", "trunc", "no ans"]:
        table.add_column(col, justify="right", no_wrap=True)
    for name, r in report["benchmarks"].items():
        table.add_row(name, str(r["problems"]), *(f"{r[k]:.3f}" for k in keys), f"{r['mean_tokens']:.0f}",
                      f"{r['truncated_frac']:.0%}", f"{r['no_answer_frac']:.0%}")
    if len(report["benchmarks"]) > 1:
        table.add_row("[bold]average[/]", "", *(f"{report['average'][k]:.3f}" for k in keys), "", "", "")
    console.print(table)


# --------------------------------------------------------------------------------------------------
# Gap recovery
# --------------------------------------------------------------------------------------------------


def gap_recovery(before: float, after: float, teacher: float) -> float | None:
    """(after − before) / (teacher − before); None when the teacher is no better than the student before."""
    gap = teacher - before
    if abs(gap) < 1e-12:
        return None
    return (after - before) / gap


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"results file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise DatasetError(f"{path}: not an opdkit eval results file (no 'benchmarks')")
    return data


def gap_recovery_report(before: dict, after: dict, teacher: dict, metric: str | None = None) -> dict:
    """Gap recovery per benchmark shared by the three result files, and on their average."""
    names = [b for b in before["benchmarks"] if b in after["benchmarks"] and b in teacher["benchmarks"]]
    if not names:
        raise DatasetError("the three results files share no benchmark")
    if metric is None:
        metric = next(k for k in before["benchmarks"][names[0]] if k.startswith("avg@"))
    rows = {}
    for name in names:
        vals = []
        for label, res in (("before", before), ("after", after), ("teacher", teacher)):
            if metric not in res["benchmarks"][name]:
                raise DatasetError(f"{label} results lack {metric} on {name}; pick a metric all three have with "
                                   f"--metric (e.g. avg@4, pass@1)")
            vals.append(res["benchmarks"][name][metric])
        rows[name] = {"before": vals[0], "after": vals[1], "teacher": vals[2], "gap_recovery": gap_recovery(*vals)}
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in ("before", "after", "teacher")}
    mean["gap_recovery"] = gap_recovery(mean["before"], mean["after"], mean["teacher"])
    return {"metric": metric, "benchmarks": rows, "average": mean}


def print_gap(report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"gap recovery on {report['metric']}: (after − before) / (teacher − before)")
    for col in ("benchmark", "before", "after", "teacher", "gap recovery"):
        table.add_column(col, justify="left" if col == "benchmark" else "right")
    fmt = lambda g: "n/a (teacher = before)" if g is None else f"{g:.1%}"  # noqa: E731
    for name, r in list(report["benchmarks"].items()) + [("average", report["average"])]:
        table.add_row(name, f"{r['before']:.3f}", f"{r['after']:.3f}", f"{r['teacher']:.3f}", fmt(r["gap_recovery"]))
    console.print(table)
