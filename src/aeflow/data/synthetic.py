"""Built-in synthetic data set: brain-slice-like phantoms with lesion anomalies and pixel masks.

Made on the fly with numpy (a 64 x 64 phantom takes about a millisecond) and fully determined by
(seed, index, size, difficulty, anomaly), so every test and demo runs offline with exact ground truth and
nothing is ever written as image files.

A phantom is one subject: skull ring, a thin CSF gap, brain tissue with a folded grey/white boundary and
smooth texture, two ventricles, a bias field and pixel noise. Subjects differ in head size and shape,
rotation, position, tissue intensities and ventricle size. An anomalous phantom is the same subject plus
one or two lesions inside the brain: irregular blobs of random size, elongation, orientation and position,
brighter ("bright_lesion") or darker ("dark_lesion") than the tissue. `difficulty` in [0, 1] makes lesions
smaller and lower in contrast as it rises (at 1 their contrast is about the tissue texture's).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.ndimage import gaussian_filter

from aeflow.data.sources import SYNTHETIC_PREFIX, RawImage, join_source, split_source
from aeflow.errors import BadFileError, ConfigError

ANOMALY_TYPES = ("bright_lesion", "dark_lesion")
NORMAL = "good"
#: Bumped whenever the generator's output changes; every synthetic source names the version it needs.
GENERATOR_VERSION = 1


def phantom_source(seed: int, index: int, size: int, difficulty: float, anomaly: str, *, mask: bool = False) -> str:
    """The source string a synthetic record carries (its mask is the same with 'mask' for 'phantom').

    It pins the generator version, so a saved split list never silently yields different images."""
    return join_source(SYNTHETIC_PREFIX + ("mask" if mask else "phantom"), seed=seed, index=index, size=size,
                       difficulty=f"{difficulty:g}", anomaly=anomaly, version=GENERATOR_VERSION)


def read_synthetic(source: str) -> RawImage:
    """RawImage for a phantom_source() string: the phantom (float in [0, 1]) or its mask (bool)."""
    what, options = split_source(source)
    if options.get("version") != str(GENERATOR_VERSION):
        raise BadFileError(source, f"made by synthetic generator version {options.get('version')}; this aeflow "
                                   f"has version {GENERATOR_VERSION}, so the images would differ")
    try:
        image, mask = make_phantom(int(options["seed"]), int(options["index"]), size=int(options["size"]),
                                   difficulty=float(options["difficulty"]), anomaly=options["anomaly"])
    except (KeyError, ValueError, ConfigError) as exc:
        raise BadFileError(source, f"not a valid synthetic source: {exc}") from exc
    if what == SYNTHETIC_PREFIX + "mask":
        return RawImage(mask, {"format": "synthetic", "generator_version": GENERATOR_VERSION})
    if what != SYNTHETIC_PREFIX + "phantom":
        raise BadFileError(source, "synthetic sources are 'synthetic:phantom#...' or 'synthetic:mask#...'")
    return RawImage(image, {"format": "synthetic", "generator_version": GENERATOR_VERSION})


@functools.lru_cache(maxsize=512)
def make_phantom(seed: int, index: int, *, size: int = 64, difficulty: float = 0.5,
                 anomaly: str = NORMAL) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 size x size in [0, 1], mask bool size x size), deterministic in all arguments.

    The subject depends on (seed, index) only, so the same subject can be drawn with or without a lesion.
    The arrays are cached and shared: treat them as read-only.
    """
    if anomaly not in (NORMAL, *ANOMALY_TYPES):
        raise ConfigError(f"synthetic anomaly must be one of {(NORMAL, *ANOMALY_TYPES)}, got {anomaly!r}")
    if not 0.0 <= difficulty <= 1.0:
        raise ConfigError(f"synthetic difficulty must be in [0, 1], got {difficulty}")
    if size < 16:
        raise ConfigError(f"synthetic size must be at least 16 pixels, got {size}")
    subject = np.random.default_rng([seed, index, 0])
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size * 2.0 - 1.0  # pixel centres in [-1, 1]
    pixel = 2.0 / size

    # Head: a rotated, shifted ellipse; skull ring and CSF gap are shells inside it.
    angle = subject.uniform(-0.35, 0.35)
    cy, cx = subject.uniform(-0.05, 0.05, size=2)
    u, v = _rotate(x - cx, y - cy, angle)
    semi = np.array([subject.uniform(0.68, 0.82), subject.uniform(0.80, 0.93)])  # (x, y) semi-axes
    radius = np.hypot(u / semi[0], v / semi[1])  # 1 on the head outline
    skull = subject.uniform(0.07, 0.11)
    head = _soft(1.0 - radius, pixel)
    inside_skull = _soft(1.0 - skull - radius, pixel)
    brain = _soft(1.0 - skull - 0.035 - radius, pixel)

    # Folded grey/white boundary: the white-matter radius wobbles with a few random harmonics.
    theta = np.arctan2(v / semi[1], u / semi[0])
    fold = sum(subject.uniform(0.02, 0.06) * np.cos(k * theta + subject.uniform(0, 2 * np.pi)) for k in (5, 7, 11))
    white = _soft(subject.uniform(0.55, 0.68) + fold - radius, pixel) * brain

    # Ventricles: two mirrored tilted ellipses near the midline.
    ventricles = np.zeros_like(x)
    v_len, v_wid = subject.uniform(0.14, 0.26), subject.uniform(0.05, 0.09)
    v_off, v_tilt = subject.uniform(0.06, 0.11), subject.uniform(0.2, 0.5)
    for side in (-1.0, 1.0):
        vu, vv = _rotate(u - side * v_off, v + 0.05, side * v_tilt)
        ventricles = np.maximum(ventricles, _soft(1.0 - np.hypot(vu / v_wid, vv / v_len), pixel / v_wid))

    grey_level, white_level = subject.uniform(0.42, 0.52), subject.uniform(0.58, 0.68)
    texture = gaussian_filter(subject.normal(size=(size, size)), sigma=max(size / 40, 0.8))
    texture *= 0.05 / (texture.std() + 1e-12)
    tissue = (grey_level + (white_level - grey_level) * white + texture) * brain
    tissue = tissue * (1 - ventricles) + subject.uniform(0.12, 0.2) * ventricles * brain
    image = tissue + subject.uniform(0.85, 0.95) * (head - inside_skull) + 0.08 * (inside_skull - brain)
    bias = 1.0 + subject.uniform(-0.08, 0.08) * x + subject.uniform(-0.08, 0.08) * y
    image = image * bias * subject.uniform(0.9, 1.05) + subject.normal(0.0, 0.015, size=(size, size))

    mask = np.zeros((size, size), dtype=bool)
    if anomaly != NORMAL:
        lesion_rng = np.random.default_rng([seed, index, 1])
        allowed = (brain > 0.99) & (ventricles < 0.01)
        sign = 1.0 if anomaly == "bright_lesion" else -1.0
        for _ in range(1 if lesion_rng.random() < 0.75 else 2):
            profile = _lesion(lesion_rng, x, y, allowed, difficulty, pixel)
            contrast = lesion_rng.uniform(0.20 - 0.13 * difficulty, 0.45 - 0.30 * difficulty)
            image = image + sign * contrast * profile
            mask |= profile > 0.5
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    image.flags.writeable = mask.flags.writeable = False  # cached and shared between callers
    return image, mask


def _lesion(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, allowed: np.ndarray, difficulty: float,
            pixel: float) -> np.ndarray:
    """Soft profile (peak 1) of an irregular blob centred on an allowed pixel and kept inside the brain."""
    rows, cols = np.nonzero(allowed)
    pick = rng.integers(len(rows))
    cy, cx = y[rows[pick], cols[pick]], x[rows[pick], cols[pick]]
    # Radius in image half-widths; never below ~1.5 pixels so that every lesion has a non-empty mask.
    radius = max(rng.uniform(0.07 - 0.03 * difficulty, 0.20 - 0.10 * difficulty), 1.5 * pixel)
    elongation = rng.uniform(1.0, 2.2)
    u, v = _rotate(x - cx, y - cy, rng.uniform(0, np.pi))
    r = np.hypot(u * np.sqrt(elongation), v / np.sqrt(elongation)) / radius
    theta = np.arctan2(v, u)
    wobble = 1.0 + sum(rng.uniform(0.0, 0.25) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    profile = _soft(wobble - r, pixel / radius)
    return profile * allowed


def _rotate(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * u + s * v, -s * u + c * v


def _soft(signed_distance: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased inside indicator: 1 inside, 0 outside, a linear ramp about one pixel wide at the edge."""
    return np.clip(signed_distance / edge + 0.5, 0.0, 1.0)
