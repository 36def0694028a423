"""`python -m kdlab.report <sweep dir>`: the same as `kdlab-report`."""

from kdlab.report.cli import main

raise SystemExit(main())
