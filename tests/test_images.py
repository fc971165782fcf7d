"""Finding files, decoding every image mode to upright RGB, and preprocessing like transformers."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import skimage.data
from conftest import draw_image
from PIL import Image
from transformers import (
    AutoImageProcessor,
    BitImageProcessor,
    CLIPImageProcessor,
    ViTImageProcessor,
)

from simsearch.errors import ImageError, InputPathError
from simsearch.images import Preprocessing, decode_image, find_images


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# -- finding files -----------------------------------------------------------------------


def test_find_images_recurses_matches_suffixes_case_insensitively_and_sorts(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    names = ["a.JPG", "b/c.png", "b/deep/d.TIFF", "e.webp", "f.gif", "g.bmp", "h.jpeg", "i.tif"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "raw.cr2").write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images([tmp_path])]
    assert found == [
        "a.JPG",
        "e.webp",
        "f.gif",
        "g.bmp",
        "h.jpeg",
        "i.tif",
        "b/c.png",
        "b/deep/d.TIFF",
    ]


def test_find_images_yields_each_file_once_and_takes_named_files(tmp_path):
    (tmp_path / "x.png").write_bytes(b"x")
    (tmp_path / "odd.dat").write_bytes(b"x")
    found = list(find_images([tmp_path, tmp_path / "x.png", tmp_path / "odd.dat"]))
    assert [p.name for p in found] == ["x.png", "odd.dat"]


def test_find_images_refuses_a_missing_path(tmp_path):
    with pytest.raises(InputPathError, match="no such file or directory"):
        list(find_images([tmp_path / "missing"]))


def test_find_images_does_not_follow_a_directory_symlink_loop(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert [p.name for p in find_images([tmp_path])] == ["a.png"]


# -- decoding ----------------------------------------------------------------------------


def test_decodes_palette_with_transparency_onto_white():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    img.info["transparency"] = 0
    out = decode_image(_encode(img, "PNG", transparency=0))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode):
    img = Image.new(mode, (4, 4), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    out = decode_image(_encode(img, "PNG"))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb():
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_encode(img, "JPEG", quality=95))
    r, g, b = out.getpixel((8, 8))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16_bit_greyscale_keeps_its_full_range():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    out = decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize("mode", ["1", "L", "I", "F", "YCbCr"])
def test_other_modes_become_rgb(mode):
    img = draw_image(0).convert(mode) if mode != "F" else draw_image(0).convert("L").convert("F")
    fmt = "TIFF" if mode in ("I", "F") else ("JPEG" if mode == "YCbCr" else "PNG")
    out = decode_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (96, 72)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    r, _, b = decode_image(data).getpixel((4, 4))
    assert r > 200 and b < 60


def test_exif_orientation_is_applied():
    upright = draw_image(3, size=(120, 80))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how a camera held sideways saves it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(_encode(stored, "PNG", exif=exif))  # lossless, so pixels compare exactly
    assert out.size == upright.size
    assert np.array_equal(np.asarray(out), np.asarray(upright))
    jpeg = decode_image(_encode(stored, "JPEG", quality=95, exif=exif))
    assert jpeg.size == upright.size


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_its_header():
    with pytest.raises(ImageError, match="2,500,000,000 pixels, above the limit"):
        decode_image(_png_claiming(50_000, 50_000))


def test_pixel_limit_is_configurable():
    data = _encode(draw_image(0), "PNG")
    with pytest.raises(ImageError, match="above the limit of 1,000 pixels"):
        decode_image(data, max_pixels=1000)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"<html><body>not an image</body></html>", "not an image"),
        (None, "truncated"),
    ],
    ids=["empty", "html", "truncated"],
)
def test_bad_data_raises_image_error_with_a_reason(data, reason):
    if data is None:
        data = _encode(draw_image(1, size=(400, 300)), "JPEG", quality=95)[:2000]
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


# -- preprocessing -----------------------------------------------------------------------

PHOTOS = {
    "astronaut": skimage.data.astronaut,
    "chelsea": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
    "camera": skimage.data.camera,
}

PROCESSORS = {
    "vit-exact-bilinear": lambda: ViTImageProcessor(size={"height": 224, "width": 224}),
    "bit-shortest-edge-crop-bicubic": lambda: BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ),
    "clip-small-upscale-crop": lambda: CLIPImageProcessor(
        size={"shortest_edge": 700}, crop_size={"height": 640, "width": 640}
    ),
}


@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize("proc_name", PROCESSORS)
def test_preprocessing_matches_the_checkpoint_image_processor(photo, proc_name, tmp_path):
    proc = PROCESSORS[proc_name]()
    proc.save_pretrained(tmp_path)
    reference_proc = AutoImageProcessor.from_pretrained(tmp_path)
    img = Image.fromarray(PHOTOS[photo]()).convert("RGB")
    expected = reference_proc(images=[img], return_tensors="np")["pixel_values"][0]
    ours = Preprocessing.from_processor(reference_proc)(img)
    assert ours.shape == expected.shape
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_preprocessing_settings_round_trip_as_json():
    import json

    pre = Preprocessing.from_processor(PROCESSORS["bit-shortest-edge-crop-bicubic"]())
    d = pre.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["resize"] == "shortest_edge" and d["crop"] == [224, 224] and d["resample"] == 3


# -- JPEG draft mode ---------------------------------------------------------------------


def _big_jpeg(photo, size=(1600, 1200)) -> bytes:
    img = Image.fromarray(PHOTOS[photo]()).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    return _encode(img, "JPEG", quality=90)


@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize("proc_name", ["vit-exact-bilinear", "bit-shortest-edge-crop-bicubic"])
def test_draft_decoding_stays_close_to_the_checkpoint_preprocessing(photo, proc_name, tmp_path):
    proc = PROCESSORS[proc_name]()
    proc.save_pretrained(tmp_path)
    reference_proc = AutoImageProcessor.from_pretrained(tmp_path)
    pre = Preprocessing.from_processor(reference_proc)
    data = _big_jpeg(photo)
    full = decode_image(data)
    drafted = decode_image(data, draft=pre)
    assert drafted.size == (800, 600)  # decoded at half scale in the DCT domain
    expected = reference_proc(images=[full], return_tensors="np")["pixel_values"][0]
    ours = pre(drafted)
    relative = np.abs(ours - expected).mean() / np.abs(expected).mean()
    assert relative < 0.015, relative


def test_draft_never_decodes_below_twice_the_model_input():
    pre = Preprocessing.from_processor(PROCESSORS["vit-exact-bilinear"]())
    small = _big_jpeg("coffee", size=(600, 450))  # 1/2 scale would be 300x225 < 448
    assert decode_image(small, draft=pre).size == (600, 450)
    png = _encode(Image.fromarray(PHOTOS["coffee"]()), "PNG")  # only JPEG has draft mode
    assert decode_image(png, draft=pre).size == (600, 400)


@pytest.mark.parametrize("proc_name", PROCESSORS)
def test_preprocessing_is_rebuilt_from_its_manifest_form(proc_name):
    pre = Preprocessing.from_processor(PROCESSORS[proc_name]())
    assert Preprocessing.from_dict(pre.to_dict()) == pre
