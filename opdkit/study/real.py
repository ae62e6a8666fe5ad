"""``opdkit study --real``: the paper's central claims on a real language model (issue 11).

The models are SmolLM2-135M-Instruct (the bundled GGUF) and models opdkit derives from it with its own recipes;
the task is two-digit addition with a one-shot example in the boxed format (``opdkit prompts arithmetic``),
graded with math-verify on the explicit ``\\boxed{}`` answer. Members of the real zoo (paper roles in brackets):

* ``base``: SmolLM2-135M-Instruct as shipped;
* ``rl`` [teacher with new capability]: ``base`` after opdkit GRPO on the training problems (a same-family model
  improved by RL, the paper's Table 1 teacher);
* ``rl_B`` [incompatible thinking pattern, equal capability]: ``rl`` fine-tuned (opdkit SFT) on its own correct
  rollouts (opdkit rollout, keep_correct_only) rewritten into pattern B, "Adding a and b gives c. The final
  answer is \\boxed{c}.", where pattern A is the one-shot's "a + b = c. The final answer is \\boxed{c}.";
* ``base_coldB`` [off-policy cold start]: ``base`` after SFT on ``rl_B``'s filtered rollouts (paper §5.1);
* ``rl_alpaca`` [foreign template]: ``rl``'s weights under an Alpaca chat template, scored with
  ``teacher.chat_template=own`` so the teacher reads the prompt in a layout it was never trained on;
* ``pruned``: ``base`` without 4 of its 30 layers (the demo's student), for the long-response experiment.

The "same pipeline" teacher needs no training: it is ``base`` itself scored at ``teacher.temperature=0.5`` (a
sharper copy: a higher sampled score at its own temperature, no problem it can solve that the student cannot).

Every experiment is one ``Distiller`` run per seed, cached like the toy study's; ``opdkit probe`` runs on each
pair before training, and the report compares its verdict with the outcome. Derived models are cached under
``OUT/zoo`` with a card recording their recipe and accuracies.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path


from ..config import ConfigError, DistillConfig, dump_yaml, load_config, to_dict
from ..recipes.common import write_rows
from ..tracking import console, read_metrics
from .experiments import Experiment, summarise
from .zoo import ZooPaths, link_member

BASE = "smollm2-135m-instruct"
ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% else %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}")
PATTERN_A = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)")


@dataclass
class RealZooConfig:
    train_prompts: int = 400
    heldout: int = 96
    seed: int = 0
    grpo_steps: int = 30
    grpo_prompts_per_step: int = 8
    grpo_n: int = 4
    grpo_lr: float = 1e-5
    pattern_sft_steps: int = 30
    cold_start_sft_steps: int = 30
    sft_lr: float = 1e-5
    sft_batch: int = 16
    max_new_tokens: int = 40


@dataclass
class RealOPDConfig:
    """Settings shared by every OPD run of the real study (the demo's shape; the paper's Table 2 at 135M)."""

    steps: int = 20
    prompts_per_step: int = 8
    n: int = 2
    lr: float = 1e-5
    k: int = 16
    eval_every: int = 0
    long_steps: int = 6
    long_prompts_per_step: int = 4
    long_max_new_tokens: int = 384
    long_data: str = "../shared/data/dapo-math-17k.parquet"
    probe_prompts: int = 32


@dataclass
class RealStudyConfig:
    zoo: RealZooConfig = field(default_factory=RealZooConfig)
    opd: RealOPDConfig = field(default_factory=RealOPDConfig)
    seeds: int = 2
    threads: int | None = None
    probe: bool = True
    experiments: list = field(default_factory=list)  # names; empty: all of REAL_EXPERIMENTS

    def validate(self) -> None:
        known = {e.name for e in REAL_EXPERIMENTS + REAL_EXTRAS}
        unknown = [n for n in self.experiments if n not in known]
        if unknown:
            raise ConfigError(f"experiments: unknown {unknown}; choose from {sorted(known)}")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}")


# Each experiment: student <- teacher on a prompt set ("arith" or "long"), with Distiller overrides.
REAL_EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("new_capability", "base", "rl", train="arith", eval="arith", key=True),
    Experiment("same_pipeline", "base", "base", train="arith", eval="arith", key=True,
               overrides=("teacher.temperature=0.5",)),
    Experiment("reverse", "rl", "base", train="arith", eval="arith", key=True),
    Experiment("pattern_B", "base", "rl_B", train="arith", eval="arith", key=True),
    Experiment("cold_start_B", "base_coldB", "rl_B", train="arith", eval="arith", key=True),
    Experiment("template_foreign", "base", "rl_alpaca", train="arith", eval="arith", key=True,
               overrides=("teacher.chat_template=own",)),
    Experiment("long_responses", "pruned", "base", train="long", eval="long", key=True),
    Experiment("long_prune_truncate", "pruned", "base", train="long", eval="long", key=True,
               overrides=("objective.prune=truncate",)),
)
# Not in the default plan (name them in ``experiments=[...]``): the policy-gradient top-k form with and without
# the vOPD baseline, and Prune-OPD truncate at thresholds where it fires (issue 15's evidence on real pairs).
REAL_EXTRAS: tuple[Experiment, ...] = (
    Experiment("pg_topk", "base", "rl", train="arith", eval="arith", key=True, overrides=("objective.form=pg",)),
    Experiment("pg_topk_vopd", "base", "rl", train="arith", eval="arith", key=True,
               overrides=("objective.form=pg", "objective.baseline=vopd")),
    Experiment("sampled", "base", "rl", train="arith", eval="arith", key=True, overrides=("objective.name=sampled",)),
    Experiment("sampled_vopd", "base", "rl", train="arith", eval="arith", key=True,
               overrides=("objective.name=sampled", "objective.baseline=vopd")),
    # Prune-OPD where it fires: at the preset threshold 0.5 truncate never stops a row on this pair (the top-16
    # overlap stays near 0.71); 0.6 is the threshold the study task used for the same purpose.
    Experiment("long_prune_truncate_t06", "pruned", "base", train="long", eval="long", key=True,
               overrides=("objective.prune=truncate", "objective.prune_threshold=0.6")),
    Experiment("long_prune_truncate_t07", "pruned", "base", train="long", eval="long", key=True,
               overrides=("objective.prune=truncate", "objective.prune_threshold=0.7")),
)
# The CI-sized variant: the headline only (OPD from the RL-improved teacher raises held-out accuracy), one seed.
REAL_QUICK: dict = {
    "seeds": 1, "probe": False, "experiments": ["new_capability"],
    "zoo": {"heldout": 64, "grpo_steps": 10, "grpo_prompts_per_step": 4, "grpo_lr": 2e-5},
    "opd": {"steps": 8, "prompts_per_step": 4},
}
DEPENDS = {"rl": ("base",), "rl_B": ("rl",), "base_coldB": ("base", "rl_B"), "rl_alpaca": ("rl",),
           "pruned": ("base",)}
ORDER = ("base", "rl", "rl_B", "base_coldB", "rl_alpaca", "pruned")


def needed_members(experiments) -> tuple[str, ...]:
    need: set[str] = set()
    todo = [m for e in experiments for m in e.needs]
    while todo:
        m = todo.pop()
        if m not in need:
            need.add(m)
            todo += list(DEPENDS.get(m, ()))
    return tuple(m for m in ORDER if m in need)


def pattern_b(response: str) -> str | None:
    """Pattern A ("a + b = c. ...") rewritten into pattern B; None when the response does not start in A."""
    m = PATTERN_A.match(response)
    if m is None:
        return None
    a, b, c = m.groups()
    return f"Adding {a} and {b} gives {c}. The final answer is \\boxed{{{c}}}."


class RealZoo(ZooPaths):
    """The real study's models and prompt files under ``root``; ``build()`` makes whatever is missing."""

    def __init__(self, root: str | Path, cfg: RealZooConfig, threads: int | None = None):
        super().__init__(root)
        self.cfg, self.threads = cfg, threads

    def model(self, name: str) -> Path:
        if name == "base":
            from ..models import resolve_model_path

            return Path(resolve_model_path(BASE))
        return super().model(name)

    def write_data(self) -> None:
        from ..recipes.prompts import ArithmeticConfig, arithmetic_rows

        c = self.cfg
        rows = arithmetic_rows(ArithmeticConfig(output="-", count=c.train_prompts, heldout=c.heldout, seed=c.seed))
        write_rows(self.data("train_arith"), rows[:c.train_prompts])
        write_rows(self.data("eval_arith"), rows[c.train_prompts:])

    # -- recipes --------------------------------------------------------------------------------------

    def _common(self, name: str) -> list[str]:
        return ["run.tensorboard=false", "run.progress=false", f"run.seed={self.cfg.seed}",
                f"run.out_dir={self.root / name / 'run'}"] + ([f"run.threads={self.threads}"] if self.threads else [])

    def _grpo(self) -> dict:
        from ..recipes.grpo import grpo_config
        from ..train import Distiller

        c = self.cfg
        cfg = grpo_config(None, [
            f"student.path={self.model('base')}", f"data.train={self.data('train_arith')}",
            # the card measures the held-out accuracy of base and rl; the GRPO run itself need not
            f"data.eval={self.data('eval_arith')}", "eval.prompts=0",
            f"eval.max_new_tokens={c.max_new_tokens}", "eval.batch_size=32",
            f"rollout.prompts_per_step={c.grpo_prompts_per_step}", f"rollout.n={c.grpo_n}",
            f"rollout.max_new_tokens={c.max_new_tokens}", f"optim.lr={c.grpo_lr}", f"run.steps={c.grpo_steps}",
            f"optim.micro_batch_size={c.grpo_prompts_per_step * c.grpo_n}", "run.log_samples=1"] + self._common("rl"))
        summary = Distiller(cfg).run()
        link_member(self.root / "rl" / "run" / "final_model", self.model("rl"))
        return {"recipe": f"opdkit grpo, {c.grpo_steps} steps x {c.grpo_prompts_per_step} prompts x {c.grpo_n}, "
                          f"lr {c.grpo_lr}", "accuracy_before": summary.get("accuracy_before"),
                "accuracy_after": summary.get("accuracy_after"), "wall_seconds": summary["wall_seconds"]}

    def _rollout(self, teacher: str, out: Path) -> dict:
        from ..recipes.rollout import RolloutRecipeConfig, run_rollout

        if not out.is_file():
            cfg = load_config(RolloutRecipeConfig, base={
                "model": {"path": str(self.model(teacher))},
                "data": {"train": str(self.data("train_arith")), "add_suffix": "never"},
                "rollout": {"n": 1, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": self.cfg.max_new_tokens,
                             "batch_size": 64, "seed": self.cfg.seed},
                "filter": {"keep_correct_only": True, "max_attempts": 2},
                "output": {"path": str(out)}, "threads": self.threads})
            run_rollout(cfg)
        return json.loads(out.with_suffix("").with_name(out.stem + ".stats.json").read_text())

    def _sft(self, name: str, init: str, data: Path, steps: int) -> dict:
        from ..recipes.sft import SFTConfig, SFTTrainer

        c = self.cfg
        cfg = load_config(SFTConfig, base={
            "model": {"path": str(self.model(init))},
            "data": {"train": str(data), "max_length": 256},
            "optim": {"lr": c.sft_lr, "micro_batch_size": c.sft_batch, "schedule": "cosine", "warmup_ratio": 0.1},
            "run": {"out_dir": str(self.root / name / "run"), "steps": steps, "seed": c.seed,
                    "tensorboard": False, "progress": False, "threads": self.threads}})
        summary = SFTTrainer(cfg).run()
        link_member(self.root / name / "run" / "final_model", self.model(name))
        return {"recipe": f"opdkit sft from {init} on {data.name}, {steps} steps, lr {c.sft_lr}",
                "first_loss": summary["first_loss"], "last_loss": summary["last_loss"],
                "wall_seconds": summary["wall_seconds"]}

    def _pattern_b(self) -> dict:
        """``rl`` fine-tuned on its own correct rollouts, rewritten from pattern A into pattern B."""
        stats = self._rollout("rl", self.root / "rl_B" / "rl_rollouts.jsonl")
        rows = []
        for row in _read_jsonl(self.root / "rl_B" / "rl_rollouts.jsonl"):
            text = pattern_b(row["messages"][-1]["content"])
            if text is not None:
                rows.append({**row, "messages": row["messages"][:-1] + [{"role": "assistant", "content": text}]})
        write_rows(self.data("sft_pattern_B"), rows)
        card = self._sft("rl_B", "rl", self.data("sft_pattern_B"), self.cfg.pattern_sft_steps)
        return {**card, "rollouts_accepted": stats.get("accepted"), "rewritten_rows": len(rows)}

    def _cold_start(self) -> dict:
        stats = self._rollout("rl_B", self.root / "base_coldB" / "rl_B_rollouts.jsonl")
        card = self._sft("base_coldB", "base", self.root / "base_coldB" / "rl_B_rollouts.jsonl",
                         self.cfg.cold_start_sft_steps)
        return {**card, "rollouts_accepted": stats.get("accepted")}

    def _alpaca(self) -> dict:
        """``rl``'s weights (linked, not copied) under a foreign chat template."""
        out = self.model("rl_alpaca")
        tmp = out.with_name(".tmp-final_model")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        src = self.model("rl").resolve()
        for f in src.iterdir():
            if f.name != "tokenizer_config.json" and f.is_file():
                (tmp / f.name).symlink_to(f)
        tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
        tok_cfg["chat_template"] = ALPACA_TEMPLATE
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
        if (tmp / "chat_template.jinja").is_symlink():  # a template file would win over tokenizer_config's
            (tmp / "chat_template.jinja").unlink()
        tmp.rename(out)
        return {"recipe": "rl's weights with an Alpaca chat template (### Instruction / ### Response)"}

    def _pruned(self) -> dict:
        from ..demo import STUDENT_KEEP, pruned_student

        link_member(pruned_student(self.model("base"), STUDENT_KEEP), self.model("pruned"))
        return {"recipe": f"base with layers {sorted(set(range(30)) - set(STUDENT_KEEP))} dropped (the demo student)"}

    def build(self, members: tuple[str, ...]) -> dict:
        if not self.data("eval_arith").is_file():
            self.write_data()
        recipes = {"rl": self._grpo, "rl_B": self._pattern_b, "base_coldB": self._cold_start,
                   "rl_alpaca": self._alpaca, "pruned": self._pruned}
        cards = {}
        for name in members:
            if self.card(name) and self.model(name).exists():
                cards[name] = self.card(name)
                continue
            console.print(f"[bold]real zoo: making {name}[/]")
            t0 = time.perf_counter()
            card = recipes[name]() if name in recipes else {"recipe": "SmolLM2-135M-Instruct (bundled GGUF)"}
            if name not in ("pruned", "rl_alpaca"):
                card.update(self.accuracy(name))
            card["build_seconds"] = time.perf_counter() - t0
            (self.root / name).mkdir(parents=True, exist_ok=True)
            (self.root / name / "card.json").write_text(json.dumps(card, indent=1))
            cards[name] = card
        return cards

    def accuracy(self, name: str) -> dict:
        """Greedy held-out accuracy of a zoo member, with its answered fraction and mean response length."""
        from .zoo import greedy_metrics

        out = self.root / name / "accuracy.json"
        if not out.is_file():
            m = greedy_metrics(self.model(name), self.data("eval_arith"), self.threads, self.cfg.max_new_tokens)
            result = {"greedy_accuracy": m["eval/accuracy"], "answered": m["eval/answered"],
                      "response_len": m["eval/len_mean"]}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
        return json.loads(out.read_text())

    def sampled_accuracy(self, name: str, temperature: float, n: int = 4) -> float:
        """avg@n at ``temperature`` on the held-out problems (opdkit eval)."""
        from ..recipes.benchmark import EvalRecipeConfig, run_eval

        out = self.root / name / f"eval_T{temperature}.json"
        if out.is_file():
            return json.loads(out.read_text())["average"][f"avg@{n}"]
        cfg = load_config(EvalRecipeConfig, base={
            "model": {"path": str(self.model(name))},
            "benchmarks": [{"name": "heldout", "path": str(self.data("eval_arith"))}],
            "data": {"add_suffix": "never"}, "save_samples": False,
            "rollout": {"n": n, "temperature": temperature, "top_p": 1.0, "max_new_tokens": self.cfg.max_new_tokens,
                         "batch_size": 64, "seed": self.cfg.seed},
            "output": str(out), "threads": self.threads})
        return run_eval(cfg)["average"][f"avg@{n}"]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]



# --------------------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------------------


def real_distill_config(zoo: RealZoo, exp: Experiment, seed: int, opd: RealOPDConfig, out: Path) -> DistillConfig:
    """The ``opdkit distill`` config of one real experiment at one seed (every dtype ``auto``)."""
    long = exp.train == "long"
    steps, pps = (opd.long_steps, opd.long_prompts_per_step) if long else (opd.steps, opd.prompts_per_step)
    n = 1 if long else opd.n
    tokens = opd.long_max_new_tokens if long else zoo.cfg.max_new_tokens
    data = ({"train": opd.long_data, "limit": 256, "max_prompt_length": 256} if long else
            {"train": str(zoo.data("train_arith")), "eval": str(zoo.data("eval_arith"))})
    base = {
        "student": {"path": str(zoo.model(exp.student))},
        "teacher": {"path": str(zoo.model(exp.teacher))},
        "data": data,
        "rollout": {"prompts_per_step": pps, "n": n, "max_new_tokens": tokens},
        "objective": {"k": opd.k},
        "optim": {"lr": opd.lr, "micro_batch_size": pps * n, "warmup_steps": 2},
        "eval": {"prompts": 8 if long else zoo.cfg.heldout, "max_new_tokens": tokens, "every": opd.eval_every,
                 "batch_size": 8 if long else 48},
        "run": {"out_dir": str(out / "runs" / f"{exp.name}_s{seed}"), "steps": steps, "seed": seed,
                "tensorboard": False, "progress": False, "log_samples": 1, "threads": None},
    }
    return load_config(DistillConfig, None, list(exp.overrides), base=base)


POSITION_KEYS = ("overlap_ratio", "reverse_kl", "overlap_token_advantage", "entropy_gap")


def position_profile(rows: list[dict], window: int = 2) -> dict:
    """{bin: {quantity@start, quantity@end}} of the position-binned diagnostics (quarters of the response)."""
    train = [r for r in rows if "opd/loss" in r]
    out: dict = {}
    for q in range(1, 5):
        for key in POSITION_KEYS:
            name = f"diag/pos_q{q}/{key}"
            for tag, part in (("start", train[:window]), ("end", train[-window:])):
                values = [r[name] for r in part if isinstance(r.get(name), (int, float))]
                out[f"{name}@{tag}"] = sum(values) / len(values) if values else None
    return out


def run_real_experiment(zoo: RealZoo, exp: Experiment, seed: int, opd: RealOPDConfig, out: Path) -> dict:
    """Run (or load the cached result of) one real experiment at one seed."""
    from ..train import Distiller

    rd = out / "runs" / f"{exp.name}_s{seed}"
    done = rd / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(rd, ignore_errors=True)
    console.print(f"[bold]real study: {exp.name} seed {seed}: {exp.student} <- {exp.teacher} "
                  f"{' '.join(exp.overrides)}[/]")
    summary = Distiller(real_distill_config(zoo, exp, seed, opd, out)).run()
    rows = read_metrics(rd)
    result = summarise(rows, summary)
    result.update(position_profile(rows))
    tokens = [r.get("rollout/tokens") for r in rows if "opd/loss" in r]
    result.update({"experiment": exp.name, "seed": seed, "student": exp.student, "teacher": exp.teacher,
                   "overrides": list(exp.overrides), "seconds_per_step": summary.get("seconds_per_step"),
                   "rollout/len_mean@mean": _mean([r.get("rollout/len_mean") for r in rows if "opd/loss" in r]),
                   "rollout/tokens@sum": sum(t for t in tokens if isinstance(t, (int, float))) or None,
                   "prune/pruned_frac@mean": _mean([r.get("prune/pruned_frac") for r in rows if "opd/loss" in r]),
                   **{f"{key}@mean": _mean([r.get(key) for r in rows if "opd/loss" in r])
                      for key in ("rollout/tokens", "prune/generated_tokens", "prune/kept_tokens", "prune/drift_frac", "time/rollout",
                                  "time/teacher", "time/train")}})
    done.write_text(json.dumps(result, indent=1))
    # The study needs the metrics, not the 135M-parameter weights (about 2 GB of model and optimizer state per run).
    for heavy in ("checkpoints", "final_model"):
        shutil.rmtree(rd / heavy, ignore_errors=True)
    return result


def _mean(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def run_probe_for(zoo: RealZoo, exp: Experiment, opd: RealOPDConfig, out: Path, threads: int | None) -> dict:
    """``opdkit probe`` on the experiment's pair and prompts before any training (cached)."""
    from ..probe import ProbeConfig, run_probe

    path = out / "probes" / f"{exp.name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if exp.train == "long":
        return {}
    overrides = dict(o.split("=", 1) for o in exp.overrides)
    cfg = load_config(ProbeConfig, base={
        "student": {"path": str(zoo.model(exp.student))},
        "teacher": {"path": str(zoo.model(exp.teacher)),
                    "temperature": float(overrides.get("teacher.temperature", 1.0)),
                    "chat_template": overrides.get("teacher.chat_template", "student")},
        "data": {"train": str(zoo.data("train_arith")), "limit": opd.probe_prompts},
        "rollout": {"n": 2, "max_new_tokens": zoo.cfg.max_new_tokens, "batch_size": 32},
        "k": opd.k, "threads": threads})
    console.print(f"[bold]real study: probe {exp.name}: {exp.student} <- {exp.teacher}[/]")
    result = run_probe(cfg)
    keep = {k: result.get(k) for k in ("verdict", "issues", "reasons", "recipe", "seconds")}
    keep["numbers"] = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(keep, indent=1))
    return keep


def real_study_config(overrides: list[str], quick: bool = False, seeds: int | None = None,
                      threads: int | None = None) -> RealStudyConfig:
    extra = [f"seeds={seeds}"] if seeds is not None else []
    extra += [f"threads={threads}"] if threads is not None else []
    return load_config(RealStudyConfig, None, overrides + extra, base=REAL_QUICK if quick else None)


def check_real_cache(cfg: RealStudyConfig, out: Path) -> None:
    """Refuse to mix runs of different settings in one output directory (cached results would be reused)."""
    path = out / "study.yaml"
    if not path.is_file():
        return
    old, new = to_dict(load_config(RealStudyConfig, path)), to_dict(cfg)
    changed = [f"{s}.{k}" for s in ("zoo", "opd") for k in old[s] if old[s][k] != new[s].get(k)]
    if changed:
        raise ConfigError(f"{out} holds a real study with different settings ({', '.join(changed)}); its cached "
                          f"models and runs would be reused. Choose another --out, or delete {out}")


def run_real_study(cfg: RealStudyConfig, out: str | Path) -> dict:
    """Make the zoo members the planned experiments need, probe each pair, run every experiment and seed."""
    from ..hardware import configure_threads, hardware_record

    out = Path(out)
    check_real_cache(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(dump_yaml(cfg))
    configure_threads(cfg.threads)
    started = time.perf_counter()
    chosen = ([e for e in REAL_EXPERIMENTS + REAL_EXTRAS if e.name in cfg.experiments] if cfg.experiments
              else list(REAL_EXPERIMENTS))
    zoo = RealZoo(out / "zoo", cfg.zoo, cfg.threads)
    cards = zoo.build(needed_members(chosen))
    if any(e.name == "same_pipeline" for e in chosen):
        # The same-pipeline teacher's "higher score": the base model's avg@4 at T = 0.5 against T = 1.
        cards["base"].update({f"sampled_accuracy_T{t}": zoo.sampled_accuracy("base", t) for t in (1.0, 0.5)})
        (zoo.root / "base" / "card.json").write_text(json.dumps(cards["base"], indent=1))
    zoo_seconds = time.perf_counter() - started
    probes = {e.name: run_probe_for(zoo, e, cfg.opd, out, cfg.threads) for e in chosen} if cfg.probe else {}
    probe_seconds = time.perf_counter() - started - zoo_seconds
    results: dict[str, list[dict]] = {}
    for exp in chosen:
        for seed in range(cfg.seeds if exp.key else 1):
            results.setdefault(exp.name, []).append(run_real_experiment(zoo, exp, seed, cfg.opd, out))
    timing = {"zoo_seconds": zoo_seconds, "probe_seconds": probe_seconds,
              "total_seconds": time.perf_counter() - started, "machine": hardware_record()}
    timing_path = out / "timing.json"
    previous = json.loads(timing_path.read_text()) if timing_path.is_file() else []
    timing_path.write_text(json.dumps(previous + [timing], indent=1))
    console.print(f"real study: {timing['total_seconds']:.0f} s (zoo {zoo_seconds:.0f} s, probes "
                  f"{probe_seconds:.0f} s)")
    return {"zoo": cards, "probes": probes, "results": results, "timing": timing}


def check_real_headline(result: dict) -> list[str]:
    """The headline of ``--quick``: OPD from the RL-improved teacher raises held-out accuracy and lowers the
    exact held-out reverse KL; returns the checks that failed."""
    checks = {"held-out accuracy rises": result["eval/accuracy@after"] > result["eval/accuracy@before"],
              "held-out reverse KL falls": result["eval/reverse_kl@after"] < result["eval/reverse_kl@before"]}
    return [name for name, ok in checks.items() if not ok]
