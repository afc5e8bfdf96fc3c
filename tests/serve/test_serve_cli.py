"""``reclm serve`` refuses, before loading anything, to bind off loopback without an API key."""

from __future__ import annotations

from typer.testing import CliRunner

from reclm.cli.main import app


def test_a_keyless_bind_off_loopback_is_refused_with_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("RECLM_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "no-run"), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not loopback" in lines[0] and "RECLM_API_KEY" in lines[0], result.output
    assert "Traceback" not in result.output


def test_a_short_key_is_refused_too(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "short")
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--host", "0.0.0.0", "--api-key-env", "MY_KEY"])
    assert result.exit_code == 2 and "too short" in result.output
