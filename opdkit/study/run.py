"""One study run: build (or reuse) the zoo, run the planned experiments (cached per run), write the report.

``StudyConfig`` holds the zoo, the shared OPD settings, the number of seeds of the key comparisons and the
experiments to run; ``QUICK`` is the CI-sized variant (the headline experiment only, checked by
``check_headline``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, dump_yaml, load_config, to_dict
from ..tracking import console
from .experiments import EXPERIMENTS, OPDConfig, Plan, load_results, run_experiment
from .zoo import Zoo, ZooConfig, with_dependencies


@dataclass
class StudyConfig:
    zoo: ZooConfig = field(default_factory=ZooConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    seeds: int = 3
    threads: int = 1
    experiments: list = field(default_factory=list)  # names; empty: all of EXPERIMENTS

    def validate(self) -> None:
        known = {e.name for e in EXPERIMENTS}
        unknown = [n for n in self.experiments if n not in known]
        if unknown:
            raise ConfigError(f"experiments: unknown {unknown}; choose from {sorted(known)}")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


# The CI-sized study: the headline experiment (S0 <- T_new) with one seed, a short zoo and a short OPD run.
QUICK: dict = {
    "seeds": 1,
    "experiments": ["new_capability"],
    "zoo": {"eval_prompts": 64},
    "opd": {"steps": 150, "eval_every": 0, "eval_prompts": 64},
}


def study_config(overrides: list[str], quick: bool = False, seeds: int | None = None,
                 threads: int | None = None) -> StudyConfig:
    extra = [f"seeds={seeds}"] if seeds is not None else []
    extra += [f"threads={threads}"] if threads is not None else []
    cfg = load_config(StudyConfig, None, overrides + extra, base=QUICK if quick else None)
    cfg.zoo.threads = cfg.opd.threads = cfg.threads
    return cfg


def _cached_settings(cfg: StudyConfig) -> dict:
    """The settings cached zoo members and runs depend on (threads, seeds and the experiment list do not)."""
    data = to_dict(cfg)
    data["zoo"].pop("threads"), data["opd"].pop("threads")
    return {"zoo": data["zoo"], "opd": data["opd"]}


def check_cache(cfg: StudyConfig, out: Path) -> None:
    """Refuse to mix runs of different settings in one output directory (cached results would be reused)."""
    path = out / "study.yaml"
    if not path.is_file():
        return
    previous = load_config(StudyConfig, path)
    if _cached_settings(previous) != _cached_settings(cfg):
        old, new = _cached_settings(previous), _cached_settings(cfg)
        changed = [f"{section}.{k}" for section in old for k in old[section] if old[section][k] != new[section].get(k)]
        raise ConfigError(f"{out} holds a study with different settings ({', '.join(changed)}); its cached zoo and "
                          f"runs would be reused. Choose another --out, or delete {out}")


def plan(cfg: StudyConfig) -> Plan:
    chosen = [e for e in EXPERIMENTS if not cfg.experiments or e.name in cfg.experiments]
    return Plan(chosen, cfg.seeds)


def run_study(cfg: StudyConfig, out: str | Path) -> dict:
    """Train the zoo members the planned experiments need, run them, return {experiment: [per-seed results]}."""
    out = Path(out)
    check_cache(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(dump_yaml(cfg))
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    p = plan(cfg)
    zoo = Zoo(out / "zoo", cfg.zoo)
    cards = zoo.build(with_dependencies(set().union(*(e.needs for e in p.experiments))))
    zoo_seconds = time.perf_counter() - started
    for exp, seed in p.runs():
        run_experiment(zoo, exp, seed, cfg.opd, out)
    timing = {"zoo_seconds": zoo_seconds, "total_seconds": time.perf_counter() - started}
    timing_path = out / "timing.json"
    previous = json.loads(timing_path.read_text()) if timing_path.is_file() else []
    timing_path.write_text(json.dumps(previous + [timing], indent=1))
    console.print(f"study: {timing['total_seconds']:.0f} s (zoo {zoo_seconds:.0f} s)")
    return {"zoo": cards, "results": load_results(out), "timing": timing}


def check_headline(result: dict) -> list[str]:
    """The signature of a successful OPD run (paper §4.1) on the headline experiment, as failed checks
    (empty: all hold): exact reverse KL to the teacher on held-out prompts down, held-out accuracy up,
    overlap-token advantage toward 0, and the shared top-k holding most of both models' mass.

    The overlap ratio and the entropy gap are reported but not asserted: at this scale they do not move
    reliably (the top-16 of a 225-token vocabulary is mostly arbitrary tail; see docs/reproduction.md)."""
    failed = []
    checks = {
        "eval reverse KL decreases": result["eval/reverse_kl@after"] < result["eval/reverse_kl@before"],
        "eval accuracy increases": result["eval/accuracy@after"] > result["eval/accuracy@before"],
        "overlap-token advantage moves toward 0":
            abs(result["diag/overlap_token_advantage@end"]) < abs(result["diag/overlap_token_advantage@start"]),
        "overlap mass > 0.9": min(result["diag/overlap_mass_student@mean"],
                                  result["diag/overlap_mass_teacher@mean"]) > 0.9,
    }
    for name, ok in checks.items():
        if not ok:
            failed.append(name)
    return failed
