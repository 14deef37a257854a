"""The install path: CI runs the README's test command, runtime and development
requirements stay apart, setup.sh refuses what it does not know before installing."""
import os
import re
import subprocess

from utils import ROOT

DEV_TOOLS = {"pytest", "ruff", "black"}


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def _packages(path):
    lines = [line.split("#")[0].strip() for line in _read(path).splitlines()]
    return {re.split(r"[<>=!~\[; ]", line)[0].lower() for line in lines if line} - {""}


def test_ci_runs_the_readme_test_command_verbatim():
    readme = re.search(r"# \(b\)[^\n]*\n([^\n]+)\n", _read("README.md")).group(1)
    ci = [line for line in _read(".ci/run").splitlines() if line and not line.startswith(
        ("#", "set ", "cd "))]
    assert ci == [readme]
    assert "--dev" in readme  # the tests need the development tools


def test_runtime_requirements_hold_no_dev_tools():
    assert not DEV_TOOLS & _packages("requirements.txt")
    dev = _read("requirements-dev.txt").splitlines()
    assert "-r requirements.txt" in dev
    assert DEV_TOOLS <= _packages("requirements-dev.txt") - {"-r"}


def test_setup_refuses_an_unknown_argument_before_installing():
    run = subprocess.run(["bash", os.path.join(ROOT, "setup.sh"), "--devv"],
                         capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHON="/nonexistent/python"))
    assert run.returncode == 2
    assert "unknown argument '--devv'" in run.stderr
    usage = subprocess.run(["bash", os.path.join(ROOT, "setup.sh"), "--help"],
                           capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "--dev" in usage.stdout
