"""``opdkit probe``: will on-policy distillation from this teacher work for this student? Measured before training.

The probe samples the student (and the teacher) on a few prompts and measures, at step 0, everything the
paper (arXiv 2604.13016) found to decide the outcome of OPD:

* the exact full-vocabulary reverse KL(p_t‖q_t) on the student's own tokens and its distribution (Eq. 2/4);
* the token-level diagnostics of §4 on the same positions: top-k overlap ratio (Eq. 6), overlap-token
  advantage (Eq. 7), entropies and their gap (Eq. 8), overlap masses (Eqs. 9-10), via ``opdkit.diagnostics``;
* the teacher's mean log-prob of the student's tokens and of its own, and the student's of the teacher's;
* tokenizer and chat-template compatibility, the teacher's log-prob of the student's end-of-turn token and
  thinking-tag handling (``opdkit.compat``);
* a self-check: the teacher scored against itself through the same code paths must give KL ≈ 0, which fails
  on a shifted-by-one alignment or a teacher temperature that differs from the student's;
* where the prompts have answers: student and teacher accuracy and the share of prompts the teacher solves
  and the student does not (the paper's "new capability" condition, §3.2);
* a verdict with reasons and the paper's recipe (``decide``), and a ranking of several candidate teachers.

Every number can be recomputed from ``--dump-rollouts``: one JSON line per rollout with the token ids the
models saw.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from . import losses
from .answers import score_response
from .compat import compare_special_tokens, compare_templates, think_fraction, thinking_support
from .config import (AUTO_DTYPE_HELP, BatchSamplingConfig, ConfigError, Dtype, FrozenModelConfig, PromptDataConfig,
                     ScoringTeacherConfig, _get, _help, load_config)
from .data import Example, load_prompts, render_prompt
from .diagnostics import (auroc, masked_mean, position_bins, sequence_mean_reward, topk_diagnostics,
                          windowed_diagnostics)
from .distributed import pad_cat
from .evaluation import decode_responses
from .models import (DTYPES, TokenizerMismatchError, check_tokenizers, eos_token_ids, freeze, load_causal_lm,
                     load_tokenizer, model_vocab_size, resolve_model_path)
from .candidates import Candidates
from .engines.base import Rollout, TeacherScores
from .engines.hf_rollout import HFRolloutEngine, row_seeds, sample
from .engines.hf_teacher import HFTeacher
from .objectives import ReverseKL
from .student import TeacherLogits, student_forward
from .tracking import console
from .hardware import configure_threads

# Per-token reverse-KL levels (nats) whose exceedance fractions the probe reports.
KL_LEVELS = (0.01, 0.1, 0.5, 1.0, 2.0, 5.0)
PERCENTILES = (10, 25, 50, 75, 90, 99)

# The top-level keys every probe result has (None where a quantity could not be measured).
RESULT_KEYS = ("reverse_kl", "overlap_ratio", "overlap_token_advantage", "entropy_student", "entropy_teacher",
               "entropy_gap", "overlap_mass_student", "overlap_mass_teacher", "self_check_reverse_kl", "k", "verdict",
               "reasons")
# Verdicts from least to most serious; ``rank`` orders candidate teachers by their most serious issue first.
VERDICTS = ("distill", "align_template", "cold_start", "change_teacher", "fix_setup", "incompatible_tokenizer")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class ProbeThresholds:
    """Decision thresholds; docs/probe-and-report.md explains how each comes from the paper's numbers."""

    self_check_kl: float = _help(
        "max reverse KL (nats/token) of the teacher against itself; a correct setup gives 0 up to rounding", default=1e-3)
    min_overlap_ratio: float = _help(
        "initial top-k overlap below this = pattern mismatch (the paper's working pairs start at 0.70-0.76)",
        default=0.6)
    min_overlap_mass: float = _help(
        "student or teacher mass on the shared top-k below this = support mismatch (paper: 0.97-0.99)",
        default=0.9)
    min_eos_logp: float = _help(
        "teacher log-prob of the student's end-of-turn token below this = EOS mismatch (log 1e-3)", default=-6.9)
    template_shift_share: float = _help(
        "template-only KL above this share of the initial reverse KL = the template matters", default=0.1)
    template_accuracy_gain: float = _help(
        "teacher accuracy gain of the other prompt rendering that calls for switching to it", default=0.1)
    think_gap: float = _help("difference in the share of rollouts with think tags that counts as a thinking-pattern "
                             "mismatch", default=0.5)
    min_new_capability: float = _help(
        "share of prompts the teacher solves and the student does not, below which the teacher adds nothing",
        default=0.1)
    min_graded_prompts: int = _help("fewer prompts with answers than this: no capability verdict", default=8)
    vopd_ratio: float = _help(
        "vOPD's baseline shrinking the sampled-token gradient's second moment below this share = recommend "
        "objective.baseline=vopd for the policy-gradient forms", default=0.8)
    prune_min_length: float = _help(
        "student responses at least this long on average (tokens) = judge Prune-OPD for them", default=256.0)
    prune_overlap_drop: float = _help(
        "top-k overlap of the last response quarter this much below the first = the prefix drifts: recommend "
        "Prune-OPD truncate", default=0.05)


@dataclass
class ProbeStudentConfig(FrozenModelConfig):
    path: str = _help("HF model directory, .gguf file or bundled name of the student", default="")
    device: str = _help("the probe runs its models on the CPU (cpu)", default="cpu")
    dtype: Dtype = _help("dtype of the student when scoring" + AUTO_DTYPE_HELP, default="auto")
    sampling_dtype: Dtype = _help("dtype of the student's sampling copy" + AUTO_DTYPE_HELP, default="auto")


@dataclass
class ProbeTeacherConfig(ScoringTeacherConfig):
    device: str = _help("the probe runs its models on the CPU (cpu)", default="cpu")


@dataclass
class ProbeDataConfig(PromptDataConfig):
    limit: Optional[int] = _help("prompts drawn from data.train: a random subset seeded by rollout.seed (all: "
                                 "null)", default=32)


@dataclass
class ProbeSamplingConfig(BatchSamplingConfig):
    n: int = _help("rollouts per prompt for each model", default=1)
    temperature: float = _help("sampling temperature of both models, and the student's scoring temperature",
                               default=1.0)
    batch_size: int = _help("rows per sampling/scoring batch", default=16)
    seed: int = _help("seed of the prompt subset and of sampling", default=0)


# The flat keys of the first probe config, each now the key of the shared vocabulary that means the same.
PROBE_RENAMED = {
    "samples_per_prompt": "rollout.n", "n": "rollout.n", "max_new_tokens": "rollout.max_new_tokens",
    "temperature": "rollout.temperature", "top_p": "rollout.top_p", "seed": "rollout.seed",
    "batch_size": "rollout.batch_size", "prompts": "data.train", "n_prompts": "data.limit",
    "columns": "data.columns", "prompt_suffix": "data.prompt_suffix", "system_prompt": "data.system_prompt",
    "chat_template_kwargs": "data.chat_template_kwargs", "max_prompt_length": "data.max_prompt_length",
    "teacher_temperature": "teacher.temperature", "teacher_chat_template": "teacher.chat_template",
    "teacher_chat_template_kwargs": "teacher.chat_template_kwargs", "student_dtype": "student.dtype",
    "sampling_dtype": "student.sampling_dtype", "teacher_dtype": "teacher.dtype"}


@dataclass
class ProbeConfig:
    RENAMED = PROBE_RENAMED  # old names, read with a deprecation warning

    student: ProbeStudentConfig = field(default_factory=ProbeStudentConfig)
    teacher: ProbeTeacherConfig = field(default_factory=ProbeTeacherConfig)
    teachers: list = _help("several candidate teachers to rank for the student (paths; each scored with the "
                           "teacher section's other keys)", default_factory=list)
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    rollout: ProbeSamplingConfig = field(default_factory=ProbeSamplingConfig)
    k: int = _help("top-k size of the overlap diagnostics (the paper: 16; distill: objective.k)", default=16)
    chunk_size: int = _help("positions per chunk of the vocabulary projections", default=512)
    json: str = _help("write the result JSON here (default: print it to stdout)", default="")
    dump_rollouts: str = _help("write every rollout (token ids, per-token numbers) here as JSON lines",
                               default="")
    threads: Optional[int] = _help("torch CPU threads (default: this process's share of the cores)", default=None)
    thresholds: ProbeThresholds = field(default_factory=ProbeThresholds)

    @property
    def teacher_list(self) -> list[str]:
        return ([self.teacher.path] if self.teacher.path else []) + [str(t) for t in self.teachers]

    def validate(self) -> None:
        if not self.student.path:
            raise ConfigError("student.path is required (--student or student=PATH)")
        if not self.teacher_list:
            raise ConfigError("give a teacher (--teacher T) or several (--teachers T1 T2 ...)")
        for key in ("student.device", "teacher.device"):
            if _get(self, key) != "cpu":
                raise ConfigError(f"{key}={_get(self, key)!r}: opdkit probe runs its models on the CPU (the models "
                                  f"are small enough to probe there); use {key}=cpu")
        self.data.validate()  # data.train (--prompts FILE.jsonl) is required
        self.rollout.validate()
        for key in ("k", "chunk_size", "teacher.temperature"):
            if _get(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {_get(self, key)}")


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def distribution(values: torch.Tensor, levels: tuple[float, ...] = KL_LEVELS) -> dict:
    """Mean, spread, percentiles, max and the share above each level of a 1-D sample (NaN-free)."""
    v = values.double().flatten()
    if v.numel() == 0:
        return {"count": 0}
    q = torch.quantile(v, torch.tensor([p / 100 for p in PERCENTILES], dtype=v.dtype))
    return {"count": int(v.numel()), "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            **{f"p{p}": float(x) for p, x in zip(PERCENTILES, q)}, "max": float(v.max()),
            "frac_above": {str(level): float((v > level).double().mean()) for level in levels}}


def per_prompt_solved(correct: list[float | None], example_index: list[int]) -> dict[int, bool]:
    """pass@n per prompt: True if any of its graded rollouts is correct (prompts without answers left out)."""
    solved: dict[int, bool] = {}
    for c, i in zip(correct, example_index):
        if c is not None:
            solved[i] = solved.get(i, False) or c > 0.5
    return solved


def capability(student_correct: list, student_index: list[int], teacher_correct: list,
               teacher_index: list[int]) -> dict | None:
    """Accuracy of both models and the paper's "new capability" share (§3.2): prompts the teacher solves and
    the student does not. None when no prompt has an answer."""
    s, t = per_prompt_solved(student_correct, student_index), per_prompt_solved(teacher_correct, teacher_index)
    graded = sorted(set(s) & set(t))
    if not graded:
        return None
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"graded_prompts": len(graded),
            "student": mean([c for c in student_correct if c is not None]),
            "teacher": mean([c for c in teacher_correct if c is not None]),
            "new_capability_share": mean([float(t[i] and not s[i]) for i in graded]),
            "student_only_share": mean([float(s[i] and not t[i]) for i in graded])}


@dataclass
class SelfCheck:
    """The teacher against itself: ``reverse_kl`` must be ≈ 0 (exact, full vocabulary, nats/token)."""

    reverse_kl: float
    max_token_kl: float
    sampled_logratio: float  # mean |log p(ŷ) − log q(ŷ)| on the sampled tokens
    tolerance: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.reverse_kl) and self.reverse_kl <= self.tolerance

    def message(self) -> str:
        if self.passed:
            return f"self-check passed: teacher vs itself reverse KL {self.reverse_kl:.2e} ≤ {self.tolerance:g}"
        return (f"SELF-CHECK FAILED: the teacher scored against itself gives reverse KL {self.reverse_kl:.4f} "
                f"nats/token (max {self.max_token_kl:.3f}, tolerance {self.tolerance:g}); it must be ≈ 0. The "
                f"teacher's scores do not line up with the student's: check that teacher_temperature equals "
                f"temperature, that responses are not shifted by one token against their prompts, and that the "
                f"teacher reads the prompt the student saw. Every OPD signal from this setup would be wrong.")


@dataclass
class Finding:
    """What one check of ``decide`` concluded. ``notes`` are observations it records whatever the outcome;
    ``issue`` (a ``VERDICTS`` name, None when the check passes) comes with the ``reasons`` behind it and the
    recipe ``step`` that fixes it. A ``final`` issue stops the verdict: nothing measured after it can be trusted."""

    notes: list[str] = field(default_factory=list)
    issue: str | None = None
    reasons: list[str] = field(default_factory=list)
    step: str = ""
    final: bool = False


def check_tokenizer(r: dict, th: ProbeThresholds) -> Finding:
    """OPD scores the student's token ids with the teacher: they must mean the same tokens."""
    if not r.get("tokenizer_error"):
        return Finding()
    return Finding(issue="incompatible_tokenizer", final=True,
                   reasons=[f"tokenizers are incompatible: {r['tokenizer_error']}"],
                   step="pick a teacher that shares the student's tokenizer (same model family); OPD scores the "
                        "student's token ids with the teacher")


def check_self_consistency(r: dict, th: ProbeThresholds) -> Finding:
    """The teacher against itself must give KL ≈ 0; otherwise every other number shares the broken alignment."""
    sc = r["self_check"]
    if sc["passed"]:
        return Finding(notes=[f"self-check passed (teacher vs itself: {sc['reverse_kl']:.1e} nats/token)"])
    return Finding(issue="fix_setup", final=True, reasons=[sc["message"]],
                   step="fix the scoring setup (teacher_temperature = temperature, prompt/response alignment) and "
                        "probe again; nothing else here can be trusted until the self-check passes")


def _eos_fixes(r: dict, th: ProbeThresholds) -> list[str]:
    eos, fixes = r["eos"], []
    if not eos["student_eos_is_teacher_eos"]:
        fixes.append(f"the student ends turns with {eos['student_eos_tokens']} but the teacher with "
                     f"{eos['teacher_eos_tokens']}")
    eos_logp = eos.get("teacher_logp_student_eos_at_teacher_end")
    if eos_logp is not None and eos_logp < th.min_eos_logp:
        fixes.append(f"where the teacher ends its own turn it gives the student's end-of-turn token log-prob "
                     f"{eos_logp:.1f} (< {th.min_eos_logp})")
    return fixes


def _rendering_notes_and_fixes(r: dict, th: ProbeThresholds) -> tuple[list[str], list[str]]:
    ta = r.get("template_alignment")
    if not ta:
        return ["both templates render the prompt identically"], []
    shift, kl = ta["shift_reverse_kl"], r["reverse_kl"]
    share = shift / kl if kl else math.inf
    got, alt = ta["renderings"][ta["configured"]], ta["renderings"][ta["better"]]
    gain = (alt["accuracy"] - got["accuracy"]) if alt["accuracy"] is not None else 0.0
    note = (f"the chat templates render the prompt differently; the template alone moves the teacher by "
            f"{shift:.3f} nats/token ({share:.0%} of the initial reverse KL)")
    if ta["better"] == ta["configured"]:
        return [f"{note}; the teacher reads the {ta['configured']} rendering, which suits it best (accuracy "
                f"{_fmt(got['accuracy'])}, finished {got['ended']:.0%})"], []
    where = (f"the teacher does better reading the {ta['better']} rendering (accuracy {_fmt(alt['accuracy'])} vs "
             f"{_fmt(got['accuracy'])}, finished {alt['ended']:.0%} vs {got['ended']:.0%})")
    if share > th.template_shift_share or gain >= th.template_accuracy_gain:
        return [], [f"{note}, and {where}: use teacher.chat_template={ta['better']}"]
    return [f"{note}; {where}, a difference too small to act on"], []


def check_template(r: dict, th: ProbeThresholds) -> Finding:
    """The teacher must read the conversation in a layout it knows, and end turns where the student does (§5.2a)."""
    notes, fixes = _rendering_notes_and_fixes(r, th)
    fixes = _eos_fixes(r, th) + fixes
    return Finding(notes=notes, issue="align_template" if fixes else None, reasons=fixes,
                   step="give the teacher its aligned template: the rendering it does better with (teacher."
                        "chat_template), the student's end-of-turn token mapped to the teacher's, and prompts in "
                        "the teacher's post-training format (paper §5.2a: the teacher-aligned template raised the "
                        "initial overlap and the recovered gap from ~80% to ~85%)")


def check_support(r: dict, th: ProbeThresholds) -> Finding:
    """Thinking pattern and support overlap (§3.1, §5.1): can the student's states be scored meaningfully?

    The overlap ratio counts every top-k slot alike; with peaked distributions most slots hold negligible
    probability and their order is noise, so a low ratio is a mismatch only if the shared set also misses the
    mass (the paper's complementary check, App. C.2).
    """
    notes, pattern = [], []
    masses = (f"the shared top-{r['k']} holds {r['overlap_mass_student']:.2f} of the student's and "
              f"{r['overlap_mass_teacher']:.2f} of the teacher's mass")
    mass_ok = min(r["overlap_mass_student"], r["overlap_mass_teacher"]) >= th.min_overlap_mass
    ratio = f"initial top-{r['k']} overlap {r['overlap_ratio']:.2f}"
    if r["overlap_ratio"] >= th.min_overlap_ratio:
        notes.append(f"{ratio} ≥ {th.min_overlap_ratio} (paper's working pairs: 0.70-0.76)")
    elif mass_ok:
        notes.append(f"{ratio} < {th.min_overlap_ratio}, but {masses} (≥ {th.min_overlap_mass}): the models "
                     f"disagree only on low-probability tokens")
    else:
        pattern.append(f"{ratio} < {th.min_overlap_ratio} (the paper's working pairs start at 0.70-0.76)")
    if mass_ok:
        notes.append(f"{masses} (paper: 0.97-0.99)")
    else:
        pattern.append(f"{masses} (< {th.min_overlap_mass}; paper: 0.97-0.99)")
    think = r["compatibility"]["thinking"]
    gap = abs(think["teacher_rollouts_with_think"] - think["student_rollouts_with_think"])
    if math.isfinite(gap) and gap >= th.think_gap:
        pattern.append(f"thinking pattern differs: think tags in {think['student_rollouts_with_think']:.0%} of "
                       f"student and {think['teacher_rollouts_with_think']:.0%} of teacher rollouts")
    return Finding(notes=notes, issue="cold_start" if pattern else None, reasons=pattern,
                   step="off-policy cold start first: SFT the student on the teacher's own rollouts, filtered to "
                        "complete, non-repetitive (and correct) responses, then OPD from that checkpoint (paper "
                        "§5.1: the SFT student starts with higher overlap and ends higher)")


def check_new_capability(r: dict, th: ProbeThresholds) -> Finding:
    """The teacher must know something the student does not (§3.2)."""
    acc = r.get("accuracy")
    if not acc:
        return Finding(notes=["the prompts have no answers: the new-capability condition (§3.2) cannot be checked; "
                              "watch held-out accuracy early in training. If the answers are in another column, map "
                              "it with columns={answer: <column>}"])
    if acc["graded_prompts"] < th.min_graded_prompts:
        return Finding(notes=[f"only {acc['graded_prompts']} prompts have answers (< {th.min_graded_prompts}): "
                              f"capability not judged"])
    share = acc["new_capability_share"]
    summary = (f"teacher accuracy {acc['teacher']:.2f} vs student {acc['student']:.2f}; the teacher solves "
               f"{share:.0%} of {acc['graded_prompts']} prompts the student does not")
    if share >= th.min_new_capability:
        return Finding(notes=[summary])
    return Finding(issue="change_teacher",
                   reasons=[summary + f" (< {th.min_new_capability:.0%}: no new capability to transfer)"],
                   step="choose another teacher with capability the student lacks (paper §3.2: an RL-post-trained "
                        "teacher recovered 58.6% of the gap, a same-pipeline one 15.6%) or prompts the teacher "
                        "solves and the student does not")


# From the most to the least fundamental: scoring setup, template and end-of-turn, thinking pattern and support
# overlap, new capability.
CHECKS = (check_tokenizer, check_self_consistency, check_template, check_support, check_new_capability)


def closing_step(fired: list[str]) -> str | None:
    """The recipe's last step: probe again after aligning the template, else distil unless the teacher must go."""
    if "align_template" in fired:
        return "probe again with the aligned template: the overlap and capability numbers above were measured on " \
               "the misaligned one"
    if "change_teacher" in fired:
        return None
    return "distil: opdkit distill with this teacher (paper defaults: top-k 16, student top-k set, temperature " \
           "1.0); watch diag/overlap_ratio rise and diag/entropy_gap shrink"


def vopd_advice(r: dict, th: ProbeThresholds, fired: list[str]) -> Finding:
    """Advice, not an issue: vOPD's baseline where it measurably shrinks the policy-gradient's second moment."""
    vopd = r.get("vopd_second_moment_ratio")
    if vopd is None or not math.isfinite(vopd):
        return Finding()
    pg = (f"vOPD's baseline (-KL per token) would scale the sampled-token gradient's second moment by {vopd:.2f} "
          f"on these rollouts")
    if vopd < th.vopd_ratio and "align_template" not in fired and "change_teacher" not in fired:
        return Finding(notes=[pg + f" (< {th.vopd_ratio})"],
                       step="if you train a policy-gradient form (objective.name=sampled, or objective.form=pg), set "
                            "objective.baseline=vopd: same expected gradient, lower variance here")
    return Finding(notes=[pg + ("; keep objective.baseline=none" if vopd >= 1 else "")])


def prune_advice(r: dict, th: ProbeThresholds, fired: list[str]) -> Finding:
    """Advice, not an issue: Prune-OPD for long responses, only where the overlap falls along them.

    Prune-OPD truncates a row once its top-k overlap stays low: a saving where low overlap marks a drifted prefix,
    random cuts where the overlap is simply low everywhere (the real study's long pair: 0.70-0.74 in every
    quarter, so the threshold that fires is the average and prunes rows at random as much as at drift).
    """
    length = ((r.get("rollouts") or {}).get("student") or {}).get("len_mean")
    quarters = r.get("by_position") or {}
    first, last = (quarters.get(q, {}).get("overlap_ratio") for q in ("pos_q1", "pos_q4"))
    if length is None or length < th.prune_min_length or None in (first, last):
        return Finding()
    if "change_teacher" in fired or "align_template" in fired:
        return Finding()
    seen = (f"student responses average {length:.0f} tokens; top-{r['k']} overlap {first:.2f} in the first "
            f"quarter of the response, {last:.2f} in the last")
    if first - last >= th.prune_overlap_drop:
        threshold = round((first + last) / 2, 2)
        return Finding(notes=[seen + f": the overlap falls by {first - last:.2f} (≥ {th.prune_overlap_drop})"],
                       step=f"long responses whose overlap falls along them: objective.prune=truncate with "
                            f"objective.prune_threshold={threshold} (between the early and late overlap) stops "
                            f"drifted rows and saves their tokens (Prune-OPD); watch prune/pruned_frac")
    return Finding(notes=[seen + ": it does not fall along the response, so Prune-OPD's threshold would cut rows "
                                 "at random, not at drift; keep objective.prune=none"])


def decide(r: dict, th: ProbeThresholds) -> dict:
    """The verdict, its reasons and the recommended recipe from one teacher's probe numbers (paper §3-§5).

    Runs ``CHECKS`` in order. The verdict is the first issue that fires (what to do first); ``issues`` lists all
    that fired, and the recipe every fix that applies, in order, ending with ``closing_step``. Once the template
    is misaligned, later findings are provisional (measured on the wrong layout): their reasons are kept,
    marked, but they neither fire nor add a step.
    """
    reasons: list[str] = []
    recipe: list[str] = []
    fired: list[str] = []
    for check in CHECKS:
        f = check(r, th)
        if f.issue and f.final:
            return {"verdict": f.issue, "issues": [f.issue], "reasons": reasons + f.notes + f.reasons,
                    "recipe": [f.step]}
        reasons += f.notes
        if f.issue is None:
            continue
        if "align_template" in fired:
            reasons += [f"(with the misaligned template) {why}" for why in f.reasons]
            continue
        reasons += f.reasons
        fired.append(f.issue)
        recipe.append(f.step)
    for advice in (vopd_advice(r, th, fired), prune_advice(r, th, fired)):
        reasons += advice.notes
        recipe += [advice.step] if advice.step else []
    last = closing_step(fired)
    return {"verdict": fired[0] if fired else "distill", "issues": fired, "reasons": reasons,
            "recipe": recipe + ([last] if last else [])}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def rank(results: list[dict]) -> list[dict]:
    """Order candidate teachers: by their most serious issue (``VERDICTS`` order), then new-capability share
    (the paper's strongest predictor, §3.2), then initial overlap (§3.1), then lower initial reverse KL."""
    def key(r: dict):
        acc = r.get("accuracy") or {}
        worst = max((VERDICTS.index(i) for i in r.get("issues") or []), default=0)
        return (worst, -(acc.get("new_capability_share") or 0.0),
                -(r.get("overlap_ratio") or 0.0), r.get("reverse_kl") or math.inf)

    ordered = sorted(results, key=key)
    return [{"rank": i + 1, "teacher": r["teacher"], "verdict": r["verdict"],
             "new_capability_share": (r.get("accuracy") or {}).get("new_capability_share"),
             "overlap_ratio": r.get("overlap_ratio"), "reverse_kl": r.get("reverse_kl")}
            for i, r in enumerate(ordered)]


# --------------------------------------------------------------------------------------------------
# Scoring a pair of models on one set of rollouts
# --------------------------------------------------------------------------------------------------


@dataclass
class PairScores:
    """Both models on the same response tokens, (B, T, ...), 0 where masked.

    ``kl`` is the exact full-vocabulary KL(p_t‖q_t) of the model in the student role against the teacher;
    ``student_logp_at`` (B, T, k) its log-probs on the student half S^p_t of the candidates (None without top-k).
    """

    student_logp: torch.Tensor
    student_logp_at: torch.Tensor | None
    student_entropy: torch.Tensor
    kl: torch.Tensor
    teacher: TeacherScores


def score_pair(student_model, teacher, student_prompts: list[list[int]], teacher_prompts: list[list[int]],
               response_ids: torch.Tensor, response_mask: torch.Tensor, *, pad_id: int, vocab_size: int,
               temperature: float, k: int = 0, student_topk_ids: torch.Tensor | None = None,
               teacher_at_ids: torch.Tensor | None = None, chunk_size: int = 512, batch_size: int = 16
               ) -> PairScores:
    """Score responses with a teacher engine and a model in the student role, in row batches.

    The student side runs exactly as in training (``student_forward`` at ``temperature``, full-vocabulary
    reverse KL against the teacher's logits recomputed from its hidden states); the teacher side is the
    engine's own ``score``. ``teacher_at_ids`` (B, T, C) asks the teacher for log-probs at extra ids (default:
    the student's top-k).
    """
    parts: dict[str, list] = {}
    for start in range(0, len(student_prompts), batch_size):
        rows = slice(start, start + batch_size)
        resp, mask = response_ids[rows], response_mask[rows]
        topk = None if student_topk_ids is None else student_topk_ids[rows]
        at = topk if teacher_at_ids is None else teacher_at_ids[rows]
        scores = teacher.score(teacher_prompts[rows], resp, mask, k=k, student_topk_ids=at, keep_hidden=True)
        with torch.no_grad():
            candidates = Candidates.of(topk, None)  # the student's top-k S^p only
            out = student_forward(student_model, student_prompts[rows], resp, mask, pad_id=pad_id,
                                  vocab_size=vocab_size, candidates=candidates, chunk_size=chunk_size,
                                  temperature=temperature, compute_dtype=None, head_dtype=torch.float32,
                                  objective=ReverseKL(), teacher=TeacherLogits(scores.hidden, teacher.head_logits))
        scores.hidden = None
        on_student = None if candidates is None else candidates.student(out.logp_at)
        for name, value in (("student_logp", out.logp_sampled), ("student_logp_at", on_student),
                            ("student_entropy", out.entropy), ("kl", out.full_loss), ("teacher", scores)):
            parts.setdefault(name, []).append(value)
    teacher_fields = {f: pad_cat([getattr(s, f) for s in parts["teacher"]]) for f in TeacherScores.__dataclass_fields__
                      if f != "hidden"}
    return PairScores(pad_cat(parts["student_logp"]), pad_cat(parts["student_logp_at"]),
                      pad_cat(parts["student_entropy"]), pad_cat(parts["kl"]), TeacherScores(**teacher_fields))


def self_check(model, teacher, prompts: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor,
               *, pad_id: int, vocab_size: int, temperature: float, tolerance: float, chunk_size: int = 512,
               batch_size: int = 16) -> SelfCheck:
    """Score ``model`` (the teacher's own weights in the student role, at the student's ``temperature``)
    against the ``teacher`` engine on the same prompts: every path that lines the two up is exercised, and a
    correct setup gives KL ≈ 0. A response shifted by one, or a teacher temperature other than the student's,
    gives a clearly positive KL."""
    pair = score_pair(model, teacher, prompts, prompts, response_ids, response_mask, pad_id=pad_id,
                      vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size, batch_size=batch_size)
    m = response_mask
    logratio = (pair.student_logp - pair.teacher.sampled_logp).abs()
    return SelfCheck(masked_mean(pair.kl, m), float(pair.kl[m].max()) if m.any() else float("nan"),
                     masked_mean(logratio, m), tolerance)


# --------------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------------


@dataclass
class StudentSide:
    """The student, its prompts (rendered with its template) and its rollouts, shared by every teacher."""

    cfg: ProbeConfig
    path: str
    tokenizer: object
    model: object
    sampler: object  # the sampling copy (``sampling_dtype``)
    examples: list[Example]
    eos_ids: list[int]
    pad_id: int
    vocab_size: int | None = None
    rollout: Rollout | None = None
    texts: list[str] = field(default_factory=list)
    correct: list = field(default_factory=list)


@dataclass
class TeacherRun:
    """The teacher's own rollouts on one rendering of the prompts, scored by both models."""

    rendering: str  # "student" (the student's rendered prompt) or "own" (the teacher's template)
    rollout: Rollout
    texts: list[str]
    correct: list
    pair: PairScores  # student role = the student reading its own prompt; teacher = the engine

    def summary(self, eos_ended: torch.Tensor) -> dict:
        graded = [c for c in self.correct if c is not None]
        m = self.rollout.response_mask
        return {"accuracy": sum(graded) / len(graded) if graded else None,
                "ended": float((~self.rollout.truncated).float().mean()),
                "teacher_logp_own_tokens": masked_mean(self.pair.teacher.sampled_logp, m),
                "len_mean": float(m.sum(-1).float().mean()),
                "ended_with_student_eos": float(eos_ended.any(-1).float().mean())}


def _sample_examples(cfg: ProbeConfig, tokenizer) -> list[Example]:
    examples = load_prompts(cfg.data.train, tokenizer, columns=cfg.data.columns, columns_option="columns",
                            prompt_suffix=cfg.data.prompt_suffix,
                            system_prompt=cfg.data.system_prompt, chat_template_kwargs=cfg.data.chat_template_kwargs,
                            max_prompt_length=cfg.data.max_prompt_length).examples
    if cfg.data.limit is None or len(examples) <= cfg.data.limit:
        return examples
    chosen = sorted(random.Random(cfg.rollout.seed).sample(range(len(examples)), cfg.data.limit))
    return [examples[i] for i in chosen]


def _generate(model, prompts: list[list[int]], cfg: ProbeConfig, *, eos_ids: list[int], pad_id: int, topk: int,
              seed: int, vocab_size: int) -> Rollout:
    """``n`` responses per prompt, sampled in row batches (row seeds ignore the batching)."""
    n = cfg.rollout.n
    rows = [p for p in prompts for _ in range(n)]
    index = [i for i in range(len(prompts)) for _ in range(n)]
    parts = []
    for start in range(0, len(rows), cfg.rollout.batch_size):
        batch = rows[start:start + cfg.rollout.batch_size]
        parts.append(sample(model, batch, max_new_tokens=cfg.rollout.max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, topk=topk,
                            seeds=row_seeds(seed, start, len(batch)), vocab_size=vocab_size))
    resp, mask, logp, top = (pad_cat([p[j] for p in parts]) for j in range(4))
    return Rollout(rows, resp, mask, logp, top, torch.cat([p[4] for p in parts]), index, n)


def _decode(tokenizer, rollout: Rollout, skip_special: bool = True) -> list[str]:
    return decode_responses(tokenizer, rollout.response_ids, rollout.response_mask, skip_special)


def _grade(texts: list[str], rollout: Rollout, examples: list[Example]) -> list:
    return [score_response(text, examples[i].answer) for text, i in zip(texts, rollout.example_index)]


def _ended_with(rollout: Rollout, eos_ids: list[int]) -> torch.Tensor:
    """(B, T) True at the EOS token (one of ``eos_ids``) that ended a finished response."""
    is_eos = torch.isin(rollout.response_ids, torch.tensor(eos_ids)) & rollout.response_mask
    return is_eos & ~rollout.truncated[:, None]


def load_student(cfg: ProbeConfig) -> StudentSide:
    path = resolve_model_path(cfg.student.path)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, cfg.student.dtype)
    freeze(model)
    sampler = HFRolloutEngine(model, eos_ids=eos_token_ids(tokenizer, model), pad_id=tokenizer.pad_token_id,
                              sampling_dtype=DTYPES[cfg.student.sampling_dtype]).model
    sampler.eval()
    return StudentSide(cfg, cfg.student.path, tokenizer, model, sampler, _sample_examples(cfg, tokenizer),
                       eos_token_ids(tokenizer, model), tokenizer.pad_token_id)


def sample_student(s: StudentSide, vocab_size: int) -> None:
    """The student's rollouts with its top-k ids at every position, on the ids it shares with the teacher."""
    if s.rollout is not None and s.vocab_size == vocab_size:
        return
    s.vocab_size = vocab_size
    s.rollout = _generate(s.sampler, [ex.prompt_ids for ex in s.examples], s.cfg, eos_ids=s.eos_ids,
                          pad_id=s.pad_id, topk=s.cfg.k, seed=s.cfg.rollout.seed, vocab_size=vocab_size)
    s.texts = _decode(s.tokenizer, s.rollout)
    s.correct = _grade(s.texts, s.rollout, s.examples)


def student_rollout_metrics(s: StudentSide, teacher: HFTeacher, teacher_prompts: list[list[int]]
                            ) -> tuple[dict, PairScores]:
    """One OPD step's quantities at step 0: both models on the student's own rollouts (paper §2, §4)."""
    cfg, ro = s.cfg, s.rollout
    pair = score_pair(s.model, teacher, ro.prompt_ids, [teacher_prompts[i] for i in ro.example_index],
                      ro.response_ids, ro.response_mask, pad_id=s.pad_id, vocab_size=s.vocab_size,
                      temperature=cfg.rollout.temperature, k=cfg.k, student_topk_ids=ro.topk_ids,
                      chunk_size=cfg.chunk_size, batch_size=cfg.rollout.batch_size)
    mask = ro.response_mask
    # The step's diagnostics, with the exact full-vocabulary KL in place of the one-sample estimate.
    per_pos, out = topk_diagnostics(
        student_ids=ro.topk_ids, teacher_ids=pair.teacher.topk_ids, student_logp_S=pair.student_logp_at,
        teacher_logp_S=pair.teacher.logp_at_student_topk, entropy_student=pair.student_entropy,
        entropy_teacher=pair.teacher.entropy, student_logp_sampled=pair.student_logp,
        teacher_logp_sampled=pair.teacher.sampled_logp, mask=mask, k=cfg.k, reverse_kl=pair.kl, prefix="")
    sampled_estimate = (pair.student_logp - pair.teacher.sampled_logp).float()
    seq_kl = (pair.kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    out.update({
        "reverse_kl_distribution": distribution(pair.kl[mask]),
        "reverse_kl_per_sequence": distribution(seq_kl[mask.any(-1)]),
        "reverse_kl_sampled_estimate": masked_mean(sampled_estimate, mask),
        "teacher_logp_student_tokens": masked_mean(pair.teacher.sampled_logp, mask),
        "student_logp_own_tokens": masked_mean(pair.student_logp, mask),
        # vOPD: the exact value -KL(p_t||q_t) as the baseline, on these rollouts (logit-space second moment)
        "vopd_second_moment_ratio": None if pair.student_logp_at is None else losses.pg_second_moment_ratio(
            pair.student_logp, pair.teacher.sampled_logp, -pair.kl, pair.student_logp_at, mask),
    })
    bins = position_bins(mask.shape[1], cfg.rollout.max_new_tokens, max(1, cfg.rollout.max_new_tokens // 4))
    quarters = {name: window for name, window in bins.items() if name.startswith("pos_q")}
    out["by_position"] = windowed_diagnostics(per_pos, mask, quarters)
    return out, pair


def teacher_run(s: StudentSide, teacher: HFTeacher, t_model, t_eos: list[int], prompts: list[list[int]],
                rendering: str) -> TeacherRun:
    """The teacher's rollouts on ``prompts``; both models score them, the teacher also at the student's EOS ids."""
    cfg = s.cfg
    ro = _generate(t_model, prompts, cfg, eos_ids=t_eos, pad_id=s.pad_id, topk=0, seed=cfg.rollout.seed + 1,
                   vocab_size=s.vocab_size)
    eos_at = torch.tensor(s.eos_ids).expand(*ro.response_ids.shape, len(s.eos_ids))
    pair = score_pair(s.model, teacher, [s.examples[i].prompt_ids for i in ro.example_index], ro.prompt_ids,
                      ro.response_ids, ro.response_mask, pad_id=s.pad_id, vocab_size=s.vocab_size,
                      temperature=cfg.rollout.temperature, teacher_at_ids=eos_at, chunk_size=cfg.chunk_size,
                      batch_size=cfg.rollout.batch_size)
    texts = _decode(s.tokenizer, ro)
    return TeacherRun(rendering, ro, texts, _grade(texts, ro, s.examples), pair)


def template_alignment(s: StudentSide, teacher: HFTeacher, t_model, t_eos: list[int], renderings: dict,
                       configured: TeacherRun) -> dict | None:
    """When the student's rendering of a prompt differs from the teacher's own template: how far the template
    alone moves the teacher, and under which rendering the teacher does better (its aligned template).

    ``shift_reverse_kl`` = KL(teacher | student's rendering ‖ teacher | own template) on the teacher's
    rollouts, both at the teacher temperature. The better rendering is the one with the higher teacher accuracy
    (when answers exist), then the larger share of finished responses, then the higher log-prob of its tokens.
    """
    if renderings["student"] == renderings["own"]:
        return None
    cfg, ro = s.cfg, configured.rollout
    rows = {name: [renderings[name][i] for i in ro.example_index] for name in renderings}
    shift = score_pair(t_model, teacher, rows["student"], rows["own"], ro.response_ids, ro.response_mask,
                       pad_id=s.pad_id, vocab_size=s.vocab_size, temperature=cfg.teacher.temperature,
                       chunk_size=cfg.chunk_size, batch_size=cfg.rollout.batch_size)
    other_name = "own" if configured.rendering == "student" else "student"
    other = teacher_run(s, teacher, t_model, t_eos, renderings[other_name], other_name)
    runs = {configured.rendering: configured, other_name: other}
    summaries = {name: run.summary(_ended_with(run.rollout, s.eos_ids)) for name, run in runs.items()}

    def merit(name: str):
        x = summaries[name]
        return (x["accuracy"] if x["accuracy"] is not None else 0.0, x["ended"], x["teacher_logp_own_tokens"])

    better = max(summaries, key=merit)
    if merit(better) == merit(configured.rendering):
        better = configured.rendering
    return {"configured": configured.rendering, "shift_reverse_kl": masked_mean(shift.kl, ro.response_mask),
            "renderings": summaries, "better": better}


def compatibility(s: StudentSide, t_tok, vocab, run: TeacherRun, renderings: dict) -> dict:
    cfg, ex = s.cfg, s.examples[0]
    reply = run.texts[0] if run.texts and run.texts[0].strip() else "OK."
    return {
        "vocab": {"shared_vocab_size": vocab.shared_vocab_size, "student_tokens": len(s.tokenizer),
                  "teacher_tokens": len(t_tok), "warnings": list(vocab.warnings)},
        "special_tokens": compare_special_tokens(s.tokenizer, t_tok),
        "template": compare_templates(s.tokenizer, t_tok, ex.messages, reply, student_kwargs=cfg.data.chat_template_kwargs,
                                      teacher_kwargs=cfg.teacher.chat_template_kwargs),
        "thinking": {"student": thinking_support(s.tokenizer, ex.messages, cfg.data.chat_template_kwargs),
                     "teacher": thinking_support(t_tok, ex.messages, cfg.teacher.chat_template_kwargs),
                     "student_rollouts_with_think": think_fraction(_decode(s.tokenizer, s.rollout, False)),
                     "teacher_rollouts_with_think": think_fraction(_decode(s.tokenizer, run.rollout, False))},
        "teacher_reads": "its own template" if cfg.teacher.chat_template == "own" else "the student's prompt",
    }


def probe_teacher(s: StudentSide, teacher_name: str) -> tuple[dict, list[dict]]:
    """All probe numbers, the verdict and the recipe for one teacher; returns (result, rollout dump rows)."""
    cfg, th = s.cfg, s.cfg.thresholds
    t_path = resolve_model_path(teacher_name)
    t_tok = load_tokenizer(t_path)
    t_model = load_causal_lm(t_path, cfg.teacher.dtype)
    freeze(t_model)
    result: dict = {key: None for key in RESULT_KEYS}
    result.update({"teacher": teacher_name, "student": s.path, "k": cfg.k})
    try:
        vocab = check_tokenizers(s.tokenizer, t_tok, model_vocab_size(s.model), model_vocab_size(t_model),
                                 s.path, teacher_name)
    except TokenizerMismatchError as e:
        result["tokenizer_error"] = str(e)
        result.update(decide(result, th))
        return result, []
    sample_student(s, vocab.shared_vocab_size)
    teacher = HFTeacher(t_model, vocab_size=s.vocab_size, pad_id=s.pad_id, temperature=cfg.teacher.temperature,
                        chunk_size=cfg.chunk_size, head_dtype=torch.float32)
    t_eos = eos_token_ids(t_tok, t_model)
    renderings = {"student": [ex.prompt_ids for ex in s.examples],
                  "own": [render_prompt(t_tok, ex.messages, cfg.teacher.chat_template_kwargs) for ex in s.examples]}
    teacher_prompts = renderings[cfg.teacher.chat_template]

    # 1. The student's rollouts scored by both models.
    metrics, pair = student_rollout_metrics(s, teacher, teacher_prompts)
    result.update(metrics)

    # 2. The teacher's own rollouts on the prompts it reads.
    run = teacher_run(s, teacher, t_model, t_eos, teacher_prompts, cfg.teacher.chat_template)
    t_mask = run.rollout.response_mask
    result.update({"teacher_logp_own_tokens": masked_mean(run.pair.teacher.sampled_logp, t_mask),
                   "student_logp_teacher_tokens": masked_mean(run.pair.student_logp, t_mask),
                   "reverse_kl_on_teacher_rollouts": masked_mean(run.pair.kl, t_mask)})

    # 3. Self-check: the teacher's own weights in the student role against the teacher engine, same prompts.
    check = self_check(t_model, teacher, run.rollout.prompt_ids, run.rollout.response_ids, t_mask, pad_id=s.pad_id,
                       vocab_size=s.vocab_size, temperature=cfg.rollout.temperature, tolerance=th.self_check_kl,
                       chunk_size=cfg.chunk_size, batch_size=cfg.rollout.batch_size)
    result["self_check_reverse_kl"] = check.reverse_kl
    result["self_check"] = {"passed": check.passed, "reverse_kl": check.reverse_kl,
                            "max_token_kl": check.max_token_kl, "sampled_logratio_abs": check.sampled_logratio,
                            "tolerance": check.tolerance, "message": check.message()}

    # 4. Compatibility: vocabulary, special tokens, templates (and which one the teacher is at home in),
    # thinking tags, end-of-turn.
    result["compatibility"] = compatibility(s, t_tok, vocab, run, renderings)
    result["template_alignment"] = template_alignment(s, teacher, t_model, t_eos, renderings, run)
    result["template_shift_reverse_kl"] = (result["template_alignment"] or {}).get("shift_reverse_kl")
    ro = s.rollout
    s_ended, t_ended = _ended_with(ro, s.eos_ids), _ended_with(run.rollout, t_eos)
    at_t_end = torch.logsumexp(run.pair.teacher.logp_at_student_topk, -1)[t_ended]
    result["eos"] = {
        "student_eos_tokens": s.tokenizer.convert_ids_to_tokens(s.eos_ids),
        "teacher_eos_tokens": t_tok.convert_ids_to_tokens(t_eos),
        "student_eos_is_teacher_eos": set(s.eos_ids) <= set(t_eos),
        "teacher_logp_student_eos": masked_mean(pair.teacher.sampled_logp, s_ended) if s_ended.any() else None,
        "teacher_logp_student_eos_at_teacher_end": float(at_t_end.mean()) if at_t_end.numel() else None,
        "student_rollouts_ended": float((~ro.truncated).float().mean()),
        "teacher_rollouts_ended": float((~run.rollout.truncated).float().mean()),
    }
    result["rollouts"] = {
        "student": {"count": len(ro), "len_mean": float(ro.response_mask.sum(-1).float().mean()),
                    "truncated": float(ro.truncated.float().mean()), "example": s.texts[0][:300]},
        "teacher": {"count": len(run.rollout), "len_mean": float(t_mask.sum(-1).float().mean()),
                    "truncated": float(run.rollout.truncated.float().mean()), "example": run.texts[0][:300]}}

    # 5. Accuracy where answers exist (explicit final answers only, opdkit.answers).
    result["accuracy"] = capability(s.correct, ro.example_index, run.correct, run.rollout.example_index)
    if result["accuracy"] is not None:
        reward = sequence_mean_reward(pair.student_logp, pair.teacher.sampled_logp, ro.response_mask)
        result["accuracy"]["reward_auroc"] = auroc(reward, torch.tensor([(c or 0.0) > 0.5 for c in s.correct]))

    result.update(decide(result, th))
    teacher_rows = [teacher_prompts[i] for i in ro.example_index]
    student_rows = [s.examples[i].prompt_ids for i in run.rollout.example_index]
    dump = (_dump_rows(s, teacher_name, "student", ro, s.texts, s.correct, pair, teacher_rows)
            + _dump_rows(s, teacher_name, "teacher", run.rollout, run.texts, run.correct, run.pair, student_rows))
    return result, dump


def _dump_rows(s: StudentSide, teacher_name: str, kind: str, ro: Rollout, texts: list[str], correct: list,
               pair: PairScores, other_prompts: list[list[int]]) -> list[dict]:
    """One row per rollout: the ids each model saw and the per-token numbers the probe averaged.

    ``prompt_ids`` is the prompt the sampling model read (the student's rendering for student rollouts, the
    teacher's for teacher rollouts); ``teacher_prompt_ids`` / ``student_prompt_ids`` the other model's.
    ``token_reverse_kl`` is KL(p_t‖q_t) per response token; ``student_logp`` / ``teacher_logp`` the log-probs
    of each response token.
    """
    other = "teacher_prompt_ids" if kind == "student" else "student_prompt_ids"
    rows = []
    for b in range(len(ro)):
        m = ro.response_mask[b]
        ex = s.examples[ro.example_index[b]]
        rows.append({"teacher": teacher_name, "kind": kind, "example": ex.index, "sample": b % ro.group_size,
                     "prompt_ids": ro.prompt_ids[b], other: other_prompts[b],
                     "response_ids": ro.response_ids[b][m].tolist(), "truncated": bool(ro.truncated[b]),
                     "response": texts[b], "answer": ex.answer, "correct": correct[b],
                     "token_reverse_kl": pair.kl[b][m].tolist(), "student_logp": pair.student_logp[b][m].tolist(),
                     "teacher_logp": pair.teacher.sampled_logp[b][m].tolist()})
    return rows


def finite_or_none(obj):
    """JSON-safe copy: NaN and infinities become null (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def run_probe(cfg: ProbeConfig) -> dict:
    """Probe every teacher of ``cfg`` against the student; returns the JSON-ready result.

    With one teacher the result is that teacher's numbers. With several, the top-level keys are the
    best-ranked teacher's, ``ranking`` orders all of them and ``candidates`` holds every teacher's result.
    """
    configure_threads(cfg.threads)
    start = time.perf_counter()
    s = load_student(cfg)
    results, dump = [], []
    for name in cfg.teacher_list:
        t0 = time.perf_counter()
        result, rows = probe_teacher(s, name)
        result["seconds"] = time.perf_counter() - t0
        results.append(result)
        dump += rows
    ranking = rank(results)
    best = next(r for r in results if r["teacher"] == ranking[0]["teacher"])
    out = dict(best)
    out.update({"prompts": cfg.data.train, "n_prompts": len(s.examples), "samples_per_prompt": cfg.rollout.n,
                "max_new_tokens": cfg.rollout.max_new_tokens, "temperature": cfg.rollout.temperature,
                "teacher_temperature": cfg.teacher.temperature, "seed": cfg.rollout.seed,
                "thresholds": {k: getattr(cfg.thresholds, k) for k in cfg.thresholds.__dataclass_fields__},
                "seconds": time.perf_counter() - start})
    if len(results) > 1:
        out["ranking"], out["candidates"] = ranking, results
    if cfg.dump_rollouts:
        path = Path(cfg.dump_rollouts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(finite_or_none(r)) + "\n" for r in dump))
    return finite_or_none(out)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


VERDICT_STYLE = {"distill": "green", "align_template": "yellow", "cold_start": "yellow", "change_teacher": "red",
                 "fix_setup": "bold red", "incompatible_tokenizer": "bold red"}


def print_result(result: dict) -> None:
    from rich.table import Table

    for r in result.get("candidates", [result]):
        table = Table(title=f"probe: {r['student']} <- {r['teacher']}")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        for key in ("reverse_kl", "overlap_ratio", "overlap_token_advantage", "entropy_student", "entropy_teacher",
                    "entropy_gap", "overlap_mass_student", "overlap_mass_teacher", "teacher_logp_student_tokens",
                    "teacher_logp_own_tokens", "student_logp_teacher_tokens", "self_check_reverse_kl",
                    "template_shift_reverse_kl"):
            if isinstance(r.get(key), (int, float)):
                table.add_row(key, f"{r[key]:.4g}")
        for key, value in (r.get("accuracy") or {}).items():
            table.add_row(f"accuracy/{key}", "n/a" if value is None else f"{value:.3g}")
        console.print(table)
        style = VERDICT_STYLE[r["verdict"]]
        console.print(f"verdict: [{style}]{r['verdict']}[/]")
        for reason in r["reasons"]:
            console.print(f"  - {reason}", highlight=False)
        console.print("recipe:")
        for i, step in enumerate(r["recipe"], 1):
            console.print(f"  {i}. {step}", highlight=False)
    if "ranking" in result:
        console.print("ranking: " + ", ".join(f"{x['rank']}. {x['teacher']} ({x['verdict']})"
                                              for x in result["ranking"]), highlight=False)


def _flag_overrides(args) -> list[str]:
    """Command-line flags as key=value overrides (JSON values are valid YAML, so types survive)."""
    flags = {"student.path": args.student, "teacher.path": args.teacher, "teachers": args.teachers,
             "data.train": args.prompts, "data.limit": args.n_prompts, "json": args.json,
             "dump_rollouts": args.dump_rollouts}
    return [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]


def _cmd_probe(args) -> int:
    cfg = load_config(ProbeConfig, args.config, _flag_overrides(args) + list(args.overrides))
    result = run_probe(cfg)
    text = json.dumps(result, indent=2)
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(text)
        console.print(f"wrote {cfg.json}")
    else:
        print(text)
    print_result(result)
    failed = [r["teacher"] for r in result.get("candidates", [result]) if r["verdict"] == "fix_setup"]
    if failed:
        console.print(f"[bold red]SELF-CHECK FAILED for {', '.join(failed)}: see the reasons above[/]")
        return 3
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("probe", help="before training: will OPD from this teacher work for this student?")
    p.add_argument("--student", help="student model (HF directory, .gguf or bundled name)")
    p.add_argument("--teacher", help="teacher model")
    p.add_argument("--teachers", nargs="+", help="several candidate teachers to rank")
    p.add_argument("--prompts", help="prompt file (.jsonl/.parquet)")
    p.add_argument("--n-prompts", type=int, help="prompts sampled from the file (data.limit, default 32)")
    p.add_argument("--json", help="write the result JSON here")
    p.add_argument("--dump-rollouts", help="write every rollout as a JSON line here")
    p.add_argument("--config", help="YAML config file (keys: see opdkit.probe.ProbeConfig)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. k=8 rollout.max_new_tokens=128")
    p.set_defaults(func=_cmd_probe)


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["probe", *sys.argv[1:]]))
