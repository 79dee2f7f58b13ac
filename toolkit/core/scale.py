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

*A second opinion: the lattice in the power spectrum.* The autocorrelation's most prominent
peak is not always the grout's: a design of bands and borders a few tesserae wide, a weathered
surface whose grout is tight and barely darker than the stone, or tesserae of 4-10 px (a whole
panel photographed at once) leave the grout peak weak or absent, and a design-sized period or
nothing wins (then the old fallback, a twentieth of the image side, gave figure-sized
"tesserae" in silence). The grout lattice is the *finest* periodic structure of a mosaic: a
design is built of tesserae and repeats more slowly. So the radially averaged power spectrum
of the same edge image (Hann window; JPEG's 8/16-px block grid notched out) is whitened (its
smooth trend removed on a log-frequency axis) and its peaks listed (``spectral_peaks``); a
*lattice* is the finest peak at least so prominent that is not the 2nd harmonic of a coarser,
stronger one (``_lattice``). Then, in ``estimate_scale``:

* a *clear* autocorrelation peak (``AC_CLEAR``) is kept (*agreed* when the spectrum has a
  significant peak within ``AGREE``, confidence up to 1; else *autocorrelation*, at most 0.5),
  unless the spectrum shows a much finer lattice that is strong (``SPECTRAL_STRONG``,
  ``FINER_SHARE`` of the spectral peak at the period), not its 2nd/3rd harmonic, while the
  period shows no lattice regularity (an autocorrelation peak at twice it, or spectral peaks
  at its 2nd/3rd harmonic; design bands have neither): then the period was a design's and the
  finer lattice replaces it (*spectrum*, at most 0.5);
* with *no clear* autocorrelation peak, the finest significant spectral lattice
  (``SPECTRAL_SIGNIFICANCE``) is used (*spectrum*, at most 0.5). When not even a faint
  autocorrelation peak (``AC_FAINT``) sits at it, a significant peak that one does confirm
  is taken instead when the finer one has under ``FINER_SHARE`` of its strength; else a finer weak lattice (``SPECTRAL_WEAK``, e.g. 4-6
  px tesserae, at least ``FINER_SHARE`` as strong) is preferred to it, and a period of
  ``CREDIBLE_UNSEEN`` px or more with nothing finer is a design's (tesserae that large always
  show in the autocorrelation): *unresolved*, which counts as too coarse;
* no spectral lattice: the faint autocorrelation period, if any (*autocorrelation*).

The spectrum is only used on windows of ``MIN_SPECTRAL_SIDE`` px or more.

``ScaleEstimate.confidence`` (0-1) says how sure the estimate is, ``alternatives`` lists the
periods both methods considered, and ``coarse`` says that the tesserae measure under
``RESOLVABLE_DIAMETER`` px: too few pixels per tessera to segment them one by one (the
engines' callers then return a warning and no regions, ``coarse_message``).
Cost: about 0.2-0.5 s on one core, independent of the image size.
"""
from __future__ import annotations

import math
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
RESOLVABLE_DIAMETER = 6.0  # px: smaller tesserae are too coarse to segment one by one
TARGET_DIAMETER = 10.0  # px: the size a too-coarse photograph should be retaken at, at least
SPECTRAL_SIGNIFICANCE = 0.45  # whitened log-power prominence of a lattice peak (noise: < 0.4)
SPECTRAL_WEAK = 0.3  # a fine peak this prominent still speaks for unresolved tesserae
SPECTRAL_STRONG = 1.0  # a lattice peak this prominent is unmistakable (confidence 1)
FINER_SHARE = 0.5  # a finer lattice replaces a coarser one when at least this share as strong
SPECTRAL_TO_DIAMETER = PERIOD_TO_DIAMETER  # the same for the spectrum's period (0.94 measured)
AGREE = 0.25  # the two methods see the same period when their log ratio is under this
AC_CLEAR = 0.03  # an autocorrelation peak this prominent is a clear periodic structure
AC_FAINT = 0.006  # ... and this prominent, a faint one (supports a spectral period near it)
CREDIBLE_UNSEEN = 8 * RESOLVABLE_DIAMETER  # px: larger periods need an autocorrelation peak
UNCONFIRMED = 0.5  # confidence factor of a period only one method found
MIN_SPECTRAL_SIDE = 128  # px: a smaller window has too few frequencies for the spectrum's trend
_LOG_STEP = 0.02  # resolution of the log-lag axis (2 %)
_SPECTRAL_STEP = 0.04  # resolution of the spectrum's log-frequency axis (4 %)
_SPECTRAL_TREND = 8.0  # smoothing (in bins) of the trend removed from the log spectrum
_JPEG_BLOCK = 16  # px: JPEG's block grid (8 px; 16 px for subsampled colour), notched out
_SMOOTH = 2.0  # Gaussian smoothing of the profile, in log-lag steps


@dataclass(frozen=True)
class ScaleEstimate:
    """The tessera scale of an image and how clearly the image showed it."""

    diameter: float  # median equivalent tessera diameter (px)
    period: float  # dominant period of the grout network (px)
    prominence: float  # height of the autocorrelation peak over its surroundings (0..1)
    found: bool  # False: no periodic structure; ``diameter`` is a fallback guess
    confidence: float = 0.0  # 0 (a guess) .. 1 (both methods agree on a clear lattice)
    method: str = "none"  # "agreed", "spectrum" (replaced the autocorrelation's), "autocorrelation",
    # "unresolved" (a design's period only: tesserae not resolved), "none" (nothing periodic)
    alternatives: tuple = ()  # (source, period px, prominence) of every candidate considered

    @property
    def coarse(self) -> bool:
        """The tesserae are too small (in pixels) to segment one by one: measured under
        RESOLVABLE_DIAMETER, or not resolved at all (only a design's period was seen)."""
        return self.found and (self.diameter < RESOLVABLE_DIAMETER or self.method == "unresolved")

    @property
    def ambiguous(self) -> bool:
        """The estimate is a weak or contested one (check it, or give the size): the two
        measurements did not agree on it, or only weakly."""
        return self.method != "agreed" or self.confidence < 0.5

    def warning(self) -> str | None:
        """A one-line warning for the user, or None when the estimate is usable as it is."""
        if self.method == "unresolved":
            return (f"no tessera lattice resolved (only a design's period of {self.period:.0f} px, "
                    "no grout network): too coarse to segment tesserae (probably under "
                    f"{RESOLVABLE_DIAMETER:g} px), or their grout too faint to measure; not "
                    "segmented. Photograph at a higher resolution or segment closer crops, or "
                    "give --tessera-size if you know the size")
        if self.coarse:
            return coarse_message(self.diameter)
        if not self.found:
            return ("no tessera lattice found (no periodic grout network between "
                    f"{MIN_PERIOD:g} px and a fifth of the image): the tessera size "
                    f"{self.diameter:.1f} px is a guess; give it with --tessera-size")
        if self.ambiguous:
            others = sorted({round(p) for s, p, _ in self.alternatives
                             if abs(p / self.period - 1) > AGREE})
            seen = f" (other periods seen: {', '.join(f'{p} px' for p in others[:4])})" if others else ""
            return (f"tessera size {self.diameter:.1f} px is uncertain (confidence "
                    f"{self.confidence:.2f}){seen}; check the overlay or give --tessera-size")
        return None

    def to_json(self) -> dict:
        """The estimate as recorded in segment.json and reported by the backend."""
        return {
            "diameter_px": round(float(self.diameter), 2),
            "period_px": round(float(self.period), 2),
            "confidence": round(float(self.confidence), 3),
            "method": self.method,
            "found": bool(self.found),
            "coarse": bool(self.coarse),
            "alternatives": [
                {"source": s, "period_px": round(float(p), 2), "prominence": round(float(q), 3)}
                for s, p, q in self.alternatives
            ],
        }


def coarse_message(diameter: float) -> str:
    """What to tell a user whose photograph has tesserae of ``diameter`` px (too coarse)."""
    factor = math.ceil(2 * TARGET_DIAMETER / max(diameter, 1.0)) / 2
    return (f"tesserae ~{diameter:.0f} px: too coarse to segment tesserae one by one (under "
            f"{RESOLVABLE_DIAMETER:g} px); photograph at >= {factor:g}x this resolution "
            f"(tesserae of {TARGET_DIAMETER:g} px or more), or segment closer crops")


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


def _dominant_period(image: np.ndarray, edges: np.ndarray | None = None
                     ) -> tuple[float, float, list[tuple[float, float]]]:
    """(period px, prominence, all peaks as (period, prominence)) of the grout network's
    autocorrelation in ``image``; period 0 when there is none."""
    h, w = image.shape[:2]
    max_lag = min(h, w) // 2
    hi = min(h, w) / MAX_PERIODS_ACROSS
    if hi <= MIN_PERIOD:
        return 0.0, 0.0, []
    prof = radial_autocorrelation(edge_image(image) if edges is None else edges, max_lag)
    lags = np.exp(np.arange(np.log(3.0), np.log(max_lag - 1), _LOG_STEP))
    curve = gaussian_filter1d(np.interp(lags, np.arange(len(prof)), prof), _SMOOTH)
    peaks, props = find_peaks(curve, prominence=0)
    keep = (lags[peaks] >= MIN_PERIOD) & (lags[peaks] <= hi)
    if not keep.any():
        return 0.0, 0.0, []
    peaks, prominence = peaks[keep], props["prominences"][keep]
    best = int(np.argmax(prominence))
    # A lattice also correlates at twice its period: a clear peak at half the winner's lag is
    # the fundamental (texture can blur the first peak more than the second).
    half = np.abs(lags[peaks] / lags[peaks[best]] - 0.5) < 0.07
    half &= prominence >= HARMONIC_SHARE * prominence[best]
    if half.any():
        best = int(np.flatnonzero(half)[np.argmax(prominence[half])])
    found = [(float(lags[k]), float(q)) for k, q in zip(peaks, prominence)]
    return float(lags[peaks[best]]), float(prominence[best]), found


def spectral_peaks(edges: np.ndarray) -> list[tuple[float, float]]:
    """Peaks (period px, prominence) of the whitened, radially averaged power spectrum of an
    edge image, between MIN_PERIOD and a fifth of its shorter side, strongest first.

    Whitened: the log power per log-frequency bin minus its smooth trend, so a peak's
    prominence is a ratio (0.7 = the lattice's frequencies carry twice the power of their
    neighbours). The frequencies of JPEG's 8-px block grid (k/8 cycles per px along either
    axis) are left out: compression puts power there whatever the picture.
    """
    h, w = edges.shape
    hi = min(h, w) / MAX_PERIODS_ACROSS
    if min(h, w) < MIN_SPECTRAL_SIDE:
        return []
    f = edges.astype(np.float64) - float(edges.mean())
    f *= np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.rfft2(f)) ** 2
    fy = np.abs(np.fft.fftfreq(h))[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    radius = np.hypot(fy, fx)
    keep = np.ones(power.shape, bool)
    for k in range(1, _JPEG_BLOCK // 2 + 1):
        f0 = k / _JPEG_BLOCK
        keep &= ~((np.abs(fy - f0) < 1.5 / h) | (np.abs(fx - f0) < 1.5 / w))
    # Bins from below the coarsest period of interest (the trend needs room) to Nyquist.
    bins = np.exp(np.arange(np.log(1 / (2 * hi)), np.log(0.5), _SPECTRAL_STEP))
    idx = np.digitize(radius[keep], bins)
    n = len(bins) + 1
    count = np.bincount(idx, minlength=n)[1:len(bins)]
    mean = np.bincount(idx, power[keep], minlength=n)[1:len(bins)] / np.maximum(count, 1)
    freq = np.sqrt(bins[:-1] * bins[1:])
    valid = count > 0
    if valid.sum() < 8:
        return []
    freq, logp = freq[valid], np.log(mean[valid] + 1e-30)
    white = gaussian_filter1d(logp - gaussian_filter1d(logp, _SPECTRAL_TREND, mode="nearest"), 1.0)
    peaks, props = find_peaks(white, prominence=0)
    period = 1 / freq[peaks]
    sel = (period >= MIN_PERIOD) & (period <= hi)
    found = sorted(zip(period[sel].tolist(), props["prominences"][sel].tolist()), key=lambda t: -t[1])
    return [(float(p), float(q)) for p, q in found]


def _lattice(peaks: list[tuple[float, float]], significance: float, below: float = math.inf
             ) -> tuple[float, float] | None:
    """The grout lattice among spectral peaks: the finest one at least ``significance``
    prominent and finer than ``below`` that is not the 2nd harmonic of a coarser peak at least as
    strong (a lattice of period P also has power at P/2; a design only repeats more slowly than
    its tesserae)."""
    strong = [(p, q) for p, q in peaks if q >= significance]
    for p, q in sorted(strong):
        if p >= below:
            break
        harmonic = any(
            P > p and Q >= q and abs(2 * p / P - 1) < 0.16
            for P, Q in strong
        )
        if not harmonic:
            return p, q
    return None


def _centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return image[top:top + side, left:left + side]


def estimate_scale(image: np.ndarray) -> ScaleEstimate:
    """The tessera scale of an RGB uint8 image (module docstring)."""
    image = _as_rgb(image)
    h, w = image.shape[:2]
    window = _centre_crop(image, WINDOW)
    edges = edge_image(window)
    period, prominence, ac_peaks = _dominant_period(window, edges)
    spectral = spectral_peaks(edges)
    if min(h, w) > WINDOW:
        wide = _centre_crop(image, 2 * WINDOW)
        half = cv2.resize(wide, (wide.shape[1] // 2, wide.shape[0] // 2),
                          interpolation=cv2.INTER_AREA)
        half_edges = edge_image(half)
        p2, q2, more = _dominant_period(half, half_edges)
        ac_peaks += [(2 * p, q) for p, q in more]
        spectral += [(2 * p, q) for p, q in spectral_peaks(half_edges)]
        if q2 > prominence:
            period, prominence = 2 * p2, q2
    alternatives = tuple(
        [("autocorrelation", p, q) for p, q in sorted(ac_peaks, key=lambda t: -t[1])[:4]]
        + [("spectrum", p, q) for p, q in sorted(spectral, key=lambda t: -t[1])[:4]]
    )
    if period > 0 and prominence >= AC_CLEAR:
        # A clear autocorrelation period: the lattice, or a design's bands. It is a design's
        # when the spectrum shows a much finer lattice, unmistakably (strong, at least
        # FINER_SHARE as strong as the spectral peak at the period, not its 2nd or 3rd
        # harmonic) and the period shows no sign of a lattice's regularity (its
        # autocorrelation peaks again at twice the period, or its spectrum at the 2nd or 3rd
        # harmonic: a sharp lattice has strong higher harmonics too, a design's bands have
        # neither). Then the finer lattice replaces it (tesserae a few px across, borders of
        # several rows of them).
        matches = [(p, q) for p, q in spectral if abs(math.log(period / p)) < AGREE]
        reference = max(matches, key=lambda t: t[1]) if matches else (period, 0.0)
        regular = any(abs(math.log(p / (2 * period))) < 0.1 for p, _ in ac_peaks) or any(
            q >= SPECTRAL_SIGNIFICANCE and abs(k * p / reference[0] - 1) < 0.16
            for p, q in spectral for k in (2, 3))
        finer = _lattice(spectral, max(SPECTRAL_STRONG, FINER_SHARE * reference[1]),
                         below=period / 1.5)
        if (finer is not None and not regular
                and not any(abs(period / finer[0] / k - 1) < 0.06 for k in (2, 3))):
            return ScaleEstimate(SPECTRAL_TO_DIAMETER * finer[0], finer[0], prominence, True,
                                 UNCONFIRMED * min(1.0, finer[1] / SPECTRAL_STRONG), "spectrum",
                                 alternatives)
        if reference[1] >= SPECTRAL_SIGNIFICANCE:  # both methods see it: confident
            return ScaleEstimate(PERIOD_TO_DIAMETER * period, period, prominence, True,
                                 min(1.0, reference[1] / SPECTRAL_STRONG), "agreed", alternatives)
        return ScaleEstimate(PERIOD_TO_DIAMETER * period, period, prominence, True,
                             UNCONFIRMED * min(1.0, prominence / 0.1), "autocorrelation",
                             alternatives)
    # No clear autocorrelation period: it saw nothing, or only faintly. The grout lattice is
    # the finest periodic structure of a mosaic: the finest significant spectral peak. When
    # even a faint autocorrelation peak sits at it, it stands. Otherwise a design may have
    # won: a finer, weaker lattice (tesserae weathered or a few px across) is preferred; and
    # a large period with nothing finer and no autocorrelation peak is a design's: tesserae
    # that large would show in the autocorrelation, so the tesserae were not resolved
    # (figure-sized "tesserae" are the worst answer).
    lattice = _lattice(spectral, SPECTRAL_SIGNIFICANCE)

    def seen(candidate: tuple[float, float] | None) -> bool:
        return candidate is not None and any(
            abs(math.log(p / candidate[0])) < AGREE and q >= AC_FAINT for p, q in ac_peaks)

    supported = [c for c in spectral if c[1] >= SPECTRAL_SIGNIFICANCE and seen(c)]
    if lattice is not None and not seen(lattice) and supported:
        # a coarser lattice a faint autocorrelation peak confirms wins over a finer one under
        # FINER_SHARE of its strength (the rule of the clear case)
        strongest = max(supported, key=lambda t: t[1])
        if lattice[1] < FINER_SHARE * strongest[1]:
            lattice = strongest
    if not seen(lattice):
        weak = _lattice(spectral, SPECTRAL_WEAK)
        if weak is not None and (lattice is None or (
                lattice[0] > 3 * weak[0] and weak[1] >= FINER_SHARE * lattice[1])):
            lattice = weak
        elif lattice is not None and lattice[0] >= CREDIBLE_UNSEEN:
            return ScaleEstimate(SPECTRAL_TO_DIAMETER * lattice[0], lattice[0], prominence, True,
                                 0.0, "unresolved", alternatives)
    if lattice is not None:
        return ScaleEstimate(SPECTRAL_TO_DIAMETER * lattice[0], lattice[0], prominence, True,
                             UNCONFIRMED * min(1.0, lattice[1] / SPECTRAL_STRONG), "spectrum",
                             alternatives)
    if period > 0:
        return ScaleEstimate(PERIOD_TO_DIAMETER * period, period, prominence, True,
                             UNCONFIRMED * min(1.0, prominence / 0.1), "autocorrelation",
                             alternatives)
    guess = max(MIN_PERIOD, FALLBACK_FRACTION * min(h, w))
    return ScaleEstimate(guess, guess / PERIOD_TO_DIAMETER, 0.0, False, 0.0, "none", alternatives)


def estimate_tessera_size(image: np.ndarray) -> float:
    """Median equivalent tessera diameter (px) of an RGB uint8 image, from its grout period."""
    return estimate_scale(image).diameter
