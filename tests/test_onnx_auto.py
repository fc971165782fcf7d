"""`--backend auto`, a new index's default: ONNX Runtime through an export made once and
cached, validated against PyTorch; torch where that path cannot run, with a notice.

The cache is read from outside the index (a folder anyone may have written to): a changed
or swapped entry is refused, never run as the model; two processes exporting one model race
to one export; an export that does not validate is remembered, and torch takes over.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import NO_TORCH, draw_image, subprocess_env

from simsearch import Index
from simsearch.errors import ModelLoadError
from simsearch.models import onnx_cache, provider
from simsearch.models.embed import Embedder

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("skimage")

IMAGES = [draw_image(700 + i) for i in range(12)]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def auto(monkeypatch, tmp_path):
    """The real "auto" (conftest makes it torch for the other tests), and a cache of this
    test's own, so that what it exports is seen."""
    monkeypatch.setattr(provider, "auto_backend", _REAL_AUTO)
    monkeypatch.setenv(onnx_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr("simsearch.models.embed.cpu_has_amx", lambda: False)
    return tmp_path / "cache" / "onnx"


_REAL_AUTO = provider.auto_backend


@pytest.fixture
def exports(monkeypatch):
    """Count the exports made (each is a real one)."""
    from simsearch.models import onnx_export

    made = []
    real = onnx_export.export_model

    def counted(*args, **kwargs):
        made.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_model", counted)
    return made


def _photos(folder: Path, images) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        img.save(folder / f"img{i:02d}.png")
    return folder


def _torch_vectors(model, images, **options):
    return Embedder(model, device="cpu", precision="fp32", **options).embed_images(images)


def test_a_new_index_embeds_with_its_models_onnx_export(tmp_path, tiny_vit, exports, auto):
    photos = _photos(tmp_path / "photos", IMAGES[:8])
    with Index.create(tmp_path / "index", tiny_vit) as idx:
        assert idx.backend == "onnx"
        # The manifest names the model itself, not the cache: the index is the model's.
        assert idx.manifest.model == str(tiny_vit) and idx.manifest.precision == "onnx-fp32"
        assert idx.add(photos).indexed == 8
        # Each stored vector is PyTorch's fp32 vector of its image, to within 1e-4.
        for i, vector in enumerate(_torch_vectors(tiny_vit, IMAGES[:8])):
            hit = idx.search(vector, k=1)[0]
            assert Path(hit.path).name == f"img{i:02d}.png" and hit.score > 0.9999
    assert len(exports) == 1 and Path(exports[0]).parent == auto
    # Opening it again, or a second index of the model, uses the export: none is made.
    with Index.open(tmp_path / "index") as idx:
        assert idx.embedder.precision == "fp32" and idx.backend == "onnx"
        assert Path(idx.search(IMAGES[3], k=1)[0].path).name == "img03.png"
    with Index.create(tmp_path / "second", tiny_vit) as idx:
        assert idx.backend == "onnx"
    assert len(exports) == 1


def test_the_export_is_the_models_wherever_it_lies(tmp_path, tiny_vit, other_vit, exports, auto):
    """Keyed by the weights, not the path: a copy finds it; another model at the copy's
    path (same architecture, other weights) gets its own."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_vit, copy)
    with Index.create(tmp_path / "a", tiny_vit):
        pass
    with Index.create(tmp_path / "b", copy) as idx:
        assert idx.manifest.model == str(copy)
    assert len(exports) == 1
    shutil.rmtree(copy)
    shutil.copytree(other_vit, copy)
    with Index.create(tmp_path / "c", copy) as idx:
        cosine = np.sum(idx.embed(IMAGES[:3]) * _torch_vectors(other_vit, IMAGES[:3]), axis=1)
    assert cosine.min() > 0.9999 and len(exports) == 2
    assert len([p for p in auto.iterdir() if p.is_dir()]) == 2


def test_the_same_weights_with_other_preprocessing_get_their_own_export(
    tmp_path, tiny_vit, exports
):
    """The entry was keyed by weights and config.json alone: the same weights with a CLIP
    image processor (shortest-edge resize, centre crop) took the exact-resize export, and
    the index recorded the other model's preprocessing."""
    from transformers import CLIPImageProcessor

    clip = tmp_path / "clip"
    shutil.copytree(tiny_vit, clip)
    (clip / "preprocessor_config.json").unlink()
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(clip)
    with Index.create(tmp_path / "plain", tiny_vit) as idx:
        assert idx.manifest.preprocessing["resize"] == "exact"
    with Index.create(tmp_path / "clip-index", clip) as idx:
        assert idx.backend == "onnx" and idx.manifest.preprocessing["resize"] == "shortest_edge"
        got = idx.embed(IMAGES[:3])
    assert np.sum(got * _torch_vectors(clip, IMAGES[:3]), axis=1).min() > 0.9999
    assert len(exports) == 2


def test_layer_and_pooling_are_the_exports(tmp_path, tiny_vit, exports):
    with Index.create(tmp_path / "index", tiny_vit, layer=-2, pool="mean") as idx:
        assert (idx.manifest.layer, idx.manifest.pool, idx.backend) == (2, "mean", "onnx")
        got = idx.embed(IMAGES[:4])
    expected = _torch_vectors(tiny_vit, IMAGES[:4], layer=-2, pool="mean")
    assert np.sum(got * expected, axis=1).min() > 0.9999
    with Index.open(tmp_path / "index") as idx:  # the manifest's layer 2 is -2's entry
        idx.embed(IMAGES[:1])
    assert len(exports) == 1


def test_an_export_that_does_not_validate_falls_back_to_torch_once(
    tmp_path, tiny_vit, exports, auto, monkeypatch, caplog
):
    from simsearch import config

    monkeypatch.setattr(config, "ONNX_MIN_COSINE", 1.5)  # no export can pass
    caplog.set_level(logging.WARNING, logger="simsearch")
    with Index.create(tmp_path / "index", tiny_vit) as idx:
        assert idx.backend == "torch" and idx.manifest.precision == "fp32"
        assert idx.add(_photos(tmp_path / "photos", IMAGES[:3])).indexed == 3
    assert "differ from PyTorch's" in caplog.text and "embedding with torch instead" in caplog.text
    assert len(exports) == 1 and not any(p.is_dir() for p in auto.iterdir())
    (record,) = auto.glob("*.failed.json")
    assert "differ from PyTorch's" in json.loads(record.read_text())["reason"]
    # The next new index does not export again: the recorded failure, the same notice.
    caplog.clear()
    with Index.create(tmp_path / "second", tiny_vit) as idx:
        assert idx.backend == "torch"
    assert len(exports) == 1 and "recorded in" in caplog.text
    # Another simsearch, torch or onnxruntime tries again.
    monkeypatch.setattr(onnx_cache, "_versions", lambda: {"simsearch": "next"})
    monkeypatch.setattr(config, "ONNX_MIN_COSINE", 0.9999)
    with Index.create(tmp_path / "third", tiny_vit) as idx:
        assert idx.backend == "onnx"
    assert len(exports) == 2


def test_a_changed_cache_entry_is_refused_not_run(tmp_path, tiny_vit, other_vit, auto, caplog):
    """The cache is a folder on disk: its model.onnx replaced by another model's export (the
    same size), or the entry swapped for another model's whole export. Either would put
    another model's vectors into the index as this one's."""
    with Index.create(tmp_path / "index", tiny_vit) as idx:
        idx.add(_photos(tmp_path / "photos", IMAGES[:4]))
    with Index.create(tmp_path / "other", other_vit):
        pass
    (mine,) = [p for p in auto.iterdir() if p.is_dir() and p.name.startswith(_key(tiny_vit))]
    (theirs,) = [p for p in auto.iterdir() if p.is_dir() and p != mine]
    original = (mine / "model.onnx").read_bytes()
    (mine / "model.onnx").write_bytes((theirs / "model.onnx").read_bytes())
    with Index.open(tmp_path / "index") as idx, pytest.raises(ModelLoadError, match="SHA-256"):
        idx.embed(IMAGES[:1])
    # A new index says so and embeds with torch; nothing in the cache is removed.
    caplog.set_level(logging.WARNING, logger="simsearch")
    with Index.create(tmp_path / "new", tiny_vit) as idx:
        assert idx.backend == "torch"
    assert "SHA-256" in caplog.text and "embedding with torch instead" in caplog.text
    assert (mine / "model.onnx").read_bytes() != original  # left for the user to see
    # The whole entry swapped: its record names other weights.
    shutil.rmtree(mine)
    shutil.copytree(theirs, mine)
    with (
        Index.open(tmp_path / "index") as idx,
        pytest.raises(ModelLoadError, match="other weights"),
    ):
        idx.embed(IMAGES[:1])
    with Index.open(tmp_path / "index", backend="torch") as idx:  # torch still serves it
        assert Path(idx.search(IMAGES[2], k=1)[0].path).name == "img02.png"


def _key(model: Path) -> str:
    from simsearch.models.weights import hash_weights

    return hash_weights(model)[:24]


def test_torch_is_kept_where_onnx_runtime_is_not_the_faithful_fast_path(
    tmp_path, tiny_vit, exports, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING, logger="simsearch")
    # AMX: torch's bf16 is the faster path, unless fp32 is asked for (ONNX Runtime's is).
    monkeypatch.setattr("simsearch.models.embed.cpu_has_amx", lambda: True)
    with Index.create(tmp_path / "amx", tiny_vit) as idx:
        assert idx.backend == "torch"
    with Index.create(tmp_path / "amx-fp32", tiny_vit, precision="fp32") as idx:
        assert idx.backend == "onnx"
    monkeypatch.setattr("simsearch.models.embed.cpu_has_amx", lambda: False)
    exports.clear()
    caplog.clear()
    # An arithmetic asked for by name is torch's.
    with Index.create(tmp_path / "bf16", tiny_vit, precision="bf16") as idx:
        assert idx.backend == "torch" and idx.manifest.precision == "bf16"
    # No onnxruntime: torch, as before the choice existed, without a word.
    monkeypatch.setattr(onnx_cache, "missing_for_export", lambda: ["onnxruntime"])
    monkeypatch.setattr(provider, "missing_for_export", lambda: ["onnxruntime"])
    with Index.create(tmp_path / "plain", tiny_vit) as idx:
        assert idx.backend == "torch"
    assert caplog.text == ""
    # onnxruntime without the exporter: torch, and how to get the faster path.
    monkeypatch.setattr(provider, "missing_for_export", lambda: ["onnx", "skimage"])
    with Index.create(tmp_path / "noexport", tiny_vit) as idx:
        assert idx.backend == "torch"
    assert "needs onnx, skimage (pip install 'simsearch[onnx-export]')" in caplog.text
    assert exports == []


def test_a_cache_that_cannot_be_written_leaves_torch(tmp_path, tiny_vit, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(onnx_cache.CACHE_ENV, str(blocker / "cache"))
    caplog.set_level(logging.WARNING, logger="simsearch")
    with Index.create(tmp_path / "index", tiny_vit) as idx:
        assert idx.backend == "torch"
        assert idx.add(_photos(tmp_path / "photos", IMAGES[:2])).indexed == 2
    assert "cannot make the ONNX cache" in caplog.text
    assert blocker.read_text() == "not a folder"


def test_torch_adds_to_an_auto_index_and_finds_its_vectors(tmp_path, tiny_vit):
    with Index.create(tmp_path / "index", tiny_vit) as idx:
        idx.add(_photos(tmp_path / "a", IMAGES[:6]))
    with Index.open(tmp_path / "index", backend="torch") as idx:
        assert idx.add(_photos(tmp_path / "b", IMAGES[6:9])).indexed == 3
        assert idx.manifest.precision == "onnx-fp32"  # the index's own, written once
    with Index.open(tmp_path / "index") as idx:  # ONNX again, finding torch's vectors
        hit = idx.search(IMAGES[7], k=1)[0]
        assert Path(hit.path) == tmp_path / "b" / "img01.png" and hit.score > 0.9999


# Exports `sys.argv[1]` into the cache (the same code path `auto` takes), printing the entry.
RACER = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from simsearch.models.onnx_cache import cached_export
print(cached_export(sys.argv[1]))
"""


@pytest.mark.e2e
def test_two_processes_exporting_one_model_make_one_export(tmp_path, tiny_vit, auto):
    env = subprocess_env(SIMSEARCH_CACHE_DIR=str(auto.parent))
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tiny_vit)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.communicate(timeout=300), p.returncode) for p in racers]
    assert [code for _, code in results] == [0, 0], results
    entries = {out.strip() for (out, _), _ in results}
    assert len(entries) == 1
    said = "".join(err for (_, err), _ in results)
    assert said.count("to ONNX once") == 1 and "waiting for it" in said, said
    assert [p.name for p in auto.iterdir() if p.is_dir()] == [Path(entries.pop()).name]
    assert not [p for p in auto.iterdir() if ".export-" in p.name]  # no work folder left


@pytest.mark.e2e
def test_the_cli_default_is_onnx_and_searching_it_needs_no_torch(tmp_path, tiny_vit, auto):
    """`simsearch index` with no --backend, as a user runs it; then search and add in a
    process where torch cannot be imported: the cached export is all they need."""
    # The defaults a user has (no backend, no precision), on a CPU without AMX (where it
    # has AMX, torch's bf16 is the default: test_torch_is_kept_...).
    env = subprocess_env(SIMSEARCH_CACHE_DIR=str(auto.parent), ONEDNN_MAX_CPU_ISA="AVX512_CORE")
    del env["SIMSEARCH_BACKEND"]
    env.pop("SIMSEARCH_PRECISION", None)
    photos = _photos(tmp_path / "photos", IMAGES[:8])
    index = tmp_path / "index"

    def simsearch(*args, blocked=False):
        code = ["-c", NO_TORCH] if blocked else ["-m", "simsearch"]
        argv = [sys.executable, *code, *(str(a) for a in args)]
        return subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)

    done = simsearch("index", photos, "--index", index, "--model", tiny_vit, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["indexed"] == 8
    assert "exporting" in done.stderr and "lowest cosine to PyTorch" in done.stderr
    info = simsearch("info", "--index", index, "--json")
    assert json.loads(info.stdout)["precision"] == "onnx-fp32", info.stdout
    found = simsearch("search", photos / "img05.png", "--index", index, "--json", blocked=True)
    assert found.returncode == 0, found.stderr
    assert Path(json.loads(found.stdout)["hits"][0]["path"]).name == "img05.png"
    more = _photos(tmp_path / "more", IMAGES[8:10])
    added = simsearch("-q", "index", more, "--index", index, blocked=True)
    assert added.returncode == 0 and "2 indexed" in added.stdout, added.stderr
