"""Lightweight split records and their JSON file list, with checksums so a run can be repeated exactly."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aeflow.data.readers import SYNTHETIC_PREFIX, split_source
from aeflow.errors import DataError

SPLITS_FILE = "splits.json"
SPLIT_NAMES = ("train", "val", "test")
_FORMAT = "aeflow-splits/1"


@dataclass(frozen=True)
class Record:
    """One 2-D image of a data set, before decoding.

    source: a path, optionally with '#...' naming a slice/frame/npz index (see aeflow.data.readers).
    label: 0 normal, 1 anomalous, -1 unknown.
    mask: source of the pixel mask, if the data set has one for this image.
    empty_mask: True where the data set's pixel ground truth is known to be all background without a
        mask file (e.g. MVTec 'good' test images), so pixel metrics can count these images.
    """

    source: str
    label: int
    anomaly_type: str = "good"
    mask: str | None = None
    empty_mask: bool = False

    @property
    def has_pixel_truth(self) -> bool:
        return self.mask is not None or self.empty_mask


@dataclass
class SplitRecords:
    """The three splits of a data set as records, plus how they were made.

    labelled: anomalous images of the layout's TRAINING pool whose labels the semi-supervised models may
        learn from (`labelled_anomalies` in build_records / load_data; empty otherwise). They are kept out of
        `train`, so "train holds normal images only" stays true for every other model, and they never come
        from val or test. `splits()` lists them as a fourth split only when there are some.
    """

    train: list[Record]
    val: list[Record]
    test: list[Record]
    layout: str = ""
    root: str | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)
    labelled: list[Record] = field(default_factory=list)

    def splits(self) -> dict[str, list[Record]]:
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {**splits, "labelled": self.labelled} if self.labelled else splits


def file_of(source: str) -> str | None:
    """The file behind a source, or None for generated (synthetic) sources."""
    return None if source.startswith(SYNTHETIC_PREFIX) else split_source(source)[0]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_files(records: SplitRecords) -> list[str]:
    """Every distinct file the records read (images and masks; an npz file once)."""
    files = {file_of(s) for recs in records.splits().values() for r in recs for s in (r.source, r.mask) if s}
    return sorted(f for f in files if f is not None)


def save_splits(splits, run_dir: str | Path) -> Path:
    """Write `run_dir/splits.json`: every record of every split and the SHA-256 of every file they read.

    `splits` is a SplitRecords or anything with a `.records` SplitRecords (a DataSplits). Paths under the
    data root are stored relative to it, so the list also works with the data moved to another root.
    """
    records: SplitRecords = getattr(splits, "records", splits)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    root = None
    if records.root:
        root_path = Path(records.root).resolve()
        root = str(root_path if root_path.is_dir() else root_path.parent)  # a file root (an .npz): its folder

    def rel(source: str | None) -> str | None:
        if source is None or root is None or not source.startswith(root + "/"):
            return source
        return source[len(root) + 1:]

    try:
        checksums = {rel(f): sha256_file(f) for f in record_files(records)}
    except OSError as exc:
        raise DataError(f"cannot checksum data file {exc.filename}: {exc.strerror}") from exc
    document = {
        "format": _FORMAT,
        "layout": records.layout,
        "root": root,
        "seed": records.seed,
        "options": records.options,
        "splits": {name: [{**asdict(r), "source": rel(r.source), "mask": rel(r.mask)} for r in recs]
                   for name, recs in records.splits().items()},
        "checksums": checksums,
    }
    path = run_dir / SPLITS_FILE
    path.write_text(json.dumps(document, indent=1, default=str))
    return path


def load_splits(run_dir: str | Path, *, root: str | Path | None = None, verify: bool = True) -> SplitRecords:
    """Read `run_dir/splits.json` back; relative paths are joined to `root` (default: the saved root).

    With verify=True every file's checksum is compared with the saved one, and any missing or changed
    file is a DataError naming it, so a repeated run cannot silently use different data.
    """
    path = Path(run_dir) / SPLITS_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no split file list (was the run saved with save_splits?)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read split file list: {exc}") from exc
    try:
        return _records_from(document, path, root, verify)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a hand-edited or crafted file
        raise DataError(f"{path}: malformed split file list ({type(exc).__name__}: {exc})") from None


def _records_from(document, path: Path, root, verify: bool) -> SplitRecords:
    if not isinstance(document, dict):
        raise DataError(f"{path}: not an aeflow split list (a JSON {type(document).__name__}, not an object)")
    if document.get("format") != _FORMAT:
        raise DataError(f"{path}: not an aeflow split list (format {document.get('format')!r})")
    base = str(Path(root).resolve()) if root is not None else document.get("root")

    def absolute(source: str | None) -> str | None:
        if source is None or base is None or source.startswith(("/", SYNTHETIC_PREFIX)):
            return source
        return f"{base}/{source}"

    if verify:
        changed = []
        for name, digest in document["checksums"].items():
            file = absolute(name)
            if not Path(file).is_file():  # a device or a pipe named by a crafted list would be read forever
                changed.append(f"{file} (missing, or not a regular file)")
                continue
            try:
                if sha256_file(file) != digest:
                    changed.append(f"{file} (content changed)")
            except OSError:
                changed.append(f"{file} (missing)")
        if changed:
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise DataError(f"{path}: data differs from the saved run: {'; '.join(changed[:5])}{more}")
    splits = {name: [Record(**{**r, "source": absolute(r["source"]), "mask": absolute(r["mask"])}) for r in recs]
              for name, recs in document["splits"].items()}
    return SplitRecords(**splits, layout=document["layout"], root=base, seed=document["seed"],
                        options=document["options"])
