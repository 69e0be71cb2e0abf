"""The training curves of a run (`curves/metrics.csv`), kept whole through kills and resumes.

Two things in lightning's CSVLogger would lose rows of the curves when a run is killed and resumed:

- When the set of logged columns grows (the first epoch-level metrics appear after the first step rows were
  written), its writer truncates `metrics.csv` and writes every row again in place. A kill in that window
  leaves the file empty or cut short. `CurvesLogger` writes the whole file next to its destination and renames
  it over it instead, so a kill at any moment leaves the previous file or the new one.
- It deletes `metrics.csv` when it starts in a folder that has one, which on `--resume` would lose the epochs
  trained before the crash. `Curves` sets those rows aside before a resumed fit and puts them back after it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

METRICS_FILE = "metrics.csv"


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """All rows in one file, replaced atomically: a reader (or a kill) sees the old file or the new one."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


class _AtomicWriter(ExperimentWriter):
    """Lightning's experiment writer with a save that never leaves a torn `metrics.csv`. It keeps the rows it has
    written (the file is its own: lightning's writer deletes an older one when it starts), so a save writes them
    all again without reading the file back."""

    def __init__(self, log_dir: str):
        super().__init__(log_dir)
        self.saved: list[dict] = []

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        rows = self.saved + self.metrics
        write_rows(Path(self.metrics_file_path), rows, self.metrics_keys)
        self.saved, self.metrics = rows, []  # only once written: a failed save is tried again whole


class CurvesLogger(CSVLogger):
    """CSVLogger writing `<run>/curves/metrics.csv` through `_AtomicWriter`.

    Each save writes the whole file again (lightning saves once per checkpoint and every 100 steps), which for
    the few thousand rows of a run costs milliseconds."""

    def __init__(self, run_dir: str | Path):
        super().__init__(run_dir, name="", version="curves")

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AtomicWriter(log_dir=self.log_dir)
        return self._experiment


class Curves:
    """Keeps the training curves of a resumed run whole.

    Before a resumed fit the old rows of finished epochs are moved to `metrics.before_resume.csv` (appended there,
    so a run resumed twice keeps both parts; rows of the epoch that was cut short are dropped, as it is trained
    again), and after the fit they are put back in front of the new rows. A crash during the resumed fit leaves
    them in the side file, where the next resume finds them.
    """

    def __init__(self, folder: Path):
        self.current, self.before = folder / METRICS_FILE, folder / "metrics.before_resume.csv"

    def set_aside(self, epochs_done: int) -> None:
        rows = read_rows(self.before) + [r for r in read_rows(self.current)
                                         if r.get("epoch", "") != "" and int(float(r["epoch"])) < epochs_done]
        if rows:
            write_rows(self.before, rows)
        self.current.unlink(missing_ok=True)

    def merge(self) -> None:
        if self.before.exists():
            write_rows(self.current, read_rows(self.before) + read_rows(self.current))
            self.before.unlink()
