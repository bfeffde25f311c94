"""``python -m experiments``: train a suite's runs (every arm over the same seeds, one process per run)
and write its report.

    python -m experiments                          # the main suite, seeds 1-5, 2 processes at a time
    python -m experiments --suite smoke --seeds 2  # two arms, a handful of steps (what CI runs)
    python -m experiments --report-only            # re-read the finished runs and rewrite the report
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

from .arms import SUITES
from .report import collect, write_report
from .runner import plan_runs, train_runs

TIMING_NAME = "training_time.json"  # the elapsed time and processes of the last invocation that trained runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="papo", choices=sorted(SUITES), help="which suite (experiments/arms.py)")
    parser.add_argument("--arms", nargs="+", help="a subset of the suite's arms (default: all)")
    parser.add_argument("--seeds", type=int, help="how many seeds (default: the suite's, 5 for the main one)")
    parser.add_argument("--first-seed", type=int, help="the first seed (default: the suite's, 1 for the main one)")
    parser.add_argument("--steps", type=int, help="override the suite's training steps (every arm alike)")
    parser.add_argument("--workers", type=int, default=2, help="training processes at a time (default 2)")
    parser.add_argument("--runs-dir", type=Path, help="run folders (default runs/experiments/SUITE)")
    parser.add_argument("--results-dir", type=Path, help="CSVs, figures, report (default experiments/results/SUITE)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    for name, value in (("--seeds", args.seeds), ("--workers", args.workers), ("--steps", args.steps)):
        if value is not None and value < 1:
            parser.error(f"{name}: got {value}, expected a positive integer")
    if args.first_seed is not None and args.first_seed < 0:
        parser.error(f"--first-seed: got {args.first_seed}, expected an integer >= 0")
    try:
        arms = [suite.arm(name) for name in args.arms] if args.arms else list(suite.arms)
        first = suite.first_seed if args.first_seed is None else args.first_seed
        seeds = range(first, first + (args.seeds or suite.default_seeds))
        runs_dir = args.runs_dir or Path("runs/experiments") / suite.name
        overrides = {} if args.steps is None else {"steps": args.steps}
        runs = plan_runs(suite, arms, seeds, runs_dir, overrides)
    except ValueError as error:
        parser.error(str(error))
    failed = []
    timing = runs_dir / TIMING_NAME
    if not args.report_only and not all(run.is_done() for run in runs):
        start = time.perf_counter()
        failed = train_runs(runs, args.workers)
        timing.write_text(json.dumps({"elapsed_seconds": time.perf_counter() - start, "workers": args.workers}))
    collected = collect(runs)
    if not collected.runs:
        print(f"no finished runs under {runs_dir}; nothing to report", file=sys.stderr)
        return 1
    command = "python -m experiments " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = write_report(suite, collected, args.results_dir or Path("experiments/results") / suite.name,
                          command.strip(), json.loads(timing.read_text()) if timing.is_file() else None)
    print(f"{len(collected.runs)} of {len(runs)} runs finished; wrote {report}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
