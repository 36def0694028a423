"""Every command of README.md's "Three commands" and "Recipes" blocks runs as written, in a short form, from a fresh
directory: the same entry points (train.py's Hydra main, eval.py's, kdlab-cache-teacher's, kdlab-report's) with the
recipe's own arguments, then `debug=limit` and small sizes appended (a sweep cut to its first job), and each `<...>`
placeholder filled: `<path to gsm8k>` with the real GSM8K files beside the repository (../shared/data, or
$KDLAB_SHARED_DATA; where neither is, a small file in GSM8K's schema written by the test), `outputs/.../<date>/...`
with what an earlier recipe wrote.

A recipe that needs what this machine lacks (the hub, 8 GPUs, a GPU) is still composed and checked, and then must
fail at start-up with one line naming what is missing, or pass its config checks: every command is accounted for by
name, so a recipe added to README.md without a way to run it here fails this test instead of being skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO

README = REPO / "README.md"
SECTIONS = ("## Three commands", "## Recipes")
DATA = Path(os.environ.get("KDLAB_SHARED_DATA") or REPO.parent / "shared" / "data")
# appended to every training command (a key the recipe sets itself is left as the recipe has it)
SHORT = {"trainer.max_steps": "2", "task.train_size": "64", "task.batch_size": "4", "task.eval_examples": "2",
         "task.eval_batch_size": "2", "task.generation.max_new_tokens": "8", "policy.sampling.max_new_tokens": "8",
         "eval.before": "false"}  # the teacher is still scored: the scoring after training is the same code
# recipes this machine cannot run whole, and what is checked instead
NEEDS_HUB = ("teacher=flan_t5_xl",)
NEEDS_GPUS = {"trainer=gpu": 1, "trainer=fsdp": 8}


def readme_commands() -> list[str]:
    """The commands of the recipe blocks, comments removed, `a && b` as two commands."""
    text = README.read_text()
    commands = []
    for section in SECTIONS:
        assert section in text, f"README.md lost its {section!r} section"
        body = text.split(section, 1)[1].split("\n## ", 1)[0]
        for block in re.findall(r"```bash\n(.*?)```", body, re.S):
            for line in block.splitlines():
                line = re.split(r"\s#\s", " " + line, maxsplit=1)[0].strip()
                commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def test_readme_recipes_are_found_and_each_has_a_runner():
    commands = readme_commands()
    assert len(commands) >= 25 and commands[0] == "python train.py"
    for command in commands:
        argv = shlex.split(command)
        assert argv[:2] in (["python", "train.py"], ["python", "eval.py"]) or argv[0] in (
            "kdlab-cache-teacher", "kdlab-report", "pip"), f"README recipe {command!r}: no runner in {__file__}"
    assert not any("../shared" in c for c in commands), "a recipe points outside the repository"
    for command in commands:  # every placeholder is one this test (and the README) explains
        for placeholder in re.findall(r"<[^>]*>", command):
            assert placeholder in ("<path to gsm8k>", "<date>", "<run>", "<time>"), (command, placeholder)


def test_a_gsm8k_path_that_does_not_exist_is_named_in_full(tmp_path, monkeypatch, capsys):
    """The GSM8K recipe with a relative path to data not downloaded yet: the error names the absolute path it
    looked for (relative paths are read from where the command runs), without a traceback."""
    monkeypatch.chdir(tmp_path)
    command = next(c for c in readme_commands() if "task=gsm8k" in c)
    argv = shlex.split(command.replace("<path to gsm8k>", "data/gsm8k"))[2:]
    code, err = _train(argv, capsys)
    assert code != 0 and f"(looked for {tmp_path / 'data' / 'gsm8k'})" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err


HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _install_line_checked(argv: list[str]) -> str:
    """An install line is not run here (it would change this environment); what it names is checked instead: every
    extra of `pip install -e ".[a,b]"` exists in pyproject.toml, and `pip uninstall` removes what .ci/run removes."""
    import tomllib

    if argv[1] == "install":
        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        named = [e for a in argv if a.startswith(".[") for e in a[2:-1].split(",")]
        assert named and all(e in extras for e in named), (argv, sorted(extras))
        return f"extras {named} checked against pyproject.toml"
    assert argv[1] == "uninstall", argv
    removed = [a for a in argv[2:] if not a.startswith("-")]
    ci = (REPO / ".ci" / "run").read_text()
    assert removed and all(name in ci for name in removed), removed
    return "the packages .ci/run removes"


def gsm8k_folder(tmp_path: Path) -> Path:
    """The real GSM8K files where they are beside the repository; elsewhere (a CI machine without ../shared) a
    folder written here in GSM8K's own schema ({"question", "answer"} lines, the answer ending `#### <number>`), so
    the recipe still runs through the same loader, prompt template and metric."""
    if (DATA / "gsm8k" / "test.jsonl").is_file():
        return DATA / "gsm8k"
    import json

    folder = tmp_path / "gsm8k"
    folder.mkdir()
    for split, count in (("train", 64), ("test", 16)):
        lines = [json.dumps({"question": f"Tom has {a} apples and buys {a + 3} more. How many apples has he?",
                             "answer": f"He has {a} + {a + 3} = <<{a}+{a + 3}={2 * a + 3}>>{2 * a + 3}.\n"
                                       f"#### {2 * a + 3}"}) for a in range(count)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _fill(command: str, places: dict[str, Path], gsm8k: Path) -> list[str]:
    """The command's words, each placeholder filled (a shell would read `<` as a redirection)."""
    command = command.replace("<path to gsm8k>", str(gsm8k))
    for pattern, key in (("outputs/runs/<date>/<run>", "run"), ("outputs/multirun/<date>/<time>", "sweep")):
        if pattern in command:
            assert key in places, f"{command}: no earlier recipe wrote a {key} directory"
            command = command.replace(pattern, str(places[key]))
    return shlex.split(command)


def _short(argv: list[str]) -> list[str]:
    keys = {a.split("=", 1)[0] for a in argv}
    extra = [] if any(a.startswith("debug=") for a in argv) else ["debug=limit"]
    return [*argv, *extra, *(f"{k}={v}" for k, v in SHORT.items() if k not in keys)]


def _first_job(argv: list[str]) -> list[str]:
    """A multirun cut to its first job: each command-line list to its first value, and each list of the sweep
    file's sweeper too, given on the command line (README's advice for a short sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    parser = OverridesParser.create()
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            override = parser.parse_override(arg)
            if override.is_sweep_override():
                arg = f"{override.key_or_group}={next(iter(override.sweep_string_iterator()))}"
        out.append(arg)
    if "-cn" in argv:
        sweep_file = Path(argv[argv.index("-cd") + 1]) / f"{argv[argv.index('-cn') + 1]}.yaml"
        params = yaml.safe_load(sweep_file.read_text())["hydra"]["sweeper"]["params"]
        given = {a.split("=", 1)[0] for a in out if "=" in a}  # the command line's value of a key wins in Hydra
        out += [f"{key}={str(value).split(',')[0]}" for key, value in params.items() if key not in given]
    return out


def _hydra_main(entry, argv: list[str], capsys) -> tuple[int, str]:
    """Run a console command as the shell would, with `argv`, in a process of its own (so that no state an earlier
    test left in this process, logging handlers or Hydra's singletons, reaches it): `entry` is a script path
    (`python train.py ...`) or the name of a console script's module (`kdlab.teachers.cache`); (exit code, stderr).
    One torch thread, as on a shared 2-core CPU decoding is ten times faster so."""
    import subprocess

    if isinstance(entry, Path):
        cmd = [sys.executable, str(entry), *argv]
    else:
        cmd = [sys.executable, "-c", f"import sys; from {entry} import main; sys.exit(main())", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    return done.returncode, done.stderr


def _train(argv: list[str], capsys) -> tuple[int, str]:
    return _hydra_main(REPO / "train.py", argv, capsys)


def _serve_teacher() -> tuple[str, object]:
    """kdlab-serve-teacher on a free port, in a thread: what the remote recipe's comment starts first."""
    from kdlab.run.compose import compose
    from kdlab.teachers.server import build_server

    server = build_server(compose(["teacher=arith_teacher", "server.port=0"], config_name="serve_teacher"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}", server


def _checked_only(argv: list[str]) -> list[str]:
    """The config problems of a recipe this machine cannot run (none expected: the recipe is spelt right)."""
    from kdlab.run.compose import compose
    from kdlab.run.validate import config_errors

    return config_errors(compose([a for a in argv if not a.startswith("hydra.")]))



@pytest.mark.slow
def test_every_readme_recipe_runs_in_its_short_form(tmp_path, monkeypatch, capsys, one_thread):
    from hydra.core.hydra_config import HydraConfig

    from kdlab.report.cli import main as report_main

    monkeypatch.chdir(tmp_path)
    places: dict[str, Path] = {}
    outcomes: dict[str, str] = {}
    gsm8k = gsm8k_folder(tmp_path)
    url, server = _serve_teacher()
    try:
        for i, command in enumerate(readme_commands()):
            argv = _fill(command, places, gsm8k)
            if argv[0] == "pip":
                outcomes[command] = _install_line_checked(argv)
                continue
            if argv[:2] == ["python", "train.py"] and "policy.sampling.engine=vllm" in argv and not HAS_VLLM:
                code, err = _train(_short(argv[2:]) + [f"hydra.run.dir=outputs/runs/recipes/{i}"], capsys)
                assert code != 0 and "vllm" in err.lower() and "Traceback" not in err, (command, err[-2000:])
                assert len(err.strip().splitlines()) <= 3, err
                outcomes[command] = "refused at start-up: vLLM is not installed here (the extra's tests run it)"
                continue
            if argv[:2] == ["python", "train.py"]:
                args = _short(argv[2:])
                if "-cd" in args:  # the sweeps folder of the repository, not of this test's directory
                    args[args.index("-cd") + 1] = str(REPO / args[args.index("-cd") + 1])
                args = [a.replace("http://127.0.0.1:8000", url) for a in args]
                gpus = next((n for key, n in NEEDS_GPUS.items() if key in args), 0)
                if any(key in args for key in NEEDS_HUB):
                    code, err = _train(args + [f"hydra.run.dir=outputs/runs/recipes/{i}"], capsys)
                    assert code != 0 and "hub" in err and "Traceback" not in err, (command, err[-2000:])
                    outcomes[command] = "refused offline, naming the hub"
                    continue
                if gpus > torch.cuda.device_count():
                    assert _checked_only(args) == [], command
                    if gpus == 1:  # no GPU at all: one line, not Lightning's traceback
                        code, err = _train(args + [f"hydra.run.dir=outputs/runs/recipes/{i}"], capsys)
                        assert code != 0 and re.search("gpu|cuda", err, re.I) and "Traceback" not in err, (
                            command, err[-2000:])
                        assert "InstantiationException" not in err and len(err.strip().splitlines()) <= 3, err
                    outcomes[command] = f"config checked (needs {gpus} GPUs)"
                    continue
                if "trainer=ddp" in args:  # two processes: tests/models/test_distributed.py runs train.py so
                    assert _checked_only(args) == [], command
                    outcomes[command] = "config checked (tests/models/test_distributed.py runs it)"
                    continue
                if "-m" in args:
                    args = _first_job(args) + [f"hydra.sweep.dir=outputs/multirun/recipes/{i}"]
                    places["sweep"] = tmp_path / "outputs" / "multirun" / "recipes" / str(i)
                elif not any(a.startswith("hydra.run.dir=") for a in args):
                    args.append(f"hydra.run.dir=outputs/runs/recipes/{i}")
                    places["run"] = tmp_path / "outputs" / "runs" / "recipes" / str(i)
                code, err = _train(args, capsys)
                assert code == 0, (command, args, err[-3000:])
                outcomes[command] = "ran"
            elif argv[:2] == ["python", "eval.py"]:
                code, err = _hydra_main(REPO / "eval.py", _short(argv[2:]), capsys)
                assert code == 0, (command, err[-3000:])
                outcomes[command] = "ran"
            elif argv[0] == "kdlab-cache-teacher":
                code, err = _hydra_main("kdlab.teachers.cache", _short(argv[1:]), capsys)
                assert code == 0, (command, err[-3000:])
                outcomes[command] = "ran"
            elif argv[0] == "kdlab-report":
                assert report_main(argv[1:]) == 0, command
                assert (Path(argv[1]) / "report.md").is_file()
                outcomes[command] = "ran"
    finally:
        server.shutdown()
        server.server_close()
        HydraConfig.instance().cfg = None  # later tests in this process run outside any Hydra job
    print("\n".join(f"{outcome}: {command}" for command, outcome in outcomes.items()))
    assert set(outcomes) == set(readme_commands())
    not_run = [c for c, o in outcomes.items() if o != "ran" and not c.startswith("pip ")]
    assert len(not_run) <= 4 + (not HAS_VLLM), not_run  # hub, gpu, fsdp, ddp (and vLLM where it is not installed)
