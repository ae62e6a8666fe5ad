"""What each "less work" optimisation buys, phase by phase, on one workload (``opdkit bench --ablation``).

One process builds the benchmark's ``Distiller`` once, samples one rollout and then times each phase with the
optimisation off and on, alternating (off, on, off, on, ...) so that load drift hits both. The samples are the
same with and without each optimisation (they are exact: see tests/test_rollout.py and tests/test_packing.py),
so each pair does the same useful work:

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
    for _ in range(repeats):
        for name, (share, compact) in rollout_modes.items():
            engine.share_prefill, engine.compact = share, compact
            box = {}
            times.setdefault(f"rollout: {name}", []).append(_timed(lambda: box.update(r=d.rollout(indices, seed))))
            if rollout is not None and not torch.equal(box["r"].response_ids, rollout.response_ids):
                raise RuntimeError(f"rollout mode {name!r} sampled different tokens (should be exact)")
            rollout = box["r"]
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
              "useful_tokens": useful, "rows": rows, "longest_response": T,
              "padded_positions": padded_positions, "packed_positions": packed_positions,
              "decode_row_steps_padded": rows * T, "decode_row_steps_compacted": useful}
    lines = [f"Ablation ({s.workload} workload, {s.batch} prompts x {s.n} samples, at most {s.new_tokens} new tokens, "
             f"one process, {s.threads or 'all'} thread(s), median of {repeats} alternating repeats): "
             f"{useful} useful response tokens in {rows} rows of up to {T}; a padded pass covers "
             f"{padded_positions} positions, the packed one {packed_positions}; decode does {rows * T} row-steps "
             f"padded and {useful} compacted.", "", "| phase and setting | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["seconds"].items()]
    return result, "\n".join(lines) + "\n"
