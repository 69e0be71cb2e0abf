"""From records to Samples: decoding, intensity rule, channels, resizing; and `load_data`, the one entry point.

`load_data` builds a layout's records, then decodes every image and mask once (in threads) before any
training starts, so a bad file is reported (or, with skip_bad=True, skipped and listed) at load time
rather than half-way through an epoch. The same decoding is what ImageDataset does per item.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aeflow.data.intensity import parse_intensity, to_unit_range
from aeflow.data.layouts import build_records
from aeflow.data.readers import MAX_PIXELS, read_mask, read_raw, split_source
from aeflow.data.records import Record, SplitRecords
from aeflow.data.sample import Sample
from aeflow.errors import BadFileError, ConfigError, DataError

#: ITU-R BT.601 luma weights, used when a colour image must become single-channel.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class Decoded:
    """One record decoded at its original size: image H x W x C float32 in [0, 1], mask bool H x W or None."""

    image: np.ndarray
    mask: np.ndarray | None
    meta: dict


def decode_record(record: Record, *, channels: int = 1, intensity: str = "auto",
                  max_pixels: int = MAX_PIXELS, resize_to: tuple[int, int] | None = None) -> Decoded:
    """Decode a record's image (and mask), apply the intensity rule and the channel count.

    resize_to: the size the image will be resized to, checked before decoding (see readers.check_resize).
    Raises BadFileError for unreadable files, for a rule that does not fit the file, and for a mask whose size
    differs from its image.
    """
    raw = read_raw(record.source, max_pixels=max_pixels, resize_to=resize_to)
    try:
        image, info = to_unit_range(raw, intensity, source=record.source)
    except ConfigError as error:  # the rule does not fit this file (e.g. 'window' without window tags)
        raise BadFileError(split_source(record.source)[0], str(error).removeprefix(f"{record.source}: ")) from None
    height, width = image.shape[:2]
    meta = {**raw.meta, **info, "original_size": (height, width),
            "raw_min": float(np.nanmin(raw.array)), "raw_max": float(np.nanmax(raw.array))}
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 3 and channels == 1:
        image = (image @ _LUMA)[:, :, None]
        meta["color_to_gray"] = "bt601"
    elif image.shape[2] == 1 and channels == 3:
        image = np.repeat(image, 3, axis=2)
    mask = None
    if record.mask is not None:
        mask = read_mask(record.mask, max_pixels=max_pixels)
        if mask.shape != (height, width):
            raise BadFileError(record.mask, f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's "
                                            f"{width}x{height} ({record.source})")
    elif record.empty_mask:
        mask = np.zeros((height, width), dtype=bool)
    return Decoded(image, mask, meta)


def _size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size):
        raise ConfigError(f"image_size must be a positive integer or (height, width), got {image_size!r}")
    return int(size[0]), int(size[1])


def _check_channels(channels) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    return channels


class ImageDataset(torch.utils.data.Dataset):
    """Records -> Samples: image C x H x W float in [0, 1] (grayscale stays 1 channel unless channels=3),
    resized with antialiasing to `image_size` (None keeps each image's size); mask resized by nearest
    neighbour and binary. Sample.meta records the intensity rule, original size and format details."""

    def __init__(self, records: Sequence[Record], image_size: int | tuple[int, int] | None = 256, channels: int = 1,
                 intensity: str = "auto", *, max_pixels: int = MAX_PIXELS):
        self.records = list(records)
        self.image_size = _size(image_size)
        self.channels = _check_channels(channels)
        self.intensity = str(parse_intensity(intensity))
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        decoded = decode_record(record, channels=self.channels, intensity=self.intensity, max_pixels=self.max_pixels,
                                resize_to=self.image_size)
        image = torch.from_numpy(np.ascontiguousarray(decoded.image.transpose(2, 0, 1)))
        mask = None if decoded.mask is None else torch.from_numpy(decoded.mask.astype(np.float32))
        if self.image_size is not None and tuple(image.shape[1:]) != self.image_size:
            image = F.interpolate(image[None], size=self.image_size, mode="bilinear", antialias=True,
                                  align_corners=False)[0].clamp_(0.0, 1.0)
            if mask is not None:
                mask = F.interpolate(mask[None, None], size=self.image_size, mode="nearest")[0, 0]
        return Sample(image=image, label=record.label, path=record.source, mask=mask,
                      anomaly_type=record.anomaly_type, meta=decoded.meta)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)


@dataclass
class DataSplits:
    """What load_data returns: the three datasets, their records, what was skipped and per-image stats."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    records: SplitRecords
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: source -> {"size": (h, w), "channels", "dtype", "min", "max"} of the raw pixels, from validation.
    stats: dict[str, dict] = field(default_factory=dict)

    def describe(self) -> str:
        from aeflow.data.describe import describe

        return describe(self)

    @property
    def labelled(self) -> ImageDataset:
        """The labelled training anomalies (`records.labelled`; empty unless load_data was asked for some),
        decoded like the training images."""
        t = self.train
        return ImageDataset(self.records.labelled, t.image_size, t.channels, t.intensity, max_pixels=t.max_pixels)

    @classmethod
    def from_records(cls, records: SplitRecords, *, image_size: int | tuple[int, int] | None = 256, channels: int = 1,
                     intensity: str = "auto", skip_bad: bool = False, validate: bool = True,
                     max_pixels: int = MAX_PIXELS, skipped: Sequence[tuple[str, str]] = ()) -> "DataSplits":
        """Datasets over saved or freshly built records; with validate=True every record is decoded once
        first and bad ones raise BadFileError (or, with skip_bad=True, are dropped and listed)."""
        channels, intensity = _check_channels(channels), str(parse_intensity(intensity))
        skipped, stats = list(skipped), {}
        if validate:
            records, stats, bad = _validate(records, channels, intensity, max_pixels, skip_bad)
            skipped += bad
        if not records.train:
            raise DataError(f"{records.layout} data at {records.root}: no training images"
                            + (f" ({len(skipped)} file(s) skipped as bad)" if skipped else ""))
        make = lambda recs: ImageDataset(recs, image_size, channels, intensity, max_pixels=max_pixels)  # noqa: E731
        return cls(make(records.train), make(records.val), make(records.test), records, skipped, stats)


def _validate(records: SplitRecords, channels: int, intensity: str, max_pixels: int,
              skip_bad: bool) -> tuple[SplitRecords, dict, list[tuple[str, str]]]:
    def check(record: Record) -> dict | BadFileError:
        try:
            decoded = decode_record(record, channels=channels, intensity=intensity, max_pixels=max_pixels)
        except BadFileError as error:
            return error
        meta = decoded.meta
        return {"size": meta["original_size"], "channels": decoded.image.shape[2], "dtype": meta["dtype"],
                "min": meta["raw_min"], "max": meta["raw_max"], "intensity": meta["intensity"]}

    every = [r for recs in records.splits().values() for r in recs]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = dict(zip((r.source for r in every), pool.map(check, every)))
    bad = [(r.source, results[r.source]) for r in every if isinstance(results[r.source], BadFileError)]
    if bad and not skip_bad:
        raise bad[0][1]
    kept = {name: [r for r in recs if not isinstance(results[r.source], BadFileError)]
            for name, recs in records.splits().items()}
    stats = {source: result for source, result in results.items() if not isinstance(result, BadFileError)}
    clean = SplitRecords(**kept, layout=records.layout, root=records.root, seed=records.seed, options=records.options)
    return clean, stats, [(error.path, error.reason) for _, error in bad]


def load_data(layout: str, root: str | Path | None = None, *, image_size: int | tuple[int, int] | None = 256,
              channels: int = 1, intensity: str = "auto", seed: int = 0, skip_bad: bool = False,
              max_pixels: int = MAX_PIXELS, validate: bool = True, labelled_anomalies: int = 0,
              **layout_options) -> DataSplits:
    """Load a data set by layout name (see available_layouts()) into train / val / test datasets.

    image_size: int or (H, W) to resize to, None to keep sizes. channels: 1 (grayscale kept as is; colour
    converted by BT.601 luma) or 3 (grayscale repeated). intensity: rule to map pixels to [0, 1] (see
    aeflow.data.intensity). seed: fixes every shuffle and carved split. skip_bad: drop bad files and list
    them in `.skipped` instead of raising. max_pixels: decompression-bomb limit. labelled_anomalies: K
    anomalous images of the layout's training pool, drawn with the seed, for semi-supervised models
    (`.labelled`; see build_records). layout_options: the layout's own options (a misspelt one is a
    ConfigError that lists the valid ones).
    """
    _size(image_size), _check_channels(channels), parse_intensity(intensity)  # fail fast, before any I/O
    records, skipped = build_records(layout, root, seed=seed, skip_bad=skip_bad,
                                     labelled_anomalies=labelled_anomalies, **layout_options)
    return DataSplits.from_records(records, image_size=image_size, channels=channels, intensity=intensity,
                                   skip_bad=skip_bad, validate=validate, max_pixels=max_pixels, skipped=skipped)
