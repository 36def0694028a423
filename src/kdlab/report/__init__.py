"""Reports of sweeps from the runs on disk: `kdlab-report <sweep dir>` writes report.md, runs.csv,
differences.csv and PNG plots.

runs.py reads the runs (config, overrides, results, status) and detects what the sweep varied; tables.py builds the
comparison table and the CSV; stats.py holds the t intervals and paired differences (plain Python); differences.py
pairs the cells that differ in one setting; plots.py draws the plots; markdown.py assembles the report; cli.py is the
console script. Everything works offline; W&B Reports live in wandb_report.py, imported only when asked for.
"""
