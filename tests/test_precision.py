"""Precision modes: each stays faithful to fp32, `auto` picks by hardware, indexes mix them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import _save_vit, draw_image

from simsearch import Index
from simsearch.errors import ModelLoadError
from simsearch.models.embed import Embedder, pick_precision


@pytest.fixture(scope="module")
def small_vit(tmp_path_factory):
    """Bigger than tiny_vit (128-dim, 4 layers, 64 px) so that rounding has work to do."""
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


@pytest.fixture(scope="module")
def images():
    return [draw_image(300 + i, size=(80, 64)) for i in range(60)]


def _recall_at_10(reference: np.ndarray, other: np.ndarray) -> float:
    def neighbours(v):
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :10]

    ref, got = neighbours(reference), neighbours(other)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref, got, strict=True)]))


# (mean cosine to fp32, recall@10 of fp32's neighbours). Measured here: bf16 0.99999/0.99,
# fp16 1.0/1.0, int8 0.9995/0.96. The recall bounds are looser than the real-model targets
# (docs/benchmarks.md): random weights make all vectors alike, so rounding reorders
# neighbours more easily than in a trained model.
BOUNDS = {"bf16": (0.999, 0.9), "fp16": (0.9999, 0.95), "int8": (0.995, 0.85)}


@pytest.mark.parametrize("precision", list(BOUNDS))
def test_each_precision_stays_close_to_fp32(small_vit, images, precision):
    reference = Embedder(small_vit, precision="fp32").embed_images(images)
    embedder = Embedder(small_vit, precision=precision)
    assert embedder.precision == precision
    vecs = embedder.embed_images(images)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    cosine, recall = BOUNDS[precision]
    assert float(np.mean(np.sum(vecs * reference, axis=1))) >= cosine
    assert _recall_at_10(reference, vecs) >= recall
    assert not np.array_equal(vecs, reference)  # the mode really changed the arithmetic


def test_auto_picks_by_hardware(monkeypatch):
    monkeypatch.delenv("SIMSEARCH_PRECISION")
    monkeypatch.setattr("simsearch.models.embed.cpu_has_native_bf16", lambda: True)
    assert pick_precision("auto", "cpu") == "bf16"
    assert pick_precision(None, "cpu") == "bf16"
    assert pick_precision("auto", "cuda") == "fp16"
    monkeypatch.setattr("simsearch.models.embed.cpu_has_native_bf16", lambda: False)
    assert pick_precision("auto", "cpu") == "fp32"
    # The library reads no environment variable: $SIMSEARCH_PRECISION is the CLI's.
    monkeypatch.setenv("SIMSEARCH_PRECISION", "int8")
    assert pick_precision(None, "cpu") == "fp32"


def test_bad_precisions_are_clear_errors():
    with pytest.raises(ModelLoadError, match="unknown precision 'fp8'"):
        pick_precision("fp8", "cpu")
    with pytest.raises(ModelLoadError, match="int8 runs on the CPU only"):
        pick_precision("int8", "cuda")


def test_the_cli_takes_the_precision_from_the_environment(run, tmp_path, tiny_vit):
    folder = tmp_path / "photos"
    folder.mkdir()
    draw_image(420).save(folder / "a.png")
    env = {"SIMSEARCH_PRECISION": "bf16"}
    result = run("index", folder, "--index", tmp_path / "ix", "--model", tiny_vit, env=env)
    assert result.exit_code == 0, result.output
    with Index.open(tmp_path / "ix") as idx:
        assert idx.manifest.precision == "bf16"
    result = run(
        "index",
        folder,
        "--index",
        tmp_path / "iy",
        "--model",
        tiny_vit,
        env={"SIMSEARCH_PRECISION": "fp8"},
    )
    assert result.exit_code == 2 and "fp8" in result.output


def test_precisions_share_an_index_and_the_manifest_records_the_first(tmp_path, tiny_vit):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        draw_image(400 + i).save(folder / f"a{i}.png")
    with Index.create(tmp_path / "ix", model=tiny_vit, precision="bf16") as idx:
        idx.add(folder)
        assert idx.manifest.precision == "bf16"
    for i in range(6):
        draw_image(410 + i).save(folder / f"b{i}.png")
    with Index.open(tmp_path / "ix", precision="int8") as idx:
        summary = idx.add(folder)
        assert (summary.indexed, summary.unchanged) == (6, 6)
        assert idx.embedder.precision == "int8"
        for path in sorted(folder.iterdir()):
            assert idx.search(path, k=1)[0].path == str(path)
        assert idx.verify() == []


def test_int8_quantises_the_attention_projections_only(small_vit):
    import torch

    model = Embedder(small_vit, precision="int8").model
    linear = {n: type(m) for n, m in model.named_modules() if "Linear" in type(m).__name__}
    attention = {n: t for n, t in linear.items() if "attention" in n}
    others = {n: t for n, t in linear.items() if "attention" not in n}
    assert attention and others
    assert all(t is not torch.nn.Linear and "quantized" in t.__module__ for t in attention.values())
    assert all(t is torch.nn.Linear for t in others.values())
