"""Untrusted images: every bad input is refused with its reason; odd modes become RGB."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from vlrlhf.data.images import ImageError, load_image


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(folder / "ok.png")
    return folder


def test_path_bytes_base64_data_uri_and_cells_give_the_same_image(root):
    data = (root / "ok.png").read_bytes()
    sources = ["ok.png", str(root / "ok.png"), data, base64.b64encode(data).decode() * 1,
               "data:image/png;base64," + base64.b64encode(data).decode(), {"bytes": data, "path": None},
               {"bytes": None, "path": "ok.png"}]
    arrays = [np.asarray(load_image(source, image_root=root)) for source in sources]
    assert all(a.shape == (6, 8, 3) and (a == arrays[0]).all() for a in arrays)
    assert tuple(arrays[0][0, 0]) == (10, 20, 30)


@pytest.mark.parametrize("path", ["../secret.png", "sub/../../secret.png", "/etc/passwd"])
def test_paths_outside_image_root_are_refused(root, path):
    (root.parent / "secret.png").write_bytes((root / "ok.png").read_bytes())
    with pytest.raises(ImageError, match="path_outside_root") as info:
        load_image(path, image_root=root)
    assert info.value.reason == "path_outside_root"


def test_symlink_out_of_the_root_is_refused_but_inside_is_fine(root):
    outside = root.parent / "outside.png"
    outside.write_bytes((root / "ok.png").read_bytes())
    os.symlink(outside, root / "link_out.png")
    os.symlink(root / "ok.png", root / "link_in.png")
    with pytest.raises(ImageError, match="path_outside_root"):
        load_image("link_out.png", image_root=root)
    assert load_image("link_in.png", image_root=root).size == (8, 6)


def test_paths_need_an_image_root(root):
    with pytest.raises(ImageError, match="need data.image_root"):
        load_image("ok.png", image_root=None)


def noise_png(size: int = 64) -> bytes:
    return png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)))


@pytest.mark.parametrize("source, reason", [
    ("missing.png", "missing"),
    ("empty.png", "empty"),
    (b"", "empty"),
    (b"this is not an image at all", "unreadable"),
    (noise_png()[:-2000], "truncated"),
    ("data:image/png;base64,@@@@", "unreadable"),
])
def test_bad_inputs_raise_with_reason(root, source, reason):
    (root / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError) as info:
        load_image(source, image_root=root)
    assert info.value.reason == reason


def test_truncated_jpeg_is_detected(root):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = png_bytes(noise, "JPEG", quality=90)
    with pytest.raises(ImageError) as info:
        load_image(data[: len(data) // 2], image_root=root)
    assert info.value.reason == "truncated"


def test_decompression_bomb_is_refused_from_the_header(root):
    bomb = png_bytes(Image.new("L", (3000, 3000)))  # small file, 9M pixels
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="3000x3000, above max_pixels=1000000") as info:
        load_image(bomb, max_pixels=1_000_000)
    assert info.value.reason == "too_many_pixels"
    assert load_image(bomb, max_pixels=10_000_000).size == (3000, 3000)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and carries no pixel data (a few dozen bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_image_pillow_refuses_in_open_is_a_bad_record_not_a_crash(root):
    # Above 2 x Image.MAX_IMAGE_PIXELS Pillow raises DecompressionBombError (not an OSError)
    # inside Image.open, before our own max_pixels check sees the size.
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 100
    bomb = png_header_only(side, side)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    (root / "bomb.png").write_bytes(bomb)
    for source in (bomb, "bomb.png"):
        with pytest.raises(ImageError, match="decompression bomb") as info:
            load_image(source, image_root=root, max_pixels=10 ** 12)
        assert info.value.reason == "too_many_pixels"


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (4, 2), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    loaded = load_image(png_bytes(image, "JPEG", exif=exif.tobytes()))
    assert loaded.size == (2, 4)


@pytest.mark.parametrize("image, pixel", [
    (Image.new("P", (2, 2), 0), None),
    (Image.new("CMYK", (2, 2), (0, 255, 255, 0)), None),
    (Image.new("LA", (2, 2), (100, 0)), (255, 255, 255)),  # fully transparent: white
    (Image.new("RGBA", (2, 2), (255, 0, 0, 255)), (255, 0, 0)),
    (Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16)), (255, 255, 255)),
    (Image.new("1", (2, 2), 1), (255, 255, 255)),
])
def test_odd_modes_become_rgb(image, pixel):
    if image.mode == "P":
        image.putpalette([0, 128, 0] * 256)
        pixel = (0, 128, 0)
    if image.mode == "CMYK":
        pixel = None
    data = png_bytes(image, "TIFF" if image.mode == "CMYK" else "PNG")
    loaded = load_image(data)
    assert loaded.mode == "RGB" and loaded.size == (2, 2)
    if pixel is not None:
        assert loaded.getpixel((0, 0)) == pixel
    else:  # CMYK cyan+... -> red-ish
        assert loaded.getpixel((0, 0))[0] > 200
