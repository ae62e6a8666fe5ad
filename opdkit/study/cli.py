"""``opdkit study``: the small-scale reproduction of the paper's findings (issue 7), one command."""

from __future__ import annotations

import argparse
import json


def add_commands(sub) -> None:
    p = sub.add_parser("study", help="train the tiny model zoo and reproduce the paper's OPD findings on the dial task",
                       description="Build the zoo (cached in OUT/zoo), run the OPD experiments (cached in OUT/runs) "
                                   "and write OUT/report.md with figures. --quick runs only the headline "
                                   "experiment and asserts the signature of a successful OPD run.")
    p.add_argument("--out", default="runs/study", help="output directory (zoo, runs, report); reruns reuse it")
    p.add_argument("--quick", action="store_true", help="CI-sized: headline experiment only, checked")
    p.add_argument("--seeds", type=int, default=None, help="seeds of the key comparisons (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. opd.steps=100 zoo.student_sft_steps=400")
    p.set_defaults(func=_cmd_study)


def _cmd_study(args: argparse.Namespace) -> int:
    from .run import check_headline, run_study, study_config

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
