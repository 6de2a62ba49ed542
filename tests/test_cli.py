"""The `dskd` command: plugin listings, validation, and user errors as one line with exit status 2.

Output shapes are checked in process (`dskd.run.cli.main` with capsys); exit statuses, stderr and tracebacks,
which only a real process shows faithfully, through `python -m dskd` in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dskd.registry import LOAD_ENV
from dskd.run.cli import EXIT_USER_ERROR, main

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JOB = REPO / "dskd.toml"


def run_dskd(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dskd", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


@pytest.fixture(autouse=True)
def only_builtin_plugins(monkeypatch):
    # Whatever else is installed in the environment must not change these listings.
    monkeypatch.setenv(LOAD_ENV, "")


def test_plugins_json_has_one_list_per_family_and_the_plugins(capsys):
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert list(listing) == ["divergences", "aligners", "policies", "objectives", "plugins"]
    assert {
        "forward_kl",
        "reverse_kl",
        "js",
        "tvd",
        "skew_forward_kl",
        "skew_reverse_kl",
        "adaptive_kl",
        "generalized_jsd",
    } <= set(listing["divergences"])
    assert {"sft", "kd", "dskd", "dskd_v2"} <= set(listing["objectives"])
    assert "off_policy" in listing["policies"]
    for family in ("divergences", "aligners", "policies", "objectives"):
        assert listing[family] == sorted(listing[family])
    for plugin in listing["plugins"]:
        assert set(plugin) == {"name", "package", "version", "registered"}
    kd = next(p for p in listing["plugins"] if p["name"] == "kd")
    assert kd["package"] == "dskd" and kd["registered"] == {"objectives": ["kd"]}


def test_plugins_prints_a_table_of_plugins_and_families(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "dskd plugins" in out
    assert "plugin" in out and "package" in out and "registers" in out
    assert "divergences: forward_kl" in out  # the table row of the forward_kl plugin
    assert any(line.startswith("objectives:") and "dskd_v2" in line for line in out.splitlines())


def test_validate_accepts_the_default_job(capsys):
    assert main(["validate", str(DEFAULT_JOB)]) == 0
    assert capsys.readouterr().out.strip() == f"{DEFAULT_JOB}: ok"


def test_validate_prints_every_problem_on_its_own_line_and_exits_2(tmp_path: Path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[trian]\nlr = 1\n\n[train]\nlr = "fast"\nbatch_size = 0.5\n\n[eval]\ntop_p = "all"\n')
    assert main(["validate", str(bad)]) == EXIT_USER_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"{bad}: trian: unknown table; did you mean 'train'?",
        f"{bad}: train.lr: expected a number, got 'fast'; write lr = <a number>",
        f"{bad}: train.batch_size: expected an integer, got 0.5; write batch_size = <an integer>",
        f"{bad}: eval.top_p: expected a number, got 'all'; write top_p = <a number>",
    ]


def test_validate_checks_overrides(capsys):
    assert (
        main(["validate", str(DEFAULT_JOB), "--set", "divergence.name=skew_forward_kl", "--set", "divergence.lamb=0.2"])
        == EXIT_USER_ERROR
    )
    expected = "divergence.lamb: unknown option of divergence 'skew_forward_kl'; did you mean 'lam'?"
    assert expected in capsys.readouterr().err
    assert (
        main(["validate", str(DEFAULT_JOB), "--set", "divergence.name=skew_forward_kl", "--set", "divergence.lam=0.2"])
        == 0
    )


def test_run_with_a_bad_key_exits_2_with_one_line_before_any_work(tmp_path: Path, capsys):
    job = tmp_path / "job.toml"
    job.write_text(DEFAULT_JOB.read_text().replace("[train]\n", "[train]\nlearning_rte = 1\n"))
    assert main(["run", str(job)]) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"dskd: error: {job}: ")
    assert "train.learning_rte: unknown key" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_run_with_a_malformed_override_exits_2(capsys):
    assert main(["run", str(DEFAULT_JOB), "--set", "train.lr"]) == EXIT_USER_ERROR
    assert "--set train.lr: expected table.key=value" in capsys.readouterr().err


def test_debug_raises_instead_of_printing_one_line(tmp_path: Path):
    from dskd.errors import ConfigError

    with pytest.raises(ConfigError, match="file not found"):
        main(["--debug", "run", str(tmp_path / "missing.toml")])
    with pytest.raises(ConfigError, match="file not found"):
        main(["run", str(tmp_path / "missing.toml"), "--debug"])  # after the subcommand too


# ---------------------------------------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_run_on_a_missing_file_prints_one_line_and_exits_2(tmp_path: Path):
    result = run_dskd("run", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert result.returncode == EXIT_USER_ERROR
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dskd: error: ") and "missing.toml" in lines[0] and "file not found" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.integration
def test_debug_shows_the_traceback(tmp_path: Path):
    result = run_dskd("--debug", "run", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "dskd.errors.ConfigError" in result.stderr


@pytest.mark.integration
def test_module_help_lists_the_commands():
    env = {**os.environ, LOAD_ENV: ""}
    result = run_dskd("--help", env=env)
    assert result.returncode == 0
    for command in ("run", "validate", "plugins", "eval", "report", "doctor"):
        assert command in result.stdout
    assert "--debug" in result.stdout
