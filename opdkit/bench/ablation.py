"""What each "less work" optimisation buys, phase by phase, on one workload (``opdkit bench --ablation``).

One process builds the benchmark's ``Distiller`` once, samples one rollout and then times each phase with the
optimisation off and on, alternating (off, on, off, on, ...) so that load drift hits both. The samples are the
same with and without each optimisation up to float rounding (exact in fp32: tests/test_rollout.py and
tests/test_packing.py; a bf16 sampling copy rounds differently at another batch size, so a few rows may sample
other tokens: the table reports how many rows matched and the useful tokens of each mode), so each pair does
about the same useful work:

* rollout: ``rollout.share_prefill`` and ``rollout.compact`` (both off / prefill shared / both on);
* teacher scoring: ``teacher.packed`` off / on;
* the student's training forward and backward (no optimizer step): ``student.packed`` off / on.
"""

from __future__ import annotations

import statistics
import time

from .workers import BenchSettings


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_ablation(s: BenchSettings, repeats: int = 2) -> tuple[dict, str]:
    import torch

    from ..config import DistillConfig, load_config
    from ..train import Distiller, step_seed
    from .workers import min_new_tokens

    if s.threads:
        torch.set_num_threads(s.threads)
    overrides = [f"student.path={s.student}", f"teacher.path={s.teacher}", f"data.train={s.prompts}",
                 "eval.prompts=0", f"rollout.prompts_per_step={s.batch}", f"rollout.n={s.n}",
                 f"rollout.max_new_tokens={s.new_tokens}", f"rollout.min_new_tokens={min_new_tokens(s)}",
                 f"objective.name={s.objective}", f"optim.micro_batch_size={s.batch * s.n}",
                 "run.out_dir=/tmp/opdkit-bench-unused", f"run.seed={s.seed}", "data.shuffle=false", *s.extra]
    d = Distiller(load_config(DistillConfig, None, overrides), log_to_disk=False)
    indices = d.sampler.next_batch()
    seed = step_seed(d.cfg.run.seed, 1)
    engine, teacher = d.engine, d.teacher
    rollout_modes = {"padded, per-row prefill": (False, False), "shared prefill": (True, False),
                     "shared prefill + compaction": (True, True)}
    times: dict[str, list[float]] = {}
    rollout = None
    first: dict[str, object] = {}
    for _ in range(repeats):
        for name, (share, compact) in rollout_modes.items():
            engine.share_prefill, engine.compact = share, compact
            box = {}
            times.setdefault(f"rollout: {name}", []).append(_timed(lambda: box.update(r=d.rollout(indices, seed))))
            rollout = first.setdefault(name, box["r"])
    reference = first["padded, per-row prefill"]
    same_rows = {name: sum(bool(torch.equal(a, b)) for a, b in zip(r.response_ids, reference.response_ids))
                 if r.response_ids.shape == reference.response_ids.shape else
                 sum(bool(torch.equal(a[:min(len(a), len(b))], b[:min(len(a), len(b))]))
                     for a, b in zip(r.response_ids, reference.response_ids))
                 for name, r in first.items()}
    tokens = {name: int(r.response_mask.sum()) for name, r in first.items()}
    scores = None
    for _ in range(repeats):
        for packed in (False, True):
            teacher.packed = packed
            box = {}
            times.setdefault(f"teacher: {'packed' if packed else 'padded'}", []).append(
                _timed(lambda: box.update(s=d.score(rollout))))
            scores = box["s"]
    for _ in range(repeats):
        for packed in (False, True):
            d.student_packed = packed
            times.setdefault(f"train fwd+bwd: {'packed' if packed else 'padded'}", []).append(
                _timed(lambda: d.update(rollout, scores, None)))
            d.optimizer.zero_grad(set_to_none=True)
    mask = rollout.response_mask
    rows, T = mask.shape
    prompt_lens = [len(p) for p in rollout.prompt_ids]
    useful = int(mask.sum())
    padded_positions = rows * (max(prompt_lens) + T)
    packed_positions = sum(prompt_lens) + useful - rows
    result = {"seconds": {k: statistics.median(v) for k, v in times.items()}, "runs": times,
              "rollout_rows_as_reference": same_rows, "rollout_tokens": tokens,
              "useful_tokens": useful, "rows": rows, "longest_response": T,
              "padded_positions": padded_positions, "packed_positions": packed_positions,
              "decode_row_steps_padded": rows * T, "decode_row_steps_compacted": useful}
    lines = [f"Ablation ({s.workload} workload, {s.batch} prompts x {s.n} samples, at most {s.new_tokens} new tokens, "
             f"one process, {s.threads or 'all'} thread(s), median of {repeats} alternating repeats): "
             f"{useful} useful response tokens in {rows} rows of up to {T}; a padded pass covers "
             f"{padded_positions} positions, the packed one {packed_positions}; decode does {rows * T} row-steps "
             f"padded and {useful} compacted.", "", "| phase and setting | seconds | note |", "|---|---|---|"]
    for k, v in result["seconds"].items():
        mode = k.split(": ", 1)[1]
        note = (f"{tokens[mode]} tokens, {same_rows[mode]}/{rows} rows as without sharing"
                if k.startswith("rollout") else "same rollout")
        lines.append(f"| {k} | {v:.2f} | {note} |")
    return result, "\n".join(lines) + "\n"
