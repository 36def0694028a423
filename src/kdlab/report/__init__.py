"""Reports of sweeps from the runs on disk: `kdlab-report <sweep dir>` writes report.md, runs.csv and PNG plots.

runs.py reads the runs (config, overrides, results, status) and detects what the sweep varied; tables.py builds the
comparison table and the CSV; plots.py draws the plots; markdown.py assembles the report; cli.py is the console
script. Everything works offline; W&B Reports live in wandb_report.py, imported only when asked for.
"""
