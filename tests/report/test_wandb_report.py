"""`kdlab-report --wandb`: the W&B Report of a real tiny multirun, derived from its runs and built offline; the
offline, logged-out and unreachable paths write the specification, say what is missing in one line, and return fast.

No test reaches W&B: credentials are removed and the server address points at this machine (a closed port, or a
local HTTP server that refuses every request the way W&B refuses a bad key).
"""

from __future__ import annotations

import csv
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import wandb_workspaces.reports.v2 as wr
import yaml
from wandb_workspaces import expr

from kdlab.report.runs import load_sweep
from kdlab.report.tables import comparison_table_markdown
from kdlab.report.wandb_report import SPEC_FILE, build_report, push_specification, wandb_unavailable
from kdlab.report.wandb_spec import BOOKKEEPING, SPEC_FORMAT, report_from_spec, sweep_specification
from kdlab.run.rundir import CONFIG
from tests.conftest import REPO, TINY_RUN

GRID = ["loss=fkl,jsd", "policy.student_fraction=0,1", "seed=0,1"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """2 losses x 2 student fractions x 2 seeds, 3 steps each, logged offline to W&B (about 20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("multirun")
    cmd = [sys.executable, "train.py", "-m", f"hydra.sweep.dir={out}", *TINY_RUN, "export=false",
           "eval.teacher=false", "eval.before=false", "logger=wandb", *GRID]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No credentials anywhere wandb looks (environment, ~/.netrc, settings) and a W&B address that refuses at once."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_ENTITY", "WANDB_PROJECT", "HTTPS_PROXY",
                 "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    yield tmp_path
    import wandb

    wandb.teardown()  # wandb keeps its settings in a process-wide singleton: later tests must not inherit these


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_configs(sweep_dir) -> list[dict]:
    """Each job's resolved config read straight from disk, without kdlab's loader."""
    return [yaml.safe_load((path / CONFIG).read_text()) for path in sorted(sweep_dir.glob("[0-9]*"))]


def _panel_grids(spec: dict) -> list[dict]:
    return [block for block in spec["blocks"] if block["type"] == "panel_grid"]


def _panels(spec: dict, kind: str) -> list[dict]:
    return [panel for grid in _panel_grids(spec) for panel in grid["panels"] if panel["type"] == kind]


@pytest.mark.slow  # the tiny multirun
def test_specification_is_derived_from_the_runs(sweep_dir, no_wandb_login):
    configs = _job_configs(sweep_dir)
    assert len(configs) == 8
    sweep = load_sweep(sweep_dir)
    spec = sweep_specification(sweep, comparison_table_markdown(sweep))
    assert spec["format"] == SPEC_FORMAT and json.loads(json.dumps(spec)) == spec  # plain JSON

    # every run set selects the runs by the W&B group the jobs logged to
    groups = sorted({c["logger"]["wandb"]["group"] for c in configs})
    assert spec["groups"] == groups
    assert all(rs["filters"]["groups"] == groups for grid in _panel_grids(spec) for rs in grid["runsets"])
    # the destination is what the runs logged to; no entity was configured, so the push resolves the user's
    assert spec["project"] == configs[0]["logger"]["wandb"]["project"] and spec["entity"] is None
    assert sweep_specification(sweep, "", entity="lab", project="p")["entity"] == "lab"

    # swept keys are what differs between the jobs' configs, paths and logger naming aside
    assert {"loss.name", "policy.student_fraction", "seed"} <= set(spec["swept_keys"])
    assert not any(k.startswith(("output_dir", "logger.")) for k in spec["swept_keys"])

    # one metric-vs-student-fraction scatter per loss; each job matches exactly one of their run sets
    scatters = _panels(spec, "scatter")
    assert [p["x"] for p in scatters] == ["config:policy.student_fraction"] * 2
    assert {p["y"] for p in scatters} == {f"summary:val/{sweep.metric}"}
    method_filters = [grid["runsets"][0]["filters"]["config"] for grid in _panel_grids(spec)
                      if grid["panels"][0]["type"] == "scatter"]
    for config in configs:
        matches = [f for f in method_filters if all(_dotted(config, k) == v for k, v in f.items())]
        assert len(matches) == 1
    jsd_beta = next(c["loss"]["beta"] for c in configs if c["loss"]["name"] == "jsd")
    assert {f["loss.name"] for f in method_filters} == {"fkl", "jsd"}
    assert {"loss.name": "jsd", "loss.beta": jsd_beta} in method_filters
    assert f"jsd({jsd_beta:g})" in spec["title"] and "fkl" in spec["title"]

    # learning curves: each train/* column the jobs' metrics.csv hold a value for, bookkeeping aside, grouped
    # over seeds; throughput on its own panel
    logged = set()
    for path in sweep_dir.glob("*/csv/metrics.csv"):
        for row in csv.DictReader(path.open()):
            logged |= {k for k, v in row.items() if k.startswith("train/") and v}
    assert {"train/loss", "train/fkl", "train/jsd"} <= logged  # what the two losses log, by their names
    assert spec["components"][0] == "train/loss" and set(spec["components"]) == logged - BOOKKEEPING
    curves = _panels(spec, "line")
    assert [p["y"] for p in curves] == [[k] for k in spec["components"]] + [["train/tokens_per_sec"]]
    curve_grid = next(g for g in _panel_grids(spec) if g["panels"][0]["type"] == "line")
    assert curve_grid["runsets"][0]["groupby"] == [f"config:{k}" for k in spec["swept_keys"] if k != "seed"]

    # parallel coordinates over every swept key and the metric, and a run comparer
    (parallel,) = _panels(spec, "parallel_coordinates")
    assert parallel["columns"] == [f"config:{k}" for k in spec["swept_keys"]] + [f"summary:val/{sweep.metric}"]
    assert len(_panels(spec, "run_comparer")) == 1


def _dotted(config: dict, key: str):
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


@pytest.mark.slow  # the tiny multirun
def test_report_built_offline_holds_the_panels_filters_and_table(sweep_dir, no_wandb_login):
    sweep = load_sweep(sweep_dir)
    table = comparison_table_markdown(sweep)
    spec = json.loads(json.dumps(sweep_specification(sweep, table)))  # as read back from the file
    report = report_from_spec(spec, entity="lab")
    assert isinstance(report, wr.Report) and report.entity == "lab" and report.project == spec["project"]
    assert report.title == spec["title"] and len(report.title) <= 128
    assert report.description == spec["description"] and "fkl" in report.description and "seed" in report.description

    assert table in [b.text for b in report.blocks if isinstance(b, wr.MarkdownBlock)]
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    panels = [p for g in grids for p in g.panels]
    scatters = [p for p in panels if isinstance(p, wr.ScatterPlot)]
    assert len(scatters) == 2
    assert all(p.x == wr.Config("policy.student_fraction") and p.y == wr.SummaryMetric("val/accuracy")
               for p in scatters)
    lines = [p for p in panels if isinstance(p, wr.LinePlot)]
    assert [p.y for p in lines] == [[k] for k in spec["components"]] + [["train/tokens_per_sec"]]
    assert {p.x for p in lines} == {"trainer/global_step"}  # WandbLogger's step metric
    (parallel,) = [p for p in panels if isinstance(p, wr.ParallelCoordinatesPlot)]
    assert [c.metric for c in parallel.columns] == (
        [wr.Config(k) for k in spec["swept_keys"]] + [wr.SummaryMetric("val/accuracy")])
    assert any(isinstance(p, wr.RunComparer) for p in panels)
    # the panels as W&B receives them: nested config keys in W&B's stored layout (`policy.value.student_fraction`)
    wire = scatters[0]._to_model().model_dump(by_alias=True, exclude_none=True)
    assert wire["viewType"] == "Scatter Plot"
    assert (wire["config"]["xAxis"], wire["config"]["yAxis"]) == ("config:policy.value.student_fraction",
                                                                  "summary:val/accuracy")
    wire = parallel._to_model().model_dump(by_alias=True, exclude_none=True)
    assert "config:loss.value.name" in [c["accessor"] for c in wire["config"]["columns"]]

    # the filters as W&B receives them: the jobs' group, and each loss's config keys in W&B's nested layout
    group = _job_configs(sweep_dir)[0]["logger"]["wandb"]["group"]
    loss_names = []
    for grid in grids:
        (runset,) = grid.runsets
        wire = expr.filters_tree_to_v2(expr.expr_to_filters(runset.filters))["filters"]
        assert {"key": {"section": "run", "name": "group"}, "op": "=", "value": group}.items() <= wire[0].items()
        loss_names += [f["value"] for f in wire if f["key"] == {"section": "config", "name": "loss.value.name"}]
    assert sorted(loss_names) == ["fkl", "jsd"]
    curve_runset = next(g for g in grids if isinstance(g.panels[0], wr.LinePlot)).runsets[0]
    assert [expr.groupby_str_to_key(g).name for g in curve_runset.groupby] == [
        k.replace(".", ".value.", 1) if "." in k else f"{k}.value" for k in spec["swept_keys"] if k != "seed"]

    # the whole report converts to the model `save()` uploads; only the run sets' project-id look-up needs the
    # server, so they are detached from their project for this offline conversion
    for grid in grids:
        for runset in grid.runsets:
            runset.entity = runset.project = ""
    wire = report._to_model().model_dump(by_alias=True, exclude_none=True)
    kinds = [block["type"] for block in wire["spec"]["blocks"]]
    assert kinds.count("panel-grid") == len(grids) == 4 and kinds.count("markdown-block") == 2
    assert table in [block.get("content") for block in wire["spec"]["blocks"]]
    grid_runsets = [b["metadata"]["runSets"][0] for b in wire["spec"]["blocks"] if b["type"] == "panel-grid"]
    assert all(rs["filters"]["filters"][0]["value"] == group for rs in grid_runsets)


@pytest.mark.slow  # the tiny multirun
def test_offline_build_writes_the_specification_and_returns_at_once(sweep_dir, no_wandb_login, capsys):
    sweep = load_sweep(sweep_dir)
    table = comparison_table_markdown(sweep)
    cases = {"offline": {"WANDB_MODE": "offline"}, "logged out": {}, "unreachable": {"WANDB_API_KEY": "k" * 40}}
    for case, env in cases.items():
        out = no_wandb_login / case
        os.environ.pop("WANDB_MODE")
        os.environ.update(env)
        try:
            start = time.perf_counter()
            code = build_report(sweep, table, out_dir=out)
            elapsed = time.perf_counter() - start
        finally:
            os.environ.pop("WANDB_API_KEY", None)
            os.environ["WANDB_MODE"] = "offline"
        lines = capsys.readouterr().out.strip().splitlines()
        assert code == 0 and elapsed < 5, (case, elapsed)
        assert len(lines) == 1 and f"--wandb-push {out / SPEC_FILE}" in lines[0]
        assert {"offline": "WANDB_MODE=offline", "logged out": "not logged in",
                "unreachable": "no network"}[case] in lines[0]
        assert json.loads((out / SPEC_FILE).read_text()) == sweep_specification(sweep, table)


@pytest.mark.slow  # the tiny multirun
def test_push_without_login_or_network_says_why_and_fails_fast(sweep_dir, no_wandb_login, capsys, monkeypatch):
    sweep = load_sweep(sweep_dir)
    build_report(sweep, "table", out_dir=no_wandb_login)
    path = no_wandb_login / SPEC_FILE
    capsys.readouterr()
    monkeypatch.setenv("WANDB_MODE", "online")
    start = time.perf_counter()
    assert push_specification(path) == 1
    assert time.perf_counter() - start < 5
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert "not logged in" in line and f"--wandb-push {path}" in line

    (no_wandb_login / "other.json").write_text(json.dumps({"title": "not a spec"}))
    assert push_specification(no_wandb_login / "other.json") == 1
    assert "not a kdlab W&B report specification" in capsys.readouterr().out


def test_a_host_that_never_answers_is_reported_within_the_probe_timeout(no_wandb_login, monkeypatch):
    """A listening socket that never accepts: the TCP connect completes in the kernel, the TLS handshake never
    does, as with a firewall that swallows traffic. Without the probe's timeout this would wait indefinitely."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"https://127.0.0.1:{port}")
        start = time.perf_counter()
        problem = wandb_unavailable(timeout=0.5)
        elapsed = time.perf_counter() - start
    assert 0.5 <= elapsed < 2.0
    assert problem == f"no network: 127.0.0.1:{port} unreachable within 0.5 s (TimeoutError)"


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every request as W&B answers a bad API key."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"errors": [{"message": "user is not logged in"}]}')

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.mark.slow  # the tiny multirun
def test_a_server_that_refuses_the_push_gives_one_line_and_exit_1(sweep_dir, no_wandb_login, capsys, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
        monkeypatch.setenv("WANDB_MODE", "online")
        assert wandb_unavailable() is None  # logged in (a key is set) and the host answers
        sweep = load_sweep(sweep_dir)
        start = time.perf_counter()
        code = build_report(sweep, "table", entity="lab", out_dir=no_wandb_login)
        assert time.perf_counter() - start < 30
    finally:
        server.shutdown()
    (line,) = [x for x in capsys.readouterr().out.strip().splitlines() if x.startswith("W&B report")]
    assert code == 1 and "not saved" in line and "user is not logged in" in line and "--wandb-push" in line
    assert (no_wandb_login / SPEC_FILE).is_file()


@pytest.mark.slow  # the tiny multirun
def test_kdlab_report_cli_offline_then_push(sweep_dir, no_wandb_login, capsys):
    """The console script's flags reach this module: the local report and the specification beside it, then a push
    that cannot happen offline."""
    from kdlab.report.cli import main

    out = no_wandb_login / "report"
    assert main([str(sweep_dir), "--wandb", "--project", "kdlab-tests", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["project"] == "kdlab-tests" and "WANDB_MODE=offline" in last
    assert main(["--wandb-push", str(out / SPEC_FILE)]) == 1
    assert "WANDB_MODE=offline" in capsys.readouterr().out
