"""``opdkit study``: the small-scale reproduction of the paper's findings (issue 7), one command."""

from __future__ import annotations

import argparse
import json


def add_commands(sub) -> None:
    p = sub.add_parser("study", help="train the tiny model zoo and reproduce the paper's OPD findings on the dial task",
                       description="Build the zoo (cached in OUT/zoo), run the OPD experiments (cached in OUT/runs) "
                                   "and write OUT/report.md with figures. --quick runs only the headline "
                                   "experiment and asserts the signature of a successful OPD run.")
    p.add_argument("--out", default=None, help="output directory (zoo, runs, report); reruns reuse it (default runs/study)")
    p.add_argument("--quick", action="store_true", help="CI-sized: headline experiment only, checked")
    p.add_argument("--real", action="store_true",
                   help="the real-model study: SmolLM2-135M-Instruct and models opdkit derives from it (GRPO, "
                        "SFT, rollout) on two-digit addition and DAPO-Math; default --out runs/study-real")
    p.add_argument("--seeds", type=int, default=None, help="seeds of the key comparisons (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. opd.steps=100 zoo.student_sft_steps=400")
    p.set_defaults(func=_cmd_study)


def _cmd_study(args: argparse.Namespace) -> int:
    if args.real:
        return _cmd_real(args)
    from .run import check_headline, run_study, study_config

    args.out = args.out or "runs/study"

    cfg = study_config(args.overrides, quick=args.quick, seeds=args.seeds, threads=args.threads)
    outcome = run_study(cfg, args.out)
    if args.quick:
        headline = outcome["results"]["new_capability"][0]
        failed = check_headline(headline)
        keys = ["eval/accuracy@before", "eval/accuracy@after", "eval/reverse_kl@before", "eval/reverse_kl@after",
                "diag/overlap_ratio@start", "diag/overlap_ratio@end", "diag/overlap_token_advantage@start",
                "diag/overlap_token_advantage@end", "diag/entropy_gap@start", "diag/entropy_gap@end"]
        print(json.dumps({k: headline[k] for k in keys}, indent=1))
        if failed:
            print(f"opdkit study --quick: the successful-OPD signature did not appear: {', '.join(failed)}")
            return 1
        print("opdkit study --quick: successful-OPD signature holds")
        return 0
    from .report import write_report

    path = write_report(args.out)
    print(f"report: {path}")
    return 0


def _cmd_real(args: argparse.Namespace) -> int:
    from .real import check_real_headline, real_study_config, run_real_study

    out = args.out or "runs/study-real"
    cfg = real_study_config(args.overrides, quick=args.quick, seeds=args.seeds, threads=args.threads)
    outcome = run_real_study(cfg, out)
    if args.quick:
        headline = outcome["results"]["new_capability"][0]
        teacher = outcome["zoo"]["rl"]["greedy_accuracy"]
        keys = ["eval/accuracy@before", "eval/accuracy@after", "eval/reverse_kl@before", "eval/reverse_kl@after",
                "diag/overlap_ratio@start", "diag/overlap_ratio@end", "diag/overlap_token_advantage@start",
                "diag/overlap_token_advantage@end"]
        print(json.dumps({"teacher_accuracy": teacher, **{k: headline[k] for k in keys}}, indent=1))
        failed = check_real_headline(headline)
        if failed:
            print(f"opdkit study --real --quick: the headline did not hold: {', '.join(failed)}")
            return 1
        print("opdkit study --real --quick: OPD from the RL-improved teacher raised held-out accuracy")
        return 0
    from .real_report import write_real_report

    print(f"report: {write_real_report(out)}")
    return 0
