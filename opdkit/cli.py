"""``opdkit`` command line: one subcommand per job, each ``--config FILE.yaml`` plus ``key=value`` overrides."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError
from .errors import UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. objective.k=8 run.steps=20")


def _cmd_distill(args) -> int:
    from .config import DistillConfig, load_config
    from .train import is_main_process, run_distill

    cfg = load_config(DistillConfig, args.config, args.overrides)
    summary = run_distill(cfg)
    if not is_main_process():
        return 0
    out = Path(cfg.run.out_dir) / "summary.json"
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("samples")}, indent=2))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, overrides=args.overrides, config=args.config)
    return 0


def _cmd_prune(args) -> int:
    from .prune import prune_command

    prune_command(args.model, layers=args.layers, out=args.out, keep=args.keep)
    return 0


# The config class of every command that reads one (module, class): names, so ``opdkit --help`` stays light.
COMMAND_CONFIGS = {
    "distill": ("opdkit.config", "DistillConfig"),
    "grpo": ("opdkit.config", "DistillConfig"),
    "demo": ("opdkit.config", "DistillConfig"),
    "sft": ("opdkit.recipes.sft", "SFTConfig"),
    "rollout": ("opdkit.recipes.rollout", "RolloutRecipeConfig"),
    "eval": ("opdkit.recipes.benchmark", "EvalRecipeConfig"),
    "dedup": ("opdkit.recipes.dedup", "DedupConfig"),
    "prompts-rewrite": ("opdkit.recipes.prompts", "RewriteConfig"),
    "prompts-mix": ("opdkit.recipes.prompts", "MixConfig"),
    "prompts-arithmetic": ("opdkit.recipes.prompts", "ArithmeticConfig"),
    "probe": ("opdkit.probe", "ProbeConfig"),
    "study": ("opdkit.study.run", "StudyConfig"),
    "study-real": ("opdkit.study.real", "RealStudyConfig"),  # opdkit study --real
}


def config_class(command: str) -> type:
    import importlib

    module, name = COMMAND_CONFIGS[command]
    return getattr(importlib.import_module(module), name)


def _cmd_config(args) -> int:
    from . import config as C

    rows = C.describe(config_class(args.for_command))
    renamed = C.describe_renames(config_class(args.for_command))
    if args.markdown:
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, text in rows:
            print(f"| `{key}` | `{default}` | {text.replace('|', '/')} |")
        return 0
    for key, default, text in rows:
        print(f"{key:36s} {default:28s} {text}")
    for old, new in renamed:
        print(f"{old:36s} {'(deprecated)':28s} old name of {new}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opdkit", description="On-policy distillation of language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="on-policy distillation (OPD) of a student from a teacher")
    _add_config_args(p)
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("demo", help="distil SmolLM2-135M-Instruct into a layer-pruned student in minutes")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("prune", help="make a smaller student by dropping decoder layers")
    p.add_argument("model", help="HF model directory, .gguf file or bundled name")
    p.add_argument("--layers", type=int, help="number of decoder layers to keep (chosen greedily by perplexity)")
    p.add_argument("--keep", help="comma-separated layer indices to keep instead of the greedy search")
    p.add_argument("--out", required=True, help="output directory (an ordinary HF model)")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("config", help="list every config key of a command with its default and meaning")
    p.add_argument("for_command", nargs="?", default="distill", choices=sorted(COMMAND_CONFIGS), metavar="COMMAND",
                   help=f"the command whose keys to list (default distill): {', '.join(sorted(COMMAND_CONFIGS))}")
    p.add_argument("--markdown", action="store_true", help="as a markdown table (the README's config reference)")
    p.set_defaults(func=_cmd_config)

    for module in command_modules():
        module.add_commands(sub)
    return parser


# Modules that add subcommands with an ``add_commands(subparsers)`` function (keeps this file small).
COMMAND_MODULES = ["opdkit.probe", "opdkit.report", "opdkit.recipes.cli", "opdkit.bench", "opdkit.study"]


def command_modules() -> list:
    import importlib

    return [importlib.import_module(name) for name in COMMAND_MODULES]


def quiet_libraries() -> None:
    """No hub access at run time, and no per-tensor progress bars from transformers."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"opdkit {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from .loop import Preempted

        if isinstance(e, Preempted):  # SIGTERM: the conventional 128 + signal number
            print(f"opdkit {args.command}: stopped by {e.args[0]}", file=sys.stderr)
            return 128 + e.signum
        print(f"opdkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except UserError as e:  # one line the user can act on; -v shows where it came from. Anything else is a bug
        if args.verbose:
            raise
        print(f"opdkit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
