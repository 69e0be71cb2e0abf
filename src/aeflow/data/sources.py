"""What a *source* string names, and what reading one gives: shared by the readers and the synthetic phantoms.

A source is a file path, optionally followed by `#key=value,...` naming one 2-D image inside it (see
`aeflow.data.readers`), or a generated phantom, `synthetic:phantom#...` (see `aeflow.data.synthetic`). This module
holds only the source syntax and the `RawImage` every reader returns, so that the readers (which dispatch a
synthetic source to the phantom generator) and the generator (which writes and parses its own sources) both import
it and not each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aeflow.errors import BadFileError

SYNTHETIC_PREFIX = "synthetic:"


@dataclass
class RawImage:
    """Decoded pixels in native units: H x W, or H x W x 3 for colour (alpha is dropped)."""

    array: np.ndarray
    meta: dict = field(default_factory=dict)


def split_source(source: str) -> tuple[str, dict[str, str]]:
    """'file.nii.gz#axis=2,slice=4' -> ('file.nii.gz', {'axis': '2', 'slice': '4'}).

    The options follow the LAST '#'. A name that is itself an existing file ('hash#frame=1.png') has no options,
    and neither has a name whose tail does not read as key=value pairs unless the part before it exists (then
    the tail is reported as unparseable), so file names with '#' are read, not misparsed.
    """
    source = str(source)
    path, sep, fragment = source.rpartition("#")
    synthetic = source.startswith(SYNTHETIC_PREFIX)
    if not sep or (not synthetic and os.path.lexists(source)):
        return source, {}
    options = {}
    for item in filter(None, fragment.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            if synthetic or os.path.lexists(path):
                raise BadFileError(path, f"cannot parse '#{fragment}': expected key=value pairs")
            return source, {}
        options[key.strip()] = value.strip()
    return path, options


def join_source(path: str | Path, **options) -> str:
    """Inverse of split_source."""
    if not options:
        return str(path)
    return f"{path}#" + ",".join(f"{k}={v}" for k, v in options.items())
