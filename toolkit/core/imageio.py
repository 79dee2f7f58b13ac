"""The one image reader: every command and the backend read images through here.

Rules (the same in ``segment``, ``export``, training, ``eval`` and the backend):

* **Displayed frame.** An image is read as it is displayed: the EXIF orientation (JPEG, PNG,
  WebP) or the TIFF ``Orientation`` tag is applied, exactly as browsers apply it, so Label
  Studio's editor, its percentages and ``original_width``/``original_height``, and everything
  we write (masks, instance maps, points, pre-labels, click answers) share one frame. The
  orientation applied (1..8, 1 = none) is returned in ``ImageInfo.orientation`` and recorded in
  ``segment.json`` and the dataset manifest. Orientation values outside 1..8 count as 1.
* **RGB uint8.** Every image comes out as an ``H x W x 3`` uint8 array: grey is repeated into
  three channels; palette images are expanded; CMYK is converted with Pillow's plain
  ``R = 255 - C - K`` rule (no colour management: ICC profiles are ignored); alpha (RGBA, LA,
  palette transparency, TIFF extra samples) is composited on white, so transparent parts read
  as white paper, never as black tesserae.
* **16 -> 8 bits: keep the high byte** (``v8 = v16 >> 8``), for grey and colour, PNG and TIFF.
  Chosen over a per-image percentile stretch because (1) it is what the annotator sees: Pillow
  and libpng's ``strip_16`` reduce 16-bit PNGs this way, so the editor and the toolkit show the
  same values; (2) it depends on the pixel alone, so a tile read on its own (very large
  images are streamed tile by tile) gives the same values as the whole image, and a crop, a
  training sample and a click window agree; (3) it never changes the photographer's exposure.
  The price: a 12-bit scan stored in 16 bits (values up to 4095) reads very dark, as it does
  in the browser; stretch such files once (e.g. in the RAW converter) before importing them.
  32-bit integer images are read as 16-bit containers (clipped to 0..65535, then the same rule);
  float images as 0..1 (clipped, scaled by 255).
* **Formats.** Pillow reads PNG, JPEG, BMP and WebP; TIFF (strips or tiles, BigTIFF, any
  compression imagecodecs decodes: LZW, Deflate, JPEG, ZSTD...) is read with ``tifffile``, and
  with Pillow only when tifffile cannot decode it.
* **Very large images.** A TIFF of more than ``STREAM_PIXELS`` pixels can be opened with
  ``open_image`` as an ``ImageTiles``: an array-like whose slices ``tiles[y0:y1, x0:x1]`` decode
  only the TIFF tiles or strips under the window (orientation and the rules above applied), so
  ``tiling.segment_tiled`` segments it with memory for one tile at a time.

Errors are ``MosaicError`` naming the file and the problem.
"""
from __future__ import annotations

import io
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
from PIL import Image

from .errors import MosaicError

ORIENTATION_TAG = 274  # EXIF and TIFF "Orientation"
TIFF_SUFFIXES = (".tif", ".tiff")
STREAM_PIXELS = 64_000_000  # TIFFs larger than this are streamed by open_image (about 190 MB as RGB)
MAX_PIXELS = 2_000_000_000  # the reader's own bound against decompression bombs
WHITE = 255

Source = Union[str, os.PathLike, bytes]

# orientation -> (transpose, flip rows, flip columns), applied in that order to the stored
# pixels: the displayed image (as PIL.ImageOps.exif_transpose and browsers show it).
_ORIENT = {
    1: (False, False, False), 2: (False, False, True), 3: (False, True, True), 4: (False, True, False),
    5: (True, False, False), 6: (True, False, True), 7: (True, True, True), 8: (True, True, False),
}
_pillow_lock = threading.Lock()


@dataclass(frozen=True)
class ImageInfo:
    """What the reader learned about an image file."""

    width: int  # displayed (orientation applied)
    height: int
    orientation: int  # EXIF/TIFF orientation applied, 1..8 (1: stored upright)
    format: str  # "PNG", "JPEG", "TIFF", ...
    mode: str  # the stored pixels, e.g. "RGB", "I;16", "CMYK", "uint16 x3"

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


# --------------------------------------------------------------------------------------------
# Pixel rules
# --------------------------------------------------------------------------------------------
def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The displayed view of stored ``pixels`` (rows, columns first) for an orientation 1..8."""
    transpose, flip_rows, flip_cols = _ORIENT.get(int(orientation), _ORIENT[1])
    if transpose:
        pixels = pixels.swapaxes(0, 1)
    if flip_rows:
        pixels = pixels[::-1]
    if flip_cols:
        pixels = pixels[:, ::-1]
    return pixels


def displayed_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """(width, height) as displayed, from the stored size."""
    return (height, width) if _ORIENT.get(int(orientation), _ORIENT[1])[0] else (width, height)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """The one bit-depth rule (module docstring): uint8 as is, 16-bit (and 32-bit integer, as a
    16-bit container) keep the high byte, float 0..1 scaled by 255, booleans 0/255."""
    dtype = pixels.dtype
    if dtype == np.uint8:
        return pixels
    if dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if np.issubdtype(dtype, np.floating):
        scaled = np.nan_to_num(pixels.astype(np.float32, copy=False), nan=0.0) * 255 + 0.5
        return np.clip(scaled, 0, 255).astype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        if dtype.itemsize == 1:  # int8
            return np.clip(pixels, 0, 255).astype(np.uint8)
        if dtype != np.uint16:
            pixels = np.clip(pixels, 0, 65535)
        return (pixels >> 8).astype(np.uint8)
    raise ValueError(f"unsupported pixel type {dtype}")


def _composite_on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 colour (H x W x C) over white with uint8 alpha (H x W)."""
    a = alpha.astype(np.uint16)[..., None]
    out = (colour.astype(np.uint16) * a + WHITE * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _rgb(channels: np.ndarray) -> np.ndarray:
    """RGB uint8 from uint8 grey (H x W), grey+alpha, RGB or RGBA (H x W x C)."""
    if channels.ndim == 2:
        channels = channels[..., None]
    c = channels.shape[2]
    if c in (2, 4):
        channels = _composite_on_white(channels[..., : c - 1], channels[..., c - 1])
        c -= 1
    if c == 1:
        return np.repeat(channels, 3, axis=2)
    return np.ascontiguousarray(channels[..., :3])


# --------------------------------------------------------------------------------------------
# Pillow
# --------------------------------------------------------------------------------------------
def _open_pil(source: Source) -> Image.Image:
    """Image.open with this module's own pixel bound instead of Pillow's global one (large
    photographs are expected here; the backend applies its own, lower, limit first)."""
    fp: Any = io.BytesIO(source) if isinstance(source, bytes) else source
    with _pillow_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(fp)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    if im.width * im.height > MAX_PIXELS:
        im.close()
        raise ValueError(f"{im.width}x{im.height} pixels is more than this reader's limit of {MAX_PIXELS:,}")
    return im


def pil_orientation(im: Image.Image) -> int:
    """The EXIF (or TIFF tag) orientation of an opened PIL image, 1 when absent or invalid.

    A PNG's eXIf chunk counts only before the pixel data (where the PNG specification puts
    it): looking further would make Pillow decode the whole image just to read the header."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block never stops reading the pixels
        return 1
    return int(value) if value in _ORIENT else 1


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """RGB uint8 pixels of an opened PIL image, in the displayed frame (module docstring)."""
    orientation = pil_orientation(im)
    im.load()
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = to_uint8(np.asarray(im))
        rgb = _rgb(grey)
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgb = _rgb(np.asarray(im.convert("RGBA")))
    elif mode == "L":
        rgb = _rgb(np.asarray(im))
    else:  # RGB, P, 1, CMYK, YCbCr, LAB, HSV...
        rgb = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(orient(rgb, orientation))


def _pil_info(im: Image.Image) -> ImageInfo:
    orientation = pil_orientation(im)
    width, height = displayed_size(im.width, im.height, orientation)
    return ImageInfo(width, height, orientation, im.format or "?", im.mode)


# --------------------------------------------------------------------------------------------
# TIFF
# --------------------------------------------------------------------------------------------
def _is_tiff(source: Source) -> bool:
    if isinstance(source, bytes):
        head = source[:4]
    else:
        try:
            with open(source, "rb") as f:
                head = f.read(4)
        except OSError:
            return False
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _tiff_file(source: Source):
    import tifffile

    return tifffile.TiffFile(io.BytesIO(source) if isinstance(source, bytes) else source)


class _TiffPage:
    """The first image of a TIFF file and the rules to turn its stored samples into RGB."""

    def __init__(self, tif: Any) -> None:
        import tifffile

        self.tif = tif
        page = tif.pages.first
        self.page = page
        self.photometric = int(page.photometric)
        self.samples = int(page.samplesperpixel)
        self.extrasamples = tuple(int(e) for e in (page.extrasamples or ()))
        tag = page.tags.get(ORIENTATION_TAG)
        value = int(tag.value) if tag is not None else 1
        self.orientation = value if value in _ORIENT else 1
        if page.imagedepth != 1:
            raise ValueError("volumetric TIFF (image depth > 1) is not supported")
        ph = tifffile.PHOTOMETRIC
        supported = {int(ph.MINISBLACK), int(ph.MINISWHITE), int(ph.RGB), int(ph.PALETTE), int(ph.SEPARATED)}
        if self.photometric not in supported:
            raise NotImplementedError(f"TIFF photometric {page.photometric!r}")
        if self.photometric == int(ph.SEPARATED) and int(getattr(page, "inkset", 1) or 1) != 1:
            raise NotImplementedError("TIFF separated image that is not CMYK")
        self.height, self.width = int(page.imagelength), int(page.imagewidth)

    @property
    def info(self) -> ImageInfo:
        width, height = displayed_size(self.width, self.height, self.orientation)
        mode = f"{self.page.dtype} x{self.samples} ({self.page.photometric.name.lower()})"
        return ImageInfo(width, height, self.orientation, "TIFF", mode)

    def to_rgb(self, stored: np.ndarray) -> np.ndarray:
        """RGB uint8 of a window of stored samples (rows x cols [x samples]), not oriented."""
        import tifffile

        ph = tifffile.PHOTOMETRIC
        if stored.ndim == 2:
            stored = stored[..., None]
        if self.photometric == int(ph.PALETTE):
            colormap = self.page.colormap  # 3 x 2**bits, 16-bit values
            lut = to_uint8(np.asarray(colormap).T.astype(np.uint16))
            return lut[stored[..., 0].astype(np.intp)]
        pixels = to_uint8(stored)
        if self.photometric == int(ph.MINISWHITE):
            pixels = pixels.copy()
            pixels[..., 0] = 255 - pixels[..., 0]
        if self.photometric == int(ph.SEPARATED):
            cmyk = pixels[..., :4].astype(np.int16)
            rgb = np.clip(255 - cmyk[..., :3] - cmyk[..., 3:4], 0, 255).astype(np.uint8)
            alpha = self._alpha(pixels, 4)
            return rgb if alpha is None else _composite_on_white(rgb, alpha)
        colours = 3 if self.photometric == int(ph.RGB) else 1
        alpha = self._alpha(pixels, colours)
        base = pixels[..., :colours]
        if alpha is not None:
            base = _composite_on_white(base, alpha)
        return _rgb(base)

    def _alpha(self, pixels: np.ndarray, colours: int) -> np.ndarray | None:
        """The alpha channel (associated or unassociated extra sample), if any."""
        if pixels.shape[2] > colours and any(e in (1, 2) for e in self.extrasamples[:1]):
            return pixels[..., colours]
        return None

    def read_all(self) -> np.ndarray:
        stored = self.page.asarray(maxworkers=1)
        if stored.ndim == 3 and int(self.page.planarconfig) == 2:  # separate planes
            stored = np.moveaxis(stored, 0, -1)
        return self.to_rgb(stored)

    # ---------------------------------------------------------------- windows
    def read_window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Stored samples of rows [y0, y1) and columns [x0, x1), decoding only the tiles or
        strips under them."""
        page = self.page
        contig = int(page.planarconfig) != 2
        planes = 1 if contig else self.samples
        per_px = self.samples if contig else 1
        out = np.zeros((y1 - y0, x1 - x0, self.samples), dtype=page.dtype)
        if page.is_tiled:
            th, tw = int(page.tilelength), int(page.tilewidth)
        else:
            th, tw = int(page.rowsperstrip or self.height), self.width
            th = min(th, self.height)
        across = math.ceil(self.width / tw)
        down = math.ceil(self.height / th)
        decode = page.decode
        extra: dict[str, Any] = {}
        if int(page.compression) in (6, 7, 34892, 33007):
            extra = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
        fh = self.tif.filehandle
        for plane in range(planes):
            for ty in range(y0 // th, min(down, math.ceil(y1 / th))):
                for tx in range(x0 // tw, min(across, math.ceil(x1 / tw))):
                    index = plane * across * down + ty * across + tx
                    offset, count = page.dataoffsets[index], page.databytecounts[index]
                    with fh.lock:
                        fh.seek(offset)
                        data = fh.read(count) if count else None
                    segment, _, _ = decode(data, index, _fullsize=page.is_tiled, **extra)
                    if segment is None:
                        continue
                    seg = segment[0]  # depth 1: rows x cols x samples
                    sy, sx = ty * th, tx * tw
                    r0, r1 = max(y0, sy), min(y1, sy + seg.shape[0])
                    c0, c1 = max(x0, sx), min(x1, sx + seg.shape[1])
                    if r0 >= r1 or c0 >= c1:
                        continue
                    part = seg[r0 - sy:r1 - sy, c0 - sx:c1 - sx, :per_px]
                    if contig:
                        out[r0 - y0:r1 - y0, c0 - x0:c1 - x0] = part
                    else:
                        out[r0 - y0:r1 - y0, c0 - x0:c1 - x0, plane] = part[..., 0]
        return out


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------
class ImageTiles:
    """A large TIFF as a read-only, array-like RGB uint8 image in the displayed frame.

    ``tiles[y0:y1, x0:x1]`` decodes only the TIFF tiles or strips under the window; ``shape``,
    ``ndim``, ``dtype`` and ``info`` are known without decoding. ``np.asarray(tiles)`` reads
    the whole image (avoid it on images larger than memory). Use as a context manager, or
    ``close()`` it.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._tif = _tiff_file(str(path))
        try:
            self._page = _TiffPage(self._tif)
        except BaseException:
            self._tif.close()
            raise
        self.info = self._page.info
        self.shape = (self.info.height, self.info.width, 3)

    def __enter__(self) -> "ImageTiles":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._tif.close()

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 3

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > 3 or not all(isinstance(k, slice) for k in key[:2]) or (
                len(key) == 3 and key[2] != slice(None)):
            raise IndexError("ImageTiles supports [rows, cols] slices with step 1 only")
        rows = key[0].indices(self.shape[0])
        cols = key[1].indices(self.shape[1]) if len(key) > 1 else (0, self.shape[1], 1)
        if rows[2] != 1 or cols[2] != 1:
            raise IndexError("ImageTiles supports [rows, cols] slices with step 1 only")
        y0, y1 = rows[0], max(rows[0], rows[1])
        x0, x1 = cols[0], max(cols[0], cols[1])
        return self.window(y0, y1, x0, x1)

    def window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """RGB uint8 of displayed rows [y0, y1) and columns [x0, x1)."""
        transpose, flip_rows, flip_cols = _ORIENT[self.info.orientation]
        h, w = self.shape[:2]
        if flip_rows:
            y0, y1 = h - y1, h - y0
        if flip_cols:
            x0, x1 = w - x1, w - x0
        sy0, sy1, sx0, sx1 = (x0, x1, y0, y1) if transpose else (y0, y1, x0, x1)
        if sy1 <= sy0 or sx1 <= sx0:
            shape = (sx1 - sx0, sy1 - sy0) if transpose else (sy1 - sy0, sx1 - sx0)
            return np.zeros((max(shape[0], 0), max(shape[1], 0), 3), np.uint8)
        try:
            stored = self._page.read_window(sy0, sy1, sx0, sx1)
        except Exception as exc:
            raise MosaicError(f"{self.path}: cannot read image ({exc})") from exc
        return np.ascontiguousarray(orient(self._page.to_rgb(stored), self.info.orientation))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self.window(0, self.shape[0], 0, self.shape[1])
        return whole if dtype is None else whole.astype(dtype)


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------
def _name(source: Source, name: str | None) -> str:
    if name is not None:
        return name
    return "image bytes" if isinstance(source, bytes) else str(source)


def _check_file(source: Source) -> None:
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise MosaicError(f"{source}: image file not found")


def read_image_info(source: Source, name: str | None = None) -> tuple[np.ndarray, ImageInfo]:
    """(RGB uint8 pixels in the displayed frame, ImageInfo) of an image file or its bytes."""
    _check_file(source)
    where = _name(source, name)
    tiff_error: Exception | None = None
    if _is_tiff(source):
        try:
            with _tiff_file(source) as tif:
                page = _TiffPage(tif)
                return np.ascontiguousarray(orient(page.read_all(), page.orientation)), page.info
        except MemoryError:
            raise
        except Exception as exc:  # tifffile cannot: Pillow may (e.g. old-style JPEG, YCbCr)
            tiff_error = exc
    try:
        with _open_pil(source) as im:
            info = _pil_info(im)
            return pil_to_rgb(im), info
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = f"{tiff_error}; Pillow: {exc}" if tiff_error else str(exc)
        raise MosaicError(f"{where}: cannot read image ({reason})") from exc


def read_image(source: Source, name: str | None = None) -> np.ndarray:
    """RGB uint8 pixels in the displayed frame (module docstring); MosaicError naming the file."""
    return read_image_info(source, name)[0]


def image_info(source: Source, name: str | None = None) -> ImageInfo:
    """Displayed size, orientation, format and stored mode, from the header only."""
    _check_file(source)
    where = _name(source, name)
    tiff_error: Exception | None = None
    if _is_tiff(source):
        try:
            with _tiff_file(source) as tif:
                return _TiffPage(tif).info
        except Exception as exc:
            tiff_error = exc
    try:
        with _open_pil(source) as im:
            return _pil_info(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = f"{tiff_error}; Pillow: {exc}" if tiff_error else str(exc)
        raise MosaicError(f"{where}: cannot read image ({reason})") from exc


def image_size(source: Source) -> tuple[int, int]:
    """(width, height) as displayed, without decoding the pixels."""
    return image_info(source).size


def open_image(path: str | os.PathLike, stream_pixels: int | None = None) -> np.ndarray | ImageTiles:
    """The image for segmentation: an ``ImageTiles`` for a TIFF larger than ``stream_pixels``
    (default ``STREAM_PIXELS``; read tile by tile), otherwise the decoded array (``read_image``)."""
    info = image_info(path)
    limit = STREAM_PIXELS if stream_pixels is None else stream_pixels
    if info.format == "TIFF" and info.width * info.height > limit:
        try:
            return ImageTiles(path)
        except Exception as exc:
            raise MosaicError(f"{path}: cannot read image ({exc})") from exc
    return read_image(path)
