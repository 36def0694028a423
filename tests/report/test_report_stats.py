"""Intervals over seeds and paired differences in kdlab-report: the t quantile against printed tables and closed
forms, intervals and paired differences against hand-computed values, the pairs a grid yields, and the report and
differences.csv of a small sweep written on disk, checked against numbers computed here with `statistics` and
printed t values."""

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from kdlab.report.cli import main as report_main
from kdlab.report.differences import differences, sentence
from kdlab.report.runs import load_sweep
from kdlab.report.stats import binomial_standard_error, paired_differences, t_interval, t_quantile
from kdlab.report.tables import compare, run_standard_error_line, scored_problems
from tests.report.test_report import _cells, _config, _write_run

# t_{0.975, df} as printed in statistical tables (four decimals), and to more digits where the test needs them
PRINTED_T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 10: 2.2281, 30: 2.0423, 120: 1.9799}
T_975 = {1: 12.706205, 2: 4.302653, 4: 2.7764451}


@pytest.mark.parametrize("df,printed", sorted(PRINTED_T_975.items()))
def test_t_quantile_matches_printed_tables(df, printed):
    assert t_quantile(0.975, df) == pytest.approx(printed, abs=5e-5)
    assert t_quantile(0.025, df) == pytest.approx(-printed, abs=5e-5)  # symmetric about zero


@pytest.mark.parametrize("p", [0.55, 0.8, 0.9, 0.975, 0.995, 0.9995])
def test_t_quantile_matches_the_closed_forms_of_one_and_two_degrees_of_freedom(p):
    """df=1 is Cauchy: tan(pi (p - 1/2)); df=2 has t = (2p - 1) / sqrt(2 p (1 - p)). Neither goes through the sum
    the module inverts."""
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)


def test_t_quantile_agrees_with_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 8, 15, 29, 60, 250):
        for p in (0.6, 0.9, 0.95, 0.975, 0.99):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_t_quantile_refuses_what_it_cannot_compute():
    for df in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="degrees of freedom"):
            t_quantile(0.975, df)
    for p in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="probability"):
            t_quantile(p, 3)


def test_interval_of_one_to_five_by_hand():
    """mean 3, sd sqrt(2.5), half-width t_{0.975,4} sqrt(2.5) / sqrt(5) = 2.7764451 * 0.7071068 = 1.9632432."""
    interval = t_interval([1, 2, 3, 4, 5])
    assert interval.mean == 3 and interval.n == 5
    assert interval.std == pytest.approx(math.sqrt(2.5), rel=1e-12)
    assert interval.half_width == pytest.approx(T_975[4] * math.sqrt(2.5) / math.sqrt(5), rel=1e-7)
    assert interval.half_width == pytest.approx(1.9632432, abs=1e-7)
    assert (interval.low, interval.high) == pytest.approx((3 - 1.9632432, 3 + 1.9632432), abs=1e-7)
    assert interval.excludes_zero
    assert not t_interval([-1, 1, 2]).excludes_zero  # mean 0.667, half-width 3.79: zero inside


def test_one_value_has_no_interval_and_an_empty_list_none_at_all():
    one = t_interval([0.42])
    assert (one.mean, one.n, one.std, one.low, one.high, one.half_width) == (0.42, 1, None, None, None, None)
    assert not one.excludes_zero  # no interval: nothing is distinguishable
    with pytest.raises(ValueError):
        t_interval([])


def test_paired_differences_match_by_seed_and_count_the_seeds_left_out():
    a = {1: 0.40, 2: 0.50, 3: 0.60}
    b = {4: 0.90, 3: 0.64, 2: 0.53}  # another order; seed 4 only here, seed 1 only in a
    paired = paired_differences(a, b)
    assert paired.seeds == [2, 3] and paired.only_a == [1] and paired.only_b == [4]
    assert paired.differences == pytest.approx([0.03, 0.04])
    # mean 0.035, sd 0.0070711, half-width 12.706205 * 0.0070711 / sqrt(2) = 0.0635310
    assert paired.interval.mean == pytest.approx(0.035)
    assert paired.interval.half_width == pytest.approx(T_975[1] * statistics.stdev([0.03, 0.04]) / math.sqrt(2))
    assert paired.interval.half_width == pytest.approx(0.0635310, abs=1e-6)
    assert paired_differences({1: 0.4}, {2: 0.5}).interval is None  # no seed in common: no difference at all


def test_pairing_by_seed_finds_a_difference_the_cell_intervals_hide():
    """Seeds move both settings together (0.40, 0.50, 0.60 and 0.42, 0.525, 0.615): the cells' own intervals overlap
    almost entirely, yet b beats a by 0.015 to 0.025 on every seed. Per-seed differences 0.02, 0.025, 0.015: mean
    0.02, sd 0.005, half-width 4.302653 * 0.005 / sqrt(3) = 0.0124207, so the paired interval is [0.0076, 0.0324]."""
    a, b = {1: 0.40, 2: 0.50, 3: 0.60}, {1: 0.42, 2: 0.525, 3: 0.615}
    cell_a, cell_b = t_interval(list(a.values())), t_interval(list(b.values()))
    assert cell_a.low < cell_b.low < cell_a.high < cell_b.high  # the unpaired intervals overlap
    # an unpaired (Welch) comparison would not separate them either: the mean difference is far inside one sd
    assert cell_b.mean - cell_a.mean < min(cell_a.std, cell_b.std) / 4
    paired = paired_differences(a, b).interval
    assert paired.mean == pytest.approx(0.02) and paired.std == pytest.approx(0.005)
    assert (paired.low, paired.high) == pytest.approx((0.02 - 0.0124207, 0.02 + 0.0124207), abs=1e-6)
    assert paired.excludes_zero


def test_binomial_standard_error():
    assert binomial_standard_error(0.5, 100) == pytest.approx(0.05)
    assert binomial_standard_error(0.36, 200) == pytest.approx(0.48 / math.sqrt(200))
    assert binomial_standard_error(1.0, 50) == 0.0
    with pytest.raises(ValueError):
        binomial_standard_error(1.5, 10)


# fkl and rkl, lambda 0 and 1, seeds 1-3; rkl at lambda 1 misses seed 3 (failed). At lambda 0 fkl and rkl move
# together seed by seed (rkl ahead by 0.02, 0.025, 0.015); fkl's lambda 1 trails its lambda 0 by 0.10, 0.09, 0.17.
ACCURACIES = {("fkl", 0): [0.40, 0.50, 0.60], ("rkl", 0): [0.42, 0.525, 0.615],
              ("fkl", 1): [0.30, 0.41, 0.43], ("rkl", 1): [0.35, 0.45, None]}
PROBLEMS = 150


@pytest.fixture
def small_sweep(tmp_path):
    root = tmp_path / "sweep"
    job = 0
    for (loss, fraction), values in ACCURACIES.items():
        for seed, accuracy in enumerate(values, start=1):
            config = _config(loss, seed, fraction) | {"task": {"name": "arith", "eval_examples": 200}}
            overrides = [f"loss={loss}", f"policy.student_fraction={fraction}", f"seed={seed}"]
            run = _write_run(root, str(job), overrides, config, accuracy, None if accuracy else "ValueError: boom")
            if accuracy is not None:  # what was scored: 150 problems (eval_examples says 200, the split is smaller)
                (run / "generations").mkdir()
                (run / "generations" / "student_after.jsonl").write_text(
                    "".join(json.dumps({"prediction": "1", "reference": "1"}) + "\n" for _ in range(PROBLEMS)))
            job += 1
    return root


def _expected_interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    half = T_975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def test_report_shows_cell_intervals_and_one_sentence_per_paired_difference(small_sweep, tmp_path):
    out = tmp_path / "report"
    assert report_main([str(small_sweep), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    cells = _cells(report.split("## Comparison")[1].split("\n\n")[2])
    mean, low, high = _expected_interval(ACCURACIES[("fkl", 0)])
    assert cells[("fkl", "λ=0")] == f"{mean:.4f} [{low:.4f}, {high:.4f}] (sd 0.1000, n=3)"
    assert cells[("fkl", "λ=0")] == "0.5000 [0.2516, 0.7484] (sd 0.1000, n=3)"  # by hand: 4.302653 * 0.1 / sqrt(3)
    assert cells[("rkl", "λ=1")] == "**0.4000** [-0.2353, 1.0353] (sd 0.0707, n=2, 1 not finished)"

    assert "## Paired differences" in report and "### `policy.student_fraction`" in report and "### `loss`" in report
    assert report.index("### `policy.student_fraction`") < report.index("### `loss`")  # the column key's first
    # lambda 0, rkl - fkl per seed: 0.02, 0.025, 0.015 -> 0.0200 [0.0076, 0.0324]: distinguishable, although the two
    # cells' intervals ([0.2516, 0.7484] and [0.2714, 0.7686]) overlap
    assert ("- λ=0: rkl minus fkl is +0.0200 (95% interval +0.0076 to +0.0324, 3 seeds): distinguishable from zero; "
            "rkl scores higher.") in report
    # fkl, lambda 1 - lambda 0: -0.10, -0.09, -0.17 -> mean -0.12, sd 0.043589, half-width 0.108281
    assert ("- fkl: λ=1 minus λ=0 is -0.1200 (95% interval -0.2283 to -0.0117, 3 seeds): distinguishable from zero; "
            "λ=0 scores higher.") in report
    # lambda 1, rkl - fkl: seeds 1, 2 only (0.05, 0.04), seed 3 left out; half-width 12.706205 * 0.0070711 / sqrt(2)
    assert ("- λ=1: rkl minus fkl is +0.0450 (95% interval -0.0185 to +0.1085, 2 seeds; left out: 1 seed only in fkl): "
            "not distinguishable from zero at 95%.") in report
    # the 11 finished runs average 5/11; sqrt(5/11 * 6/11 / 150) = 0.040656
    assert "One run's standard error: about 0.0407 (150 problems, at the mean accuracy)" in report


def test_differences_csv_matches_a_reference_computed_here(small_sweep, tmp_path):
    out = tmp_path / "report"
    assert report_main([str(small_sweep), "--out", str(out)]) == 0
    with (out / "differences.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["key"], r["fixed"], r["value_a"], r["value_b"]) for r in rows] == [
        ("policy.student_fraction", "fkl", "λ=0", "λ=1"), ("policy.student_fraction", "rkl", "λ=0", "λ=1"),
        ("loss", "λ=0", "fkl", "rkl"), ("loss", "λ=1", "fkl", "rkl")]
    by_pair = {(r["key"], r["fixed"]): r for r in rows}
    for (key, fixed), (a, b) in {("policy.student_fraction", "fkl"): (("fkl", 0), ("fkl", 1)),
                                 ("policy.student_fraction", "rkl"): (("rkl", 0), ("rkl", 1)),
                                 ("loss", "λ=0"): (("fkl", 0), ("rkl", 0)),
                                 ("loss", "λ=1"): (("fkl", 1), ("rkl", 1))}.items():
        pairs = [(x, y) for x, y in zip(ACCURACIES[a], ACCURACIES[b]) if x is not None and y is not None]
        mean, low, high = _expected_interval([y - x for x, y in pairs])
        row = by_pair[(key, fixed)]
        assert int(row["n_pairs"]) == len(pairs) and int(row["seeds_left_out"]) == 3 - len(pairs)
        assert [float(row[k]) for k in ("mean_difference", "low", "high")] == pytest.approx([mean, low, high],
                                                                                             abs=1e-5)
        assert row["distinguishable"] == str(low > 0 or high < 0)
    # rkl, lambda 1 - lambda 0 on seeds 1, 2: -0.07, -0.075 -> -0.0725 [-0.1043, -0.0407]; lambda 1, rkl - fkl not
    assert [r["distinguishable"] for r in rows] == ["True", "True", "True", "False"]


def test_pairs_of_a_grid_differ_in_exactly_one_setting(tmp_path):
    """2 losses x 2 learning rates x 2 fractions: 8 cells, each with 3 neighbours one setting away, 12 pairs; no pair
    differing in two settings (fkl at lr 0.001 against rkl at lr 0.01) appears."""
    job = 0
    for loss in ("fkl", "rkl"):
        for lr in (0.001, 0.01):
            for fraction in (0, 1):
                for seed in (1, 2):
                    config = _config(loss, seed, fraction) | {"optimizer": {"lr": lr}}
                    overrides = [f"loss={loss}", f"optimizer.lr={lr}", f"policy.student_fraction={fraction}",
                                 f"seed={seed}"]
                    _write_run(tmp_path, str(job), overrides, config, 0.3 + 0.01 * job)
                    job += 1
    sweep = load_sweep(tmp_path)
    found = differences(compare(sweep), sweep.metric)
    assert [d.key for d in found] == ["policy.student_fraction"] * 4 + ["loss"] * 4 + ["optimizer.lr"] * 4
    assert {(d.fixed, d.value_a, d.value_b) for d in found if d.key == "optimizer.lr"} == {
        ("fkl λ=0", "lr=0.001", "lr=0.01"), ("fkl λ=1", "lr=0.001", "lr=0.01"),
        ("rkl λ=0", "lr=0.001", "lr=0.01"), ("rkl λ=1", "lr=0.001", "lr=0.01")}
    # jobs differ by 0.01 each: lambda 1 is one job after lambda 0 (+0.01 on both seeds, no spread)
    first = found[0]
    assert (first.fixed, first.paired.seeds, first.paired.differences) == ("fkl lr=0.001", [1, 2], [
        pytest.approx(0.02), pytest.approx(0.02)])
    assert "every seed gives the same difference" in sentence(first)


def test_one_seed_pair_says_there_is_no_interval(tmp_path):
    for job, fraction in enumerate((0, 1)):
        _write_run(tmp_path, str(job), [f"policy.student_fraction={fraction}"], _config("fkl", 1, fraction),
                   0.3 + 0.1 * job)
    sweep = load_sweep(tmp_path)
    (only,) = differences(compare(sweep), sweep.metric)
    assert sentence(only) == "fkl: λ=1 minus λ=0 is +0.1000 from one seed: no interval with one seed."
    assert not only.distinguishable


def test_standard_error_line_only_where_it_applies(small_sweep):
    sweep = load_sweep(small_sweep)
    runs = {run.name: run for run in sweep.runs}
    assert scored_problems(runs["0"]) == PROBLEMS  # the generations scored, not eval_examples (200)
    assert scored_problems(runs["11"]) == 200  # failed, no generations: the configured count
    mean = statistics.fmean(v for values in ACCURACIES.values() for v in values if v is not None)
    line = run_standard_error_line(sweep)
    assert line.startswith(f"One run's standard error: about {math.sqrt(mean * (1 - mean) / PROBLEMS):.4f} (150 ")
    sweep.metric = "rougeL"  # graded scores, not a share of problems solved: no binomial error
    assert run_standard_error_line(sweep) is None
    sweep.metric = "accuracy"
    for run in sweep.runs:  # N unknown anywhere: no line
        for path in (run.directory / "generations").glob("*.jsonl"):
            path.unlink()
        run.config["task"].pop("eval_examples")
    assert run_standard_error_line(sweep) is None


def test_standard_error_of_runs_with_different_problem_counts_is_a_range(tmp_path):
    for job, (problems, accuracy) in enumerate(((100, 0.5), (400, 0.5))):
        run = _write_run(tmp_path, str(job), [f"seed={job}"], _config("fkl", job, 0), accuracy)
        results = json.loads((run / "results.json").read_text()) | {"data": {"validation": {"used": problems}}}
        (run / "results.json").write_text(json.dumps(results))
    line = run_standard_error_line(load_sweep(tmp_path))
    assert "about 0.0250 to 0.0500 (100 to 400 problems, run by run)" in line  # sqrt(.25/400), sqrt(.25/100)


def test_stats_module_is_plain_python():
    """kdlab-report must start without the training stack: the statistics import nothing beyond the standard
    library (no numpy, scipy or torch)."""
    import ast

    source = Path(__file__).parents[2] / "src" / "kdlab" / "report" / "stats.py"
    tree = ast.parse(source.read_text())
    modules = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert modules <= {"__future__", "math", "statistics", "dataclasses", "typing"}
