"""A cohort of whole slides: the split over ranks, the slide loop that a bad slide does not stop, the table.

Each slide either gets complete outputs (:func:`construct.inference.slide.predict_slide` puts
them in place together, the areas JSON last) or a failed row naming its error; the loop goes on
either way. With ``skip_existing`` a slide whose outputs are all there is not predicted again,
so rerunning the same command resumes a stopped run. The rows of all slides, in the order the
slides were given, make ``cohort.csv`` and ``cohort.json`` in the output folder.

Under several processes (torchrun) the slides are split by :func:`split_by_area`: longest
processing time first on level-0 area, a deterministic plan that keeps every rank's total area
close. The processes themselves are the caller's (construct.engine.distributed).
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from construct.atomic import write_text_atomic
from construct.classes import ClassSet
from construct.config import Config
from construct.data.slide_reader import OpenSlideReader
from construct.errors import ConStructError, DataError
from construct.inference.predictor import Predictor
from construct.inference.slide import OVERVIEW_SIDE, SlideOutputs, open_slide, predict_slide

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
"""Row statuses: predicted now, complete outputs found (``skip_existing``), could not be opened or predicted."""
TABLE_NAMES = ("cohort.csv", "cohort.json")

Progress = Callable[[Path, tuple[int, int]], AbstractContextManager[Callable[[int], None]]]
"""Given a slide and its level-0 size, a context holding the callback that gets each window's output pixels."""


@dataclass(frozen=True)
class CohortJob:
    """What every slide of a cohort run shares."""

    config: Config
    out_dir: Path
    classes: ClassSet
    mpp: float | None = None
    """Level-0 µm/px of slides whose files do not state it."""
    regions: bool = True
    """Also write <name>_regions.geojson."""
    skip_existing: bool = False
    overview_side: int = OVERVIEW_SIDE
    provenance: dict[str, Any] = field(default_factory=dict)
    """Stored in each areas JSON and row: the checkpoint and config used."""
    show_tracebacks: bool = False
    """Print the full traceback of a failed slide (--debug) besides its one line."""


def check_unique_names(paths: Sequence[Path]) -> None:
    """Outputs are named after the slide's file stem: two slides of one stem would overwrite each other."""
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise DataError(f"{path} and {seen[path.stem]} would write the same outputs ({path.stem}_*); "
                            "rename one or predict them into different --out-dir folders")
        seen[path.stem] = path


def slide_area(path: Path) -> int:
    """Level-0 pixels of a slide; 0 when it cannot be opened (its rank finds out and reports it)."""
    try:
        with OpenSlideReader(path, mpp=1.0) as reader:  # the resolution plays no part in the area
            width, height = reader.size
    except Exception:  # any unreadable file: it fails in the slide loop, with its row
        return 0
    return width * height


def split_by_area(areas: Sequence[int], parts: int) -> list[list[int]]:
    """Slide indices for each of ``parts`` ranks, the largest slide first to the least loaded rank.

    Deterministic (ties go to the earlier slide and the lower rank); each rank's slides keep their
    given order.
    """
    loads = [0] * parts
    plan: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(areas)), key=lambda i: (-areas[i], i)):
        rank = min(range(parts), key=lambda r: (loads[r], r))
        plan[rank].append(index)
        loads[rank] += areas[index]
    return [sorted(indices) for indices in plan]


def run_slides(paths: Sequence[Path], job: CohortJob, load_predictor: Callable[[], Predictor],
               progress: Progress | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Predict each slide in turn; one row per slide, in order. The predictor is loaded at the first slide that needs it.

    A slide that cannot be opened or predicted prints one ``error:`` line on stderr and gets a
    failed row; errors of the model or the config (raised by ``load_predictor``) stop the run.
    """
    rows = []
    with ExitStack() as stack:
        predictor: Predictor | None = None
        for path in paths:
            outputs = SlideOutputs.for_slide(job.out_dir, path.stem)
            if job.skip_existing and outputs.complete(job.regions):
                report = json.loads(outputs.areas.read_text(encoding="utf-8"))
                rows.append(cohort_row(path, SKIPPED, None, report, job.classes))
                log(f"{path.name}: outputs complete in {job.out_dir}, skipped")
                continue
            started = time.perf_counter()
            try:
                slide = open_slide(path, job.config, job.mpp)
            except Exception as exc:
                rows.append(_failed(path, exc, started, job))
                continue
            with slide.reader:
                if predictor is None:
                    predictor = stack.enter_context(load_predictor())
                width, height = slide.reader.size
                try:
                    with (progress(path, (width, height)) if progress else nullcontext(None)) as advance:
                        report = predict_slide(slide, predictor, job.out_dir, progress=advance,
                                               overview_side=job.overview_side, regions=job.regions,
                                               provenance=job.provenance)
                except Exception as exc:
                    rows.append(_failed(path, exc, started, job))
                    continue
            rows.append(cohort_row(path, DONE, None, report, job.classes))
            shares = ", ".join(f"{name} {100 * share:.1f}%" for name, share in report["fractions"].items())
            written = ", ".join(p.name for p in outputs.files(job.regions))
            log(f"{path.name}: {report['tissue_mm2']:.2f} mm² tissue ({shares}); wrote {written} to {job.out_dir}")
    return rows


def failure_message(path: Path, exc: BaseException) -> str:
    """One line naming the slide and what went wrong."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, ConStructError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if str(path) in text else f"{path}: {text}"


def _failed(path: Path, exc: Exception, started: float, job: CohortJob) -> dict[str, Any]:
    message = failure_message(path, exc)
    if job.show_tracebacks:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {message}", file=sys.stderr, flush=True)
    report = {"seconds": round(time.perf_counter() - started, 2), **job.provenance}
    return cohort_row(path, FAILED, message, report, job.classes)


def table_columns(classes: ClassSet) -> list[str]:
    per_class = [f"{name}_{what}" for name in classes.all_names for what in ("mm2", "share")]
    return ["slide", "status", "error", "tissue_mm2", *per_class, "tiles", "seconds", "checkpoint", "config",
            "config_overrides"]


def cohort_row(path: Path, status: str, error: str | None, report: dict[str, Any], classes: ClassSet) -> dict[str, Any]:
    """One table row from an areas JSON (``report``); a failed slide has no areas."""
    areas, fractions = report.get("areas_mm2", {}), report.get("fractions", {})
    row: dict[str, Any] = {"slide": str(path), "status": status, "error": error, "tissue_mm2": report.get("tissue_mm2")}
    for name in classes.all_names:
        row[f"{name}_mm2"] = areas.get(name)
        row[f"{name}_share"] = fractions.get(name)
    overrides = report.get("config_overrides")
    row.update(tiles=report.get("tiles"), seconds=report.get("seconds"), checkpoint=report.get("checkpoint"),
               config=report.get("config"), config_overrides=" ".join(overrides) if overrides else None)
    return row


def write_cohort_table(rows: Sequence[dict[str, Any]], out_dir: Path, classes: ClassSet) -> list[Path]:
    """``cohort.csv`` and ``cohort.json`` (the same rows) in ``out_dir``, each written atomically."""
    columns = table_columns(classes)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if row.get(key) is None else row.get(key) for key in columns} for row in rows)
    paths = [out_dir / name for name in TABLE_NAMES]
    contents = [text.getvalue(), json.dumps([{key: row.get(key) for key in columns} for row in rows], indent=2,
                                            ensure_ascii=False) + "\n"]
    for path, content in zip(paths, contents):
        write_text_atomic(path, content)
    return paths
