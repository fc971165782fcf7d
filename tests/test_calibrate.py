"""Dedup threshold calibration: edited copies of the index's own images set against their
nearest other images, and dedup at the calibrated threshold finding planted copies."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from simsearch import Index
from simsearch.cli import cli as main
from simsearch.cli.render import calibration_line
from simsearch.errors import QueryError
from simsearch.ops.calibrate import EDITS, choose_threshold, edit, mistake_weights


@pytest.fixture(scope="session")
def thumbnail_vit(tmp_path_factory) -> Path:
    """A ViT built to see: one 32 px patch whose embedding is a 4 x 4 colour thumbnail of
    the image, blocks that pass it through unchanged, and the final LayerNorm, so the
    cosine of two images is the correlation of their thumbnails: a crude but real notion
    of "looks alike", which a randomly initialised tiny ViT lacks."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    size, grid = 32, 4
    config = ViTConfig(
        hidden_size=3 * grid * grid,
        num_hidden_layers=1,
        num_attention_heads=3,
        intermediate_size=16,
        image_size=size,
        patch_size=size,
    )
    model = ViTModel(config, add_pooling_layer=False)
    cell = size // grid
    weight = torch.zeros(3 * grid * grid, 3, size, size)
    for k in range(3):
        for r in range(grid):
            for c in range(grid):
                rows, cols = slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell)
                weight[(k * grid + r) * grid + c, k, rows, cols] = 1.0 / cell**2
    with torch.no_grad():
        model.embeddings.patch_embeddings.projection.weight.copy_(weight)
        model.embeddings.patch_embeddings.projection.bias.zero_()
        model.embeddings.position_embeddings.zero_()
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "o_proj.bias", "fc2.weight", "fc2.bias")):
                param.zero_()  # attention and MLP add nothing: the residual passes through
    folder = tmp_path_factory.mktemp("thumbnail-vit")
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


SCENES = 24


def scene(i: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """The i-th drawn scene: six shapes of random colours and places on a random ground."""
    rng = np.random.default_rng(1000 + i)
    w, h = size
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.uniform(-0.2, 0.8) * w, rng.uniform(-0.2, 0.8) * h
        x1, y1 = x0 + rng.uniform(0.2, 0.6) * w, y0 + rng.uniform(0.2, 0.6) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour)
    return img


def open_index(path: Path, model: Path) -> Index:
    return Index.create(path, model, pool="mean")


@pytest.fixture
def planted(tmp_path) -> tuple[Path, set[frozenset[str]]]:
    """24 distinct scenes, and resized, re-encoded and cropped copies of half of them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(SCENES):
        scene(i).save(folder / f"scene{i:02d}.png")
    groups = set()
    for i in range(0, SCENES, 2):
        img = scene(i)
        copy = [
            img.resize((80, 60), Image.BILINEAR),  # a thumbnail
            img,  # re-encoded as a low-quality JPEG below
            img.crop((10, 8, 150, 112)),  # trimmed edges
        ][i % 3]
        copy.save(folder / f"copy{i:02d}.jpg", quality=60)
        groups.add(frozenset({str(folder / f"scene{i:02d}.png"), str(folder / f"copy{i:02d}.jpg")}))
    return folder, groups


def found(groups) -> set[frozenset[str]]:
    return {frozenset({g.keep_path, *(d.path for d in g.duplicates)}) for g in groups}


def test_dedup_finds_the_planted_copies_and_nothing_else_at_the_calibrated_threshold(
    tmp_path, thumbnail_vit, planted
):
    folder, truth = planted
    with open_index(tmp_path / "idx", thumbnail_vit) as index:
        index.add(folder)
        calibration = index.calibrate_dedup(sample=36)
        assert calibration.images == 36 and calibration.copies == 36 * len(EDITS)
        assert 0.0 < calibration.threshold < 1.0
        assert calibration.precision >= 0.9 and calibration.recall >= 0.7
        assert set(calibration.recall_by_edit) == set(EDITS)
        assert found(index.duplicates()) == truth
    # Kept in the manifest: a later process dedups without the model.
    with Index.open(tmp_path / "idx") as index:
        assert index.info().dedup_calibration["threshold"] == calibration.threshold
        assert found(index.duplicates()) == truth
        assert index.parts.models.loaded is None
    on_disk = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert on_disk["dedup_calibration"]["threshold"] == calibration.threshold


def test_the_first_dedup_calibrates_once_and_later_ones_reuse_it(tmp_path, thumbnail_vit, planted):
    folder, truth = planted
    with open_index(tmp_path / "idx", thumbnail_vit) as index:
        index.add(folder)
    runner = CliRunner()
    args = ["dedup", "--index", str(tmp_path / "idx"), "--json"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "dedup threshold" in first.stderr and "expected precision" in first.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert {frozenset({g["keep"], *(d["path"] for d in g["duplicates"])}) for g in lines} == truth
    second = runner.invoke(main, args)
    assert second.exit_code == 0 and "dedup threshold" not in second.stderr
    assert second.stdout == first.stdout
    again = runner.invoke(main, [*args[:3], "--calibrate", "--json", "--calibration-sample", "5"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["images"] == 5
    info = json.loads(
        runner.invoke(main, ["info", "--index", str(tmp_path / "idx"), "--json"]).stdout
    )
    assert info["dedup_calibration"]["images"] == 5


def test_choose_threshold_cuts_in_the_middle_of_the_gap_when_the_sets_separate():
    threshold, precision, recall = choose_threshold(
        np.array([0.95, 0.97, 0.99]), np.array([0.5, 0.8])
    )
    assert threshold == pytest.approx(0.875)
    assert (precision, recall) == (1.0, 1.0)


def test_choose_threshold_rounds_without_moving_the_cut_across_a_score():
    # The gap's middle, 0.94243, read to four decimals (0.9424) would let the 0.94241 in.
    threshold, precision, _ = choose_threshold(np.array([0.94245, 0.99]), np.array([0.94241]))
    assert 0.94241 < threshold <= 0.94245 and precision == 1.0


def test_choose_threshold_trades_precision_for_recall_by_f_beta():
    copies = np.array([0.99, 0.98, 0.97, 0.96, 0.70])  # one hard copy, among the others
    others = np.array([0.90, 0.80, 0.75, 0.72, 0.60, 0.50])
    threshold, precision, recall = choose_threshold(copies, others, beta=1.0)
    # Reaching the 0.70 copy would take four false pairs: F1 0.67 < 0.89 without it.
    assert 0.90 < threshold < 0.96
    assert (precision, recall) == (1.0, 0.8)


def test_a_stranger_costs_more_where_the_collection_holds_few_copies():
    """The edited copies say how copies score, not how many there are: counted as seven
    real copies each, they outweigh a near-distinct picture (a burst shot at 0.90) and the
    cut falls below it; standing for the one copy the neighbours hold, they do not."""
    copies = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.85, 0.84])
    others = np.array([0.90, 0.50, 0.40])
    assert choose_threshold(copies, others)[0] < 0.85
    threshold, precision, recall = choose_threshold(copies, others, copies_expected=1.0)
    assert 0.90 < threshold < 0.95
    assert (precision, recall) == (1.0, pytest.approx(5 / 7))
    # Where the collection holds many copies, the same stranger is worth taking.
    assert choose_threshold(copies, others, copies_expected=20.0)[0] < 0.85


def test_only_neighbours_above_the_copies_level_are_taken_for_copies():
    """A neighbour above the median of the image's edited copies is a copy, and so is one
    above it against that copy; one below both is a different picture, however many copies
    the image has above it (method 2 took as many again below the level for copies, and so
    near-distinct shots of one scene became 'copies')."""
    copies = np.array([0.99, 0.98, 0.97, 0.95, 0.93])
    neighbours = np.array([0.985, 0.96, 0.94, 0.80])
    between = np.array(
        [
            [1.0, 0.90, 0.975, 0.7],
            [0.90, 1.0, 0.90, 0.7],
            [0.975, 0.90, 1.0, 0.7],
            [0.7, 0.7, 0.7, 1.0],
        ]
    )
    weights, found = mistake_weights(neighbours, copies, between)
    # 0.985: above the level (0.97); 0.94: a copy of that copy (0.975); 0.96 and 0.80: not.
    assert weights.tolist() == [0.0, 1.0, 0.0, 1.0] and found == 2.0
    weights, found = mistake_weights(neighbours, copies)
    assert weights.tolist() == [0.0, 1.0, 1.0, 1.0] and found == 1.0


def test_every_edit_makes_a_different_image_of_a_sensible_size():
    img = scene(3)
    rng = np.random.default_rng(0)
    original = np.asarray(img, dtype=np.int16)
    for name in EDITS:
        copy = edit(img, name, rng)
        assert copy.mode == "RGB" and min(copy.size) >= 30, name
        if copy.size == img.size:
            assert np.abs(np.asarray(copy, dtype=np.int16) - original).mean() > 0.5, name
    with pytest.raises(ValueError, match="unknown edit"):
        edit(img, "sepia", rng)


def test_calibration_needs_two_images_and_readable_files(tmp_path, thumbnail_vit):
    folder = tmp_path / "one"
    folder.mkdir()
    scene(0).save(folder / "a.png")
    with open_index(tmp_path / "idx", thumbnail_vit) as index:
        index.add(folder)
        with pytest.raises(QueryError, match="at least 2 indexed images"):
            index.calibrate_dedup()
        scene(1).save(folder / "b.png")
        index.add(folder)
        for f in folder.iterdir():
            f.write_bytes(b"changed since indexing")
        with pytest.raises(QueryError, match="moved or changed since"):
            index.calibrate_dedup()
        assert index.info().dedup_calibration is None


def test_copies_already_in_the_collection_do_not_push_the_threshold_past_them(
    tmp_path, thumbnail_vit
):
    """Half the scenes come with six copies each, edited as the calibration edits (but for
    the mirror, which a thumbnail cannot see through). Method 1 counted the copies below
    its edited copies' median as mistakes: threshold 0.98, 45 of the 168 pairs. Estimating
    them as copies finds most of the pairs (at fixed thresholds the model allows 0.71 of them
    at precision 1, 0.82 at 0.92) and no false one."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(7)
    truth = set()
    for i in range(16):
        img = scene(i)
        img.save(folder / f"scene{i:02d}.png")
        if i % 2:
            continue
        group = [folder / f"scene{i:02d}.png"]
        for name in EDITS:
            if name != "flip":
                group.append(folder / f"copy{i:02d}-{name}.png")
                edit(img, name, rng).save(group[-1])
        truth |= {frozenset(map(str, p)) for p in itertools.combinations(group, 2)}
    with open_index(tmp_path / "idx", thumbnail_vit) as index:
        index.add(folder)
        calibration = index.calibrate_dedup(sample=64)
        assert calibration.method == 3 and calibration.copies_among_others > 100
        pairs = {
            frozenset(p)
            for g in index.duplicates()
            for p in itertools.combinations([g.keep_path, *(d.path for d in g.duplicates)], 2)
        }
    assert calibration.threshold < 0.9
    assert len(pairs & truth) >= 0.6 * len(truth), calibration_line(calibration)
    assert len(pairs & truth) >= 0.95 * len(pairs), calibration_line(calibration)


def test_a_calibration_stored_by_the_older_method_is_kept_with_a_warning(
    tmp_path, thumbnail_vit, planted, caplog, run
):
    folder, _ = planted
    with open_index(tmp_path / "idx", thumbnail_vit) as index:
        index.add(folder)
        stored = dataclasses.asdict(index.calibrate_dedup(sample=12))
        for added in ("method", "copies_among_others"):  # what an index of method 1 holds
            del stored[added]
        with index.parts.writing():
            index.parts.set_manifest(dataclasses.replace(index.manifest, dedup_calibration=stored))
    with Index.open(tmp_path / "idx") as index:
        assert index.dedup_calibration().threshold == stored["threshold"]
        assert index.dedup_calibration().method == 1
        assert "older method" in caplog.text and "calibrate it again" in caplog.text
        assert index.parts.models.loaded is None
    result = run("dedup", "--index", tmp_path / "idx")
    assert result.exit_code == 0, result.output
    assert "run `simsearch dedup --calibrate` to calibrate it again" in result.stderr
