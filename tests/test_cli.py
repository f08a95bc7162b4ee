"""The CLI shell: help, version, error handling."""

import subprocess
import sys

import pytest

from nanoforge.cli import main


def test_version_prints_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "nanoforge" in capsys.readouterr().out


def test_python_dash_m_runs_the_same_cli() -> None:
    r = subprocess.run([sys.executable, "-m", "nanoforge", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "usage: nanoforge" in r.stdout
