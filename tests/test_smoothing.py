"""SmoothQuant-style scaling before int8 (simsearch/models/smoothing.py): the scaled model
computes what the original does, evens out the activation channels that int8 quantisation
cannot hold, and so makes the int8 export more faithful; a model it cannot scale, or a
scaling that changes the vectors, leaves the export as it was without it."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import _save_vit, draw_image

from simsearch.config import ONNX_MIN_COSINE
from simsearch.models.embed import Embedder
from simsearch.models.onnx_validation import stack_pixels

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

IMAGES = [draw_image(700 + i) for i in range(16)]
OUTLIER = 40.0  # how much larger the planted channels run than the rest


def _plant_outliers(folder, source):
    """`source`'s ViT with channels 3 and 17 of every LayerNorm's output OUTLIER times larger
    and the weights that read them OUTLIER times smaller: the same function, with the
    outlier channels of a real ViT (DINOv2's run 10-100x the median)."""
    from transformers import ViTImageProcessor, ViTModel

    model = ViTModel.from_pretrained(source, add_pooling_layer=False)
    with torch.no_grad():
        for block in model.layers:
            for norm, readers in (
                (block.layernorm_before, [block.attention.q_proj, block.attention.k_proj,
                                          block.attention.v_proj]),
                (block.layernorm_after, [block.mlp.fc1]),
            ):  # fmt: skip
                for c in (3, 17):
                    norm.weight[c] *= OUTLIER
                    norm.bias[c] *= OUTLIER
                    for linear in readers:
                        linear.weight[:, c] /= OUTLIER
    model.save_pretrained(folder)
    ViTImageProcessor.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def outlier_vit(tmp_path_factory):
    base = _save_vit(tmp_path_factory.mktemp("base-vit"), seed=5, hidden_size=64,
                     num_attention_heads=4, intermediate_size=128)  # fmt: skip
    return _plant_outliers(tmp_path_factory.mktemp("outlier-vit"), base)


def _module_and_pixels(model):
    from simsearch.models.onnx_graph import _embedding_module

    reference = Embedder(model, device="cpu", precision="fp32")
    return _embedding_module(reference), stack_pixels(IMAGES, reference.preprocess)


def _run(module, pixels):
    with torch.no_grad():
        return module(torch.from_numpy(pixels)).numpy()


def _peak_spread(module, pixels):
    """max over channels / median over channels of |x| at each q projection's input."""
    spreads = []

    def hook(_m, inputs):
        peak = inputs[0].abs().flatten(0, -2).amax(0)
        spreads.append(float(peak.max() / peak.median()))

    hooks = [b.attention.q_proj.register_forward_pre_hook(hook) for b in module.backbone.layers]
    _run(module, pixels)
    for h in hooks:
        h.remove()
    return max(spreads)


def test_smoothing_keeps_the_vectors_and_evens_the_channels(outlier_vit):
    from simsearch.models.smoothing import smooth, smoothing_plan

    module, pixels = _module_and_pixels(outlier_vit)
    before, spread_before = _run(module, pixels), _peak_spread(module, pixels)
    plan = smoothing_plan(module.backbone)
    assert [part for _, part, _, _ in plan] == ["qkv", "attention output", "mlp input"] * 3
    assert smooth(module, module.backbone, pixels, batch_size=4) == len(plan)
    after = _run(module, pixels)
    assert np.sum(before * after, axis=1).min() >= 0.99999
    spread_after = _peak_spread(module, pixels)
    assert spread_before > 20 and spread_after < spread_before / 4, (spread_before, spread_after)


def test_smoothing_stays_finite_on_dead_channels_and_zero_weights(tiny_vit):
    """A channel no image lights up (0 everywhere) and a weight column of zeros: the factors
    must stay finite, and the function the same."""
    from simsearch.models.smoothing import smooth

    module, pixels = _module_and_pixels(tiny_vit)
    with torch.no_grad():
        for block in module.backbone.layers:
            block.layernorm_before.weight[5] = 0.0
            block.layernorm_before.bias[5] = 0.0  # channel 5 of its output: always 0
            attention = block.attention
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj, block.mlp.fc1):
                linear.weight[:, 9] = 0.0  # nothing reads channel 9
    before = _run(module, pixels)
    smooth(module, module.backbone, pixels, batch_size=8)
    for name, tensor in module.backbone.state_dict().items():
        assert torch.isfinite(tensor).all(), name
    assert np.sum(before * _run(module, pixels), axis=1).min() >= 0.99999


def test_a_model_smoothing_does_not_know_is_left_as_it_is():
    from simsearch.models.smoothing import smooth, smoothing_plan

    mlp = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    weights = {k: v.clone() for k, v in mlp.state_dict().items()}
    assert smoothing_plan(mlp) == []
    assert smooth(mlp, mlp, np.ones((2, 8), dtype=np.float32), batch_size=2) == 0
    for name, tensor in mlp.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def _int8_export(tmp_path, model, name):
    from simsearch.models.onnx_export import export_model

    out = tmp_path / name
    result = export_model(model, out, int8=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "model.int8.onnx",
        "model.onnx",
        "simsearch_onnx.json",
    ]  # the smoothed fp32 file it was quantised from is gone
    info = json.loads((out / "simsearch_onnx.json").read_text())
    assert info["validation"]["int8_smoothing"] == result.int8_smoothing
    return result


def test_int8_export_of_a_model_with_outlier_channels_is_more_faithful_smoothed(
    tmp_path, outlier_vit, monkeypatch
):
    smoothed = _int8_export(tmp_path, outlier_vit, "smoothed")
    assert smoothed.int8_smoothing == 0.8
    monkeypatch.setattr("simsearch.models.onnx_int8.smooth", lambda *a, **k: 0)
    plain = _int8_export(tmp_path, outlier_vit, "plain")
    assert plain.int8_smoothing is None
    # Mean cosine to PyTorch fp32 over the 108 validation views; 1 - cosine is the error.
    assert 1 - smoothed.int8_mean_cosine < 0.7 * (1 - plain.int8_mean_cosine), (
        smoothed.int8_mean_cosine, plain.int8_mean_cosine,
    )  # fmt: skip


@pytest.mark.parametrize("fault", ["changes the vectors", "raises"])
def test_a_scaling_that_goes_wrong_is_not_used(tmp_path, tiny_vit, monkeypatch, caplog, fault):
    """The int8 file is then quantised from the plain export, with a notice."""
    from simsearch.models import onnx_int8

    real = onnx_int8.smooth

    def broken(module, backbone, *args, **kwargs):
        n = real(module, backbone, *args, **kwargs)
        if fault == "raises":
            raise KeyError(3)
        with torch.no_grad():
            backbone.layers[0].mlp.fc1.weight.mul_(3.0)  # no longer the same function
        return n

    monkeypatch.setattr(onnx_int8, "smooth", broken)
    with caplog.at_level(logging.WARNING, logger="simsearch.models.onnx_int8"):
        result = _int8_export(tmp_path, tiny_vit, "model")
    assert result.int8_smoothing is None
    assert result.fp32_min_cosine >= ONNX_MIN_COSINE
    assert "int8 without smoothing" in caplog.text
