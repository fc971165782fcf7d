"""Dedup keeps the best file, judged on the file's true properties, and one file is one file.

The keep rule is real resolution (from the header: a JPEG decoded in draft mode is smaller
than the file), then lossless over lossy, then larger file, then older, then shorter path.
Every test here uses real files on disk, indexed the way a user indexes them.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import _save_vit, draw_image
from PIL import Image, ImageDraw

from simsearch import Index
from simsearch.cli import cli
from simsearch.media.header import header_facts

# Everything in these folders is one picture, so every copy joins one group at this cosine
# (the tiny random ViT puts even unrelated drawings above 0.9; which images are copies is
# not what these tests are about, which one is kept is).
LOW = 0.5


@pytest.fixture(scope="module")
def vit224(tmp_path_factory) -> Path:
    """A tiny ViT with the real models' 224-pixel input, so JPEG draft decoding works at the
    scale it does for users (a 4000x3000 photo is decoded at 500x375)."""
    return _save_vit(tmp_path_factory.mktemp("vit224"), seed=0, image_size=224, patch_size=32)


def camera_photo(size=(4000, 3000)) -> Image.Image:
    """A camera-size photograph: a real photo (scikit-image's astronaut) scaled up, with
    sensor-like noise so the JPEG is as large as a camera's. Made once per process (a copy
    each call)."""
    return _camera_photo(tuple(size)).copy()


@functools.lru_cache(maxsize=1)
def _camera_photo(size: tuple[int, int]) -> Image.Image:
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize(size, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).normal(0, 4, (size[1], size[0], 3))
    # In place: the same pixels as np.clip(img + noise, 0, 255), without two more 288 MB
    # temporaries (1.3 s -> 0.1 s).
    noise += np.asarray(img)
    np.clip(noise, 0, 255, out=noise)
    return Image.fromarray(noise.astype(np.uint8))


def dedup(index: Path, *args: str) -> list[dict]:
    result = CliRunner().invoke(
        cli, ["dedup", "--index", str(index), "--threshold", str(LOW), "--json", *args]
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def indexed(tmp_path: Path, model: Path, *folders: Path) -> Path:
    path = tmp_path / "index"
    with Index.create(path, model=model) as idx:
        idx.add(list(folders))
    return path


@pytest.mark.slow
def test_the_camera_original_is_kept_over_its_smaller_copies(tmp_path, vit224):
    photos = tmp_path / "photos"
    photos.mkdir()
    original = camera_photo()
    original.save(photos / "IMG_0001.jpg", quality=92)
    original.resize((1280, 960), Image.Resampling.LANCZOS).save(photos / "small.jpg", quality=90)
    original.crop((400, 300, 3600, 2700)).save(photos / "crop.jpg", quality=90)
    # Not JPEG, so never draft-decoded: indexing used to store these at full size and the
    # original at its draft size (1000x750), and kept a copy.
    original.resize((1600, 1200)).save(photos / "web.webp", quality=80)
    original.resize((1440, 1080)).save(photos / "screenshot.png")
    index = indexed(tmp_path, vit224, photos)

    (group,) = dedup(index)
    assert group["keep"] == str(photos / "IMG_0001.jpg")
    assert (group["width"], group["height"], group["format"]) == (4000, 3000, "JPEG")
    dups = {Path(d["path"]).name: d for d in group["duplicates"]}
    assert set(dups) == {"small.jpg", "crop.jpg", "web.webp", "screenshot.png"}
    assert (dups["crop.jpg"]["width"], dups["crop.jpg"]["height"]) == (3200, 2400)
    assert (dups["web.webp"]["format"], dups["web.webp"]["lossless"]) == ("WEBP", False)
    assert {d["why"] for d in dups.values()} == {"higher resolution"}

    # --move-to moves the copies, never the original.
    result = CliRunner().invoke(
        cli,
        ["dedup", "--index", str(index), "--threshold", str(LOW), "--move-to", tmp_path / "d"],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in photos.iterdir()) == ["IMG_0001.jpg"]


def test_each_tie_break_in_order(tmp_path, vit224):
    photos = tmp_path / "photos"
    photos.mkdir()
    picture = Image.new("RGB", (640, 480), (40, 70, 210))  # flat colours: no noise
    ImageDraw.Draw(picture).ellipse((100, 80, 400, 380), fill=(240, 200, 30))
    # Lossless beats lossy at the same resolution, even as the smaller file: a flat drawing
    # compresses far better as PNG than as a quality-100 JPEG.
    picture.save(photos / "drawing.png")
    picture.save(photos / "drawing-q100.jpg", quality=100)
    assert (photos / "drawing.png").stat().st_size < (photos / "drawing-q100.jpg").stat().st_size
    # Among lossy files of one resolution, the larger file.
    picture.save(photos / "drawing-q60.jpg", quality=60)
    # Same bytes: the older, then the shorter path.
    (photos / "a-copy-older.jpg").write_bytes((photos / "drawing-q60.jpg").read_bytes())
    (photos / "longer-name-same-age.jpg").write_bytes((photos / "drawing-q60.jpg").read_bytes())
    (photos / "x.jpg").write_bytes((photos / "drawing-q60.jpg").read_bytes())
    when = 1_600_000_000
    for name in ("drawing-q60.jpg", "longer-name-same-age.jpg", "x.jpg"):
        os.utime(photos / name, (when, when))
    os.utime(photos / "a-copy-older.jpg", (when - 86_400, when - 86_400))
    index = indexed(tmp_path, vit224, photos)

    (group,) = dedup(index)
    assert Path(group["keep"]).name == "drawing.png"
    assert group["lossless"] is True
    why = {Path(d["path"]).name: d["why"] for d in group["duplicates"]}
    assert why["drawing-q100.jpg"] == "lossless"
    assert why["drawing-q60.jpg"] == "lossless"
    # The order among the others is the rule's order too: rank them by the rule alone.
    with Index.open(index) as idx:
        from simsearch.ops.dedup import describe, keep_order

        facts = idx.store.keep_facts(idx.store.vector_ids().tolist())
        ranked = sorted((describe(p, f) for p, _, f in facts.values()), key=keep_order)
    assert [Path(m.path).name for m in ranked] == [
        "drawing.png",  # lossless
        "drawing-q100.jpg",  # larger file
        "a-copy-older.jpg",  # older
        "x.jpg",  # shorter path
        "drawing-q60.jpg",  # shorter path
        "longer-name-same-age.jpg",
    ]


def test_header_facts_read_the_true_size_format_and_encoding(tmp_path):
    picture = draw_image(1, (300, 200))
    cases = {
        "a.png": ({}, "PNG", True),
        "a.jpg": ({"quality": 90}, "JPEG", False),
        "lossy.webp": ({"quality": 80}, "WEBP", False),
        "lossless.webp": ({"lossless": True}, "WEBP", True),
        "a.tif": ({"compression": "tiff_lzw"}, "TIFF", True),
        "jpeg.tif": ({"compression": "jpeg"}, "TIFF", False),
        "a.gif": ({}, "GIF", False),
        "a.bmp": ({}, "BMP", True),
    }
    for name, (options, fmt, lossless) in cases.items():
        picture.save(tmp_path / name, **options)
        facts = header_facts(tmp_path / name)
        assert (facts.width, facts.height, facts.format, facts.lossless) == (
            300,
            200,
            fmt,
            lossless,
        ), name
        assert header_facts((tmp_path / name).read_bytes()) == facts


def test_an_index_made_before_true_sizes_is_fixed_without_the_model(tmp_path, vit224):
    """Indexes made before this version stored the draft decode's size and no format. dedup
    reads the headers until a writer has fixed them; the next `index` run fixes them
    without the model (its folder is gone here)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(vit224, model)
    photos = tmp_path / "photos"
    photos.mkdir()
    original = camera_photo()
    original.save(photos / "IMG_0001.jpg", quality=92)
    original.resize((1280, 960), Image.Resampling.LANCZOS).save(photos / "small.jpg", quality=90)
    index = indexed(tmp_path, model, photos)
    # Make it what an old index holds: the draft sizes, and no format/lossless/device columns.
    db = sqlite3.connect(index / "meta.sqlite")
    db.execute("UPDATE images SET width = 500, height = 375 WHERE path LIKE '%IMG_0001.jpg'")
    db.execute("UPDATE images SET width = 640, height = 480 WHERE path LIKE '%small.jpg'")
    for column in ("format", "lossless", "device"):
        db.execute(f"ALTER TABLE images DROP COLUMN {column}")
    db.execute("PRAGMA user_version = 0")  # before schema versions
    db.commit()
    db.close()

    (group,) = dedup(index)  # opening adds the columns (empty): the headers read
    assert Path(group["keep"]).name == "IMG_0001.jpg"
    assert (group["width"], group["height"]) == (4000, 3000)

    shutil.rmtree(model)
    with Index.open(index) as idx:
        summary = idx.add(photos)
        assert (summary.indexed, summary.unchanged) == (0, 2)
        facts = idx.store.keep_facts(idx.store.vector_ids().tolist())
    sizes = {Path(p).name: (f.width, f.height, f.format) for p, _, f in facts.values()}
    assert sizes == {"IMG_0001.jpg": (4000, 3000, "JPEG"), "small.jpg": (1280, 960, "JPEG")}


def alias_layouts(tmp_path: Path) -> dict[str, list[Path]]:
    """Folders where two indexed paths name one file, each next to a real smaller copy."""
    layouts = {}
    for kind in ("folder-symlink", "file-symlink", "hard-link"):
        root = tmp_path / kind
        photos = root / "photos"
        photos.mkdir(parents=True)
        for i in range(3):
            draw_image(i, (320, 240)).save(photos / f"p{i}.png")
        draw_image(0, (160, 120)).save(photos / "p0-small.jpg", quality=80)
        if kind == "folder-symlink":
            (root / "link").symlink_to(photos, target_is_directory=True)
            layouts[kind] = [photos, root / "link"]
        elif kind == "file-symlink":
            (photos / "p1-link.png").symlink_to(photos / "p1.png")
            layouts[kind] = [photos]
        else:
            os.link(photos / "p2.png", photos / "p2-hard.png")
            layouts[kind] = [photos]
    return layouts


@pytest.mark.parametrize("kind", ["folder-symlink", "file-symlink", "hard-link"])
def test_paths_naming_one_file_are_never_duplicates_of_each_other(tmp_path, vit224, kind):
    folders = alias_layouts(tmp_path)[kind]
    photos = folders[0]
    before = {p: p.read_bytes() for p in photos.iterdir()}
    index = indexed(tmp_path, vit224, *folders)
    # At this threshold only byte-identical files group: the aliases are the only ones.
    strict = ["dedup", "--index", str(index), "--threshold", "0.99999"]
    result = CliRunner().invoke(cli, [*strict, "--json"])
    assert result.exit_code == 0 and result.stdout == "", result.output
    result = CliRunner().invoke(cli, [*strict, "--delete", "--yes"])
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in photos.iterdir()} == before  # nothing deleted


def test_aliases_are_listed_with_the_group_they_belong_to(tmp_path, vit224):
    folders = alias_layouts(tmp_path)["folder-symlink"]
    index = indexed(tmp_path, vit224, *folders)
    with Index.open(index) as idx:
        (group,) = idx.duplicates(-1.0)  # every image in one group
    # Kept: a path with no symlink on the way; its alias through the link is listed, not a
    # duplicate; the real copies are duplicates once each.
    assert Path(group.keep_path).parent == folders[0]
    names = sorted(Path(d.path).name for d in group.duplicates)
    assert all(Path(d.path).parent == folders[0] for d in group.duplicates)
    everything = {"p0.png", "p1.png", "p2.png", "p0-small.jpg"}
    assert names == sorted(everything - {Path(group.keep_path).name})
    assert len(group.aliases) == 4 and all(Path(a).parent == folders[1] for a in group.aliases)


def test_a_real_file_is_kept_over_a_symlink_to_a_better_one_elsewhere(tmp_path, vit224):
    """Keeping the link and deleting the real file would leave the folder with a pointer to
    a file outside it, which may be cleaned up next: the real file is kept, and deleting
    the link (the duplicate) leaves its target untouched."""
    outside, photos = tmp_path / "outside", tmp_path / "photos"
    outside.mkdir()
    photos.mkdir()
    picture = draw_image(4, (1600, 1200))
    picture.save(outside / "big.png")
    picture.resize((640, 480)).save(photos / "real.jpg", quality=90)
    (photos / "big-link.png").symlink_to(outside / "big.png")
    index = indexed(tmp_path, vit224, photos)
    (group,) = dedup(index)
    assert Path(group["keep"]).name == "real.jpg"
    assert [(Path(d["path"]).name, d["why"]) for d in group["duplicates"]] == [
        ("big-link.png", "a file, not a link")
    ]
    result = CliRunner().invoke(
        cli, ["dedup", "--index", str(index), "--threshold", str(LOW), "--delete", "--yes"]
    )
    assert result.exit_code == 0, result.output
    assert (photos / "real.jpg").exists() and (outside / "big.png").exists()
    assert not (photos / "big-link.png").is_symlink()
