"""ONNX export and the ONNX Runtime backend: the export computes what PyTorch computes, int8
stays close, and an index is filled and searched with no torch in the process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import NO_TORCH, _save_vit, draw_image, subprocess_env
from PIL import ImageEnhance

from simsearch import Index
from simsearch.config import INT8_MIN_COSINE, INT8_MIN_RECALL, ONNX_MIN_COSINE
from simsearch.errors import (
    LayerError,
    ManifestMismatchError,
    ModelExportError,
    ModelLoadError,
    SimsearchError,
)
from simsearch.models.embed import Embedder
from simsearch.models.onnx import OnnxEmbedder, read_export_info
from simsearch.models.onnx_export import export_model

pytest.importorskip("onnxruntime")

IMAGES = [draw_image(500 + i) for i in range(24)]
REPO = Path(__file__).resolve().parents[1]  # `python -c` imports simsearch from here


@pytest.fixture(scope="module", autouse=True)
def _sample_photos_read_once():
    """Each export validates on scikit-image's sample photographs, read from disk and cut
    into 108 views every time (~0.2 s of the ~0.5 s an export takes here): read them once
    for this module. The views are the same; each export still validates on all of them."""
    from simsearch.models import onnx_validation

    views = onnx_validation.sample_photos()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_validation, "sample_photos", lambda: list(views))
        yield


def _export(tmp_path_factory, model: Path, name: str, **options) -> Path:
    out = tmp_path_factory.mktemp("exports") / name
    export_model(model, out, **options)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_vit) -> Path:
    """tiny_vit exported with its defaults (last layer, cls) and int8."""
    return _export(tmp_path_factory, tiny_vit, "tiny-onnx", int8=True)


@pytest.fixture(scope="module")
def small_vit(tmp_path_factory) -> Path:
    """128-dim, 4 layers: enough weights for int8 to shrink the file and to round."""
    return _save_vit(
        tmp_path_factory.mktemp("small-vit"),
        seed=3,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=64,
        patch_size=8,
    )


def _photos(folder: Path, images) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(folder / f"img{i:02d}.png")
    return folder


# -- the export computes what PyTorch computes ------------------------------------------------


@pytest.mark.parametrize(("layer", "pool"), [(-1, "cls"), (-1, "mean"), (2, "cls"), (0, "mean")])
def test_onnx_vectors_match_pytorch(tmp_path_factory, tiny_vit, layer, pool):
    out = _export(tmp_path_factory, tiny_vit, f"l{layer}-{pool}", layer=layer, pool=pool)
    torch_embedder = Embedder(tiny_vit, layer=layer, pool=pool, precision="fp32")
    onnx_embedder = OnnxEmbedder(out)
    expected = torch_embedder.embed_images(IMAGES)
    got = onnx_embedder.embed_images(IMAGES)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.sum(got * expected, axis=1).min() >= ONNX_MIN_COSINE
    # Vectors of the two backends may share an index: what the manifest compares is equal.
    theirs, ours = torch_embedder.manifest(), onnx_embedder.manifest()
    for field in ("weights_sha256", "layer", "num_layers", "pool", "dim", "preprocessing"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.precision == "onnx-fp32"
    theirs.check_compatible(ours)


def test_export_records_what_it_is_and_how_it_checked(exported, tiny_vit):
    info = read_export_info(exported)
    assert sorted(p.name for p in exported.iterdir()) == [
        "model.int8.onnx",
        "model.onnx",
        "simsearch_onnx.json",
    ]
    assert info["source"]["weights_sha256"] == Embedder(tiny_vit).weights_sha256
    assert info["input"] == {"name": "pixel_values", "shape": [None, 3, 32, 32]}
    assert info["id2label"] is None  # a bare backbone: no classifier.onnx
    v = info["validation"]
    assert v["images"] == 108 and "scikit-image" in v["validated_on"]
    assert v["fp32_min_cosine"] >= ONNX_MIN_COSINE
    assert v["int8_min_cosine"] >= INT8_MIN_COSINE and v["int8_recall_at_10"] >= INT8_MIN_RECALL
    assert v["int8_smoothing"] == 0.8  # quantised from the SmoothQuant-scaled model
    for name, entry in info["files"].items():
        assert (exported / name).stat().st_size == entry["bytes"]


def test_onnx_takes_any_batch_size(exported, tiny_vit):
    embedder = OnnxEmbedder(exported, batch_size=5)
    one = embedder.embed_images(IMAGES[:1])
    many = embedder.embed_images(IMAGES[:7])
    np.testing.assert_allclose(many[0], one[0], atol=1e-6)


# -- int8 ---------------------------------------------------------------------------------------


def test_int8_is_smaller_and_ranks_near_copies_first(tmp_path_factory, small_vit):
    out = _export(tmp_path_factory, small_vit, "small-onnx", int8=True)
    fp32_bytes = (out / "model.onnx").stat().st_size
    int8_bytes = (out / "model.int8.onnx").stat().st_size
    assert int8_bytes < 0.5 * fp32_bytes  # weights: 1 byte instead of 4

    embedder = OnnxEmbedder(out, precision="int8")
    assert embedder.manifest().precision == "onnx-int8"
    originals = embedder.embed_images(IMAGES)
    # Slightly edited copies, 3 % brighter: random weights make every image look alike
    # (second-best cosine 0.998), so this is as far as fp32 itself still ranks all first.
    edited = [ImageEnhance.Brightness(img).enhance(1.03) for img in IMAGES]
    queries = embedder.embed_images(edited)
    best = np.argmax(queries @ originals.T, axis=1)
    assert best.tolist() == list(range(len(IMAGES)))
    reference = Embedder(small_vit, precision="fp32").embed_images(IMAGES)
    assert np.sum(originals * reference, axis=1).min() >= INT8_MIN_COSINE


def test_int8_needs_an_export_made_with_int8(tmp_path_factory, tiny_vit):
    out = _export(tmp_path_factory, tiny_vit, "no-int8")
    with pytest.raises(
        ModelLoadError, match=r"no model\.int8\.onnx \(export the model with int8\)"
    ):
        OnnxEmbedder(out, precision="int8")
    with pytest.raises(ModelLoadError, match="fp32 or int8"):
        OnnxEmbedder(out, precision="bf16")


# -- the classification head ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(7)
    names = {0: "circle", 1: "square", 2: "triangle", 3: "star"}
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        id2label=names,
        label2id={v: k for k, v in names.items()},
    )
    folder = tmp_path_factory.mktemp("tiny-classifier")
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_classifier_onnx_gives_the_torch_top_label(tmp_path_factory, tiny_classifier):
    import onnxruntime as ort
    import torch

    from simsearch.models.hub import load_classifier

    out = _export(tmp_path_factory, tiny_classifier, "classifier-onnx")
    info = read_export_info(out)
    assert info["id2label"] == {"0": "circle", "1": "square", "2": "triangle", "3": "star"}
    assert info["validation"]["classifier_top1_agreement"] == 1.0

    model, _ = load_classifier(tiny_classifier, "tiny")
    pre = OnnxEmbedder(out).preprocess
    pixels = np.stack([pre(img) for img in IMAGES])
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    session = ort.InferenceSession(str(out / "classifier.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixel_values": pixels})
    assert logits.argmax(1).tolist() == expected.argmax(1).tolist()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


# -- failures are clear and leave nothing behind ------------------------------------------------


def test_failed_validation_leaves_no_output(tmp_path, tiny_vit, monkeypatch):
    monkeypatch.setattr("simsearch.config.ONNX_MIN_COSINE", 1.01)  # unreachable
    out = tmp_path / "exports" / "model"
    with pytest.raises(ModelExportError, match="differ from PyTorch's"):
        export_model(tiny_vit, out)
    assert not out.exists()
    assert list((tmp_path / "exports").iterdir()) == []  # no temporary folder either


def test_int8_that_loses_too_much_fails_the_export(tmp_path, tiny_vit, monkeypatch):
    monkeypatch.setattr("simsearch.config.INT8_MIN_RECALL", 1.01)  # unreachable
    out = tmp_path / "model"
    wanted = r"every linear layer: .*attention projections: .*export without int8"
    with pytest.raises(ModelExportError, match=wanted):
        export_model(tiny_vit, out, int8=True)
    assert not out.exists()


def test_too_few_validation_images_is_a_clear_error(tmp_path, tiny_vit):
    folder = _photos(tmp_path / "few", IMAGES[:5])
    wanted = "has 5 readable images; validation needs at least 20"
    with pytest.raises(ModelExportError, match=wanted):
        export_model(tiny_vit, tmp_path / "out", validate_dir=folder)


def test_validate_dir_is_used(tmp_path, tiny_vit):
    folder = _photos(tmp_path / "mine", IMAGES)
    result = export_model(tiny_vit, tmp_path / "out", validate_dir=folder)
    assert result.images == len(IMAGES) and str(folder) in result.validated_on


def test_missing_onnxruntime_names_the_extra(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ModelLoadError, match=r"pip install 'simsearch\[onnx\]'"):
        OnnxEmbedder(exported)


def test_a_folder_that_is_no_export_is_a_clear_error(tiny_vit):
    with pytest.raises(ModelLoadError, match="not a simsearch ONNX export"):
        OnnxEmbedder(tiny_vit)


def test_truncated_model_file_is_refused(exported, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="incomplete or was replaced"):
        OnnxEmbedder(copy)


# -- the command line ---------------------------------------------------------------------------


def test_cli_export_model_prints_figures_and_refuses_an_existing_output(run, tmp_path, tiny_vit):
    out = tmp_path / "onnx"
    result = run("export-model", "--model", tiny_vit, "--output", out, "--int8")
    assert result.exit_code == 0, result.output
    assert "model.onnx" in result.output and "cosine to PyTorch: lowest 0.99999" in result.output
    assert "recall@10" in result.output and "validated on 108 views" in result.output
    assert (out / "model.int8.onnx").is_file()

    again = run("export-model", "--model", tiny_vit, "--output", out)
    assert again.exit_code == 1
    wanted = f"Error: {out} already exists and is not empty; choose a new output folder (--output)"
    assert wanted in again.output


def test_cli_export_model_json(run, tmp_path, tiny_vit):
    result = run("export-model", "--model", tiny_vit, "-o", tmp_path / "o", "--json", "--opset", 18)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["opset"] == 18 and data["dim"] == 32 and data["int8_mb"] is None
    assert data["fp32_min_cosine"] >= ONNX_MIN_COSINE


def test_cli_index_and_search_with_the_onnx_backend(run, tmp_path, exported):
    photos = _photos(tmp_path / "photos", IMAGES[:12])
    index = tmp_path / "index"
    result = run("-q", "index", photos, "--index", index, "--backend", "onnx", "--model", exported)
    assert result.exit_code == 0, result.output
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["precision"] == "onnx-fp32" and manifest["model"] == str(exported)

    query = tmp_path / "query.png"
    ImageEnhance.Brightness(IMAGES[4]).enhance(1.05).save(query)
    # The index remembers its backend: no --backend needed to embed a new query.
    found = run("search", query, "--index", index, "-k", 3, "--json")
    assert found.exit_code == 0, found.output
    hits = json.loads(found.output.strip().splitlines()[-1])["hits"]
    assert Path(hits[0]["path"]).name == "img04.png"
    found8 = run("search", query, "--index", index, "-k", 1, "--precision", "int8", "--json")
    assert Path(json.loads(found8.output)["hits"][0]["path"]).name == "img04.png"


def test_torch_index_accepts_onnx_additions(tmp_path, tiny_vit, exported):
    with Index.create(tmp_path / "index", model=tiny_vit) as idx:
        idx.add(_photos(tmp_path / "a", IMAGES[:8]))
    with Index.open(tmp_path / "index", model=exported, backend="onnx") as idx:
        summary = idx.add(_photos(tmp_path / "b", IMAGES[8:12]))
        assert summary.indexed == 4
        assert idx.manifest.precision == "fp32"  # the index's own, written once
    with Index.open(tmp_path / "index") as idx:  # torch again: its query finds ONNX's vector
        assert idx.embedder.precision == "fp32"
        hit = idx.search(IMAGES[9], k=1)[0]
        assert Path(hit.path) == tmp_path / "b" / "img01.png" and hit.score > 0.9999


def test_onnx_backend_checks_the_export_against_the_index(tmp_path, tiny_vit, other_vit, exported):
    with Index.create(tmp_path / "index", model=other_vit):
        pass
    with pytest.raises(ManifestMismatchError, match="model: index was built with"):
        Index.open(tmp_path / "index", model=exported, backend="onnx")
    with Index.open(tmp_path / "index") as idx:
        by_torch = idx.embed(IMAGES[:2])
    # The index's own model through ONNX Runtime: its cached export (tests/test_onnx_auto.py).
    with Index.open(tmp_path / "index", backend="onnx") as idx:
        assert idx.embedder.precision == "fp32" and idx.embedder.model_id == str(other_vit)
        assert np.sum(idx.embed(IMAGES[:2]) * by_torch, axis=1).min() > 0.9999
    with Index.create(tmp_path / "tiny", model=tiny_vit):
        pass
    with (
        Index.open(tmp_path / "tiny", model=exported, backend="torch") as idx,
        pytest.raises(ModelLoadError, match="is an ONNX export, which the torch backend"),
    ):
        idx.embed(IMAGES[:1])
    with pytest.raises(LayerError, match="has layer 3 baked in, not 2; export the model again"):
        Index.create(tmp_path / "new", model=exported, backend="onnx", layer=2)


# -- no PyTorch at run time (conftest.NO_TORCH) -------------------------------------------------


@pytest.mark.e2e
def test_onnx_backend_needs_no_torch(tmp_path, exported, tiny_vit):
    photos = _photos(tmp_path / "photos", IMAGES[:10])
    query = tmp_path / "query.png"
    ImageEnhance.Brightness(IMAGES[6]).enhance(1.05).save(query)
    index = tmp_path / "index"

    env = subprocess_env()
    del env["SIMSEARCH_BACKEND"]  # each command's own choice, as a user's would be

    def simsearch(*args):
        argv = [sys.executable, "-c", NO_TORCH, *(str(a) for a in args)]
        return subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)

    done = simsearch(
        "-q", "index", photos, "--index", index, "--backend", "onnx", "--model", exported
    )
    assert done.returncode == 0, done.stderr
    assert "10 indexed" in done.stdout
    found = simsearch("search", query, "--index", index, "-k", 2, "--json")
    assert found.returncode == 0, found.stderr
    assert Path(json.loads(found.stdout)["hits"][0]["path"]).name == "img06.png"
    # The block is real: the torch backend in the same setting fails on the import.
    torch_run = simsearch(
        "-q", "index", photos, "--index", tmp_path / "other", "--model", tiny_vit,
        "--backend", "torch",
    )  # fmt: skip
    assert torch_run.returncode != 0 and "blocked in this test" in torch_run.stderr


def test_another_models_export_of_the_same_size_is_refused(tmp_path_factory, exported, other_vit):
    """Same architecture, other weights: the same number of bytes. It was accepted, and its
    vectors went into the index as the recorded model's."""
    import shutil

    other = _export(tmp_path_factory, other_vit, "other-onnx")
    copy = tmp_path_factory.mktemp("swapped") / "export"
    shutil.copytree(exported, copy)
    swapped = (other / "model.onnx").read_bytes()
    assert len(swapped) == (copy / "model.onnx").stat().st_size
    (copy / "model.onnx").write_bytes(swapped)
    with pytest.raises(ModelLoadError, match="SHA-256 differs"):
        OnnxEmbedder(copy)


@pytest.mark.parametrize("broken", ["wrong dimension", "not unit length"])
def test_an_export_whose_output_is_not_what_it_says_commits_nothing(
    tmp_path, exported, monkeypatch, broken
):
    """An export with the wrong output dimension committed its vectors, then a traceback;
    non-unit output was stored as is."""
    real = OnnxEmbedder.embed_pixels

    def bad(self, pixels):
        out = real(self, pixels)
        return out[:, :16] if broken == "wrong dimension" else 3.0 * out

    monkeypatch.setattr(OnnxEmbedder, "embed_pixels", bad)
    photos = _photos(tmp_path / "photos", IMAGES[:4])
    with Index.create(tmp_path / "idx", exported, backend="onnx") as index:
        with pytest.raises(SimsearchError, match="nothing from this batch was stored"):
            index.add(photos)
        assert len(index) == 0 and index.verify() == []
