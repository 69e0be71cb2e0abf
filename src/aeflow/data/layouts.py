"""Data set layouts: each turns a folder (or file) into train / val / test records.

Train splits hold normal images only; val and test are explicit. Where a layout has no validation split,
one is carved from the training normals with the run's seed (and, where labelled anomalies exist outside
the test set, from those too: never from the test set). Each layout's docstring says where its validation
data comes from. Files whose ending is not an image ending (.txt, .csv, .DS_Store, ...) and hidden files
are ignored; readable files that turn out to be bad are found later, when the records are validated.

Register a layout with @register("name"); its keyword-only parameters are its options, which
`build_records` checks, so a misspelt option is a ConfigError naming it and listing the valid ones. A layout
returns (train, val, test) or, where it has anomalous images outside val and test, (train, val, test, pool):
the pool is its TRAINING anomalies, from which `labelled_anomalies` are drawn for semi-supervised models.
"""

from __future__ import annotations

import csv
import inspect
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aeflow.data import synthetic
from aeflow.data.readers import READABLE_SUFFIXES, expand_source, npz_labels, split_source
from aeflow.data.records import Record, SplitRecords
from aeflow.errors import BadFileError, ConfigError, DataError

NORMAL = "good"
_LAYOUTS: dict[str, Callable] = {}
log = logging.getLogger("aeflow.data")


class SplitWarning(UserWarning):
    """A validation or test split lacks normal or anomalous images: what that changes downstream is said."""


@dataclass
class Scan:
    """What a layout needs besides its options: the seed, and where to put files it cannot even list."""

    seed: int = 0
    skip_bad: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def bad(self, error: BadFileError) -> None:
        if not self.skip_bad:
            raise error
        self.skipped.append((error.path, error.reason))

    def sources(self, files: Sequence[Path], *, axis: int = 2, slice_range=None) -> list[str]:
        """2-D sources of files (a NIfTI volume gives its slices, a multi-frame DICOM its frames)."""
        out = []
        for file in files:
            try:
                out += expand_source(file, axis=axis, slice_range=slice_range)
            except BadFileError as error:
                self.bad(error)
        return out


def register(name: str):
    def add(fn: Callable) -> Callable:
        _LAYOUTS[name] = fn
        return fn

    return add


def available_layouts() -> list[str]:
    return sorted(_LAYOUTS)


def layout_options(layout: str) -> dict[str, object]:
    """Option names of a layout and their defaults."""
    params = inspect.signature(_get(layout)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_records(layout: str, root: str | Path | None, *, seed: int = 0, skip_bad: bool = False,
                  labelled_anomalies: int = 0, **options) -> tuple[SplitRecords, list[tuple[str, str]]]:
    """Records of every split of `layout` under `root`, and the (path, reason) of files skipped on the way.

    labelled_anomalies: K > 0 puts K anomalous images of the layout's training pool into
    `SplitRecords.labelled` (see `pick_labelled`); a layout without such a pool (anomalies only in test) is a
    ConfigError.
    """
    fn = _get(layout)
    valid = layout_options(layout)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"layout {layout!r} has no option {unknown[0]!r}; its options are: "
                          f"{', '.join(valid) or 'none'}")
    labelled_anomalies = _count("labelled_anomalies", labelled_anomalies)
    scan = Scan(seed=seed, skip_bad=skip_bad)
    root_path = Path(root).expanduser().resolve() if root is not None else None
    train, val, test, *pool = fn(root_path, scan, **options)
    pool = pool[0] if pool else []
    if labelled_anomalies and not pool:
        raise ConfigError(f"layout {layout!r} found no anomalous training images to label (anomalies outside val "
                          f"and test); labelled_anomalies needs one of: medmnist, synthetic, chest_xray, oct2017, "
                          f"isic2018, magnetic_tile (with labelled_pool), folder (with train_abnormal_dirs)")
    labelled = pick_labelled(pool, labelled_anomalies, seed)
    warn_about_splits(layout, root_path, val, test)
    records = SplitRecords(train, val, test, layout=layout, root=str(root_path) if root_path else None, seed=seed,
                           options={**{k: v for k, v in valid.items()}, **options}, labelled=labelled)
    return records, scan.skipped


_CONSEQUENCES = {
    ("validation", "normal"): "calibration and the validation loss then use held-out training images",
    ("validation", "anomalous"): "the kept checkpoint is then chosen on the validation loss of normal images, "
                                 "and `aeflow test` fits its threshold on normal images only (conformal_fpr) "
                                 "instead of the F1-optimal one",
    ("test", "normal"): "AUROC, AP, specificity and F1 need both classes: `aeflow test` cannot score this split",
    ("test", "anomalous"): "AUROC, AP, sensitivity and F1 need both classes: `aeflow test` cannot score this split",
}


def warn_about_splits(layout: str, root: Path | None, val: Sequence[Record], test: Sequence[Record]) -> list[str]:
    """Warn (SplitWarning, and in the log) for a validation or test split without normal or without anomalous
    images, saying what that changes; returns the messages."""
    where = f"{layout} data" + (f" at {root}" if root else "")
    messages = []
    for name, records in (("validation", val), ("test", test)):
        labels = {r.label for r in records}
        if not records:
            messages.append(f"{where}: the {name} split is empty")
            continue
        for label, lacking in ((0, "normal"), (1, "anomalous")):
            if label not in labels:
                messages.append(f"{where}: the {name} split ({len(records)} images) holds no {lacking} images; "
                                f"{_CONSEQUENCES[name, lacking]}")
    for message in messages:
        log.warning(message)
        warnings.warn(message, SplitWarning, stacklevel=3)
    return messages


def describe_layouts(name: str | None = None, width: int = 80) -> str:
    """Every layout (or the one named) with its options and their defaults, wrapped to `width` columns: the first
    paragraph of each layout's docstring, or all of it for a named layout."""
    import textwrap

    blocks = []
    for layout in [name] if name else available_layouts():
        doc = inspect.getdoc(_get(layout)) or ""
        paragraphs = doc.split("\n\n") if name else doc.split("\n\n")[:1]
        text = [textwrap.fill(" ".join(p.split()), width, initial_indent="  ", subsequent_indent="  ")
                for p in paragraphs]
        options = ", ".join(f"{k}={v!r}" for k, v in layout_options(layout).items()) or "none"
        text.append(textwrap.fill(f"options (-o key=value): {options}", width, initial_indent="  ",
                                  subsequent_indent="    "))
        blocks.append("\n".join([layout, *text]))
    return "\n\n".join(blocks)


def pick_labelled(pool: Sequence[Record], k: int, seed: int) -> list[Record]:
    """K records of the training anomaly pool, in the order of one permutation fixed by the seed.

    Taking a prefix of the same permutation makes the sets nested (with one seed, the 5 labelled images are
    among the 20, which are among the 100), so a gain from more labels is not confounded with a new draw.
    """
    if k > len(pool):
        raise DataError(f"labelled_anomalies={k}, but the training pool holds only {len(pool)} anomalous images")
    order = np.random.default_rng([seed, 0x1ABE1]).permutation(len(pool))
    return [pool[i] for i in order[:k]]


def _get(layout: str) -> Callable:
    if layout not in _LAYOUTS:
        raise ConfigError(f"unknown data layout {layout!r}; available: {', '.join(available_layouts())}")
    return _LAYOUTS[layout]


# --- shared helpers -----------------------------------------------------------------------------------------------


def _require_root(root: Path | None, layout: str) -> Path:
    if root is None:
        raise ConfigError(f"layout {layout!r} needs a root folder (--root)")
    if not root.exists():
        raise DataError(f"{root}: data root does not exist")
    return root


def _folder(path: Path, *, required: bool = True) -> Path | None:
    if path.is_dir():
        return path
    if required:
        raise DataError(f"{path}: expected folder is missing")
    return None


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in sorted(READABLE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _image_files(folder: Path, *, recursive: bool = False, required: bool = True,
                 scan: Scan | None = None) -> list[Path]:
    """Readable files in a folder, sorted by name; an empty folder is a DataError when required.

    Nothing is passed over silently: a folder that cannot be listed and a link with a readable ending that
    leads nowhere are BadFileErrors (given to `scan.bad`, which skips and lists them when asked; without a
    scan, raised). Linked folders are followed once each, so a link loop ends.
    """
    files: list[Path] = []
    seen: set[tuple[int, int]] = set()

    def bad(path: str, reason: str) -> None:
        error = BadFileError(path, reason)
        if scan is None:
            raise error
        scan.bad(error)

    def visit(directory: str) -> None:
        try:
            stat = os.stat(directory)
            if (stat.st_dev, stat.st_ino) in seen:
                return
            seen.add((stat.st_dev, stat.st_ino))
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            bad(directory, f"cannot list folder: {exc.strerror or exc}")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as exc:
                is_dir = is_file = False
                bad(entry.path, f"cannot read: {exc.strerror or exc}")
                continue
            readable = entry.name.lower().endswith(READABLE_SUFFIXES)
            if is_dir and recursive:
                visit(entry.path)
            elif is_file and readable:
                files.append(Path(entry.path))
            elif readable and not is_dir and entry.is_symlink():
                bad(entry.path, "a link that leads nowhere (broken or looping)")

    visit(str(folder))
    files.sort()
    if required and not files:
        raise DataError(f"{folder}: no image files (readable endings: {', '.join(READABLE_SUFFIXES)})")
    return files


def _mask_index(folder: Path | None, patterns: Sequence[str] = ("{stem}",)) -> dict[str, str]:
    """image stem -> mask file, for mask files named by one of `patterns` (e.g. '{stem}_mask')."""
    if folder is None:
        return {}
    index = {}
    for file in _image_files(folder, required=False):
        for pattern in patterns:
            prefix, _, suffix = pattern.partition("{stem}")
            stem = _stem(file)
            if stem.startswith(prefix) and stem.endswith(suffix) and len(stem) > len(prefix) + len(suffix):
                index.setdefault(stem[len(prefix): len(stem) - len(suffix)], str(file))
    return index


def _mask_for(source: str, masks: dict[str, str]) -> str | None:
    """The mask source for an image source: same stem, and the same slice/frame suffix if any."""
    path, sep, fragment = source.partition("#")
    mask = masks.get(_stem(path))
    return f"{mask}#{fragment}" if mask and sep else mask


def _carve(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split off `fraction` of records (at least one when fraction > 0 and there are two or more) as validation."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = min(max(1, round(fraction * len(records))), len(records) - 1)
    picked = set(order[:n_val].tolist())
    return ([r for i, r in enumerate(records) if i not in picked], [r for i, r in enumerate(records) if i in picked])


def _fraction(name: str, value, *, high_open: bool = True) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {name!r} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= value < 1.0 if high_open else 0.0 <= value <= 1.0):
        raise ConfigError(f"option {name!r} must be in [0, {'1)' if high_open else '1]'}, got {value}")
    return value


def _count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"option {name!r} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"option {name!r} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _val_mode(val: str, official_exists: bool, where: Path) -> str:
    _choice("val", val, ("auto", "official", "carve"))
    if val == "official" and not official_exists:
        raise DataError(f"{where}: val='official' but there is no validation folder")
    return "official" if val == "auto" and official_exists else ("carve" if val == "auto" else val)


def _as_list(name: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    if isinstance(value, Sequence) and all(isinstance(v, (str, Path)) for v in value):
        return [str(v) for v in value]
    raise ConfigError(f"option {name!r} must be a folder or a list of folders, got {value!r}")


# --- generic folders ------------------------------------------------------------------------------------------------


FOLDER_SPLITS = ("auto", "carve", "given")
_GIVEN_VAL_NAMES = ("val", "valid", "validation")


@register("folder")
def folder(root: Path | None, scan: Scan, *, normal_dirs=("normal",), abnormal_dirs=(), mask_dir=None,
           test_fraction: float = 0.2, val_fraction: float = 0.1, val_anomaly_fraction: float = 0.0,
           recursive: bool = False, nifti_axis: int = 2, slice_range=None, train_abnormal_dirs=(),
           split: str = "auto"):
    """Generic layout: folders of normal and abnormal images, either split already or split here by the seed.

    split='given' reads a ready-made split as it is: root/train, root/val (or valid, validation) and root/test,
    each holding class folders: those named in `normal_dirs` are normal, the others (or only those in
    `abnormal_dirs`, when given) abnormal, with the folder's name as anomaly type. Nothing is reshuffled:
    abnormal validation images stay in validation. Abnormal folders under train/ form the pool for
    `labelled_anomalies`. Without a val folder, `val_fraction` of the training normals is held out (seeded).
    test_fraction and val_anomaly_fraction do not apply. split='auto' (the default) means 'given' when root holds
    train/ and test/ folders and no folder named in normal_dirs, else 'carve'.

    split='carve': folders of normal images, folders of abnormal images, and an optional mask folder.
    Folders are relative to root (or absolute). Normal images are shuffled with the seed: `test_fraction`
    of them go to test, `val_fraction` of the rest to validation, the remainder to training. Abnormal images
    go to test, except `val_anomaly_fraction` of them (default 0: normal-only validation). An abnormal
    image's anomaly_type is its folder's name. Masks are matched by file stem (`<stem>.*` or
    `<stem>_mask.*`); with a mask folder, normal images count as having an empty mask. NIfTI volumes
    are cut into slices along `nifti_axis` (optionally only `slice_range` = (start, stop)), multi-frame
    DICOMs into frames; masks of slices are the same slice of the matched mask volume.

    `train_abnormal_dirs`: folders of abnormal images that form the training pool for `labelled_anomalies`
    (semi-supervised models). They never enter val or test, and unpicked ones are not used at all; without
    them the `abnormal_dirs` images stay evaluation-only and no anomaly can be labelled for training.
    """
    test_fraction = _fraction("test_fraction", test_fraction)
    val_fraction = _fraction("val_fraction", val_fraction)
    val_anomaly_fraction = _fraction("val_anomaly_fraction", val_anomaly_fraction)
    split = _choice("split", split, FOLDER_SPLITS)
    base = root if root is not None else Path.cwd()
    normal_list, abnormal_list = _as_list("normal_dirs", normal_dirs), _as_list("abnormal_dirs", abnormal_dirs)
    if not normal_list:
        raise ConfigError("option 'normal_dirs' must name at least one folder of normal images")
    masks = _mask_index(_folder(base / mask_dir) if mask_dir else None, ("{stem}", "{stem}_mask"))

    def sources(name: str | Path) -> list[str]:
        files = _image_files(_folder(base / name), recursive=recursive)
        return scan.sources(files, axis=nifti_axis, slice_range=slice_range)

    if split == "auto":
        ready = (base / "train").is_dir() and (base / "test").is_dir()
        split = "given" if ready and not any((base / d).is_dir() for d in normal_list) else "carve"
    if split == "given":
        return _given_split(base, scan, sources, normal_list, abnormal_list, masks, mask_dir is not None,
                            val_fraction)

    normals = [Record(s, 0, NORMAL, empty_mask=mask_dir is not None) for d in normal_list for s in sources(d)]
    abnormals = [Record(s, 1, Path(d).name.lower(), mask=_mask_for(s, masks))
                 for d in abnormal_list for s in sources(d)]
    rest, test_normals = _carve(normals, test_fraction, scan.seed)
    train, val = _carve(rest, val_fraction, scan.seed + 1)
    test_abnormals, val_abnormals = _carve(abnormals, val_anomaly_fraction, scan.seed + 2)
    pool = [Record(s, 1, Path(d).name.lower(), mask=_mask_for(s, masks))
            for d in _as_list("train_abnormal_dirs", train_abnormal_dirs) for s in sources(d)]
    return train, val + val_abnormals, test_normals + test_abnormals, pool


def _given_split(base: Path, scan: Scan, sources: Callable, normal_list: list[str], abnormal_list: list[str],
                 masks: dict[str, str], has_masks: bool, val_fraction: float):
    """The `folder` layout's split='given': train/, val/ and test/ read as they are (see `folder`)."""
    normal_names = {Path(d).name for d in normal_list}

    def classes(split_dir: Path) -> tuple[list[Record], list[Record]]:
        normals, abnormals = [], []
        folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        for folder in folders:
            if folder.name in normal_names:
                normals += [Record(s, 0, NORMAL, empty_mask=has_masks) for s in sources(folder)]
            elif not abnormal_list or folder.name in abnormal_list:
                abnormals += [Record(s, 1, folder.name.lower(), mask=_mask_for(s, masks)) for s in sources(folder)]
        if not normals and not abnormals:
            raise DataError(f"{split_dir}: no class folders with images (normal: {', '.join(sorted(normal_names))}"
                            f"{'; abnormal: ' + ', '.join(abnormal_list) if abnormal_list else ''})")
        return normals, abnormals

    train_normals, pool = classes(_folder(base / "train"))
    if not train_normals:
        raise DataError(f"{base / 'train'}: no normal images (folders named {', '.join(sorted(normal_names))})")
    val_dir = next((base / name for name in _GIVEN_VAL_NAMES if (base / name).is_dir()), None)
    if val_dir is None:
        train, val = _carve(train_normals, val_fraction, scan.seed + 1)
    else:
        train, (val_normals, val_abnormals) = train_normals, classes(val_dir)
        val = val_normals + val_abnormals
    test_normals, test_abnormals = classes(_folder(base / "test"))
    return train, val, test_normals + test_abnormals, pool


# --- industrial inspection: MVTec AD, BTAD, MIIC ---------------------------------------------------------------------


def _inspection(root: Path, scan: Scan, *, normal: str, mask_patterns: Sequence[str], masks_required: bool,
                val_fraction: float):
    """`train/<normal>`, `test/<normal>`, `test/<defect>...`, `ground_truth/<defect>/<mask>`."""
    val_fraction = _fraction("val_fraction", val_fraction)
    train_dir, test_dir = _folder(root / "train" / normal), _folder(root / "test")
    train = [Record(str(f), 0, NORMAL, empty_mask=True) for f in _image_files(train_dir)]
    train, val = _carve(train, val_fraction, scan.seed)
    test = []
    type_dirs = sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not type_dirs:
        raise DataError(f"{test_dir}: no test folders (expected {normal}/ and one folder per defect type)")
    for type_dir in type_dirs:
        if type_dir.name == normal:
            test += [Record(str(f), 0, NORMAL, empty_mask=True) for f in _image_files(type_dir)]
            continue
        masks = _mask_index(_folder(root / "ground_truth" / type_dir.name, required=masks_required), mask_patterns)
        for file in _image_files(type_dir):
            mask = masks.get(_stem(file))
            if mask is None and masks_required:
                scan.bad(BadFileError(file, f"no mask for it in ground_truth/{type_dir.name}/ "
                                            f"(expected {' or '.join(p.format(stem=_stem(file)) for p in mask_patterns)}"
                                            f" with an image ending)"))
                continue
            test.append(Record(str(file), 1, type_dir.name, mask=mask))
    return train, val, test


@register("mvtec")
def mvtec(root: Path | None, scan: Scan, *, val_fraction: float = 0.1):
    """MVTec AD category folder: `train/good`, `test/<type>`, `ground_truth/<type>/<stem>_mask.png`.

    Validation: `val_fraction` of train/good (normal-only; MVTec has no anomalies outside test).
    """
    return _inspection(_require_root(root, "mvtec"), scan, normal="good", mask_patterns=("{stem}_mask",),
                       masks_required=True, val_fraction=val_fraction)


@register("btad")
def btad(root: Path | None, scan: Scan, *, val_fraction: float = 0.1):
    """BTAD product folder: `train/ok`, `test/ok`, `test/ko`, masks `ground_truth/ko/<stem>.png` or `.bmp`.

    Validation: `val_fraction` of train/ok (normal-only).
    """
    return _inspection(_require_root(root, "btad"), scan, normal="ok", mask_patterns=("{stem}", "{stem}_mask"),
                       masks_required=True, val_fraction=val_fraction)


@register("miic")
def miic(root: Path | None, scan: Scan, *, val_fraction: float = 0.1):
    """MIIC (microscopic images of integrated circuits, as used by AE-FLOW).

    Assumption (no public description of its folder layout was found): MVTec-style, `train/good`,
    `test/good`, `test/<defect>`, with masks optional in `ground_truth/<defect>/<stem>[_mask].png`; a
    defect image without a mask has no pixel ground truth. Validation: `val_fraction` of train/good.
    """
    return _inspection(_require_root(root, "miic"), scan, normal="good", mask_patterns=("{stem}_mask", "{stem}"),
                       masks_required=False, val_fraction=val_fraction)


# --- medical class folders: Kermany chest X-ray and OCT2017 ------------------------------------------------------------


def _class_folders(root: Path, scan: Scan, *, normal: str, anomalies: Sequence[str], val: str,
                   val_fraction: float):
    """`<split>/<CLASS>/` with split in train, test and optionally val; classes are upper-case names."""
    root = _folder(root)
    val_fraction = _fraction("val_fraction", val_fraction)
    mode = _val_mode(val, (root / "val").is_dir(), root)

    def split(name: str, *, required: bool = True) -> tuple[list[Record], list[Record]]:
        split_dir = _folder(root / name)
        normals = [Record(str(f), 0, NORMAL) for f in _image_files(_folder(split_dir / normal))]
        abnormal = [Record(str(f), 1, cls.lower())
                    for cls in anomalies if (split_dir / cls).is_dir() for f in _image_files(split_dir / cls)]
        if required and not abnormal:
            raise DataError(f"{split_dir}: no anomaly folders ({', '.join(anomalies)})")
        return normals, abnormal

    train_normals, train_abnormal = split("train", required=False)
    test = [r for part in split("test") for r in part]
    if mode == "official":
        return train_normals, [r for part in split("val", required=False) for r in part], test, train_abnormal
    train, val_normals = _carve(train_normals, val_fraction, scan.seed)
    pool, val_abnormal = _carve(train_abnormal, val_fraction, scan.seed + 1)
    return train, val_normals + val_abnormal, test, pool


@register("chest_xray")
def chest_xray(root: Path | None, scan: Scan, *, val: str = "auto", val_fraction: float = 0.1):
    """Kermany pediatric chest X-ray: `train|test|val/NORMAL|PNEUMONIA`.

    Train: train/NORMAL. Test: test/ (234 normal + 390 pneumonia in the public release). Validation:
    val='official' uses the val/ folder (only 8 + 8 images in the public release); val='carve' takes
    `val_fraction` of train/NORMAL and the same fraction of train/PNEUMONIA (anomalies outside test);
    'auto' (default) uses val/ if present, else carves.
    """
    return _class_folders(_require_root(root, "chest_xray"), scan, normal="NORMAL", anomalies=("PNEUMONIA",),
                          val=val, val_fraction=val_fraction)


@register("oct2017")
def oct2017(root: Path | None, scan: Scan, *, val: str = "auto", val_fraction: float = 0.1):
    """Kermany OCT2017: `train|test[|val]/NORMAL|CNV|DME|DRUSEN`; anomaly types cnv, dme, drusen are kept.

    Validation as for chest_xray: the val/ folder if present ('official'), else `val_fraction` of the
    training normals and of each training anomaly class ('carve').

    Training pool for `labelled_anomalies` (here and in chest_xray): the train/ anomaly images not carved
    into validation.
    """
    return _class_folders(_require_root(root, "oct2017"), scan, normal="NORMAL", anomalies=("CNV", "DME", "DRUSEN"),
                          val=val, val_fraction=val_fraction)


# --- ISIC2018 task 3 ------------------------------------------------------------------------------------------------

ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


def _isic_split(root: Path, scan: Scan, name: str) -> list[Record] | None:
    """Records of one ISIC2018 task 3 split, or None when its input folder is absent."""
    images = root / f"ISIC2018_Task3_{name}_Input"
    if not images.is_dir():
        return None
    truth = root / f"ISIC2018_Task3_{name}_GroundTruth"
    csvs = sorted(truth.glob("*.csv")) if truth.is_dir() else sorted(root.glob(f"ISIC2018_Task3_{name}_GroundTruth*.csv"))
    if not csvs:
        raise DataError(f"{truth}: no ground-truth CSV for {images}")
    by_stem = {_stem(f): f for f in _image_files(images)}
    records = []
    with open(csvs[0], newline="") as f:
        rows = csv.DictReader(f)
        missing = [c for c in ("image", *ISIC_CLASSES) if c not in (rows.fieldnames or [])]
        if missing:
            raise DataError(f"{csvs[0]}: missing column(s) {', '.join(missing)}")
        for line, row in enumerate(rows, start=2):
            try:
                hot = [c for c in ISIC_CLASSES if float(row[c]) == 1.0]
            except (TypeError, ValueError):
                raise DataError(f"{csvs[0]}, line {line}: class columns must be 0 or 1") from None
            if len(hot) != 1:
                raise DataError(f"{csvs[0]}, line {line}: expected exactly one class set to 1, found {hot or 'none'}")
            file = by_stem.get(row["image"])
            if file is None:
                scan.bad(BadFileError(images / f"{row['image']}.jpg", f"listed in {csvs[0].name} but missing"))
                continue
            is_normal = hot[0] == "NV"
            records.append(Record(str(file), 0 if is_normal else 1, NORMAL if is_normal else hot[0].lower()))
    return records


@register("isic2018")
def isic2018(root: Path | None, scan: Scan, *, val: str = "auto", val_fraction: float = 0.1):
    """ISIC2018 task 3: `ISIC2018_Task3_{Training,Validation,Test}_Input/` with ground-truth CSVs in
    `ISIC2018_Task3_<split>_GroundTruth/` (one-hot columns MEL, NV, BCC, AKIEC, BKL, DF, VASC; NV = normal).

    Train: Training images labelled NV. Test: the Test split (required). Validation: 'official' uses the
    Validation split; 'carve' takes `val_fraction` of the training NV images and of the training anomalies;
    'auto' uses Validation if present. Training pool for `labelled_anomalies`: the Training anomalies not
    carved into validation.
    """
    root = _require_root(root, "isic2018")
    val_fraction = _fraction("val_fraction", val_fraction)
    training, validation, test = (_isic_split(root, scan, s) for s in ("Training", "Validation", "Test"))
    if training is None or test is None:
        raise DataError(f"{root}: expected ISIC2018_Task3_Training_Input/ and ISIC2018_Task3_Test_Input/")
    train_normals, train_abnormal = [r for r in training if r.label == 0], [r for r in training if r.label == 1]
    if _val_mode(val, validation is not None, root) == "official":
        return train_normals, validation, test, train_abnormal
    train, val_normals = _carve(train_normals, val_fraction, scan.seed)
    pool, val_abnormal = _carve(train_abnormal, val_fraction, scan.seed + 1)
    return train, val_normals + val_abnormal, test, pool


# --- BraTS2021 2-D slices (BMAD / MedIAnomaly benchmark layout) ----------------------------------------------------------


@register("brats2021")
def brats2021(root: Path | None, scan: Scan, *, val: str = "auto", val_fraction: float = 0.1):
    """BraTS2021 2-D slices in the BMAD layout used by the MedIAnomaly benchmark:
    `train/good/img/`, `valid/{good,Ungood}/img/`, `test/{good,Ungood}/img/`, with tumour masks of the
    same file name in `<split>/Ungood/label/` (folders without the `img/` level are accepted too; NIfTI
    volumes there are cut into axial slices, their masks being the same slice of the same-name label volume).

    Validation: 'official' uses valid/ (normal and tumour slices); 'carve' takes `val_fraction` of the
    training slices (normal-only); 'auto' uses valid/ if present. Normal slices count as having empty masks.
    """
    root = _require_root(root, "brats2021")

    def images(folder: Path) -> list[str]:
        return scan.sources(_image_files(_folder(folder / "img") if (folder / "img").is_dir() else _folder(folder)))

    def split(name: str) -> list[Record]:
        normals = [Record(s, 0, NORMAL, empty_mask=True) for s in images(root / name / "good")]
        masks = _mask_index(_folder(root / name / "Ungood" / "label", required=False))
        tumours = [Record(s, 1, "tumor", mask=_mask_for(s, masks)) for s in images(root / name / "Ungood")]
        return normals + tumours

    train = [Record(s, 0, NORMAL, empty_mask=True) for s in images(root / "train" / "good")]
    test = split("test")
    if _val_mode(val, (root / "valid").is_dir(), root) == "official":
        return train, split("valid"), test
    train, val_records = _carve(train, _fraction("val_fraction", val_fraction), scan.seed)
    return train, val_records, test


# --- MedMNIST .npz -----------------------------------------------------------------------------------------------------

#: Class names of MedMNIST files whose names aeflow knows; others are called class_<k>.
KNOWN_LABEL_NAMES = {"pneumoniamnist": {0: "normal", 1: "pneumonia"}}


@register("medmnist")
def medmnist(root: Path | None, scan: Scan, *, normal_labels=(0,), label_names=None):
    """A MedMNIST `.npz` (root is the file, or a folder holding exactly one): keys
    `{train,val,test}_images` and `{train,val,test}_labels`.

    Train: training images whose label is in `normal_labels` (default {0}). Validation: the val split,
    all labels. Test: the test split. Images with other labels are anomalies named by `label_names`
    ({label: name}; built in for PneumoniaMNIST). For PneumoniaMNIST this is the usual protocol:
    1214 normal training images, val 135 normal / 389 pneumonia, test 234 normal / 390 pneumonia.
    Training pool for `labelled_anomalies`: the train-split images with other labels (3494 pneumonias in
    PneumoniaMNIST).
    """
    root = _require_root(root, "medmnist")
    if root.is_dir():
        files = sorted(root.glob("*.npz"))
        if len(files) != 1:
            raise DataError(f"{root}: expected exactly one .npz file, found {len(files)}; give the file as root")
        root = files[0]
    if isinstance(normal_labels, (int, np.integer)):
        normal_labels = (normal_labels,)
    if not normal_labels or not all(isinstance(k, (int, np.integer)) for k in normal_labels):
        raise ConfigError(f"option 'normal_labels' must be a list of integer labels, got {normal_labels!r}")
    names = {**KNOWN_LABEL_NAMES.get(root.stem.split("_")[0], {}), **{int(k): v for k, v in (label_names or {}).items()}}
    normal = {int(k) for k in normal_labels}

    def split(name: str) -> list[Record]:
        labels = npz_labels(root, name)
        if labels.ndim != 1:
            raise DataError(f"{root}: {name}_labels has shape {labels.shape}; multi-label MedMNIST files "
                            f"(e.g. ChestMNIST) are not supported")
        return [Record(f"{root}#split={name},index={i}", 0 if int(k) in normal else 1,
                       NORMAL if int(k) in normal else names.get(int(k), f"class_{int(k)}"))
                for i, k in enumerate(labels)]

    training = split("train")
    return ([r for r in training if r.label == 0], split("val"), split("test"),
            [r for r in training if r.label == 1])


# --- magnetic tile -----------------------------------------------------------------------------------------------------


@register("magnetic_tile")
def magnetic_tile(root: Path | None, scan: Scan, *, train_fraction: float = 0.8, val_fraction: float = 0.1,
                  labelled_pool: float = 0.0):
    """Magnetic-tile surface defects: `MT_<class>/Imgs/<name>.jpg`, each with a same-name `.png` mask
    (binarised > 127). MT_Free is normal, every other class a defect type (blowhole, break, ...).

    Project convention: MT_Free names, sorted, are shuffled with the seed; `train_fraction` (80%) are
    training normals and the rest test normals; every defect image is a test anomaly with its mask.
    Validation: `val_fraction` of the training normals (normal-only; there are no anomalies outside test).

    Training pool for `labelled_anomalies`: `labelled_pool` (default 0: none) of each defect type's images,
    drawn with the seed, leave the test split for the pool (which shrinks the test set by as many defects, labelled
    or not: compare runs made with the same labelled_pool). The test normals do not change.
    """
    root = _require_root(root, "magnetic_tile")
    train_fraction = _fraction("train_fraction", train_fraction)
    labelled_pool = _fraction("labelled_pool", labelled_pool)
    class_dirs = sorted(d for d in root.glob("MT_*") if d.is_dir())
    if not any(d.name == "MT_Free" for d in class_dirs):
        raise DataError(f"{root}: expected MT_Free/ and MT_<defect>/ folders with Imgs/ inside")
    normals, defects, pool = [], [], []
    for class_dir in class_dirs:
        files = _image_files(_folder(class_dir / "Imgs"))
        masks = {_stem(f): str(f) for f in files if f.suffix.lower() == ".png"}
        is_normal = class_dir.name == "MT_Free"
        records = []
        for file in (f for f in files if f.suffix.lower() == ".jpg"):
            if _stem(file) not in masks:
                scan.bad(BadFileError(file, f"no mask {_stem(file)}.png beside it"))
                continue
            records.append(Record(str(file), 0 if is_normal else 1, NORMAL if is_normal else class_dir.name[3:].lower(),
                                  mask=masks[_stem(file)]))
        if is_normal:
            normals += records
        else:
            kept, labelled = _carve(records, labelled_pool, scan.seed + 2)
            defects, pool = defects + kept, pool + labelled
    train, test_normals = _carve(normals, 1.0 - train_fraction, scan.seed)
    train, val = _carve(train, _fraction("val_fraction", val_fraction), scan.seed + 1)
    return train, val, test_normals + defects, pool


# --- synthetic -----------------------------------------------------------------------------------------------------------


@register("synthetic")
def synthetic_phantoms(root: Path | None, scan: Scan, *, n_train: int = 200, n_val: int = 60, n_test: int = 120,
                       anomaly_fraction: float = 0.5, size: int = 64, difficulty: float = 0.5, seed=None):
    """Built-in brain-phantom data set (aeflow.data.synthetic), generated on the fly; root is ignored.

    Train: `n_train` normal subjects. Validation and test: `n_val` / `n_test` further subjects of which
    round(anomaly_fraction * n) carry a bright or dark lesion. Every image has a pixel mask (empty for
    normals). `seed` defaults to the run's seed; all subjects are distinct. Training pool for
    `labelled_anomalies`: `n_train` further subjects (indices after the test ones), each with a lesion.
    """
    n_train, n_val, n_test = _count("n_train", n_train, 1), _count("n_val", n_val), _count("n_test", n_test)
    anomaly_fraction = _fraction("anomaly_fraction", anomaly_fraction, high_open=False)
    size = _count("size", size, 16)
    difficulty = _fraction("difficulty", difficulty, high_open=False)
    seed = scan.seed if seed is None else _count("seed", seed)

    def record(index: int, anomaly: str) -> Record:
        return Record(synthetic.phantom_source(seed, index, size, difficulty, anomaly), int(anomaly != NORMAL),
                      anomaly, mask=synthetic.phantom_source(seed, index, size, difficulty, anomaly, mask=True))

    def split(first: int, n: int) -> list[Record]:
        rng = np.random.default_rng([seed, first, n])
        anomalous = set(rng.permutation(n)[: round(anomaly_fraction * n)].tolist())
        kinds = rng.integers(len(synthetic.ANOMALY_TYPES), size=n)
        return [record(first + i, synthetic.ANOMALY_TYPES[kinds[i]] if i in anomalous else NORMAL) for i in range(n)]

    train = [record(i, NORMAL) for i in range(n_train)]
    first_pool = n_train + n_val + n_test
    pool_kinds = np.random.default_rng([seed, first_pool, n_train]).integers(len(synthetic.ANOMALY_TYPES), size=n_train)
    pool = [record(first_pool + i, synthetic.ANOMALY_TYPES[kind]) for i, kind in enumerate(pool_kinds)]
    return train, split(n_train, n_val), split(n_train + n_val, n_test), pool


# --- unlabelled inputs (prediction) ----------------------------------------------------------------------------------


def scan_inputs(paths: Sequence[str | Path], *, axis: int = 2, slice_range=None,
                skip_bad: bool = False) -> tuple[list[Record], list[tuple[str, str]]]:
    """Records (label -1) for files and folders to score: folders are searched recursively for readable
    files, NIfTI volumes give one record per slice, multi-frame DICOMs one per frame, '#...' sources are
    kept as given. Returns the records and the (path, reason) of files skipped (skip_bad) on the way."""
    scan = Scan(skip_bad=skip_bad)
    sources = []
    for path in map(str, paths):
        file, _ = split_source(path)
        if Path(file).is_dir():
            files = _image_files(Path(file), recursive=True, required=False, scan=scan)
            if not files:
                scan.bad(BadFileError(file, f"no image files in the folder (readable endings: "
                                            f"{', '.join(READABLE_SUFFIXES)})"))
            sources += scan.sources(files, axis=axis, slice_range=slice_range)
        elif file != path:  # a source naming one frame or slice: read (and checked) when it is decoded
            sources.append(path)
        elif not Path(file).exists():
            scan.bad(BadFileError(file, "file not found"))
        else:
            sources += scan.sources([Path(file)], axis=axis, slice_range=slice_range)
    return [Record(s, -1, "") for s in sources], scan.skipped
