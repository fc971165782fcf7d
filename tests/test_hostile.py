"""Hostile input: every bad file is recorded with a reason (or handled), and the run goes on."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import draw_image, png_claiming
from PIL import Image

from simsearch import Index
from simsearch.cli import cli
from simsearch.models.embed import Embedder


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# Each case writes its file(s) into a folder and returns the name of the file to check and
# what must happen to it: None when it must be indexed, else a piece of the recorded reason.


def zero_byte(d: Path):
    (d / "empty.jpg").write_bytes(b"")
    return "empty.jpg", "empty file"


def truncated_jpeg(d: Path):
    data = _encode(draw_image(21, size=(400, 300)), "JPEG", quality=95)
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return "truncated.jpg", "truncated"


def png_bad_crc(d: Path):
    data = bytearray(_encode(draw_image(22), "PNG"))
    data[data.find(b"IDAT") + 10] ^= 0xFF  # flip bits in the compressed pixels
    (d / "badcrc.png").write_bytes(bytes(data))
    return "badcrc.png", "cannot decode image"


def html_named_jpg(d: Path):
    (d / "page.jpg").write_text("<!doctype html><html><body>404 Not Found</body></html>")
    return "page.jpg", "not an image"


def decompression_bomb(d: Path):
    (d / "bomb.png").write_bytes(png_claiming(50_000, 50_000))
    return "bomb.png", "above the limit"


def one_pixel(d: Path):
    Image.new("RGB", (1, 1), (200, 30, 30)).save(d / "dot.png")
    return "dot.png", None


def grey_16_bit(d: Path):
    ramp = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    Image.fromarray(ramp).save(d / "grey16.png")
    return "grey16.png", None


def cmyk_jpeg(d: Path):
    draw_image(23).convert("CMYK").save(d / "cmyk.jpg", quality=90)
    return "cmyk.jpg", None


def palette_transparency(d: Path):
    img = draw_image(24).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.save(d / "palette.png", transparency=0)
    return "palette.png", None


def animated_gif(d: Path):
    frames = [draw_image(i).convert("P") for i in (25, 26)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    return "anim.gif", None


def exif_rotated(d: Path):
    exif = Image.Exif()
    exif[0x0112] = 6
    draw_image(27).transpose(Image.Transpose.ROTATE_90).save(d / "rotated.jpg", exif=exif)
    return "rotated.jpg", None


def unreadable(d: Path):
    path = d / "secret.jpg"
    draw_image(28).save(path)
    path.chmod(0)
    return "secret.jpg", "permission denied"


def broken_symlink(d: Path):
    (d / "dangling.png").symlink_to(d / "nowhere.png")
    return "dangling.png", "broken symbolic link"


def symlink_loop(d: Path):
    (d / "loop.png").symlink_to(d / "loop.png")
    return "loop.png", "symbolic link loop"


def directory_named_jpg(d: Path):
    (d / "folder.jpg").mkdir()
    draw_image(29).save(d / "folder.jpg" / "inside.png")
    return "folder.jpg/inside.png", None


def non_utf8_name(d: Path):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8, indexed all the same
    draw_image(30).save(os.path.join(d, name))
    return name, None


def escape_text_name(d: Path):
    """A valid name that spells the escape of the one above: a file of its own."""
    draw_image(32).save(d / "caf\\xe9.png")
    return "caf\\xe9.png", None


def _ppm_claiming(width: int, height: int) -> bytes:
    return f"P6 {width} {height} 255\n".encode() + b"\0" * 64


def _tga_claiming(width: int, height: int) -> bytes:
    # Uncompressed true-colour TGA header: 18 bytes, the size as two little-endian shorts.
    header = struct.pack("<BBBHHBHHHHBB", 0, 0, 2, 0, 0, 0, 0, 0, width, height, 24, 0)
    return header + b"\0" * 64


def ppm_bomb(d: Path):
    """A 100-byte PPM whose header claims 100,000 x 100,000 pixels (30 GB decoded)."""
    (d / "bomb.ppm").write_bytes(_ppm_claiming(100_000, 100_000))
    return "bomb.ppm", "above the limit of"


def tga_bomb(d: Path):
    """A TGA (no magic number: found by suffix and header) claiming 65,535 x 65,535 pixels."""
    (d / "bomb.tga").write_bytes(_tga_claiming(65_535, 65_535))
    return "bomb.tga", "above the limit of"


def eps_named_jpg(d: Path):
    """PostScript would run in Ghostscript: refused as an image whatever it is named."""
    (d / "script.jpg").write_bytes(_encode(draw_image(33), "EPS"))
    return "script.jpg", "not an image, or a format"


def very_long_path(d: Path):
    deep = d
    for i in range(14):  # 14 folders of 200 characters: a path of ~2,900 characters
        deep = deep / (f"{i:02d}" + "x" * 198)
    deep.mkdir(parents=True)
    draw_image(31).save(deep / "deep.png")
    return str((deep / "deep.png").relative_to(d)), None


def fifo_named_jpg(d: Path):
    os.mkfifo(d / "pipe.jpg")
    return "pipe.jpg", "not a regular file"


CASES = [
    zero_byte,
    truncated_jpeg,
    png_bad_crc,
    html_named_jpg,
    decompression_bomb,
    one_pixel,
    grey_16_bit,
    cmyk_jpeg,
    palette_transparency,
    animated_gif,
    exif_rotated,
    broken_symlink,
    symlink_loop,
    directory_named_jpg,
    non_utf8_name,
    escape_text_name,
    ppm_bomb,
    tga_bomb,
    eps_named_jpg,
    very_long_path,
    fifo_named_jpg,
]
if os.geteuid() != 0:  # root reads any file, so a permission test cannot fail there
    CASES.append(unreadable)


@pytest.fixture(autouse=True)
def _no_hangs():
    """Turn a stalled run into a failure instead of a stuck test suite."""
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the run stalled"))
    signal.alarm(60)
    yield
    signal.alarm(0)


def _outcome(index: Index, folder: Path, name: str):
    """Return None if `name` is indexed with a vector, else its recorded error."""
    failed = {f.path: f.error for f in index.failed()}
    key = os.path.join(folder, name)
    if key in failed:
        return failed[key]
    known = index.store.lookup(key)
    if known is None or index.store.vector(known.id) is None:
        return "missing"
    return None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_each_hostile_file_is_recorded_or_indexed(case, tmp_path, tiny_vit):
    folder = tmp_path / "photos"
    folder.mkdir()
    draw_image(0).save(folder / "good.png")
    name, expected = case(folder)
    with Index.create(tmp_path / "index", model=tiny_vit) as index:
        summary = index.add(folder)
        outcome = _outcome(index, folder, name)
        if expected is None:
            assert outcome is None, outcome
        else:
            assert outcome is not None and expected in outcome, outcome
            assert summary.failed == 1
        assert _outcome(index, folder, "good.png") is None
        assert index.verify() == []


def test_a_folder_of_every_hostile_file_at_once(tmp_path, tiny_vit):
    folder = tmp_path / "photos"
    folder.mkdir()
    good = []
    for i in range(5):
        draw_image(i).save(folder / f"good{i}.png")
        good.append(f"good{i}.png")
    outcomes = {}
    for case in CASES:
        name, expected = case(folder)
        outcomes[name] = expected
    with Index.create(tmp_path / "index", model=tiny_vit) as index:
        summary = index.add(folder)
        for name in good:
            assert _outcome(index, folder, name) is None
        for name, expected in outcomes.items():
            outcome = _outcome(index, folder, name)
            if expected is None:
                assert outcome is None, (name, outcome)
            else:
                assert outcome is not None and expected in outcome, (name, outcome)
        bad = sum(1 for e in outcomes.values() if e is not None)
        assert summary.failed == bad
        assert summary.indexed == len(good) + len(outcomes) - bad
        assert index.verify() == []
        # A second run changes nothing and stores nothing twice.
        again = index.add(folder)
        assert again.indexed == 0 and again.removed == 0 and again.failed == bad
        assert len(index) == summary.indexed


def test_exif_rotated_jpeg_embeds_like_the_upright_one(tmp_path, tiny_vit):
    upright = draw_image(7, size=(120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    # A camera held sideways stores the pixels rotated and says so in EXIF.
    stored_rotated = upright.transpose(Image.Transpose.ROTATE_90)
    stored_rotated.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    upright.save(tmp_path / "upright.jpg", quality=95)
    embedder = Embedder(tiny_vit)
    with Index.create(tmp_path / "index", embedder=embedder) as index:
        index.add([tmp_path / "rotated.jpg", tmp_path / "upright.jpg"])
        rotated, straight = (index.store.vector(i) for i in (1, 2))
    sideways = embedder.embed_images([stored_rotated])[0]  # what ignoring EXIF would give
    distance, ignored_exif = 1 - float(rotated @ straight), 1 - float(sideways @ straight)
    assert distance < 1e-4
    assert ignored_exif > 100 * distance


def test_permission_denied_is_recorded(tmp_path, tiny_vit, monkeypatch):
    """The same as `unreadable`, made to happen for root too by failing the open call."""
    import simsearch.ops.ingest

    folder = tmp_path / "photos"
    folder.mkdir()
    draw_image(0).save(folder / "good.png")
    draw_image(1).save(folder / "secret.png")
    real_open = os.open

    def guarded_open(path, flags, *args):
        if str(path).endswith("secret.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(simsearch.ops.ingest.os, "open", guarded_open)
    with Index.create(tmp_path / "index", model=tiny_vit) as index:
        summary = index.add(folder)
        failed = {Path(f.path).name: f.error for f in index.failed()}
    assert summary.failed == 1 and "permission denied" in failed["secret.png"]


def test_file_deleted_between_listing_and_reading(tmp_path, tiny_vit, monkeypatch):
    import simsearch.ops.prepare

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        draw_image(i).save(folder / f"img{i}.png")
    real_read = simsearch.ops.prepare.read_image_file

    def read_after_delete(path):
        if path.endswith("img1.png"):
            os.unlink(path)
        return real_read(path)

    monkeypatch.setattr(simsearch.ops.prepare, "read_image_file", read_after_delete)
    with Index.create(tmp_path / "index", model=tiny_vit) as index:
        summary = index.add(folder)
        failed = {Path(f.path).name: f.error for f in index.failed()}
    assert (summary.indexed, summary.failed) == (2, 1)
    assert "disappeared" in failed["img1.png"]


def test_pixel_limit_is_configurable_per_run(tmp_path, tiny_vit):
    folder = tmp_path / "photos"
    folder.mkdir()
    draw_image(0, size=(100, 100)).save(folder / "big.png")
    draw_image(1, size=(20, 20)).save(folder / "small.png")
    with Index.create(tmp_path / "index", model=tiny_vit) as index:
        summary = index.add(folder, max_pixels=5_000)
        assert (summary.indexed, summary.failed) == (1, 1)
        assert "above the limit of 5,000 pixels" in index.failed()[0].error
        assert index.add(folder).indexed == 1  # default limit: indexed now


def test_queries_and_options_out_of_range_get_one_line(index_path):
    """Tracebacks before: an id past SQLite's 64-bit range (OverflowError), a negative
    seed (numpy's ValueError); a bare number was 'no such image file' with no hint; scores
    printed as 1.0000001192092896."""
    runner = CliRunner()
    args = ["--index", str(index_path)]
    cases = {
        ("search", "id:99999999999999999999999"): "no indexed image has id",
        ("search", "id:-5"): "no indexed image has id",
        ("cluster", "-k", "2", "--seed", "-1"): "--seed",
        ("search", "3"): "write id:3",
    }
    for argv, expected in cases.items():
        result = runner.invoke(cli, [*argv, *args])
        assert result.exit_code in (1, 2), (argv, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), argv
        assert expected in result.stderr.strip().splitlines()[-1], (argv, result.stderr)
    hits = json.loads(runner.invoke(cli, ["search", "id:1", "--json", *args]).stdout)["hits"]
    assert hits[0]["score"] == 1.0
    assert all(len(repr(h["score"])) <= 8 for h in hits)
