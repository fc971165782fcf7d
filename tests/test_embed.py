"""The Embedder: unit vectors, layer and pooling choices, backbones, and model loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import draw_image
from transformers import AutoImageProcessor, AutoModel

from simsearch.errors import LayerError, ModelLoadError
from simsearch.models.embed import Embedder


@pytest.fixture(scope="module")
def images():
    return [draw_image(i) for i in range(6)]


def _reference(folder, images):
    """Hidden states straight from transformers, the way its docs compute them."""
    model = AutoModel.from_pretrained(folder).eval()
    proc = AutoImageProcessor.from_pretrained(folder)
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True)


def _unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x, dim=-1).numpy()


def test_vectors_are_float32_unit_rows(tiny_vit, images):
    vecs = Embedder(tiny_vit).embed_images(images)
    assert vecs.dtype == np.float32
    assert vecs.shape == (len(images), 32)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_default_is_cls_of_last_layer_after_final_norm(tiny_vit, images):
    out = _reference(tiny_vit, images)
    expected = _unit(out.last_hidden_state[:, 0])
    got = Embedder(tiny_vit).embed_images(images)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_mean_pool_is_mean_of_patch_tokens(tiny_vit, images):
    out = _reference(tiny_vit, images)
    expected = _unit(out.last_hidden_state[:, 1:].mean(dim=1))
    got = Embedder(tiny_vit, pool="mean").embed_images(images)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("layer, state", [(0, 0), (1, 1), (2, 2), (-2, 2), (-4, 0)])
def test_intermediate_layers_match_hidden_states(tiny_vit, images, layer, state):
    out = _reference(tiny_vit, images)
    expected = _unit(out.hidden_states[state][:, 0])
    embedder = Embedder(tiny_vit, layer=layer)
    assert embedder.layer == state
    np.testing.assert_allclose(embedder.embed_images(images), expected, atol=1e-4)


def test_layer_and_pool_change_the_vectors(tiny_vit, images):
    base = Embedder(tiny_vit).embed_images(images)
    for other in (Embedder(tiny_vit, layer=1), Embedder(tiny_vit, pool="mean")):
        assert not np.allclose(base, other.embed_images(images), atol=1e-3)


@pytest.mark.parametrize("layer", [4, -5, 100])
def test_out_of_range_layer_is_a_clear_error(tiny_vit, layer):
    with pytest.raises(LayerError, match=r"layer .* out of range: this model has 3 layers"):
        Embedder(tiny_vit, layer=layer)


def test_unknown_pool_is_refused(tiny_vit):
    with pytest.raises(LayerError, match="unknown pooling 'max'"):
        Embedder(tiny_vit, pool="max")


def test_manifest_records_model_layer_pool_and_preprocessing(tiny_vit):
    m = Embedder(tiny_vit, layer=-2, pool="mean").manifest()
    assert (m.model, m.layer, m.num_layers, m.pool, m.dim) == (str(tiny_vit), 2, 3, "mean", 32)
    assert m.architecture == "vit"
    assert len(m.weights_sha256) == 64
    assert m.preprocessing["size"] == [32, 32]
    assert m.preprocessing["mean"] == [0.5, 0.5, 0.5]


def test_uncached_hub_model_without_network_says_how_to_use_a_folder():
    with pytest.raises(ModelLoadError) as err:
        Embedder("nobody-here/no-such-model-xyz")
    message = str(err.value)
    assert "cannot be reached" in message
    assert "Give a folder written by save_pretrained instead" in message
    # The library names no flag or variable: the error says which setting, for the CLI.
    assert "--" not in message and "SIMSEARCH_MODEL" not in message
    assert err.value.param == "model"


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        Embedder(str(tmp_path / "nope"))


def test_folder_without_image_processor_is_explained(tiny_vit, tmp_path):
    import shutil

    folder = tmp_path / "noproc"
    shutil.copytree(tiny_vit, folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no preprocessor_config\.json"):
        Embedder(folder)


def test_folder_without_weights_is_explained(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weight files"):
        Embedder(tmp_path)


# -- other backbones ---------------------------------------------------------------------


def _save(folder, model, processor):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _deit(folder):
    from transformers import DeiTConfig, DeiTImageProcessor, DeiTModel

    cfg = DeiTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    proc = DeiTImageProcessor(
        size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32}
    )
    return _save(folder, DeiTModel(cfg, add_pooling_layer=False), proc)


def _beit(folder):
    from transformers import BeitConfig, BeitImageProcessor, BeitModel

    cfg = BeitConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        use_mean_pooling=False,
    )
    proc = BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    return _save(folder, BeitModel(cfg, add_pooling_layer=False), proc)


def _dinov2(folder):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=56,
        patch_size=14,
    )
    proc = BitImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 56, "width": 56},
        do_center_crop=True,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return _save(folder, Dinov2Model(cfg), proc)


def _clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=100,
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _save(folder, CLIPModel(cfg), proc)


def _siglip(folder):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    return _save(folder, SiglipVisionModel(cfg), proc)


@pytest.mark.parametrize(
    "build",
    [_deit, _beit, _dinov2, _clip, _siglip],
    ids=["deit", "beit", "dinov2", "clip", "siglip"],
)
def test_other_backbones_embed_with_mean_pooling(build, tmp_path, images):
    torch.manual_seed(0)
    folder = build(tmp_path / "model")
    embedder = Embedder(folder, pool="mean")
    vecs = embedder.embed_images(images)
    assert vecs.shape == (len(images), 32)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert embedder.num_layers == 2
    # Distinct pictures give distinct vectors.
    assert np.abs(vecs[0] - vecs[1]).max() > 1e-4


@pytest.mark.parametrize(
    "build", [_deit, _beit, _dinov2, _clip], ids=["deit", "beit", "dinov2", "clip"]
)
def test_backbones_with_a_cls_token_embed_it(build, tmp_path, images):
    torch.manual_seed(0)
    vecs = Embedder(build(tmp_path / "model")).embed_images(images[:2])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_clip_last_layer_cls_matches_its_pooled_output(tmp_path, images):
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    folder = _clip(tmp_path / "clip")
    model = CLIPVisionModel.from_pretrained(folder).eval()
    pixels = AutoImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")
    with torch.no_grad():
        pooled = model(pixel_values=pixels["pixel_values"]).pooler_output
    got = Embedder(folder).embed_images(images)
    np.testing.assert_allclose(got, _unit(pooled), atol=1e-4)


def test_model_without_cls_token_asks_for_mean_pooling(tmp_path, images):
    torch.manual_seed(0)
    embedder = Embedder(_siglip(tmp_path / "siglip"))
    with pytest.raises(LayerError, match=r"has no \[CLS\] token.*use mean pooling") as err:
        embedder.embed_images(images[:1])
    assert err.value.param == "pool"


def test_hub_id_loads_from_the_local_cache_without_network(tiny_vit, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-vit"
    shutil.copytree(tiny_vit, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    embedder = Embedder("someone/tiny-vit")
    manifest = embedder.manifest()
    assert (manifest.model, manifest.revision) == ("someone/tiny-vit", commit)
    assert manifest.weights_sha256 == Embedder(tiny_vit).weights_sha256
