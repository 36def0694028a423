"""kdlab-report: a real tiny multirun read back into a report whose numbers are the runs' own, failed runs listed;
the table's arithmetic and the swept-key detection on run directories written here with known values."""

import csv
import json
import os
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdlab.report.cli import main as report_main
from kdlab.report.runs import detect_swept_keys, load_run, load_sweep
from kdlab.report.tables import comparison_table_markdown
from kdlab.run.resolvers import method_label, sweep_group_name
from kdlab.run.rundir import CHECKPOINTS, CONFIG, FAILURE_MARKER, INTERRUPTION_MARKER, RESULTS, STUDENT
from tests.conftest import REPO
from tests.run.test_sweeps import TINY_JOB


def _cells(table: str) -> dict[tuple[str, str], str]:
    """{(row label, column title): cell text} of a Markdown table."""
    lines = [line.strip().strip("|").split("|") for line in table.strip().splitlines()]
    header = [h.strip() for h in lines[0]]
    return {(row[0].strip(), header[i]): cell.strip() for row in lines[2:] for i, cell in enumerate(row) if i}


def _wandb_run_record(path: Path):
    """The run record (name, group, tags, initial config) of an offline W&B run file, read with W&B's protobuf
    schema: the file is a LevelDB-style log (7-byte header, 32 KiB blocks, records of crc32, length, type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {path}")


@pytest.mark.slow
def test_tiny_multirun_report_matches_the_runs_and_lists_the_failed_one(tmp_path):
    """`train.py -m` over the gkd_grid sweep cut to 4 tiny jobs, one of which fails (SFT on the student's own
    samples is refused at start-up): the sweep goes on past it, and the report's numbers are read back from each
    run's results.json independently of kdlab.report."""
    sweep_dir = tmp_path / "outputs" / "multirun" / "tiny_grid"
    cmd = [sys.executable, "train.py", "-m", "-cd", "sweeps", "-cn", "gkd_grid", f"hydra.sweep.dir={sweep_dir}",
           "loss=fkl,sft", "policy.student_fraction=0,1", "seed=1", "logger=wandb", *TINY_JOB]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    # Hydra re-raises the first failure once every job has run: the sweep exits non-zero, the others' results stay
    assert done.returncode != 0 and "ConfigError" in done.stderr
    jobs = {p.name: p for p in sweep_dir.iterdir() if p.is_dir()}
    assert sorted(jobs) == ["0", "1", "2", "3"]
    overrides = {name: yaml.safe_load((p / ".hydra" / "overrides.yaml").read_text())[:2] for name, p in jobs.items()}
    assert overrides["3"] == ["loss=sft", "policy.student_fraction=1"]
    assert not (jobs["3"] / RESULTS).exists()
    assert "loss=sft with policy.student_fraction=1.0" in json.loads((jobs["3"] / FAILURE_MARKER).read_text())["error"]

    out = tmp_path / "report"
    assert report_main([str(sweep_dir), "--out", str(out)]) == 0
    sweep = load_sweep(sweep_dir)
    assert sweep.swept_keys == ["loss.name", "policy.student_fraction"] and sweep.planned_jobs == 4
    assert [run.status for run in sweep.runs] == ["finished", "finished", "finished", "failed"]

    results = {name: json.loads((jobs[name] / RESULTS).read_text()) for name in ("0", "1", "2")}
    expected = {("fkl", "λ=0"): results["0"], ("fkl", "λ=1"): results["1"], ("sft", "λ=0"): results["2"]}
    report = (out / "report.md").read_text()
    cells = _cells(comparison_table_markdown(sweep))
    for key, result in expected.items():
        value = f"{result['metrics']['accuracy']:.4f}"
        assert cells[key].replace("**", "") == f"{value} (n=1, no interval)"
    assert cells[("sft", "λ=1")] == "no result (1 not finished)"
    assert comparison_table_markdown(sweep) in report
    # the failed run is listed with its overrides and its error
    failed_row = next(line for line in report.splitlines() if line.startswith("| 3 | failed |"))
    assert "loss=sft policy.student_fraction=1" in failed_row and "ConfigError" in failed_row
    assert "4 runs: 3 finished, 1 failed, 0 unfinished" in report

    with (out / "runs.csv").open() as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert rows["3"]["status"] == "failed" and rows["3"]["student_after/accuracy"] == ""
    for name, result in results.items():
        assert rows[name]["status"] == "finished"
        assert float(rows[name]["student_after/accuracy"]) == result["metrics"]["accuracy"]
        assert float(rows[name]["tokens_per_sec"]) == result["tokens_per_sec"]
        assert int(rows[name]["steps"]) == result["steps"] == 2
        # the sweep keeps outputs small: no exported student, checkpoints deleted once the run finished
        assert not (jobs[name] / STUDENT).exists() and not (jobs[name] / CHECKPOINTS).exists()
    for plot in ("metric.png", "learning_curves.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot})" in report

    # W&B (offline): every run of the sweep logged to one group named after the sweep directory, with the method
    # and student fraction as flat config keys; read from the offline run files W&B wrote, not from kdlab's config
    records = {name: _wandb_run_record(next((jobs[name] / "wandb").glob("offline-run-*/run-*.wandb")))
               for name in results}
    assert {r.run_group for r in records.values()} == {"multirun-tiny_grid"} == {sweep.wandb_group}
    assert {name: json.loads({u.key: u.value_json for u in r.config.update}["method"])
            for name, r in records.items()} == {"0": "fkl", "1": "fkl", "2": "sft"}
    assert records["1"].display_name == "arith-fkl-lambda1-seed1" and list(records["1"].tags) == ["arith", "fkl",
                                                                                                     "mixed"]


def _write_run(root: Path, name: str, overrides: list[str], config: dict, accuracy: float | None,
               failed: str | None = None) -> Path:
    """A run directory as train.py leaves it (the files kdlab-report reads), with a chosen final accuracy."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / CONFIG).write_text(yaml.safe_dump(config))
    if accuracy is not None:
        (run / RESULTS).write_text(json.dumps({"metric": "accuracy", "metrics": {"accuracy": accuracy},
                                                      "teacher": {"accuracy": 0.62}, "steps": 10}))
    if failed:
        (run / FAILURE_MARKER).write_text(json.dumps({"error": failed}))
    return run


def _config(loss: str, seed: int, fraction: float, beta: float | None = None) -> dict:
    loss_node = {"name": loss, "temperature": 1.0} | ({"beta": beta} if beta is not None else {})
    return {"seed": seed, "loss": loss_node, "policy": {"name": "mixed", "student_fraction": fraction},
            "task": {"name": "arith"}, "output_dir": f"/runs/{loss}{beta}-{fraction}-{seed}",
            "logger": {"csv": {"save_dir": "x"}, "wandb": {"group": "multirun-g", "name": f"{loss}-{seed}"}}}


@pytest.fixture
def grid(tmp_path):
    """fkl and jsd(0.9) at lambda 0 and 1 over seeds, with a failed and an unfinished run; known accuracies."""
    accuracies = {("fkl", 0): [0.40, 0.45, 0.50], ("fkl", 1): [0.30, 0.36, 0.33],
                  ("jsd0.9", 0): [0.50, 0.60, None], ("jsd0.9", 1): [0.20, 0.30, "unfinished"]}
    job = 0
    for (loss, fraction), values in accuracies.items():
        for seed, accuracy in enumerate(values, start=1):
            name, beta = ("jsd", 0.9) if loss == "jsd0.9" else (loss, None)
            overrides = [f"loss={loss}", f"policy.student_fraction={fraction}", f"seed={seed}", "trainer.max_steps=10"]
            failed = "ValueError: Invalid learning rate" if accuracy is None else None
            _write_run(tmp_path, str(job), overrides, _config(name, seed, fraction, beta),
                       accuracy if isinstance(accuracy, float) else None, failed)
            job += 1
    return tmp_path, accuracies


# Student t quantiles t_{0.975, df} as printed in statistical tables (a reference independent of kdlab.report.stats)
T_975 = {1: 12.706205, 2: 4.302653, 4: 2.776445, 9: 2.262157}


def test_table_is_mean_and_95_interval_over_seeds_with_the_best_in_bold(grid):
    root, accuracies = grid
    sweep = load_sweep(root)
    assert [run.name for run in sweep.runs] == [str(i) for i in range(12)]  # 10 after 9, not after 1
    # one beta per loss here: loss.beta follows from loss.name, so it is no swept key of its own
    assert sweep.swept_keys == ["loss.name", "policy.student_fraction", "seed"]
    assert sweep.metric == "accuracy" and sweep.wandb_group == "multirun-g"
    cells = _cells(comparison_table_markdown(sweep))
    for (loss, fraction), values in accuracies.items():
        done = [v for v in values if isinstance(v, float)]
        label = "jsd(0.9)" if loss == "jsd0.9" else loss
        mean, sd = statistics.fmean(done), statistics.stdev(done)
        half = T_975[len(done) - 1] * sd / len(done) ** 0.5
        best = max(statistics.fmean([v for v in vals if isinstance(v, float)])
                   for (_, f), vals in accuracies.items() if f == fraction)
        text = f"**{mean:.4f}**" if abs(mean - best) < 1e-12 else f"{mean:.4f}"
        suffix = f"sd {sd:.4f}, n={len(done)}" + (
            f", {len(values) - len(done)} not finished" if len(done) < len(values) else "")
        assert cells[(label, f"λ={fraction}")] == f"{text} [{mean - half:.4f}, {mean + half:.4f}] ({suffix})"
    # by hand: fkl at lambda 0 is 0.45, sd 0.05, half-width 4.302653 * 0.05 / sqrt(3) = 0.124207; jsd(0.9) at
    # lambda 0 (two runs) is its column's best, half-width 12.706205 * 0.070711 / sqrt(2) = 0.6353
    assert cells[("fkl", "λ=0")] == "0.4500 [0.3258, 0.5742] (sd 0.0500, n=3)"
    assert cells[("jsd(0.9)", "λ=0")] == "**0.5500** [-0.0853, 1.1853] (sd 0.0707, n=2, 1 not finished)"
    statuses = {run.name: (run.status, run.error) for run in sweep.runs}
    assert statuses["8"] == ("failed", "ValueError: Invalid learning rate")
    assert statuses["11"] == ("unfinished", None)


def test_report_lists_failed_and_unfinished_runs(grid, tmp_path_factory):
    root, _ = grid
    # Hydra's record of the launch: the sweeper's lists, then the command line's (seed=1,2,3,4 replaces 1,2,3)
    sweeper = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
               "params": {"loss": "fkl,jsd0.9", "policy.student_fraction": "0,1", "seed": "1,2,3"}}
    overrides = {"task": ["seed=1,2,3,4", "trainer.max_steps=10"]}
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": sweeper, "overrides": overrides}}))
    out = tmp_path_factory.mktemp("report")
    assert report_main([str(root), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "12 runs: 10 finished, 1 failed, 1 unfinished" in report
    assert "The sweep was to launch 16 jobs: 4 never started" in report  # 2 losses x 2 fractions x 4 seeds
    failed = "| 8 | failed | `loss=jsd0.9 policy.student_fraction=0 seed=3` | ValueError: Invalid learning rate |"
    assert failed in report
    assert "| 11 | unfinished | `loss=jsd0.9 policy.student_fraction=1 seed=3` |" in report
    assert "teacher 0.6200" in report
    with (out / "runs.csv").open() as f:
        assert [row["status"] for row in csv.DictReader(f)].count("finished") == 10


def test_group_choice_counts_by_name_and_only_undetermined_fields(tmp_path):
    """teacher=a,b changes every field of the teacher: the sweep varied `teacher.name` only; a field that differs
    between runs of the same teacher (set by another override) still counts."""
    for i, (teacher, width, lr) in enumerate([("a", 8, 1e-3), ("b", 16, 1e-3), ("a", 8, 1e-2), ("b", 16, 1e-2)]):
        config = {"teacher": {"name": teacher, "config": {"width": width}}, "optimizer": {"lr": lr}, "seed": 0}
        _write_run(tmp_path, str(i), [f"teacher={teacher}", f"optimizer.lr={lr}"], config, 0.1 * i)
    sweep = load_sweep(tmp_path)
    assert sweep.swept_keys == ["optimizer.lr", "teacher.name"]
    assert detect_swept_keys(sweep.runs[:1]) == []


def test_unresolved_hydra_config_is_resolved_as_far_as_it_can_be(tmp_path):
    """A job that failed before writing config.yaml leaves Hydra's unresolved copy: values resolve, `${hydra:...}`
    (unavailable outside the job) stays as written."""
    run = tmp_path / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "seed: 3\nloss: {name: jsd, beta: 0.9}\noutput_dir: ${hydra:runtime.output_dir}\nname: ${loss.name}-${seed}\n")
    record = load_run(run)
    assert record.status == "unfinished" and record.results is None
    assert record.get("loss.beta") == 0.9 and record.config["name"] == "jsd-3"
    assert record.config["output_dir"] == "${hydra:runtime.output_dir}" and record.get("nope", 7) == 7


def test_interrupted_run_is_unfinished_with_how_to_resume(tmp_path):
    run = _write_run(tmp_path, "0", ["seed=1"], {"seed": 1}, None)
    message = "RunInterrupted: interrupted at step 7; last.ckpt is saved. Resume with: ... ckpt_path=last"
    (run / INTERRUPTION_MARKER).write_text(json.dumps({"error": message}))
    record = load_run(run)
    assert (record.status, record.error) == ("unfinished", message)
    (run / RESULTS).write_text(json.dumps({"metrics": {"accuracy": 0.5}}))  # resumed and finished
    assert load_run(run).status == "finished"


def test_method_labels_and_sweep_group_names():
    assert method_label({"name": "jsd", "beta": 0.9}) == "jsd(0.9)"
    assert method_label({"name": "fkl"}) == "fkl"
    assert method_label({"name": "skl", "alpha": 0.1}) == "skl(0.1)"
    assert method_label({"name": "ot", "gamma": 0.0, "top_k": 50}, ["gamma"]) == "ot(gamma=0)"
    assert sweep_group_name("outputs/multirun/2026-11-25/15-14-06") == "multirun-2026-11-25-15-14-06"
    assert sweep_group_name("/data/x/outputs/multirun/gkd_grid/2026-11-25_15-14-06") == \
        "multirun-gkd_grid-2026-11-25_15-14-06"


def test_report_of_a_finished_sweep_loads_neither_torch_nor_transformers(grid, tmp_path_factory):
    """kdlab-report runs where no training stack is installed and starts in a second, so reading runs (including one
    whose only config is Hydra's unresolved copy, which needs kdlab's resolvers) must not pull torch in."""
    root, _ = grid
    (root / "12" / ".hydra").mkdir(parents=True)
    (root / "12" / ".hydra" / "config.yaml").write_text("seed: 1\nloss: {name: jsd, beta: 0.9}\n"
                                                         "method: ${kdlab.method:${loss}}\n")
    out = tmp_path_factory.mktemp("report")
    code = ("import sys; from kdlab.report.cli import main; status = main(sys.argv[1:]); "
            "print('heavy:', [m for m in ('torch', 'transformers') if m in sys.modules]); sys.exit(status)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, str(root), "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "heavy: []" in done.stdout
    assert "13 runs: 10 finished, 1 failed, 2 unfinished" in (out / "report.md").read_text()
    assert load_run(root / "12").get("method") == "jsd(0.9)"


def test_config_and_report_do_not_import_each_other():
    """Validation and reporting meet only in kdlab.run.resolvers and kdlab.run.rundir: neither imports the other, at
    the top of a file or inside a function."""
    import ast

    def imported(path: Path) -> set[str]:
        nodes = ast.walk(ast.parse(path.read_text()))
        return {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names}

    src = REPO / "src" / "kdlab"
    assert not any(m.startswith("kdlab.report") for m in imported(src / "run" / "validate.py"))
    for path in (src / "report").glob("*.py"):
        assert "kdlab.run.validate" not in imported(path), path.name


def test_cli_errors_without_runs(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report_main([])


def _runs_from_sweep_configs(root: Path, sweep: str, jobs: list[list[str]]) -> None:
    """Run directories holding the configs the ready sweep's jobs compose to (no training; accuracy = job number
    / 100), so labels and swept keys are checked on the real sweep options."""
    from omegaconf import OmegaConf

    from tests.run.test_sweeps import compose_sweep

    for i, overrides in enumerate(jobs):
        cfg = compose_sweep(sweep, overrides)
        config = OmegaConf.to_container(cfg, resolve=False)
        config.pop("hydra")
        config["output_dir"] = f"/runs/{i}"
        config = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
        _write_run(root, str(i), overrides, config, i / 100)


def test_ready_sweeps_read_back_as_their_methods(tmp_path):
    grid = tmp_path / "grid"
    losses = ["fkl", "rkl", "jsd0.1", "jsd0.5", "jsd0.9"]
    _runs_from_sweep_configs(grid, "gkd_grid", [[f"loss={loss}", f"policy.student_fraction={f}", "seed=1"]
                                                 for loss in losses for f in (0, 1)])
    sweep = load_sweep(grid)
    assert sweep.swept_keys == ["loss.beta", "loss.name", "policy.student_fraction"]
    cells = _cells(comparison_table_markdown(sweep))
    rows = ["fkl", "rkl", "jsd(0.1)", "jsd(0.5)", "jsd(0.9)"]
    assert sorted({row for row, _ in cells}) == sorted(rows)
    for i, row in enumerate(rows):  # job 2i is lambda 0, 2i+1 lambda 1; accuracy = job / 100
        assert cells[(row, "λ=0")].replace("**", "") == f"{2 * i / 100:.4f} (n=1, no interval)"
        assert cells[(row, "λ=1")].replace("**", "") == f"{(2 * i + 1) / 100:.4f} (n=1, no interval)"
    assert cells[("jsd(0.9)", "λ=1")].startswith("**")  # the highest of its column

    ablation = tmp_path / "ablation"
    options = ["ot", "ot_no_had", "ot_no_sl", "ot_no_sd", "ot_top10", "ot_sinkhorn5", "uld"]
    _runs_from_sweep_configs(ablation, "ot_ablation", [[f"loss={option}"] for option in options])
    sweep = load_sweep(ablation)
    assert sweep.swept_keys == ["loss.beta", "loss.gamma", "loss.had_weight", "loss.name", "loss.sinkhorn_iterations",
                                "loss.top_k"]
    labels = [row for row, col in _cells(comparison_table_markdown(sweep))]
    assert labels == ["ot", "ot(had_weight=0)", "ot(beta=0)", "ot(gamma=0)", "ot(top_k=10)",
                      "ot(sinkhorn_iterations=5)", "uld"]


def test_metric_option_compares_another_score_with_the_lowest_in_bold(grid, tmp_path_factory, capsys):
    root, accuracies = grid
    for run_dir in root.iterdir():  # a mismatch score per run: 1 - accuracy, so the best accuracy is the lowest NLL
        path = run_dir / RESULTS
        if path.exists():
            results = json.loads(path.read_text())
            results["metrics"]["own_teacher_nll"] = 1.0 - results["metrics"]["accuracy"]
            path.write_text(json.dumps(results))
    out = tmp_path_factory.mktemp("nll")
    assert report_main([str(root), "--metric", "own_teacher_nll", "--out", str(out)]) == 0
    comparison = (out / "report.md").read_text().split("## Comparison", 1)[1]
    cells = _cells("\n".join(line for line in comparison.split("\n\n")[2].splitlines() if line.startswith("|")))
    assert cells[("fkl", "λ=0")].startswith("0.5500 [")  # 1 - 0.45, not bold: jsd(0.9)'s 0.45 is lower
    assert cells[("jsd(0.9)", "λ=0")].startswith("**0.4500** [")
    assert cells[("fkl", "λ=1")].startswith("**0.6700** [")  # 1 - 0.33 beats jsd(0.9)'s 1 - 0.25
    assert "Metric: `own_teacher_nll`" in (out / "report.md").read_text()
    assert "One run's standard error" not in capsys.readouterr().out  # no binomial error for an NLL


def test_a_run_that_also_scores_the_teacher_is_the_same_method(tmp_path):
    """The one run of a grid with eval.teacher=true eval.before=true (the scores every run shares) joins its cell."""
    for seed in (1, 2):
        extra = ["eval.teacher=true", "eval.before=true", "export=false"] if seed == 1 else []
        config = _config("fkl", seed, 0.0) | {"eval": {"teacher": seed == 1, "before": seed == 1},
                                              "export": seed != 1}
        _write_run(tmp_path, str(seed), ["loss=fkl", f"seed={seed}", *extra], config, 0.4 + 0.1 * seed)
    sweep = load_sweep(tmp_path)
    assert sweep.swept_keys == ["seed"]
    assert "| fkl | **0.5500** [" in comparison_table_markdown(sweep)  # one cell of both runs: mean of 0.5, 0.6


def test_against_pairs_every_cell_with_a_baseline_whatever_sets_them_apart(grid, tmp_path_factory, capsys):
    # jsd(0.9) at lambda 1 differs from fkl at lambda 0 in two settings: one-setting pairing never forms that pair,
    # --against does. Reference: the per-seed differences by hand and a t interval from printed t quantiles.
    root, accuracies = grid
    out = tmp_path_factory.mktemp("against")
    assert report_main([str(root), "--out", str(out), "--against", "fkl λ=0"]) == 0
    assert "against fkl λ=0: 3 pairs" in capsys.readouterr().out
    rows = [r for r in csv.DictReader((out / "differences.csv").open()) if r["key"] == "against fkl λ=0"]
    assert [r["value_b"] for r in rows] == ["fkl λ=1", "jsd(0.9) λ=0", "jsd(0.9) λ=1"]
    base = accuracies[("fkl", 0)]
    for row, cell in zip(rows, [("fkl", 1), ("jsd0.9", 0), ("jsd0.9", 1)]):
        diffs = [b - a for a, b in zip(base, accuracies[cell]) if isinstance(b, float)]
        mean = sum(diffs) / len(diffs)
        assert row["n_pairs"] == str(len(diffs)) and float(row["mean_difference"]) == pytest.approx(mean)
        half = T_975[len(diffs) - 1] * statistics.stdev(diffs) / len(diffs) ** 0.5
        assert float(row["low"]) == pytest.approx(mean - half) and float(row["high"]) == pytest.approx(mean + half)
    report = (out / "report.md").read_text()
    section = report.split("## Against the baselines", 1)[1].split("## Plots", 1)[0]
    assert "### Against `fkl λ=0`" in section
    assert "| jsd(0.9) λ=1 | -0.1750 [-0.4927, +0.1427] | 2 |" in section  # seeds 1-2: -0.20, -0.15
    assert "| fkl λ=1 | -0.1200 [" in section and "] * | 3 |" in section  # every seed lower, by 0.10 to 0.17


def test_against_a_row_needs_its_column_where_the_row_has_several(grid, capsys):
    root, _ = grid
    assert report_main([str(root), "--against", "fkl"]) == 2
    err = capsys.readouterr().err
    assert "the row 'fkl' has results in 2 columns" in err and "'fkl λ=0'" in err and "'jsd(0.9) λ=1'" in err
    assert report_main([str(root), "--against", "sft"]) == 2
    assert "no cell with results is named 'sft'" in capsys.readouterr().err
    assert not (root / "report.md").exists()  # refused before anything was written
