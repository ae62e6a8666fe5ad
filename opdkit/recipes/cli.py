"""Subcommands of the recipes: rollout, sft, dedup, prompts {rewrite,mix,arithmetic}, grpo, eval, gap-recovery.

Each takes ``--config FILE.yaml`` plus ``key=value`` overrides of its own small config (``--keys`` lists them).
"""

from __future__ import annotations

import argparse
import json


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--keys", action="store_true", help="list every config key with its default and meaning, then exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rollout.n=4")


def _print_keys(cls) -> int:
    from ..config import describe

    for key, default, text in describe(cls):
        print(f"{key:32s} {default:24s} {text}")
    return 0


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _configured_command(module: str, config: str, run: str, show: str | None = None, summary_file: bool = False):
    """A subcommand that loads ``config`` from --config/overrides, calls ``run`` and prints its result.

    Names, not objects, so ``opdkit --help`` does not import torch and the recipes' modules.
    """
    def command(args) -> int:
        import importlib

        from ..config import load_config
        from .common import write_json

        mod = importlib.import_module(f"{__package__}.{module}")
        cls = getattr(mod, config)
        if args.keys:
            return _print_keys(cls)
        cfg = load_config(cls, args.config, args.overrides)
        result = getattr(mod, run)(cfg)
        if summary_file:
            write_json(f"{cfg.run.out_dir}/summary.json", result)
        if show:
            getattr(mod, show)(result)
        _print_json(result)
        return 0
    return command


_cmd_rollout = _configured_command("rollout", "RolloutRecipeConfig", "run_rollout", show="print_stats")
_cmd_sft = _configured_command("sft", "SFTConfig", "run_sft", summary_file=True)
_cmd_dedup = _configured_command("dedup", "DedupConfig", "run_dedup", show="print_summary")


def _cmd_prompts(args) -> int:
    from ..config import load_config
    from . import prompts as P

    cls, fn = {"rewrite": (P.RewriteConfig, P.run_rewrite), "mix": (P.MixConfig, P.run_mix),
               "arithmetic": (P.ArithmeticConfig, P.run_arithmetic)}[args.action]
    if args.keys:
        return _print_keys(cls)
    _print_json(fn(load_config(cls, args.config, args.overrides)))
    return 0


def _cmd_grpo(args) -> int:
    from ..config import DistillConfig
    from .common import write_json
    from .grpo import grpo_config, run_grpo

    if args.keys:
        return _print_keys(DistillConfig)
    cfg = grpo_config(args.config, args.overrides, args.kl_coef)
    summary = run_grpo(cfg)
    write_json(f"{cfg.run.out_dir}/summary.json", summary)
    _print_json({k: v for k, v in summary.items() if not k.startswith("samples")})
    return 0


def _cmd_eval(args) -> int:
    from ..config import load_config
    from .benchmark import EvalRecipeConfig, print_results, run_eval

    if args.keys:
        return _print_keys(EvalRecipeConfig)
    overrides = list(args.overrides)
    if args.limit is not None:
        overrides.append(f"data.limit={args.limit}")
    if args.subset_seed is not None:
        overrides.append(f"data.subset_seed={args.subset_seed}")
    report = run_eval(load_config(EvalRecipeConfig, args.config, overrides))
    print_results(report)
    print(json.dumps({"output": report.get("output"), "average": report["average"],
                      "benchmarks": {k: {m: v for m, v in r.items() if "@" in m}
                                     for k, r in report["benchmarks"].items()}}, indent=2))
    return 0


def _cmd_gap(args) -> int:
    from .benchmark import gap_recovery_report, load_results, print_gap
    from .common import write_json

    report = gap_recovery_report(load_results(args.before), load_results(args.after), load_results(args.teacher),
                                 args.metric)
    print_gap(report)
    if args.out:
        write_json(args.out, report)
    _print_json(report)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("rollout", help="sample a (teacher) model on prompts with rejection sampling -> SFT chat data")
    _config_args(p)
    p.set_defaults(func=_cmd_rollout)

    p = sub.add_parser("sft", help="supervised fine-tuning on assistant tokens (the off-policy cold start)")
    _config_args(p)
    p.set_defaults(func=_cmd_sft)

    p = sub.add_parser("dedup", help="drop prompts that duplicate a reference set (exact, then embedding cosine)")
    _config_args(p)
    p.set_defaults(func=_cmd_dedup)

    p = sub.add_parser("prompts", help="prompt sets: rewrite templates, mix sources, make a synthetic arithmetic set")
    actions = p.add_subparsers(dest="action", required=True)
    for action, text in (("rewrite", "put each prompt's bare question into another template (e.g. DAPO -> boxed)"),
                         ("mix", "draw prompts from several files in given ratios (seeded)"),
                         ("arithmetic", "write a synthetic arithmetic prompt set with checkable answers")):
        q = actions.add_parser(action, help=text)
        _config_args(q)
        q.set_defaults(func=_cmd_prompts)

    p = sub.add_parser("grpo", help="GRPO with verifiable math rewards (the distill loop with GRPO defaults)")
    p.add_argument("--kl-coef", type=float, default=0.0,
                   help="weight of a per-token k1 KL penalty to the initial model (default 0, as in the paper)")
    _config_args(p)
    p.set_defaults(func=_cmd_grpo)

    p = sub.add_parser("eval", help="avg@n and pass@k on math benchmarks")
    p.add_argument("--limit", type=int, help="problems per benchmark (same as data.limit)")
    p.add_argument("--subset-seed", type=int, help="draw the --limit problems at random with this seed")
    _config_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("gap-recovery", help="(after - before) / (teacher - before) from three opdkit eval results")
    p.add_argument("--before", required=True, help="results JSON of the student before training")
    p.add_argument("--after", required=True, help="results JSON of the student after training")
    p.add_argument("--teacher", required=True, help="results JSON of the teacher")
    p.add_argument("--metric", help="metric to compare (default: the avg@n of the files)")
    p.add_argument("--out", help="write the report as JSON here")
    p.set_defaults(func=_cmd_gap)
