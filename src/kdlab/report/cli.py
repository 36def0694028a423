"""`kdlab-report <sweep dir>`: report.md, runs.csv, differences.csv and PNG plots of a sweep's runs, offline.

    kdlab-report outputs/multirun/2026-11-25/15-14-06                 # writes into the sweep directory
    kdlab-report outputs/multirun/gkd_grid/<time> --out docs/gkd_grid # somewhere else
    kdlab-report <sweep dir> --metric own_teacher_nll --out <dir>    # another score (lower is better: in bold)
    kdlab-report <sweep dir> --against sft --against "fkl λ=1"       # every cell paired with these cells too
    kdlab-report <sweep dir> --wandb --entity me --project kdlab      # also a W&B Report (network, logged-in)
    kdlab-report --wandb-push report_spec.json                        # push a saved W&B Report specification
"""

from __future__ import annotations

import argparse
import sys

from kdlab.report.runs import FAILED, FINISHED, UNFINISHED, load_sweep
from kdlab.run.rundir import FAILURE_MARKER, RESULTS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description, examples = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog="kdlab-report", description=description, epilog="examples:\n" + examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", nargs="?", help="a multirun directory (or any folder of run directories)")
    parser.add_argument("--out", help="where to write report.md, runs.csv and the plots (default: the sweep dir)")
    parser.add_argument("--column", help="config key spread over the table's columns "
                                         "(default: policy.student_fraction when the sweep varied it)")
    parser.add_argument("--metric", help="the score compared (default: the runs' task metric, e.g. accuracy); any "
                                         "key of results.json's metrics, e.g. own_teacher_nll "
                                         "(kdlab.evaluation.mismatch)")
    parser.add_argument("--against", action="append", default=[], metavar="CELL",
                        help="a baseline cell (a row's label, or the row and column as the report names the cell: "
                             "'fkl λ=0'); every other cell is paired with it seed by seed, whatever settings set them "
                             "apart. Repeat for several")
    parser.add_argument("--wandb", action="store_true", help="also build a W&B Report of the sweep's runs")
    parser.add_argument("--entity", help="W&B entity of the report (with --wandb)")
    parser.add_argument("--project", help="W&B project of the report (with --wandb)")
    parser.add_argument("--wandb-push", metavar="SPEC_JSON", help="push a saved W&B Report specification and exit")
    args = parser.parse_args(argv)
    if args.sweep_dir is None and not args.wandb_push:
        parser.error("give a sweep directory (or --wandb-push SPEC_JSON)")
    if (args.entity or args.project) and not args.wandb:
        parser.error("--entity and --project go with --wandb")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.wandb_push:
        from kdlab.report import wandb_report  # W&B's report API only when asked for

        return int(wandb_report.push_specification(args.wandb_push))
    try:
        sweep = load_sweep(args.sweep_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.metric:
        sweep.metric = args.metric
    if not sweep.runs:
        print(f"error: no run directories under {args.sweep_dir} (a run directory holds .hydra/, {RESULTS} or "
              f"{FAILURE_MARKER})", file=sys.stderr)
        return 2
    from kdlab.report.differences import UnknownCell, against, differences
    from kdlab.report.markdown import write_report  # matplotlib loads here, not for --wandb-push
    from kdlab.report.tables import compare, comparison_table_markdown, run_standard_error_line

    out_dir = args.out or args.sweep_dir
    try:
        written = write_report(sweep, out_dir, args.column, args.against)
    except UnknownCell as err:
        print(f"error: --against: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{len(sweep.by_status(s))} {s}" for s in (FINISHED, FAILED, UNFINISHED))
    print(f"{len(sweep.runs)} runs ({counts}); swept: {', '.join(sweep.swept_keys) or 'nothing'}")
    print(comparison_table_markdown(sweep, args.column))
    standard_error = run_standard_error_line(sweep)
    if standard_error:
        print(standard_error)
    comparison = compare(sweep, args.column)
    found = differences(comparison, sweep.metric)
    print(f"paired differences (same seed, one setting changed): {len(found)} pairs, "
          f"{sum(d.distinguishable for d in found)} distinguishable from zero at 95% (report.md, differences.csv)")
    if args.against:
        versus = against(comparison, sweep.metric, args.against)
        print(f"against {', '.join(args.against)}: {len(versus)} pairs, "
              f"{sum(d.distinguishable for d in versus)} distinguishable from zero at 95%")
    for kind, path in written.items():
        print(f"{kind}: {path}")
    if args.wandb:
        from kdlab.report import wandb_report

        return int(wandb_report.build_report(sweep, comparison_table_markdown(sweep, args.column),
                                             entity=args.entity, project=args.project, out_dir=out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
