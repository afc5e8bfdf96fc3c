"""Errors of the machine (OSError) print one line and exit 1; input errors exit 2; never a traceback."""

from __future__ import annotations

from typer.testing import CliRunner

from reclm.cli.main import app


def test_an_os_error_is_one_line_with_exit_code_1(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(app, ["prepare", "--dataset", "ml-100k", "--out", str(blocker / "run")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and "NotADirectoryError" in lines[0] and "RECLM_DEBUG" in lines[0]


def test_an_input_error_is_one_line_with_exit_code_2(tmp_path):
    result = CliRunner().invoke(app, ["prepare", "--dataset", str(tmp_path / "missing.csv"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
