"""The tessera scale of a mosaic image, measured without segmenting it.

Tesserae are laid with a fairly regular pitch: the grout network repeats about every tessera,
in rows (opus tessellatum) or in a jittered honeycomb (irregular work), in whatever direction
the rows run. The estimate is the dominant period of that network:

1. *Edge image*: the colour gradient magnitude (no pre-blur) plus the thin-line (Hessian) strength
   at 0.7 px, on Lab, each normalised by its median and compressed by ``log1p``, so that a few
   very strong edges (glossy highlights, dark-light tile pairs) do not dominate the statistics.
   Both sides of every grout line, and the line itself, light up; tile texture gives fine-grained
   noise, a design's colour areas give edges far apart.
2. *Radial autocorrelation*: the autocorrelation of the edge image (FFT, normalised by the overlap
   of the shifted copies), averaged over directions, so it does not matter which way rows run.
   It falls from 1 at lag 0 and rises again at the lag where one grout line lands on the next.
3. *Dominant period*: the most prominent local maximum of that profile (on a log-lag axis,
   lightly smoothed), between 4 px and a fifth of the analysed window: texture and noise only
   shape the profile at lags of a pixel or two, highlights at a fraction of a tessera, and a
   design's colour areas give broad, weak bumps at many tesserae. A clear peak at half the
   winner's lag is taken instead (the winner was the second harmonic).
4. *Equivalent diameter*: the period is a tessera plus a grout line; the median equivalent
   diameter of the tesserae is PERIOD_TO_DIAMETER times it (calibrated on synthetic mosaics of
   known size, clean and photographic, and a real photograph: 0.85-1.2 across them, 0.91 on
   the photograph).

The window is the central ``WINDOW`` x ``WINDOW`` pixels; a larger image is also measured at
half resolution over twice the window (large tesserae), and the more prominent period wins.
Cost: about 0.2-0.5 s on one core, independent of the image size.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import find_peaks

from .errors import MosaicError

WINDOW = 1024  # side of the analysed central window (px)
MIN_PERIOD = 4.0  # px: smaller tesserae cannot be told from noise
MAX_PERIODS_ACROSS = 5  # the window must hold at least this many periods across
PERIOD_TO_DIAMETER = 0.95  # median equivalent tessera diameter per grout-network period
HARMONIC_SHARE = 0.4  # a peak at half the lag this prominent (relative) is the fundamental
FALLBACK_FRACTION = 0.05  # no periodic structure at all: a twentieth of the shorter side
_LOG_STEP = 0.02  # resolution of the log-lag axis (2 %)
_SMOOTH = 2.0  # Gaussian smoothing of the profile, in log-lag steps


@dataclass(frozen=True)
class ScaleEstimate:
    """The tessera scale of an image and how clearly the image showed it."""

    diameter: float  # median equivalent tessera diameter (px)
    period: float  # dominant period of the grout network (px)
    prominence: float  # height of the autocorrelation peak over its surroundings (0..1)
    found: bool  # False: no periodic structure; ``diameter`` is a fallback guess


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise MosaicError(
            f"tessera scale: expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}"
        )
    if min(image.shape[:2]) < 16:
        raise MosaicError(
            f"tessera scale: image {image.shape[1]}x{image.shape[0]} is too small (min 16x16)"
        )
    return np.ascontiguousarray(image[..., :3])


def edge_image(image: np.ndarray) -> np.ndarray:
    """Log-compressed gradient plus thin-line strength of an RGB uint8 image (float32)."""
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    grad = np.zeros(lab.shape[:2], np.float32)
    ridge = np.zeros(lab.shape[:2], np.float32)
    smooth = cv2.GaussianBlur(lab, (0, 0), 0.7, borderType=cv2.BORDER_REFLECT)
    for c in range(3):
        gx = cv2.Scharr(lab[..., c], cv2.CV_32F, 1, 0, borderType=cv2.BORDER_REFLECT)
        gy = cv2.Scharr(lab[..., c], cv2.CV_32F, 0, 1, borderType=cv2.BORDER_REFLECT)
        grad += gx * gx + gy * gy
        ch = smooth[..., c]
        dxx = cv2.Sobel(ch, cv2.CV_32F, 2, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
        dyy = cv2.Sobel(ch, cv2.CV_32F, 0, 2, ksize=3, borderType=cv2.BORDER_REFLECT)
        dxy = cv2.Sobel(ch, cv2.CV_32F, 1, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
        lam = np.abs(dxx + dyy) * 0.5 + np.sqrt(((dxx - dyy) * 0.5) ** 2 + dxy * dxy)
        ridge += lam * lam
    out = np.zeros(lab.shape[:2], np.float32)
    for m in (np.sqrt(grad), np.sqrt(ridge)):
        out += np.log1p(m / (float(np.median(m)) + 1e-6))
    return out


def radial_autocorrelation(feature: np.ndarray, max_lag: int) -> np.ndarray:
    """Direction-averaged autocorrelation of ``feature`` at integer lags 0..max_lag (1 at 0)."""
    f = feature.astype(np.float64) - float(feature.mean())
    h, w = f.shape
    shape = (2 * h, 2 * w)
    ac = np.fft.irfft2(np.abs(np.fft.rfft2(f, s=shape)) ** 2, s=shape)
    ones = np.fft.rfft2(np.ones_like(f), s=shape)
    overlap = np.fft.irfft2(np.abs(ones) ** 2, s=shape)
    ac = np.fft.fftshift(ac / np.maximum(overlap, 1.0))
    yy, xx = np.indices(shape)
    r = np.hypot(yy - h, xx - w)
    sel = r <= max_lag
    lag = np.rint(r[sel]).astype(np.int64)
    prof = np.bincount(lag, ac[sel], minlength=max_lag + 1) / np.maximum(
        np.bincount(lag, minlength=max_lag + 1), 1
    )
    return prof / prof[0] if prof[0] > 0 else prof


def _dominant_period(image: np.ndarray) -> tuple[float, float]:
    """(period px, prominence) of the grout network in ``image``; (0, 0) when there is none."""
    h, w = image.shape[:2]
    max_lag = min(h, w) // 2
    hi = min(h, w) / MAX_PERIODS_ACROSS
    if hi <= MIN_PERIOD:
        return 0.0, 0.0
    prof = radial_autocorrelation(edge_image(image), max_lag)
    lags = np.exp(np.arange(np.log(3.0), np.log(max_lag - 1), _LOG_STEP))
    curve = gaussian_filter1d(np.interp(lags, np.arange(len(prof)), prof), _SMOOTH)
    peaks, props = find_peaks(curve, prominence=0)
    keep = (lags[peaks] >= MIN_PERIOD) & (lags[peaks] <= hi)
    if not keep.any():
        return 0.0, 0.0
    peaks, prominence = peaks[keep], props["prominences"][keep]
    best = int(np.argmax(prominence))
    # A lattice also correlates at twice its period: a clear peak at half the winner's lag is
    # the fundamental (texture can blur the first peak more than the second).
    half = np.abs(lags[peaks] / lags[peaks[best]] - 0.5) < 0.07
    half &= prominence >= HARMONIC_SHARE * prominence[best]
    if half.any():
        best = int(np.flatnonzero(half)[np.argmax(prominence[half])])
    return float(lags[peaks[best]]), float(prominence[best])


def _centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return image[top:top + side, left:left + side]


def estimate_scale(image: np.ndarray) -> ScaleEstimate:
    """The tessera scale of an RGB uint8 image (module docstring)."""
    image = _as_rgb(image)
    h, w = image.shape[:2]
    candidates = [_dominant_period(_centre_crop(image, WINDOW))]
    if min(h, w) > WINDOW:
        wide = _centre_crop(image, 2 * WINDOW)
        half = cv2.resize(wide, (wide.shape[1] // 2, wide.shape[0] // 2),
                          interpolation=cv2.INTER_AREA)
        period, prominence = _dominant_period(half)
        candidates.append((2 * period, prominence))
    period, prominence = max(candidates, key=lambda c: c[1])
    if period <= 0:
        guess = max(MIN_PERIOD, FALLBACK_FRACTION * min(h, w))
        return ScaleEstimate(guess, guess / PERIOD_TO_DIAMETER, 0.0, False)
    return ScaleEstimate(PERIOD_TO_DIAMETER * period, period, prominence, True)


def estimate_tessera_size(image: np.ndarray) -> float:
    """Median equivalent tessera diameter (px) of an RGB uint8 image, from its grout period."""
    return estimate_scale(image).diameter
