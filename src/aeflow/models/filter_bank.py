"""Filter-bank energy detector: local energies of a fixed bank of linear filters, modelled per position on normal
images. The classical texture-analysis route (Laws' texture energy, Laws 1980; Gabor filter banks, Jain &
Farrokhnia, Pattern Recognition 1991; wavelet sub-band energies, Unser, IEEE TIP 1995), which surveys of visual
anomaly detection list among the "traditional methods" that precede deep features.

Nothing is trained. Every image (channels averaged to grey) goes through a bank of filters:

- Sobel derivatives in x and y (edges, by orientation),
- the 3 x 3 Laplacian (blobs, fine detail),
- complex Gabor filters at `gabor_frequencies` (cycles per pixel) and `gabor_orientations` angles in [0, pi)
  (kernels from scikit-image; the energy of one filter is real^2 + imaginary^2, so it does not depend on the
  phase of the texture under it),
- the three detail bands (horizontal, vertical, diagonal) of an undecimated (stationary, "a trous") wavelet
  transform at `wavelet_levels` scales, with the filters of PyWavelets' `wavelet` (undecimated so that every band
  keeps the image's resolution and gives a per-pixel energy),
- `fourier_bands` octave-wide annuli of radial frequency (the highest band reaches the corners of the spectrum),
  each a band-pass filtered image made with the FFT (periodic at the image border; the extra border energy this
  gives is the same for every image and so is absorbed by the per-position model).

Local energy: each response squared (summed over the real and imaginary parts of a Gabor pair), smoothed with a
Gaussian of `energy_sigma` pixels, and taken in log (energies span orders of magnitude; their logs are close to
Gaussian, and a texture half as strong is as far from normal as one twice as strong). Per position (i, j) and
filter channel c the normal images give the mean and variance of the log energy: a diagonal Gaussian per
position over the filter channels (the filters overlap in frequency, so the channels are correlated; a full
covariance per position like PaDiM's would cost C^2 per pixel for little gain at C ~ 20). `epsilon` is a variance
floor in log units (0.01: a standard deviation of 0.1, about a 10% energy change), needed where a region has no
texture at all in the normal images (a black border).

Map and score: the anomaly map is the root-mean-square z-score over the channels, Gaussian-smoothed with
`blur_sigma`. The image score (`score`) is its maximum ("max", the default: lesions and defects are local, and
the mean of the map would dilute a small one by its share of the image) or its mean ("mean": global changes
such as a haze over the whole image, which no single position shows strongly); both are returned as
`score_max` and `score_mean`. Positions are fixed by the training size, so test images must have it (and be
roughly aligned, as with PaDiM).
"""

from __future__ import annotations

import math

import numpy as np
import pywt
import torch
import torch.nn.functional as F
from skimage.filters import gabor_kernel

from aeflow.errors import AeflowError, ConfigError, DataError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import Moments, adopt_buffer_shapes, gaussian_blur

SCORES = ("max", "mean")
ENERGY_FLOOR = 1e-8  # added before the log: a flat region has zero energy (images are in [0, 1])

SOBEL_X = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def swt_kernels(wavelet: str, levels: int) -> list[np.ndarray]:
    """The 2-D kernels of the detail bands of an undecimated wavelet transform, 3 per level (finest first).

    Level l convolves the level l-1 low-pass chain with the wavelet's filters dilated by 2^(l-1) (the "a trous"
    algorithm, Shensa 1992), so each band of each level is one linear filter of the image."""
    w = pywt.Wavelet(wavelet)
    lo, hi = np.asarray(w.dec_lo), np.asarray(w.dec_hi)
    chain, kernels = np.ones(1), []
    for level in range(levels):
        step = 2**level

        def dilated(f):
            out = np.zeros((len(f) - 1) * step + 1)
            out[::step] = f
            return np.convolve(chain, out)

        low, high = dilated(lo), dilated(hi)
        kernels += [np.outer(high, low), np.outer(low, high), np.outer(high, high)]
        chain = low
    return kernels


def octave_band_masks(height: int, width: int, bands: int) -> torch.Tensor:
    """bands x H x (W // 2 + 1) masks of the rfft2 spectrum: annuli of radial frequency [0.5 / 2^(b+1),
    0.5 / 2^b) cycles per pixel, the highest (b = 0) open above so that it includes the spectrum's corners."""
    fy = torch.fft.fftfreq(height).abs()[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    radius = (fy**2 + fx**2).sqrt()
    masks = []
    for b in range(bands):
        low, high = 0.5 / 2 ** (b + 1), (math.inf if b == 0 else 0.5 / 2**b)
        masks.append((radius >= low) & (radius < high))
    return torch.stack(masks[::-1]).float()  # coarsest first


@register("filter_bank")
class FilterBank(AnomalyModel):
    """Per-position diagonal Gaussian of log local filter energies (see the module docstring).

    gabor_frequencies: cycles per pixel (each < 0.5). gabor_orientations: angles per frequency. wavelet: a
    PyWavelets discrete wavelet name. wavelet_levels, fourier_bands: scales of each. energy_sigma: smoothing of
    the squared responses in pixels. epsilon: log-energy variance floor. blur_sigma: smoothing of the z map.
    score: "max" or "mean" of the map.
    """

    trained_by_gradient = False

    def __init__(self, gabor_frequencies: tuple[float, ...] = (0.125, 0.25), gabor_orientations: int = 4,
                 wavelet: str = "db2", wavelet_levels: int = 2, fourier_bands: int = 4, energy_sigma: float = 2.0,
                 epsilon: float = 0.01, blur_sigma: float = 2.0, score: str = "max"):
        super().__init__()
        if not all(0 < f < 0.5 for f in gabor_frequencies):
            raise ConfigError(f"gabor_frequencies must be in (0, 0.5) cycles per pixel; got {gabor_frequencies}")
        if gabor_orientations < 1 and gabor_frequencies:
            raise ConfigError(f"gabor_orientations must be >= 1; got {gabor_orientations}")
        if wavelet not in pywt.wavelist(kind="discrete"):
            raise ConfigError(f"wavelet must be a discrete PyWavelets wavelet (pywt.wavelist(kind='discrete')); "
                              f"got {wavelet!r}")
        if wavelet_levels < 0 or fourier_bands < 0:
            raise ConfigError(f"wavelet_levels and fourier_bands must be >= 0; got {wavelet_levels}, {fourier_bands}")
        if energy_sigma <= 0 or blur_sigma < 0 or epsilon <= 0:
            raise ConfigError(f"energy_sigma and epsilon must be > 0 and blur_sigma >= 0; got {energy_sigma}, "
                              f"{epsilon}, {blur_sigma}")
        if score not in SCORES:
            raise ConfigError(f"score must be one of {', '.join(SCORES)}; got {score!r}")
        # Each energy channel is a group of spatial kernels whose squared responses add up.
        groups = [[SOBEL_X], [SOBEL_X.T], [LAPLACIAN]]
        for frequency in gabor_frequencies:
            for k in range(gabor_orientations):
                kernel = gabor_kernel(frequency, theta=math.pi * k / gabor_orientations)
                groups.append([kernel.real, kernel.imag])
        groups += [[kernel] for kernel in swt_kernels(wavelet, wavelet_levels)]
        self.groups = [[torch.tensor(k, dtype=torch.float32) for k in group] for group in groups]
        self.register_buffer("energy_mean", torch.empty(0))  # C x H x W, filled by fit()
        self.register_buffer("energy_std", torch.empty(0))  # C x H x W, epsilon included

    def energies(self, images: torch.Tensor) -> torch.Tensor:
        """B x C x H x W log local energies of the grey image under every filter of the bank."""
        gray = images.mean(1, keepdim=True)
        h, w = gray.shape[-2:]
        squared = []
        for group in self.groups:
            total = 0
            for kernel in group:
                kh, kw = kernel.shape
                if kh > h or kw > w:
                    raise DataError(f"a {kh}x{kw} filter of the bank does not fit {h}x{w} images; use higher "
                                    "gabor_frequencies or fewer wavelet_levels")
                top, left = (kh - 1) // 2, (kw - 1) // 2
                padded = F.pad(gray, (left, kw - 1 - left, top, kh - 1 - top), mode="reflect")
                total = total + F.conv2d(padded, kernel.to(gray)[None, None]).pow(2)
            squared.append(total)
        bands = self._config["fourier_bands"]
        if bands:
            spectrum = torch.fft.rfft2(gray)
            masks = octave_band_masks(h, w, bands).to(gray.device)
            squared.append(torch.fft.irfft2(spectrum * masks, s=(h, w)).pow(2))
        energy = torch.cat(squared, 1)
        local = gaussian_blur(energy.flatten(0, 1), self._config["energy_sigma"]).view_as(energy)
        return (local.clamp_min(0) + ENERGY_FLOOR).log()

    @torch.no_grad()
    def fit(self, loader) -> None:
        """One pass over normal images: per-position, per-channel moments of the log energies."""
        moments, device = Moments(), self.energy_mean.device
        for batch in loader:
            moments.add(self.energies(batch.image.to(device)))
        if moments.count < 2:
            raise DataError(f"the filter-bank model needs at least 2 training images; got {moments.count}")
        mean, std = moments.mean_std()
        self.energy_mean, self.energy_std = mean, (std.pow(2) + self._config["epsilon"]).sqrt()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_buffer_shapes(self, state_dict, prefix, ("energy_mean", "energy_std"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.energy_mean.numel() == 0:
            raise AeflowError("the filter-bank model has not been fitted: call fit(loader) on normal images first")
        if self.energy_mean.shape[-2:] != images.shape[-2:]:
            raise DataError(f"the filter-bank model was fitted on {tuple(self.energy_mean.shape[-2:])} images but "
                            f"these are {tuple(images.shape[-2:])}; score images of the training size")
        z = (self.energies(images) - self.energy_mean) / self.energy_std
        anomaly_map = gaussian_blur(z.pow(2).mean(1).sqrt(), self._config["blur_sigma"])
        scores = {"score_max": anomaly_map.flatten(1).amax(1), "score_mean": anomaly_map.flatten(1).mean(1)}
        return {"pred_score": scores[f"score_{self._config['score']}"], "anomaly_map": anomaly_map, **scores}
