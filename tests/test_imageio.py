"""The one image reader (toolkit/core/imageio.py): orientation, bit depths, TIFF layouts, colour modes.

Every file here is written by Pillow or tifffile from a known array, and what the reader returns
is compared with that array (through the documented rules), or with Pillow's own
``ImageOps.exif_transpose`` for orientation.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from mosaic_toolkit.core import imageio
from mosaic_toolkit.core import io as dataset
from mosaic_toolkit.core.errors import MosaicError

# The stored pixels S whose displayed view is the upright image U: orient(S, o) == U when
# S = orient(U, INVERSE[o]) (orientations 6 and 8 are each other's inverse; the rest are their own).
INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def upright(h: int = 30, w: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def stored(image: np.ndarray, orientation: int) -> np.ndarray:
    """What a camera writes for ``image`` shown with EXIF ``orientation``."""
    return np.ascontiguousarray(imageio.orient(image, INVERSE[orientation]))


def save_with_exif(path: Path, pixels: np.ndarray, orientation: int, **kwargs) -> Path:
    exif = Image.Exif()
    exif[imageio.ORIENTATION_TAG] = orientation
    Image.fromarray(pixels).save(path, exif=exif, **kwargs)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_displayed_frame(tmp_path, orientation) -> None:
    """PNG with EXIF: exactly the upright image, as Pillow's exif_transpose (and browsers) show it;
    the info says which orientation was applied and the displayed size."""
    image = upright()
    path = save_with_exif(tmp_path / "o.png", stored(image, orientation), orientation)
    pixels, info = imageio.read_image_info(path)
    np.testing.assert_array_equal(pixels, image)
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(im).convert("RGB")), image)
    assert (info.width, info.height, info.orientation) == (50, 30, orientation)
    assert dataset.image_size(path) == (50, 30)
    np.testing.assert_array_equal(dataset.read_image(path), image)
    with Image.open(path) as im:  # the PIL entry point the backend used to call
        np.testing.assert_array_equal(dataset.pil_to_rgb(im), image)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_jpeg_orientation(tmp_path, orientation) -> None:
    """JPEG (lossy): exactly Pillow's exif_transpose of the same file, close to the upright
    image and far from it unoriented."""
    image = np.kron(upright(6, 10), np.ones((16, 16, 1), np.uint8))  # smooth blocks survive JPEG
    path = save_with_exif(tmp_path / "o.jpg", stored(image, orientation), orientation, quality=95)
    pixels, info = imageio.read_image_info(path)
    assert pixels.shape == image.shape and info.orientation == orientation
    with Image.open(path) as im:
        np.testing.assert_array_equal(pixels, np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
    assert np.abs(pixels.astype(int) - image).mean() < 8
    assert np.abs(pixels.astype(int) - image[::-1, ::-1]).mean() > 30


def test_invalid_orientation_counts_as_upright(tmp_path) -> None:
    image = upright()
    path = save_with_exif(tmp_path / "o.png", image, 9)
    pixels, info = imageio.read_image_info(path)
    np.testing.assert_array_equal(pixels, image)
    assert info.orientation == 1


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_bit_depths_follow_one_rule(tmp_path, suffix) -> None:
    """8 and 16-bit, grey and RGB, PNG and TIFF: 16-bit values keep their high byte (v >> 8),
    the same for PNG (as Pillow and the browser reduce them) and TIFF."""
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65536, (20, 24), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (20, 24, 3), dtype=np.uint16)
    grey8, rgb8 = (grey16 >> 8).astype(np.uint8), (rgb16 >> 8).astype(np.uint8)
    cases = {"grey8": (grey8, grey8), "rgb8": (rgb8, rgb8), "grey16": (grey16, grey8), "rgb16": (rgb16, rgb8)}
    for name, (data, expected) in cases.items():
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".tif":
            tifffile.imwrite(path, data, photometric="rgb" if data.ndim == 3 else "minisblack")
        elif name == "rgb16":  # Pillow cannot write 16-bit RGB PNG; OpenCV can (BGR order)
            import cv2
            assert cv2.imwrite(str(path), np.ascontiguousarray(data[..., ::-1]))
        else:
            Image.fromarray(data).save(path)
        pixels = imageio.read_image(path)
        want = expected if expected.ndim == 3 else np.repeat(expected[..., None], 3, axis=2)
        np.testing.assert_array_equal(pixels, want, err_msg=f"{name}{suffix}")


def test_sixteen_bit_png_matches_pillow_reduction(tmp_path) -> None:
    """Pillow itself reduces a 16-bit RGB PNG to 8 bits by the same rule the reader uses."""
    import cv2

    data = np.random.default_rng(2).integers(0, 65536, (8, 9, 3), dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    cv2.imwrite(str(path), data[..., ::-1].copy())
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), (data >> 8).astype(np.uint8))
    np.testing.assert_array_equal(imageio.read_image(path), (data >> 8).astype(np.uint8))


@pytest.mark.parametrize("layout", [
    {"tile": (16, 16)},
    {"tile": (16, 16), "compression": "zlib", "bigtiff": True},
    {"tile": (32, 16), "compression": "lzw"},
    {"rowsperstrip": 7, "compression": "zlib"},
    {"rowsperstrip": 7, "planarconfig": "separate"},
    {"tile": (16, 16), "planarconfig": "separate", "bigtiff": True},
])
@pytest.mark.parametrize("orientation", [1, 5, 6, 7])
def test_tiff_layouts_whole_and_by_window(tmp_path, layout, orientation) -> None:
    """Tiled, striped, BigTIFF, compressed, planar: the whole image and every window of the
    streaming reader equal the upright image (TIFF Orientation tag applied)."""
    image = upright(45, 70, seed=orientation)
    data = stored(image, orientation).astype(np.uint16) * 256 + 3  # 16-bit, high byte = image
    path = tmp_path / "t.tif"
    if layout.get("planarconfig") == "separate":
        data = np.moveaxis(data, -1, 0)  # tifffile takes separate planes first
    tifffile.imwrite(path, data, photometric="rgb", extratags=[(274, "H", 1, orientation, True)], **layout)
    np.testing.assert_array_equal(imageio.read_image(path), image)
    with imageio.ImageTiles(path) as tiles:
        assert tiles.shape == image.shape and tiles.info.orientation == orientation
        for y0, y1, x0, x1 in [(0, 45, 0, 70), (3, 17, 5, 44), (16, 33, 31, 33), (44, 45, 69, 70), (0, 1, 0, 70)]:
            np.testing.assert_array_equal(tiles[y0:y1, x0:x1], image[y0:y1, x0:x1], err_msg=str((y0, y1, x0, x1)))
        np.testing.assert_array_equal(np.asarray(tiles), image)


def test_open_image_streams_only_large_tiffs(tmp_path) -> None:
    image = upright(40, 40)
    tif = tmp_path / "t.tif"
    tifffile.imwrite(tif, image, photometric="rgb", tile=(16, 16))
    png = tmp_path / "t.png"
    Image.fromarray(image).save(png)
    assert isinstance(imageio.open_image(tif), np.ndarray)
    tiles = imageio.open_image(tif, stream_pixels=100)
    assert isinstance(tiles, imageio.ImageTiles)
    tiles.close()
    assert isinstance(imageio.open_image(png, stream_pixels=100), np.ndarray)  # PNG cannot stream


def test_colour_modes(tmp_path) -> None:
    """Palette, CMYK (JPEG and TIFF), alpha (RGBA, LA, palette transparency, TIFF extra sample)
    composited on white; grey repeated into three channels."""
    rgb = upright(12, 16)
    # palette PNG
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    # palette with a transparent index: that colour reads as white
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    got = imageio.read_image(tmp_path / "pt.png")
    idx = np.asarray(pal)
    assert (got[idx == 0] == 255).all() and (idx == 0).any()
    # RGBA: half-transparent black over white is mid grey; fully transparent is white
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0
    rgba[:2, :, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = imageio.read_image(tmp_path / "a.png")
    assert (got[2:] == 255).all() and (np.abs(got[:2].astype(int) - 127) <= 1).all()
    # LA
    la = np.stack([np.full((4, 4), 0, np.uint8), np.full((4, 4), 0, np.uint8)], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert (imageio.read_image(tmp_path / "la.png") == 255).all()
    # CMYK JPEG and TIFF: Pillow's conversion for JPEG, R = 255 - C - K for TIFF
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=100)
    assert np.abs(imageio.read_image(tmp_path / "c.jpg").astype(int) - rgb).mean() < 6
    c = np.asarray(cmyk)
    tifffile.imwrite(tmp_path / "c.tif", c, photometric="separated")
    expected = np.clip(255 - c[..., :3].astype(int) - c[..., 3:4], 0, 255)
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "c.tif"), expected)
    # TIFF RGBA (unassociated alpha) on white; grey + alpha
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "a.tif"), got)
    # TIFF palette, 16-bit colormap
    colormap = (np.arange(3 * 256).reshape(3, 256) % 256 * 257).astype(np.uint16)
    index = np.random.default_rng(3).integers(0, 256, (6, 7), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "p.tif", index, photometric="palette", colormap=colormap)
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "p.tif"), np.stack([index] * 3, axis=2))
    # grey and min-is-white
    grey = rgb[..., 0]
    tifffile.imwrite(tmp_path / "w.tif", grey, photometric="miniswhite")
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "w.tif"), np.stack([255 - grey] * 3, axis=2))


def test_bytes_and_errors(tmp_path) -> None:
    """Bytes read like files (the backend's path); bad files are one clear MosaicError naming
    the file."""
    image = upright()
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[imageio.ORIENTATION_TAG] = 6
    Image.fromarray(stored(image, 6)).save(buffer, format="PNG", exif=exif)
    np.testing.assert_array_equal(imageio.read_image(buffer.getvalue(), "x.png"), image)
    assert imageio.image_info(buffer.getvalue(), "x.png").size == (50, 30)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage")
    for path, message in [(bad, "cannot read image"), (tmp_path / "none.png", "image file not found")]:
        with pytest.raises(MosaicError, match=message) as caught:
            imageio.read_image(path)
        assert str(path) in str(caught.value)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(MosaicError, match="notes.png: cannot read image"):
        dataset.image_size(text)


def test_streamed_segmentation_equals_in_memory(tmp_path, monkeypatch) -> None:
    """`segment` on a TIFF read tile by tile (ImageTiles) with outputs built in row bands writes
    exactly what it writes for the same image decoded whole."""
    from mosaic_toolkit import segment
    from mosaic_toolkit.classical import ClassicalEngine
    from mosaic_toolkit.core.io import read_instances, read_mask
    from mosaic_toolkit.data.synth import synth_mosaic

    image, _ = synth_mosaic(np.random.default_rng(4), 1300, 700, tessera_size=40)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, stored(image, 8).astype(np.uint16) * 257, photometric="rgb", tile=(256, 256),
                     compression="zlib", extratags=[(274, "H", 1, 8, True)])
    outputs = {}
    for name, pixels, rows in (("whole", 10**12, 1024), ("streamed", 1000, 37)):
        monkeypatch.setattr(imageio, "STREAM_PIXELS", pixels)
        monkeypatch.setattr(segment, "BAND_ROWS", rows)
        if name == "streamed":
            opened = imageio.open_image(path)
            assert isinstance(opened, imageio.ImageTiles)
            opened.close()
        out = tmp_path / name
        [record] = segment.segment_paths([path], out, ClassicalEngine(), progress=False)
        assert record["orientation"] == 8 and (record["width"], record["height"]) == (1300, 700)
        outputs[name] = (read_instances(out / "instances" / "big.png"), read_mask(out / "big.png"),
                         (out / "overlays" / "big.jpg").read_bytes())
    assert outputs["whole"][0].max() > 100
    np.testing.assert_array_equal(outputs["streamed"][0], outputs["whole"][0])
    np.testing.assert_array_equal(outputs["streamed"][1], outputs["whole"][1])
    assert outputs["streamed"][2] == outputs["whole"][2]
    # and the outputs are those of the in-memory functions on the whole image
    instances = outputs["whole"][0]
    np.testing.assert_array_equal(outputs["whole"][1], np.where(instances > 0, 0, 255))
    drawn = segment.overlay(image, instances)
    import cv2
    reference = tmp_path / "ref.jpg"
    cv2.imwrite(str(reference), drawn[..., ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert reference.read_bytes() == outputs["whole"][2]
