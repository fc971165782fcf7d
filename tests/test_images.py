"""Finding files, decoding every image mode to upright RGB, and preprocessing like transformers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from conftest import draw_image, png_claiming
from PIL import Image
from transformers import (
    AutoImageProcessor,
    BitImageProcessor,
    CLIPImageProcessor,
    ViTImageProcessor,
)

from simsearch.errors import ImageError, InputPathError
from simsearch.media.decode import decode_image
from simsearch.media.discover import find_images
from simsearch.media.formats import image_suffixes
from simsearch.media.header import header_facts
from simsearch.media.preprocess import Preprocessing


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
    (tmp_path / "b" / "clip.mov").write_bytes(b"x")
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


def test_decompression_bomb_is_refused_from_its_header():
    with pytest.raises(ImageError, match="2,500,000,000 pixels, above the limit"):
        decode_image(png_claiming(50_000, 50_000))


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


@pytest.mark.parametrize(
    "proc_name, side, size, crop",
    [
        ("bit-shortest-edge-crop-bicubic", 112, (128,), (112, 112)),
        ("vit-exact-bilinear", 112, (112, 112), None),
        ("clip-small-upscale-crop", 320, (350,), (320, 320)),
    ],
)
def test_a_students_smaller_input_is_the_same_preprocessing_scaled(
    proc_name, side, size, crop, tmp_path
):
    """A distilled student that sees smaller images preprocesses as the checkpoint's image
    processor does at that size: the same crop of the picture, fewer pixels."""
    pre = Preprocessing.from_processor(PROCESSORS[proc_name]())
    small = pre.scaled_to(side)
    assert (small.size, small.crop, small.input_side()) == (size, crop, side)
    assert (small.resample, small.mean, small.std) == (pre.resample, pre.mean, pre.std)
    img = Image.fromarray(PHOTOS["coffee"]()).convert("RGB")
    assert small(img).shape == (3, side, side)
    # as transformers does it at that size
    proc = PROCESSORS[proc_name]()
    proc.size = {"shortest_edge": size[0]} if crop else {"height": side, "width": side}
    if crop:
        proc.crop_size = {"height": side, "width": side}
    expected = proc(images=[img], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(small(img), expected, atol=1e-5)
    unscaled = Preprocessing("none", (), 2, (32, 32), None, None, None)
    with pytest.raises(ValueError, match="not a resized square"):
        unscaled.scaled_to(16)


# -- every format the installed Pillow opens -------------------------------------------------


def _savable_suffixes() -> list[tuple[str, str]]:
    """(suffix, Pillow format) of every scanned suffix whose format Pillow can also write."""
    Image.init()
    scanned = image_suffixes()
    return sorted(
        (ext, fmt)
        for ext, fmt in Image.registered_extensions().items()
        if ext in scanned and fmt in Image.SAVE
    )


def test_folder_scans_take_the_suffixes_of_pillows_registry():
    scanned = image_suffixes()
    # Formats the issue names, all opened by Pillow itself.
    for ext in (".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".j2k", ".ico", ".tga", ".mpo", ".avif"):
        assert ext in scanned, ext
    # Never: PostScript runs in Ghostscript; PDF Pillow only writes; MPEG is a video.
    for ext in (".eps", ".ps", ".pdf", ".mpg", ".mpeg", ".txt", ".mov"):
        assert ext not in scanned, ext


@pytest.mark.parametrize(("ext", "fmt"), _savable_suffixes())
def test_each_scanned_format_pillow_writes_is_found_and_decoded(tmp_path, ext, fmt):
    img = draw_image(3, size=(64, 48))
    mode = {"XBM": "1", "PPM": "RGB", "MSP": "1", "BLP": "P", "PALM": "P"}.get(fmt)
    if ext == ".pbm":
        mode = "1"
    elif ext == ".pgm":
        mode = "L"
    elif ext == ".pfm":
        mode = "F"
    path = tmp_path / f"picture{ext}"
    try:
        (img.convert(mode) if mode else img).save(path, fmt)
    except (OSError, ValueError, KeyError) as exc:  # a writer that needs another mode or size
        pytest.skip(f"Pillow cannot write this test image as {fmt}: {exc}")
    assert list(find_images([tmp_path])) == [path]
    out = decode_image(path.read_bytes(), name=path)
    assert out.mode == "RGB" and out.size[0] > 0


def test_a_huge_header_in_a_newly_scanned_format_is_refused_before_decoding():
    import time

    from test_hostile import _ppm_claiming, _tga_claiming

    for data in (_ppm_claiming(100_000, 100_000), _tga_claiming(65_535, 65_535)):
        start = time.perf_counter()
        with pytest.raises(ImageError, match="above the limit of"):
            decode_image(data)
        assert time.perf_counter() - start < 0.5  # the header only: 10-30 GB never allocated


def test_postscript_never_reaches_ghostscript_whatever_its_name(monkeypatch):
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a))
    eps = _encode(draw_image(4), "EPS")
    for name in ("photo.jpg", "photo.eps", None):
        with pytest.raises(ImageError, match="not an image, or a format"):
            decode_image(eps, name=name)
    assert ran == []


def test_find_images_reports_folders_whose_files_were_all_skipped(tmp_path):
    only_other = tmp_path / "clips"
    (only_other / "sub").mkdir(parents=True)
    for name in ("a.mov", "b.MOV", "sub/c.xyz", "README"):
        (only_other / name).write_bytes(b"x")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "x.png").write_bytes(b"x")
    (mixed / "y.mov").write_bytes(b"x")
    skipped: dict = {}
    found = list(find_images([only_other, mixed, mixed / "y.mov"], skipped=skipped))
    assert [p.name for p in found] == ["x.png", "y.mov"]  # a file named directly is taken
    assert skipped == {str(only_other): {".mov": 2, ".xyz": 1, "": 1}}


def test_the_tally_of_skipped_suffixes_stays_bounded(tmp_path, monkeypatch):

    monkeypatch.setattr("simsearch.config.SKIPPED_SUFFIXES_KEPT", 3)
    for i in range(10):
        (tmp_path / f"file.x{i}").write_bytes(b"x")
    skipped: dict = {}
    assert list(find_images([tmp_path], skipped=skipped)) == []
    assert skipped[str(tmp_path)] == {".x0": 1, ".x1": 1, ".x2": 1, "other": 7}


# -- optional formats: HEIC/HEIF (pillow-heif) and camera RAW (rawpy) ----------------------


def test_without_the_extras_heic_and_raw_are_not_scanned_and_the_notice_says_why(
    tmp_path, monkeypatch
):
    import simsearch.media.formats as formats
    from simsearch.cli.indexing import _skipped_line

    monkeypatch.setattr(formats, "optional_module", lambda module, extra: None)
    monkeypatch.setattr(formats, "_formats", None)  # worked out again, without them
    # pillow-heif, if installed, has already registered its opener: take it out again.
    Image.init()
    monkeypatch.setattr(Image, "OPEN", {k: v for k, v in Image.OPEN.items() if k != "HEIF"})
    monkeypatch.setattr(Image, "ID", [k for k in Image.ID if k != "HEIF"])
    without = {k: v for k, v in Image.EXTENSION.items() if v != "HEIF"}
    monkeypatch.setattr(Image, "EXTENSION", without)
    for name in ("a.heic", "b.HEIC", "c.dng"):
        (tmp_path / name).write_bytes(b"x")
    skipped: dict = {}
    assert list(find_images([tmp_path], skipped=skipped)) == []
    counts = skipped[str(tmp_path)]
    assert counts == {".heic": 2, ".dng": 1}
    line = _skipped_line(counts)
    assert "simsearch[heic]" in line and "simsearch[raw]" in line
    monkeypatch.undo()
    assert formats._registry() is not None


def test_heic_photos_are_scanned_and_decoded_with_pillow_heif(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif", reason="the heic extra is not installed")
    image_suffixes()  # registers the opener
    path = tmp_path / "iphone.HEIC"
    pillow_heif.from_pillow(draw_image(5, size=(64, 48))).save(path, quality=90)
    assert ".heic" in image_suffixes()
    assert list(find_images([tmp_path])) == [path]
    out = decode_image(path.read_bytes(), name=path)
    assert out.size == (64, 48) and out.mode == "RGB"
    reference = np.asarray(draw_image(5, size=(64, 48)), dtype=np.float32)
    assert np.abs(np.asarray(out, dtype=np.float32) - reference).mean() < 12  # lossy codec


def test_heic_pixel_limit_is_checked_from_its_header():
    pillow_heif = pytest.importorskip("pillow_heif", reason="the heic extra is not installed")
    image_suffixes()
    buf = io.BytesIO()
    pillow_heif.from_pillow(draw_image(6, size=(64, 48))).save(buf, quality=50)
    with pytest.raises(ImageError, match="64x48 = 3,072 pixels, above the limit of 1,000"):
        decode_image(buf.getvalue(), max_pixels=1_000, name="x.heic")


def _dng(width: int = 64, height: int = 48, preview=None, orientation: int = 1) -> bytes:
    """A real, minimal DNG (RGGB Bayer sensor data, 12 bits), optionally with an RGB
    preview in IFD0 as cameras store one, written with tifffile."""
    tifffile = pytest.importorskip("tifffile")
    cfa = np.random.default_rng(0).integers(0, 4000, (height, width)).astype(np.uint16)
    dng_tags = [
        (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
        (50707, "B", 4, (1, 1, 0, 0), True),  # DNGBackwardVersion
        (50708, "s", 0, "simsearch test", True),  # UniqueCameraModel
        (50721, "2i", 9, (1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1), True),  # matrix
        (50728, "2I", 3, (1, 1, 1, 1, 1, 1), True),  # AsShotNeutral
        (274, "H", 1, orientation, True),
    ]
    cfa_tags = [
        (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
        (33422, "B", 4, (0, 1, 1, 2), True),  # CFAPattern: RGGB
        (50717, "I", 1, 4095, True),  # WhiteLevel
    ]
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        if preview is None:
            tif.write(cfa, photometric=32803, subfiletype=0, extratags=dng_tags + cfa_tags)
        else:
            tif.write(preview, photometric="rgb", subfiletype=1, subifds=1, extratags=dng_tags)
            tif.write(cfa, photometric=32803, subfiletype=0, extratags=cfa_tags)
    return buf.getvalue()


def test_camera_raw_is_scanned_and_developed_at_half_size_without_a_preview(tmp_path):
    pytest.importorskip("rawpy", reason="the raw extra is not installed")
    path = tmp_path / "IMG_0001.DNG"
    path.write_bytes(_dng(64, 48))
    assert list(find_images([tmp_path])) == [path]
    out = decode_image(path.read_bytes(), name=path)
    assert out.mode == "RGB" and out.size == (32, 24)


def test_camera_raw_uses_its_embedded_preview_turned_upright(tmp_path):
    pytest.importorskip("rawpy", reason="the raw extra is not installed")
    preview = np.zeros((30, 40, 3), np.uint8)
    preview[:, :20] = (255, 0, 0)  # left half red
    out = decode_image(_dng(preview=preview, orientation=6), name="sideways.nef")
    assert out.size == (30, 40)  # the camera was held sideways: turned a quarter clockwise
    assert out.getpixel((15, 5)) == (255, 0, 0)  # the red half is on top now
    assert out.getpixel((15, 35)) == (0, 0, 0)


def test_camera_raw_sensor_size_is_checked_before_unpacking(tmp_path):
    pytest.importorskip("rawpy", reason="the raw extra is not installed")
    with pytest.raises(ImageError, match="camera RAW sensor is 64x48 = 3,072 pixels"):
        decode_image(_dng(64, 48), max_pixels=1_000, name="x.dng")
    with pytest.raises(ImageError, match="cannot decode camera RAW"):
        decode_image(b"II*\0" + b"\0" * 100, name="broken.cr2")


def test_camera_raw_header_facts_are_the_sensor_size_and_count_as_lossless(tmp_path):
    """Dedup's keep rule compares the sensor's size, not the preview's or the half-size
    development's that indexing decodes: the RAW original beats a JPEG export of it."""
    pytest.importorskip("rawpy", reason="the raw extra is not installed")
    path = tmp_path / "IMG_0001.DNG"
    path.write_bytes(_dng(64, 48, preview=np.zeros((12, 16, 3), np.uint8)))
    facts = header_facts(path)
    assert (facts.width, facts.height, facts.format, facts.lossless) == (64, 48, "RAW", True)
    assert header_facts(path.read_bytes(), name=path) == facts
