"""Named rules that map raw pixel values to float [0, 1]; the rule used is recorded with every image.

Rules (strings, as a user writes them):
    dtype              divide by the integer type's range: uint8 / 255, uint16 / 65535 (signed: min..max -> 0..1)
    minmax             per image: its own minimum -> 0, maximum -> 1 (a constant image becomes all zeros)
    window:C,W         values in [C - W/2, C + W/2] -> [0, 1]; values outside are clipped
    window             the same with the DICOM file's own WindowCenter / WindowWidth
    percentile:LO,HI   per image: the LO-th and HI-th percentiles -> 0 and 1; values outside are clipped
    unit               values are already in [0, 1] (float data); anything outside is an error, not clipped
    auto               per format: synthetic -> unit; DICOM -> window (if the file has one) else minmax;
                       NIfTI -> percentile:1,99; integer images -> dtype; float images -> minmax

Clipping only happens in `window` and `percentile`, and the fraction of clipped pixels is recorded
(`clipped_fraction`), as are the resolved rule (`intensity`) and any MONOCHROME1 inversion (`inverted`).
Non-finite values (NaN, inf) are replaced by the finite minimum and counted (`nonfinite_pixels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aeflow.data.readers import RawImage
from aeflow.errors import ConfigError

RULE_NAMES = ("auto", "dtype", "minmax", "window", "percentile", "unit")


@dataclass(frozen=True)
class IntensityRule:
    name: str
    params: tuple[float, ...] = ()

    def __str__(self) -> str:
        return self.name + (":" + ",".join(f"{p:g}" for p in self.params) if self.params else "")


def parse_intensity(rule: str | IntensityRule) -> IntensityRule:
    """Validate a rule string, e.g. 'window:40,400'; raises ConfigError naming what is wrong."""
    if isinstance(rule, IntensityRule):
        return rule
    name, _, args = str(rule).strip().partition(":")
    if name not in RULE_NAMES:
        raise ConfigError(f"unknown intensity rule {rule!r}; use one of: dtype, minmax, window, window:C,W, "
                          f"percentile:LO,HI, unit, auto")
    try:
        params = tuple(float(a) for a in args.split(",")) if args else ()
    except ValueError:
        raise ConfigError(f"intensity rule {rule!r}: parameters must be numbers") from None
    if name == "window" and params and (len(params) != 2 or params[1] <= 0):
        raise ConfigError(f"intensity rule {rule!r}: expected window:CENTER,WIDTH with WIDTH > 0")
    if name == "percentile" and (len(params) != 2 or not 0 <= params[0] < params[1] <= 100):
        raise ConfigError(f"intensity rule {rule!r}: expected percentile:LO,HI with 0 <= LO < HI <= 100")
    if name not in ("window", "percentile") and params:
        raise ConfigError(f"intensity rule {rule!r}: '{name}' takes no parameters")
    return IntensityRule(name, params)


def resolve_auto(raw: RawImage) -> IntensityRule:
    """The rule 'auto' stands for, given where the image came from."""
    fmt = raw.meta.get("format")
    if fmt == "synthetic":
        return IntensityRule("unit")
    if fmt == "dicom":
        has_window = "window_center" in raw.meta and raw.meta.get("window_width", 0) > 0
        return IntensityRule("window") if has_window else IntensityRule("minmax")
    if fmt == "nifti":
        return IntensityRule("percentile", (1.0, 99.0))
    if np.issubdtype(raw.array.dtype, np.integer) or raw.array.dtype == bool:
        return IntensityRule("dtype")
    return IntensityRule("minmax")


def to_unit_range(raw: RawImage, rule: str | IntensityRule = "auto", *, source: str = "") -> tuple[np.ndarray, dict]:
    """float32 array in [0, 1] (same shape as raw.array) and what was done to get it."""
    rule = parse_intensity(rule)
    requested = str(rule)
    if rule.name == "auto":
        rule = resolve_auto(raw)
    x = raw.array
    info: dict = {"intensity": str(rule), "clipped_fraction": 0.0}
    if requested != str(rule):
        info["intensity_requested"] = requested
    if rule.name == "dtype":
        if x.dtype == bool:
            y = x.astype(np.float32)
        elif np.issubdtype(x.dtype, np.integer):
            lo, hi = np.iinfo(x.dtype).min, np.iinfo(x.dtype).max
            y = x.astype(_working_dtype(x))
            y -= lo  # in place: a large image is held at most twice (its pixels and one float copy)
            y /= hi - lo
        else:
            raise ConfigError(f"{source}: intensity rule 'dtype' needs integer pixels, but this image holds "
                              f"{x.dtype} values; use minmax, window:C,W or percentile:LO,HI")
    else:
        x = x.astype(_working_dtype(x))
        finite = np.isfinite(x)
        if not finite.all():
            info["nonfinite_pixels"] = int((~finite).sum())
            x = np.where(finite, x, x[finite].min() if finite.any() else 0.0)
        if rule.name == "unit":
            if x.min() < 0 or x.max() > 1:
                raise ConfigError(f"{source}: intensity rule 'unit' needs values in [0, 1], found "
                                  f"{x.min():g}..{x.max():g}; use minmax or window:C,W")
            y = x
        elif rule.name == "minmax":
            y = _linear(x, x.min(), x.max())
        else:
            lo, hi = _window_bounds(rule, x, raw, source)
            y = _linear(x, lo, hi)
            info["clipped_fraction"] = float(((y < 0) | (y > 1)).mean())
            info["window"] = (float(lo), float(hi))
            y = np.clip(y, 0.0, 1.0)
    if raw.meta.get("photometric") == "MONOCHROME1":  # DICOM: low values are bright; invert after windowing
        y = 1.0 - y
        info["inverted"] = True
    return y.astype(np.float32), info


def _working_dtype(x: np.ndarray) -> type:
    """float32 for pixels it holds exactly (8/16-bit integers, half and single floats), else float64: a
    100-megapixel 8-bit image then needs 400 MB in between, not 800 MB."""
    return np.float32 if x.dtype.itemsize <= 2 or x.dtype == np.float32 else np.float64


def _window_bounds(rule: IntensityRule, x: np.ndarray, raw: RawImage, source: str) -> tuple[float, float]:
    if rule.name == "percentile":
        lo, hi = np.percentile(x, rule.params)
        return float(lo), float(hi)
    if rule.params:
        center, width = rule.params
    elif "window_center" in raw.meta and raw.meta.get("window_width", 0) > 0:
        center, width = raw.meta["window_center"], raw.meta["window_width"]
    else:
        raise ConfigError(f"{source}: intensity rule 'window' needs WindowCenter/WindowWidth in the file, "
                          f"which it lacks; give them as window:CENTER,WIDTH")
    return center - width / 2, center + width / 2


def _linear(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:  # constant image: nothing to stretch
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)
