"""Labels: a classification head names images, `index --label-model` stores the names, and
`search --label` keeps to the images that have one.

The classifier is a tiny ViT whose head is fitted in the fixture (ridge regression on its
[CLS] features of drawn shapes), so it is genuinely right on shapes it never saw: a wrong
class mapping, ordering or preprocessing shows up as a wrong name.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from simsearch import Index
from simsearch.errors import ModelLoadError, QueryError
from simsearch.ops.label import Labeller, matching_labels

# The classes, deliberately not in alphabetical order, and one with a synonym as ImageNet's
# "tabby, tabby cat" has.
CLASSES = {0: "red square", 1: "blue circle", 2: "green triangle, verdant delta"}
COLOURS = {0: (220, 30, 30), 1: (30, 60, 220), 2: (30, 180, 60)}

# Drawings the head is fitted on use seeds below this; the tests draw from above it.
FIT_SEEDS = 20


def draw_shape(cls: int, seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A shape of class `cls` at a random place and size on a near-white background."""
    rng = np.random.default_rng(1000 * cls + seed)
    w, h = size
    img = Image.new("RGB", size, tuple(int(x) for x in rng.integers(235, 256, 3)))
    draw = ImageDraw.Draw(img)
    s = rng.uniform(0.5, 0.8)
    x0, y0 = rng.uniform(0, 1 - s) * w, rng.uniform(0, 1 - s) * h
    box = (x0, y0, x0 + s * w, y0 + s * h)
    if cls == 0:
        draw.rectangle(box, fill=COLOURS[cls])
    elif cls == 1:
        draw.ellipse(box, fill=COLOURS[cls])
    else:
        triangle = [(box[0], box[3]), ((box[0] + box[2]) / 2, box[1]), (box[2], box[3])]
        draw.polygon(triangle, fill=COLOURS[cls])
    return img


def _fit_classifier(folder: Path, seed: int = 0, **config) -> Path:
    """Save a tiny ViTForImageClassification whose head is fitted to the drawn shapes."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    settings = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        id2label=CLASSES,
        label2id={v: k for k, v in CLASSES.items()},
    )
    settings.update(config)
    model = ViTForImageClassification(ViTConfig(**settings)).eval()
    proc = ViTImageProcessor(size={"height": 32, "width": 32})
    shots = [(c, draw_shape(c, s)) for c in CLASSES for s in range(FIT_SEEDS)]
    pixels = proc(images=[img for _, img in shots], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.vit(pixel_values=pixels).last_hidden_state[:, 0]
    # Ridge regression of +-4 targets on the features (with a bias column): a linear head.
    x = torch.cat([features, torch.ones(len(features), 1)], dim=1)
    target = torch.full((len(shots), len(CLASSES)), -4.0)
    target[torch.arange(len(shots)), torch.tensor([c for c, _ in shots])] = 4.0
    solution = torch.linalg.solve(x.T @ x + torch.eye(x.shape[1]), x.T @ target)
    with torch.no_grad():
        model.classifier.weight.copy_(solution[:-1].T)
        model.classifier.bias.copy_(solution[-1])
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> Path:
    return _fit_classifier(tmp_path_factory.mktemp("tiny-classifier"))


@pytest.fixture
def shapes(tmp_path) -> dict[int, list[Path]]:
    """Three unseen drawings of each class, as PNG files: class -> paths."""
    folder = tmp_path / "shapes"
    folder.mkdir()
    out: dict[int, list[Path]] = {}
    for cls in CLASSES:
        for n in range(3):
            path = folder / f"{CLASSES[cls].split(',')[0].replace(' ', '-')}-{n}.png"
            draw_shape(cls, FIT_SEEDS + 10 + n).save(path)
            out.setdefault(cls, []).append(path)
    return out


@pytest.fixture
def labelled(run, tmp_path, tiny_vit, classifier, shapes) -> Path:
    """An index of the shapes (backbone tiny_vit) with each image's best label from the
    classifier (top 1: with 3 classes, a top 3 would give every image every label)."""
    index = tmp_path / "index"
    folder = shapes[0][0].parent
    result = run(
        "index",
        folder,
        "--index",
        index,
        "--model",
        tiny_vit,
        "--label-model",
        classifier,
        "--label-top",
        "1",
    )
    assert result.exit_code == 0, result.output
    return index


def _all(shapes) -> list[Path]:
    return [p for paths in shapes.values() for p in paths]


# -- the Labeller --------------------------------------------------------------------------


def test_labeller_names_unseen_shapes_with_probabilities(classifier, shapes):
    labeller = Labeller(classifier, batch_size=4)
    results = list(labeller.label_files(_all(shapes), top=2))
    assert [r.path for r in results] == [str(p) for p in _all(shapes)]
    expected = [CLASSES[c] for c, paths in shapes.items() for _ in paths]
    for result, name in zip(results, expected, strict=True):
        assert result.error is None
        assert len(result.labels) == 2
        assert result.labels[0].label == name
        assert result.labels[0].score > 0.5
        assert result.labels[0].score >= result.labels[1].score > 0
        assert result.labels[1].label != name


def test_probabilities_are_those_of_transformers(classifier, shapes):
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    paths = _all(shapes)
    images = [Image.open(p).convert("RGB") for p in paths]
    model = AutoModelForImageClassification.from_pretrained(classifier).eval()
    pixels = AutoImageProcessor.from_pretrained(classifier)(images=images, return_tensors="pt")
    with torch.no_grad():
        probs = model(**pixels).logits.softmax(-1).numpy()
    results = Labeller(classifier).label_files(paths, top=3)
    for row, result in zip(probs, results, strict=True):
        order = np.argsort(-row)
        assert [lab.label for lab in result.labels] == [CLASSES[int(i)] for i in order]
        np.testing.assert_allclose([lab.score for lab in result.labels], row[order], atol=1e-3)


def test_top_is_capped_by_the_number_of_classes(classifier, shapes):
    (result,) = Labeller(classifier).label_images([Image.open(shapes[1][0])], top=10)
    assert len(result) == len(CLASSES)
    assert sum(lab.score for lab in result) == pytest.approx(1.0, abs=1e-5)


def test_bare_backbone_is_a_clear_error(tiny_vit):
    with pytest.raises(ModelLoadError, match=r"has no classification head \(it is a ViTModel\)"):
        Labeller(tiny_vit)


def test_checkpoint_lacking_head_weights_is_a_clear_error(tiny_vit, tmp_path):
    # A config that claims a head the weights do not have: transformers would invent one.
    folder = tmp_path / "claims-a-head"
    folder.mkdir()
    for f in tiny_vit.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["ViTForImageClassification"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"no trained classification head .*classifier"):
        Labeller(folder)


def test_head_without_class_names_is_a_clear_error(tmp_path):
    folder = _fit_classifier(
        tmp_path / "unnamed", id2label={0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, label2id=None
    )
    with pytest.raises(ModelLoadError, match="names no classes"):
        Labeller(folder)


def test_label_matching_takes_synonyms_and_any_case():
    stored = ["tabby, tabby cat", "tiger cat", "cat"]
    assert matching_labels("Tabby  Cat", stored) == ["tabby, tabby cat"]
    assert matching_labels("tabby, tabby cat", stored) == ["tabby, tabby cat"]
    assert matching_labels("cat", stored) == ["cat"]
    assert matching_labels("tiger", stored) == []


# -- simsearch label -----------------------------------------------------------------------


def test_cli_label_json_lines(run, classifier, shapes):
    paths = [shapes[2][0], shapes[0][0]]
    result = run("label", *paths, "--model", classifier, "--top", "2", "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in paths]
    assert [line["labels"][0]["label"] for line in lines] == [CLASSES[2], CLASSES[0]]
    assert all(len(line["labels"]) == 2 for line in lines)
    assert set(lines[0]["labels"][0]) == {"label", "score"}


def test_cli_label_csv_rows_match_the_json(run, classifier, shapes):
    import csv
    import io

    paths = [shapes[2][0], shapes[0][0]]
    as_json = run("label", *paths, "--model", classifier, "--top", "2", "--json")
    as_csv = run("label", *paths, "--model", classifier, "--top", "2", "--csv")
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert rows[0] == ["path", "rank", "label", "score"]
    expected = [
        [line["path"], str(rank), found["label"], f"{found['score']:.4f}"]
        for line in map(json.loads, as_json.stdout.splitlines())
        for rank, found in enumerate(line["labels"], 1)
    ]
    assert rows[1:] == expected and len(expected) == 4


def test_cli_label_table_and_model_from_the_environment(run, classifier, shapes):
    result = run("label", shapes[1][0], env={"SIMSEARCH_LABEL_MODEL": str(classifier)})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == str(shapes[1][0])
    assert len(lines) == 1 + len(CLASSES)  # the default top 5, capped at 3 classes
    score, name = lines[1].split(maxsplit=1)
    assert name == "blue circle" and 0.5 < float(score) <= 1


def test_cli_label_reports_unreadable_files_and_labels_the_rest(run, classifier, shapes, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    missing = tmp_path / "missing.jpg"
    result = run("label", broken, shapes[0][0], missing, "--model", classifier, "--json")
    assert result.exit_code == 1
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == [str(shapes[0][0])]
    assert f"skipping {broken}: not an image" in result.stderr
    assert f"skipping {missing}: no such file or directory" in result.stderr
    assert "Error: 2 of 3 images could not be labelled" in result.stderr


def test_cli_label_with_a_backbone_says_what_is_needed(run, tiny_vit, shapes):
    result = run("label", shapes[0][0], "--model", tiny_vit)
    assert result.exit_code == 1
    assert "has no classification head" in result.stderr
    assert "image classification checkpoint" in result.stderr


# -- index --label-model -------------------------------------------------------------------


def test_index_stores_each_images_top_labels(labelled, shapes, classifier):
    with Index.open(labelled) as idx:
        for cls, paths in shapes.items():
            for path in paths:
                (label,) = idx.labels(path)
                assert label.label == CLASSES[cls] and 0.5 < label.score <= 1
        about = idx.info()
    assert (about.labelled, about.indexed) == (9, 9)
    assert about.label_model == str(classifier) and about.label_top == 1


def test_second_run_labels_nothing_and_loads_no_model(labelled, classifier, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the label model was loaded with nothing to label")

    monkeypatch.setattr("simsearch.ops.label.Labeller.__init__", no_loading)
    with Index.open(labelled) as idx:
        summary = idx.label_images(classifier)
    assert (summary.labelled, summary.already, summary.relabelled) == (0, 9, False)


def test_changed_file_is_relabelled_and_touched_file_is_not(run, labelled, shapes, classifier):
    changed, touched = shapes[0][0], shapes[1][0]
    draw_shape(1, 99).save(changed)  # a red square's path now holds a blue circle
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes
    result = run(
        "index", changed.parent, "--index", labelled, "--label-model", classifier, "--json"
    )
    out = json.loads(result.stdout)
    assert out["labels"]["labelled"] == 1 and out["labels"]["already"] == 8
    with Index.open(labelled) as idx:
        assert idx.labels(changed)[0].label == "blue circle"
        assert idx.labels(touched)[0].label == "blue circle"
        assert len(idx.labels(touched)) == 1  # the index's top 1 was kept


def test_interrupted_labelling_continues_where_it_stopped(
    tmp_path, tiny_vit, classifier, shapes, monkeypatch
):
    from simsearch.storage.store import Store

    with Index.create(tmp_path / "ix", model=tiny_vit) as idx:
        idx.add(shapes[0][0].parent)
        write = Store.write_labels
        calls = []

        def write_then_stop(self, labels, source):
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(len(labels))
            write(self, labels, source)

        monkeypatch.setattr(Store, "write_labels", write_then_stop)
        with pytest.raises(KeyboardInterrupt):
            idx.label_images(classifier, batch_size=2)
        monkeypatch.setattr(Store, "write_labels", write)
        assert idx.info().labelled == 4
        summary = idx.label_images(classifier, batch_size=2)
    assert (summary.labelled, summary.already) == (5, 4)


def test_other_top_replaces_every_label(labelled, classifier, shapes):
    with Index.open(labelled) as idx:
        summary = idx.label_images(classifier, top=3)
        assert (summary.labelled, summary.already, summary.relabelled) == (9, 0, True)
        labels = idx.labels(shapes[2][1])
        assert labels[0].label == CLASSES[2]
        assert {lab.label for lab in labels} == set(CLASSES.values())
        assert [lab.score for lab in labels] == sorted((lab.score for lab in labels), reverse=True)
        assert idx.info().label_top == 3
        # Left out, top stays what the index has for this model: nothing to relabel.
        again = idx.label_images(classifier)
        assert (again.top, again.labelled, again.relabelled) == (3, 0, False)


def test_labelling_with_a_backbone_keeps_the_labels(labelled, tiny_vit):
    with Index.open(labelled) as idx, pytest.raises(ModelLoadError, match="no classification"):
        idx.label_images(tiny_vit)
    with Index.open(labelled) as idx:
        assert idx.info().labelled == 9


def test_removed_image_loses_its_labels(run, labelled, shapes):
    gone = shapes[2][0]
    with Index.open(labelled) as idx:
        gone_id = idx.store.lookup(str(gone)).id
    gone.unlink()
    assert run("index", gone.parent, "--index", labelled).exit_code == 0
    with sqlite3.connect(labelled / "meta.sqlite") as db:
        rows = db.execute("SELECT count(*) FROM labels WHERE image_id = ?", (gone_id,)).fetchone()
        assert rows == (0,)
        assert db.execute("SELECT count(DISTINCT image_id) FROM labels").fetchone() == (8,)


def test_plain_index_run_says_what_is_unlabelled(run, labelled, shapes):
    draw_shape(0, 77).save(shapes[0][0].parent / "new.png")
    result = run("index", shapes[0][0].parent, "--index", labelled)
    assert result.exit_code == 0
    assert "1 indexed images have no labels yet; label them with --label-model" in result.stderr


# -- search --label ------------------------------------------------------------------------


def test_search_label_keeps_to_labelled_images_even_when_others_are_closer(labelled, shapes):
    query = shapes[0][0]  # a red square
    circles = {str(p) for p in shapes[1]}
    with Index.open(labelled) as idx:
        everything = [hit.path for hit in idx.search(query, k=9)]
        # Without the filter, some image that is not a blue circle ranks above a circle.
        last_circle = max(everything.index(p) for p in circles)
        assert any(p not in circles for p in everything[:last_circle])
        hits = idx.search(query, k=9, label="blue circle")
        assert {hit.path for hit in hits} == circles
        assert [hit.path for hit in hits] == [p for p in everything if p in circles]
        assert {hit.path for hit in idx.search(query, k=2, label="blue circle")} < circles


def test_cli_search_label_matches_a_synonym_in_any_case(run, labelled, shapes):
    result = run(
        "search", shapes[0][0], "--index", labelled, "-k", "9", "--label", "Verdant Delta", "--json"
    )
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["hits"]
    assert {hit["path"] for hit in hits} == {str(p) for p in shapes[2]}


def test_search_for_a_label_no_image_has_suggests_close_ones(run, labelled, shapes):
    result = run("search", shapes[0][0], "--index", labelled, "--label", "blue circel")
    assert result.exit_code == 1
    assert "no indexed image has the label 'blue circel' among its top 1" in result.stderr
    assert "similar labels: blue circle" in result.stderr


def test_search_label_on_an_index_without_labels(index_path, photo_dir):
    with Index.open(index_path) as idx, pytest.raises(QueryError, match="no labels") as err:
        idx.search(photo_dir / "img1.png", label="cat")
    assert err.value.fix == "add-labels"


def test_index_made_before_labels_reads_as_unlabelled(index_path, photo_dir, classifier):
    with sqlite3.connect(index_path / "meta.sqlite") as db:
        db.execute("DROP TABLE labels")
        db.execute("PRAGMA user_version = 0")  # before schema versions
    with Index.open(index_path) as idx:
        assert idx.info().labelled == 0
        assert idx.labels(photo_dir / "img1.png") == []
        # Opening migrated it: the table is back.
        assert idx.label_images(classifier).labelled == 8
        assert len(idx.labels(photo_dir / "img1.png")) == len(CLASSES)


def test_index_without_dirs_only_labels(run, labelled, classifier):
    result = run("index", "--index", labelled, "--label-model", classifier, "--label-top", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("9 images labelled (replacing the labels of another model")
    info = run("info", "--index", labelled)
    assert f"labels:   9 images labelled by {classifier} (top 2)" in info.stdout


@pytest.mark.parametrize("fmt", ["npy", "csv", "parquet"])
def test_export_carries_each_images_labels(labelled, tmp_path, fmt):
    import csv
    import json

    with Index.open(labelled) as index:
        expected = {
            p: [[x.label, x.score] for x in index.labels(p)] for p in index.store.known_files()
        }
        out = tmp_path / f"out.{fmt}"
        assert index.export(out, fmt) == len(expected)
    if fmt == "npy":
        paths = [json.loads(line) for line in (out / "paths.txt").read_text().splitlines()]
        labels = [json.loads(line) for line in (out / "labels.txt").read_text().splitlines()]
    elif fmt == "csv":
        rows = list(csv.DictReader(out.open()))
        paths, labels = [r["path"] for r in rows], [json.loads(r["labels"]) for r in rows]
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out).to_pylist()
        paths = [r["path"] for r in table]
        labels = [[[x["label"], x["score"]] for x in r["labels"]] for r in table]
    got = dict(zip(paths, labels, strict=True))
    assert set(got) == set(expected)
    for path, pairs in expected.items():
        assert [name for name, _ in got[path]] == [name for name, _ in pairs]
        assert [s for _, s in got[path]] == pytest.approx([s for _, s in pairs], abs=1e-5)
