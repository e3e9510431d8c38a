"""``pip install .`` gives a package that imports and console scripts that run, outside the checkout.

The fresh virtual environment sees the verified dependency set through a ``.pth`` file (so nothing
is downloaded), while the package itself is built from the checkout and copied into it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import tomllib
from support import REPO

SCRIPTS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("install")
    env = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "verified_set.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    (root / "source").mkdir()
    source = root / "source"  # what the wheel is built from, copied so the build leaves nothing in the checkout
    for name in ("construct", "pyproject.toml", "README.md", "LICENSE"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if name == "construct" else {}))
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-build-isolation",
                             "--no-index", "--disable-pip-version-check", "--quiet", str(source)],
                            capture_output=True, text=True, timeout=300, cwd=root,
                            env={**os.environ, "TMPDIR": str(root)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return env


@pytest.mark.slow
def test_the_installed_package_imports_from_the_environment(installed, tmp_path) -> None:
    python = installed / "bin" / "python"
    code = "import construct, importlib.util; print(construct.__file__); print(importlib.util.find_spec('construct_lab'))"
    result = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    location, lab = result.stdout.splitlines()
    assert Path(location).is_relative_to(installed) and not Path(location).is_relative_to(REPO)
    assert lab == "None"  # the lab stays in the clone


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_each_console_script_answers_help(installed, tmp_path, script) -> None:
    result = subprocess.run([installed / "bin" / script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}")
