"""The study's model zoo, trained with opdkit's own SFT (``recipes.sft``), GRPO (``recipes.grpo``) and rollout
(``recipes.rollout``) on the dial task, and cached on disk so a rerun only repeats the experiments.

Members (paper roles in brackets):

* ``S0``: the base student, a 2-layer Llama, SFT on problems in pattern A, both prompt templates, where the
  dial is only ever turned down by 1 (``base_down_max``): it knows the format of a "down" step and the ten
  "-1" facts but none of the twenty "-2"/"-3" facts, so its accuracy on mixed problems is low. (With no down
  step at all the student never puts ``-`` in its top-k, and top-k OPD could not teach it: measured, see
  docs/reproduction.md);
* ``T_new`` [compatible teacher with new capability]: a bigger Llama, SFT on up+down problems, pattern A;
* ``T_same`` [same-pipeline teacher]: the bigger Llama on exactly S0's data (more capacity, no new capability);
* ``T_B`` [incompatible thinking pattern]: the bigger Llama, SFT on up+down problems in pattern B;
* ``S_RL`` [RL-improved student]: S0 after GRPO (opd_weight 0, outcome reward) on mixed problems;
* ``S0_coldB`` [off-policy cold start]: S0 after SFT on T_B's own filtered rollouts (recipes.rollout).

Teachers only ever see the ``quiz`` template, except T_same, which sees S0's data (both templates).
Each member lives in ``ZOO/<name>/final_model`` with the study tokenizer, so ``Distiller`` loads it as any HF
model; ``ZOO/<name>/card.json`` records its recipe and greedy accuracies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import load_config
from ..data import load_prompts
from ..evaluation import evaluate
from ..models import eos_token_ids, load_causal_lm, load_tokenizer, model_vocab_size
from ..recipes.common import write_rows
from ..tiny import save_tiny, tiny_llama
from ..tracking import console
from . import task


@dataclass
class ArchConfig:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128

    def build(self, vocab_size: int, seed: int):
        return tiny_llama(vocab_size, seed=seed, layers=self.layers, hidden=self.hidden, heads=self.heads,
                          kv_heads=self.kv_heads, intermediate=self.intermediate, max_positions=256)


@dataclass
class ZooConfig:
    student: ArchConfig = field(default_factory=ArchConfig)
    teacher: ArchConfig = field(default_factory=lambda: ArchConfig(layers=3, hidden=96, heads=4, kv_heads=2,
                                                                   intermediate=192))
    seed: int = 0
    sft_rows: int = 6000
    sft_depth: list = field(default_factory=lambda: [1, 3])
    sft_batch: int = 32
    sft_lr: float = 3e-3
    student_sft_steps: int = 800
    teacher_sft_steps: int = 1000
    grpo_steps: int = 150
    grpo_prompts_per_step: int = 16
    grpo_n: int = 8
    grpo_lr: float = 1e-4
    cold_start_prompts: int = 400
    cold_start_sft_steps: int = 100
    eval_prompts: int = 96
    eval_depth: int = 3
    opd_prompts: int = 2000
    opd_depth: list = field(default_factory=lambda: [2, 3])
    base_down_max: int = 1
    threads: int = 1


# name -> (architecture key, data of the base student?, pattern, templates): every SFT member of the zoo.
# The base-student data turns the dial down by at most ZooConfig.base_down_max; the others by up to MAX_OPERAND.
SFT_MEMBERS: dict[str, tuple[str, bool, str, tuple[str, ...]]] = {
    "S0": ("student", True, "A", ("quiz", "plain")),
    "T_new": ("teacher", False, "A", ("quiz",)),
    "T_same": ("teacher", True, "A", ("quiz", "plain")),
    "T_B": ("teacher", False, "B", ("quiz",)),
}
# Members trained from other members.
DEPENDS: dict[str, tuple[str, ...]] = {"S_RL": ("S0",), "S0_coldB": ("S0", "T_B")}
ORDER = ("S0", "T_new", "T_same", "T_B", "S_RL", "S0_coldB")


def with_dependencies(members: set[str]) -> tuple[str, ...]:
    """``members`` and every member they are trained from, in training order."""
    needed = set(members)
    for m in members:
        needed |= set(DEPENDS.get(m, ()))
    return tuple(m for m in ORDER if m in needed)


PROMPT_SETS: dict[str, tuple[tuple[str, ...], str]] = {
    "mixed_quiz": (("up", "down"), "quiz"),
    "mixed_plain": (("up", "down"), "plain"),
    "up_quiz": (("up",), "quiz"),
}


class ZooPaths:
    """Where a zoo keeps its members (``ROOT/<name>/final_model`` and ``card.json``) and prompt files."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def model(self, name: str) -> Path:
        return self.root / name / "final_model"

    def data(self, name: str) -> Path:
        return self.root / "data" / f"{name}.jsonl"

    def card(self, name: str) -> dict:
        path = self.root / name / "card.json"
        return json.loads(path.read_text()) if path.is_file() else {}


class Zoo(ZooPaths):
    """The toy study's zoo under ``root``; ``build()`` trains whatever is missing."""

    def __init__(self, root: str | Path, cfg: ZooConfig):
        super().__init__(root)
        self.cfg = cfg
        self.tokenizer = task.word_tokenizer()

    # -- data ---------------------------------------------------------------------------------------

    def write_data(self) -> None:
        c = self.cfg
        evals: dict[str, list] = {}
        held_out: set = set()
        for ops in (("up", "down"), ("up",)):
            key = "mixed" if len(ops) == 2 else "up"
            evals[key] = task.make_problems(c.eval_prompts, ops=ops, depth=c.eval_depth, seed=c.seed + 101 + len(ops))
            held_out |= {p.key for p in evals[key]}
        for name, (ops, template) in PROMPT_SETS.items():
            kind = name.split("_")[0]
            write_rows(self.data(f"eval_{name}"), [task.prompt_row(p, template) for p in evals[kind]])
            train = task.make_problems(c.opd_prompts, ops=ops, depth=tuple(c.opd_depth), seed=c.seed + 202 + len(ops),
                                       exclude=held_out)
            write_rows(self.data(f"train_{name}"), [task.prompt_row(p, template) for p in train])
        for name, (_, base_data, pattern, templates) in SFT_MEMBERS.items():
            limits = {"down": c.base_down_max} if base_data else None
            problems = task.make_problems(c.sft_rows, ops=("up", "down"), depth=tuple(c.sft_depth),
                                          seed=c.seed + 303 + base_data, exclude=held_out, operand_limits=limits)
            rows = [task.sft_row(p, templates[i % len(templates)], pattern) for i, p in enumerate(problems)]
            write_rows(self.data(f"sft_{name}"), rows)
        cold = task.make_problems(c.cold_start_prompts, ops=("up", "down"), depth=tuple(c.opd_depth),
                                  seed=c.seed + 404, exclude=held_out)
        write_rows(self.data("cold_start_prompts"), [task.prompt_row(p, "quiz") for p in cold])

    # -- training -----------------------------------------------------------------------------------

    def _sft(self, name: str, init: Path, data: Path, steps: int) -> dict:
        from ..recipes.sft import SFTConfig, SFTTrainer

        c = self.cfg
        cfg = load_config(SFTConfig, base={
            "model": {"path": str(self.root / name / "init"), "compute_dtype": "float32"},
            "data": {"train": str(data), "max_length": 128},
            "optim": {"lr": c.sft_lr, "micro_batch_size": c.sft_batch, "schedule": "cosine", "warmup_ratio": 0.05,
                      "weight_decay": 0.01},
            "run": {"out_dir": str(self.root / name / "sft"), "steps": steps, "seed": c.seed,
                    "tensorboard": False, "progress": False, "threads": c.threads}})
        summary = SFTTrainer(cfg, model=load_causal_lm(init, "float32"), tokenizer=self.tokenizer).run()
        link_member(self.root / name / "sft" / "final_model", self.model(name))
        return {"recipe": "sft", "data": str(data), "steps": steps, "first_loss": summary["first_loss"],
                "last_loss": summary["last_loss"], "wall_seconds": summary["wall_seconds"]}

    def _grpo(self) -> dict:
        from ..recipes.grpo import grpo_config
        from ..train import Distiller

        c = self.cfg
        cfg = grpo_config(None, [
            f"student.path={self.model('S0')}", "student.compute_dtype=float32", "student.sampling_dtype=float32",
            "student.head_dtype=float32", f"data.train={self.data('train_mixed_quiz')}",
            f"data.eval={self.data('eval_mixed_quiz')}", f"eval.prompts={c.eval_prompts}", "eval.max_new_tokens=32",
            f"rollout.prompts_per_step={c.grpo_prompts_per_step}", f"rollout.n={c.grpo_n}", "rollout.max_new_tokens=32",
            f"optim.lr={c.grpo_lr}", f"run.steps={c.grpo_steps}", f"run.seed={c.seed}", "run.tensorboard=false",
            "run.progress=false", f"run.threads={c.threads}", f"run.out_dir={self.root / 'S_RL' / 'grpo'}",
            "optim.micro_batch_size=64"])
        summary = Distiller(cfg).run()
        link_member(self.root / "S_RL" / "grpo" / "final_model", self.model("S_RL"))
        return {"recipe": "grpo", "steps": c.grpo_steps, "accuracy_before": summary.get("accuracy_before"),
                "accuracy_after": summary.get("accuracy_after"), "wall_seconds": summary["wall_seconds"]}

    def _cold_start(self) -> dict:
        """SFT of S0 on T_B's own rollouts (filtered: complete, with an answer, not repetitive), paper §5.1."""
        from ..recipes.rollout import RolloutRecipeConfig, run_rollout

        c = self.cfg
        out = self.root / "S0_coldB" / "teacher_rollouts.jsonl"
        if not out.is_file():
            cfg = load_config(RolloutRecipeConfig, base={
                "model": {"path": str(self.model("T_B")), "dtype": "float32"},
                "data": {"train": str(self.data("cold_start_prompts")), "add_suffix": "never"},
                "rollout": {"n": 1, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 32, "batch_size": 64,
                             "seed": c.seed},
                "output": {"path": str(out)}, "threads": c.threads})
            run_rollout(cfg)
        card = self._sft("S0_coldB", self.model("S0"), out, c.cold_start_sft_steps)
        return {**card, "recipe": "sft on filtered T_B rollouts"}

    def build(self, members: tuple[str, ...] = ORDER) -> dict:
        """Train the missing ``members`` (in ``ORDER``; dependencies must come first) and return their cards."""
        torch.set_num_threads(self.cfg.threads)
        if not self.data("eval_mixed_quiz").is_file():
            self.write_data()
        cards = {}
        for name in members:
            if self.model(name).is_dir() and self.card(name):
                cards[name] = self.card(name)
                continue
            console.print(f"[bold]zoo: training {name}[/]")
            if name in SFT_MEMBERS:
                arch_key = SFT_MEMBERS[name][0]
                arch: ArchConfig = getattr(self.cfg, arch_key)
                (self.root / name).mkdir(parents=True, exist_ok=True)
                save_tiny(arch.build(len(self.tokenizer), self.cfg.seed), self.tokenizer, self.root / name / "init")
                steps = self.cfg.student_sft_steps if arch_key == "student" else self.cfg.teacher_sft_steps
                card = self._sft(name, self.root / name / "init", self.data(f"sft_{name}"), steps)
            elif name == "S_RL":
                card = self._grpo()
            elif name == "S0_coldB":
                card = self._cold_start()
            else:
                raise ValueError(f"unknown zoo member {name}")
            card["accuracy"] = {ev: accuracy(self.model(name), self.data(f"eval_{ev}"), self.cfg.threads)
                                for ev in PROMPT_SETS}
            card["parameters"] = sum(p.numel() for p in load_causal_lm(self.model(name), "float32").parameters())
            (self.root / name / "card.json").write_text(json.dumps(card, indent=1))
            cards[name] = card
            console.print(f"zoo: {name} {card['accuracy']}")
        return cards


def link_member(src: Path, dst: Path) -> None:
    """``dst`` -> ``src`` as a relative link, so a zoo directory can be moved or copied whole."""
    import os

    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    dst.symlink_to(os.path.relpath(src, dst.parent), target_is_directory=True)


def accuracy(model_dir: Path, prompts: Path, threads: int = 1, max_new_tokens: int = 32) -> float:
    """Greedy accuracy of a zoo model on a prompt file (opdkit.evaluation, answers graded by opdkit.answers)."""
    return greedy_metrics(model_dir, prompts, threads, max_new_tokens, dtype="float32")["eval/accuracy"]


@torch.no_grad()
def greedy_metrics(model_dir: Path, prompts: Path, threads: int | None = 1, max_new_tokens: int = 32,
                   dtype: str = "auto") -> dict:
    """``opdkit.evaluation.evaluate``'s greedy metrics (eval/accuracy, eval/answered, eval/len_mean) of a model."""
    from ..hardware import configure_threads, fast_bf16
    from ..engines.hf_rollout import HFRolloutEngine

    configure_threads(threads)
    tok = load_tokenizer(model_dir)
    dtype = fast_bf16("cpu").dtype if dtype == "auto" else dtype
    model = load_causal_lm(model_dir, dtype)
    examples = load_prompts(prompts, tok).examples
    engine = HFRolloutEngine(model, eos_ids=eos_token_ids(tok, model), pad_id=tok.pad_token_id,
                             sampling_dtype=getattr(torch, dtype), vocab_size=model_vocab_size(model))
    metrics, _ = evaluate(student=model, engine=engine, teacher=None, tokenizer=tok, examples=examples,
                          teacher_prompts=[], max_new_tokens=max_new_tokens, batch_size=64,
                          pad_id=tok.pad_token_id, vocab_size=model_vocab_size(model))
    return metrics
