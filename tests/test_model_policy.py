"""A model folder is data: nothing in it runs, whichever command loads it.

transformers runs a folder's own Python when a config names it (`auto_map`) and the caller
allows remote code, and asks on the terminal when the caller says nothing. The attacker's
folder here is a real tiny ViT whose configs point at `evil.py`, which leaves a mark when
imported; every command that takes --model must refuse it with one line, answering "y"
to any prompt, and the mark must never appear.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import _save_vit, draw_image

from simsearch import Index
from simsearch.cli import cli
from simsearch.errors import ModelLoadError


def plant_code(folder: Path, mark: Path, where: str) -> Path:
    (folder / "evil.py").write_text(
        f"open({str(mark)!r}, 'w').write('ran')\n"
        "from transformers import ViTConfig, ViTImageProcessor, ViTModel\n"
        "class EvilConfig(ViTConfig):\n    pass\n"
        "class EvilProcessor(ViTImageProcessor):\n    pass\n"
        "class EvilModel(ViTModel):\n    pass\n"
    )
    if where in ("config", "both"):
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
        (folder / "config.json").write_text(json.dumps(config))
    if where in ("processor", "both"):
        proc = json.loads((folder / "preprocessor_config.json").read_text())
        proc["auto_map"] = {"AutoImageProcessor": "evil.EvilProcessor"}
        (folder / "preprocessor_config.json").write_text(json.dumps(proc))
    return folder


@pytest.fixture(params=["config", "processor"])
def evil_model(request, tmp_path) -> tuple[Path, Path]:
    mark = tmp_path / "MARK"
    folder = _save_vit(tmp_path / "evil-model", seed=0)
    return plant_code(folder, mark, request.param), mark


def photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir()
    for i in range(n):
        draw_image(i).save(folder / f"p{i}.png")
    return folder


def labelled(folder: Path) -> Path:
    for k, cls in enumerate(("a", "b")):
        (folder / cls).mkdir(parents=True)
        for i in range(4):
            draw_image(4 * k + i).save(folder / cls / f"{cls}{i}.png")
    return folder


@pytest.mark.parametrize("command", ["index", "label", "finetune", "export-model"])
def test_no_command_runs_a_model_folders_code(command, evil_model, tmp_path):
    folder, mark = evil_model
    pics = photos(tmp_path / "pics")
    args = {
        "index": ["index", str(pics), "--index", str(tmp_path / "idx"), "--model", str(folder)],
        "label": ["label", str(pics / "p0.png"), "--model", str(folder)],
        "finetune": [
            "finetune",
            str(labelled(tmp_path / "data")),
            "-o",
            str(tmp_path / "out"),
            "--model",
            str(folder),
            "--epochs",
            "1",
        ],
        "export-model": ["export-model", "--model", str(folder), "-o", str(tmp_path / "onnx")],
    }[command]
    result = CliRunner().invoke(cli, args, input="y\ny\ny\n")
    assert not mark.exists(), f"{command} ran the model folder's code"
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    message = result.stderr.strip().splitlines()
    assert message and "runs code" in message[-1] and "auto_map" in message[-1], result.output
    assert "[y/N]" not in result.output


def test_the_python_api_refuses_it_too(evil_model, tmp_path):
    folder, mark = evil_model
    with pytest.raises(ModelLoadError, match="auto_map"):
        Index.create(tmp_path / "idx", model=str(folder)).embedder  # noqa: B018
    assert not mark.exists()


def test_a_processor_without_auto_map_still_loads(tmp_path):
    folder = _save_vit(tmp_path / "plain", seed=0)
    pics = photos(tmp_path / "pics")
    result = CliRunner().invoke(
        cli, ["index", str(pics), "--index", str(tmp_path / "idx"), "--model", str(folder)]
    )
    assert result.exit_code == 0, result.output


def broken_vit(folder: Path, how: str) -> Path:
    """A tiny ViT whose output is NaN (one NaN weight in the final norm)."""
    import torch
    from transformers import ViTModel

    _save_vit(folder, seed=0)
    model = ViTModel.from_pretrained(folder)
    with torch.no_grad():
        if how == "nan":
            model.layernorm.weight[0] = float("nan")
        else:
            model.layernorm.weight[:] = float("inf")
            model.layernorm.bias[:] = float("inf")
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("how", ["nan", "inf"])
def test_a_model_with_broken_weights_stores_nothing(how, tmp_path, tiny_vit):
    """It stored 60 NaN vectors and exited 0: every later search ranked garbage."""
    pics = photos(tmp_path / "pics", n=6)
    model = broken_vit(tmp_path / "broken", how)
    runner = CliRunner()
    result = runner.invoke(
        cli, ["index", str(pics), "--index", str(tmp_path / "idx"), "--model", str(model)]
    )
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    last = result.stderr.strip().splitlines()[-1]
    assert "NaN or infinite" in last and "nothing from this batch was stored" in last
    with Index.open(tmp_path / "idx") as index:
        assert len(index) == 0
    verify = runner.invoke(cli, ["verify", "--index", str(tmp_path / "idx")])
    assert verify.exit_code == 0, verify.output


def test_output_that_is_not_unit_length_is_refused(tmp_path, tiny_vit, monkeypatch):
    """An ONNX export without its final normalisation (or any backend that forgets it)
    stored its vectors as they came; cosine scores then meant nothing."""
    from simsearch.models.embed import Embedder

    pics = photos(tmp_path / "pics", n=4)
    real = Embedder.embed_pixels
    monkeypatch.setattr(Embedder, "embed_pixels", lambda self, px: 2.0 * real(self, px))
    with Index.create(tmp_path / "idx", model=str(tiny_vit)) as index:
        with pytest.raises(Exception, match="not of unit length") as caught:
            index.add(pics)
        assert type(caught.value).__name__ == "ModelOutputError"
        assert len(index) == 0
        with pytest.raises(Exception, match="not of unit length"):
            index.search(pics / "p0.png")


@pytest.mark.parametrize("command", ["index", "label"])
def test_a_config_far_larger_than_its_weights_is_refused_before_allocating(command, tmp_path):
    """hidden_size 32768 in config.json beside 32-dim weights grew to 24 GB before the
    kernel killed the process. The model the config describes is counted on PyTorch's
    meta device (no memory) against the safetensors header (no data read)."""
    import resource

    folder = _save_vit(tmp_path / "inflated", seed=0)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=32768, intermediate_size=65536)
    if command == "label":
        config.update(architectures=["ViTForImageClassification"], id2label={"0": "a", "1": "b"})
    (folder / "config.json").write_text(json.dumps(config))
    pics = photos(tmp_path / "pics", n=1)
    args = {
        "index": ["index", str(pics), "--index", str(tmp_path / "idx"), "--model", str(folder)],
        "label": ["label", str(pics / "p0.png"), "--model", str(folder)],
    }[command]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = CliRunner().invoke(cli, args)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 * 1024  # KiB
    assert result.exit_code == 1, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert "does not belong to these weights" in last, last


def test_the_same_weights_under_another_config_are_another_model(tmp_path, tiny_vit):
    """Another activation, another layer-norm epsilon: other vectors from the same weights.
    They counted as the same model and were mixed into one index."""
    import shutil

    pics = photos(tmp_path / "pics")
    runner = CliRunner()
    where = ["--index", str(tmp_path / "idx")]
    made = runner.invoke(cli, ["index", str(pics), *where, "--model", str(tiny_vit)])
    assert made.exit_code == 0, made.output
    for change in ({"hidden_act": "relu"}, {"layer_norm_eps": 1e-3}):
        other = tmp_path / f"other-{next(iter(change))}"
        shutil.copytree(tiny_vit, other)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, **change}))
        (pics / "new.png").unlink(missing_ok=True)
        draw_image(9).save(pics / "new.png")
        result = runner.invoke(cli, ["index", str(pics), *where, "--model", str(other)])
        assert result.exit_code == 1, result.output
        assert "model config" in result.stderr.strip().splitlines()[-1]
    # Bookkeeping fields are not identity: the model saved again by another version is it.
    same = tmp_path / "resaved"
    shutil.copytree(tiny_vit, same)
    config = json.loads((same / "config.json").read_text())
    config.update(transformers_version="9.9.9", _name_or_path="elsewhere")
    (same / "config.json").write_text(json.dumps(config))
    assert runner.invoke(cli, ["index", str(pics), *where, "--model", str(same)]).exit_code == 0
