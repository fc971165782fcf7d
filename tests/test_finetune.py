"""Fine-tuning: a tiny ViT learns circles from squares, frozen layers stay put, an
interrupted run resumes where it stopped, and the output folder works as --model for
`label` and `index`.

A tiny random ViT cannot learn shape from forty drawings in a few steps (it stays at
chance), so the classes also differ in colour (red circles, blue squares) as in
test_label.py: what these tests check is the training machinery (labels, head, freezing,
schedule, checkpoints, saving), not what a real backbone can learn.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import _save_vit, edited_checkpoint
from PIL import Image, ImageDraw

from simsearch.cli import cli
from simsearch.errors import FinetuneError, TrainingInterrupted
from simsearch.train.finetune import FinetuneConfig, finetune
from simsearch.train.loop import learning_rate

COLOURS = {"circle": (210, 40, 40), "square": (40, 60, 210)}
PER_CLASS = 20


def draw(shape: str, seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A filled circle or square at a random place and size on a light, random background."""
    rng = np.random.default_rng([0 if shape == "circle" else 1, seed])
    w, h = size
    img = Image.new("RGB", size, tuple(int(x) for x in rng.integers(215, 256, 3)))
    side = rng.uniform(0.5, 0.85) * min(w, h)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    jitter = rng.integers(-25, 26, 3)
    colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[shape], jitter, strict=True))
    box = (x0, y0, x0 + side, y0 + side)
    (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(
        box, fill=colour
    )
    return img


def make_data(folder: Path, per_class: int = PER_CLASS, start: int = 0) -> Path:
    for shape in COLOURS:
        (folder / shape).mkdir(parents=True)
        for i in range(start, start + per_class):
            ext = "png" if i % 2 else "jpg"
            draw(shape, i).save(folder / shape / f"{shape}-{i}.{ext}", quality=95)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A bare tiny ViT backbone (no head), as the mission's ViT-L/16 in21k is."""
    return _save_vit(tmp_path_factory.mktemp("base-vit"), seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("shapes") / "data")


def quick(base: Path, **changes) -> FinetuneConfig:
    """A config that trains the tiny ViT in about a second: fp32 (exact comparisons), a
    small batch so that an epoch is several steps, and a rate fit for a random model."""
    settings = dict(model=str(base), epochs=6, batch_size=8, lr=1e-3, precision="fp32", patience=10)
    return FinetuneConfig(**{**settings, **changes})


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base, data):
    """One fine-tuned model, shared by the tests that only read it."""
    output = tmp_path_factory.mktemp("trained") / "model"
    return finetune(data, output, quick(base)), output


def test_learns_circles_from_squares(trained, base):
    result, output = trained
    assert result.classes == ("circle", "square")
    assert result.best_accuracy >= 0.9  # chance is 0.5
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.train_images == 32 and result.val_images == 8  # 20 % of each class
    assert result.steps == 6 * 4  # 32 images in batches of 8, 6 epochs
    best = result.history[result.best_epoch - 1]
    assert best.best and best.val_accuracy == result.best_accuracy
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]
    assert config["id2label"] == {"0": "circle", "1": "square"}
    assert config["label2id"] == {"circle": 0, "square": 1}
    assert (output / "preprocessor_config.json").read_bytes() == (
        base / "preprocessor_config.json"
    ).read_bytes()
    training = json.loads((output / "simsearch_training.json").read_text())
    assert training["config"]["lr"] == 1e-3 and training["config"]["freeze_layers"] is None
    assert training["frozen_blocks"] == 1  # 3 blocks, the last 2 train by default
    assert [h["epoch"] for h in training["result"]["history"]] == list(range(1, 7))
    assert not (output / "checkpoints").exists()


def test_keeps_the_best_epoch_and_stops_early(tmp_path, base, data, monkeypatch):
    """The saved model is the best epoch's, not the last; --patience ends the run."""
    import torch
    from transformers import AutoModelForImageClassification

    import simsearch.train.loop

    scores = iter([(0.7, 0.5), (0.3, 0.9), (0.2, 0.9), (0.6, 0.6), (0.5, 0.8), (0.1, 1.0)])
    monkeypatch.setattr(simsearch.train.loop, "evaluate", lambda *a: next(scores))
    output, best, last = tmp_path / "out", {}, {}

    def snapshot(record):
        best[record.epoch] = torch.load(output / "checkpoints" / "best.pt")
        last[record.epoch] = torch.load(output / "checkpoints" / "last.pt")["trainable"]

    result = finetune(data, output, quick(base, patience=2), on_epoch=snapshot)
    # Epoch 3 ties epoch 2's accuracy with a lower loss; epochs 4 and 5 are worse: stop.
    assert [r.best for r in result.history] == [True, True, True, False, False]
    assert (result.best_epoch, result.best_accuracy, result.best_loss) == (3, 0.9, 0.2)
    assert result.stopped_early and result.epochs_run == 5
    saved = AutoModelForImageClassification.from_pretrained(output).state_dict()
    for name, value in best[3].items():
        assert torch.equal(saved[name], value), name
        assert torch.equal(best[5][name], value), name
    assert not torch.equal(saved["classifier.weight"], last[5]["classifier.weight"])


@pytest.mark.parametrize("freeze_layers", [0, 2, 3])
def test_frozen_layers_do_not_change(tmp_path, base, data, freeze_layers):
    """The embeddings and the first N blocks come out bit-identical; every other backbone
    weight (later blocks, and the final norm while any block trains) has moved."""
    output = tmp_path / "out"
    finetune(data, output, quick(base, epochs=2, freeze_layers=freeze_layers))
    before, after = tensors(base), tensors(output)
    kept = [n for n in before if not _trains(n, freeze_layers)]
    moved = [n for n in before if _trains(n, freeze_layers)]
    assert any(n.startswith("embeddings.") for n in kept)
    for name in kept:
        assert np.array_equal(before[name].numpy(), after["vit." + name].numpy()), name
    for name in moved:
        assert not np.array_equal(before[name].numpy(), after["vit." + name].numpy()), name
    assert len(moved) == (0 if freeze_layers == 3 else 2 + 16 * (3 - freeze_layers))
    assert after["classifier.weight"].shape == (2, 32)


def _trains(name: str, freeze_layers: int, blocks: int = 3) -> bool:
    """Whether the base weight `name` trains (as saved: encoder.layer.N. or layers.N.)."""
    block = re.search(r"layers?\.(\d+)\.", name)
    if block is not None:
        return int(block.group(1)) >= freeze_layers
    return name.startswith("layernorm.") and freeze_layers < blocks


def test_gradient_checkpointing_trains_the_same(tmp_path, base, data):
    """Recomputing activations changes memory, not the arithmetic; and the blocks above the
    frozen ones still get gradients (the reentrant form would silently give them none)."""
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    a = finetune(data, plain, quick(base, epochs=2))
    b = finetune(data, checkpointed, quick(base, epochs=2, gradient_checkpointing=True))
    assert [r.val_loss for r in a.history] == pytest.approx([r.val_loss for r in b.history])
    first, second = tensors(plain), tensors(checkpointed)
    for name in first:
        np.testing.assert_allclose(first[name].numpy(), second[name].numpy(), atol=1e-5)
    name = next(n for n in tensors(base) if _trains(n, 1))
    assert not np.array_equal(second["vit." + name].numpy(), tensors(base)[name].numpy())


def test_resume_continues_from_the_saved_step(tmp_path, base, data):
    """Ctrl-C mid-epoch saves the step; --resume continues the same schedule and data order
    and ends where an uninterrupted run ends."""
    config = quick(base, epochs=3, batch_size=4, grad_accum=2)  # 4 steps an epoch
    whole = finetune(data, tmp_path / "whole", config)

    output = tmp_path / "interrupted"
    steps = []

    def ctrl_c_at_step_6(step):
        steps.append(step)
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match=r"step 6 .*saved in") as err:
        finetune(data, output, config, on_step=ctrl_c_at_step_6)
    assert (err.value.fix, err.value.path) == ("resume", str(output))
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not (output / "config.json").exists()  # no model until the run finishes
    with pytest.raises(FinetuneError, match="interrupted fine-tune: resume it"):
        finetune(data, output, config)

    resumed_steps = []
    resumed = finetune(data, output, resume=True, on_step=resumed_steps.append)
    assert resumed_steps == [7, 8, 9, 10, 11, 12]
    assert resumed.steps == whole.steps == 12
    assert [r.step for r in resumed.history] == [4, 8, 12]
    for mine, theirs in zip(resumed.history, whole.history, strict=True):
        assert mine.lr == pytest.approx(theirs.lr)
        assert mine.train_loss == pytest.approx(theirs.train_loss, abs=1e-5)
        assert mine.val_loss == pytest.approx(theirs.val_loss, abs=1e-5)
    final, expected = tensors(output), tensors(tmp_path / "whole")
    for name in expected:
        np.testing.assert_allclose(final[name].numpy(), expected[name].numpy(), atol=1e-5)


def test_resume_refuses_other_settings_and_finished_runs(tmp_path, base, data):
    output = tmp_path / "out"
    config = quick(base, epochs=2)

    def stop(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        finetune(data, output, config, on_step=stop)
    with pytest.raises(FinetuneError, match=r"other settings .*lr: 0\.001 vs 0\.01"):
        finetune(data, output, replace(config, lr=0.01), resume=True)
    finetune(data, output, config, resume=True)
    with pytest.raises(FinetuneError, match="finished fine-tune; there is nothing to resume"):
        finetune(data, output, config, resume=True)
    with pytest.raises(FinetuneError, match="no fine-tuning checkpoint to resume"):
        finetune(data, tmp_path / "never", config, resume=True)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, base, data) -> Path:
    """An output folder holding the checkpoint of a fine-tune stopped at step 2."""
    output = tmp_path_factory.mktemp("interrupted") / "out"

    def stop(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        finetune(data, output, quick(base, epochs=2), on_step=stop)
    return output


def _set(key, value, inner=None):
    def edit(checkpoint):
        (checkpoint[inner] if inner else checkpoint)[key] = value

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _set("epochs", "2", "config"),
        _set("lr", True, "config"),
        _set("invented", 1, "config"),
        _set("config", "x"),
        _set("step", 1.5, "state"),
        _set("state", []),
        _set("trainable", {}),
        lambda c: c["trainable"].popitem(),
        lambda c: c["trainable"].__setitem__("invented.weight", c["rng"]),
        _set("optimizer", {"state": {}}),
        lambda c: c.__setitem__("rng", c["rng"][:2]),
        _set("seed", -1, "config"),
        _set("batch", -3, "state"),  # looped forever
        _set("epoch", 99, "state"),
        _set("stopped_early", True, "state"),
        _set("history", [1], "state"),
        lambda c: c["optimizer"]["param_groups"][0].pop("lr_scale"),
        lambda c: next(iter(c["optimizer"]["state"].values())).__setitem__(
            "exp_avg", next(iter(c["optimizer"]["state"].values()))["exp_avg"][:1]
        ),
    ],
    ids=[
        "epochs-str", "lr-bool", "unknown-setting", "config-str", "step-float", "state-list",
        "no-weights", "a-weight-missing", "an-unknown-weight", "optimizer-garbage", "rng-short",
        "seed-negative", "batch-negative", "epoch-past-the-end", "stopped-early-without-best",
        "history-garbage", "group-without-lr-scale", "moment-shape",
    ],
)  # fmt: skip
def test_an_edited_checkpoint_is_refused_with_one_line(interrupted_run, base, data, tmp_path,
                                                       edit):  # fmt: skip
    """A checkpoint is a file anyone can edit: a value of the wrong type, an unknown setting
    or weights missing (which would resume from the base model's, silently) is one
    FinetuneError naming the checkpoint, and the folder stays as it was."""
    import shutil

    output = tmp_path / "out"
    shutil.copytree(interrupted_run, output)
    last = edited_checkpoint(output, edit)
    before = last.read_bytes()
    with pytest.raises(FinetuneError, match="checkpoint") as caught:
        finetune(data, output, resume=True)
    assert "\n" not in str(caught.value)
    assert last.read_bytes() == before
    assert not (output / "config.json").exists()


def test_a_checkpoint_that_is_not_a_dict_is_refused(tmp_path, base, data):
    import torch

    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    torch.save([1, 2], tmp_path / "out" / "checkpoints" / "last.pt")
    with pytest.raises(FinetuneError, match="is not a fine-tuning checkpoint"):
        finetune(data, tmp_path / "out", resume=True)


def test_resume_refuses_changed_data(tmp_path, base, data):
    import shutil

    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    output = tmp_path / "out"

    def stop(step):
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        finetune(mine, output, quick(base), on_step=stop)
    draw("circle", 99).save(mine / "circle" / "new.png")
    with pytest.raises(FinetuneError, match="images changed since it started"):
        finetune(mine, output, resume=True)


def test_learning_rate_warms_up_then_decays_to_zero():
    rates = [learning_rate(s, 100, 10, 1e-3) for s in range(100)]
    assert rates[0] == pytest.approx(1e-3 / 11)
    assert all(a < b for a, b in itertools.pairwise(rates[:11]))  # warm-up
    assert rates[10] == pytest.approx(1e-3)  # the peak
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))  # decay
    assert rates[-1] < 1e-6


def test_output_labels_images(trained, tmp_path):
    """`simsearch label --model OUTPUT` names the classes, from id2label."""
    _, output = trained
    files = []
    for shape in COLOURS:
        for seed in (500, 501):
            path = tmp_path / f"{shape}-{seed}.png"
            draw(shape, seed).save(path)
            files.append((path, shape))
    result = CliRunner().invoke(
        cli, ["label", *[str(p) for p, _ in files], "--model", str(output), "--json", "--top", "2"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["labels"][0]["label"] for r in rows] == [shape for _, shape in files]
    assert {x["label"] for x in rows[0]["labels"]} == {"circle", "square"}


def test_output_indexes_with_the_finetuned_backbone(trained, tmp_path, base, data):
    """`simsearch index --model OUTPUT` embeds with the fine-tuned backbone (not the base,
    not the head): its vectors are the trained ViT's [CLS] after the final norm."""
    import torch
    from transformers import AutoModelForImageClassification

    from simsearch import Index
    from simsearch.models.embed import Embedder

    _, output = trained
    index = tmp_path / "index"
    result = CliRunner().invoke(
        cli, ["-q", "index", str(data), "--index", str(index), "--model", str(output)]
    )
    assert result.exit_code == 0, result.output
    with Index.open(index) as idx:
        assert len(idx) == 2 * PER_CLASS
        assert idx.info().dim == 32
        hits = idx.search(data / "circle" / "circle-0.jpg", k=3)
        assert hits[0].path.endswith("circle-0.jpg")

    image = draw("square", 77)
    mine = Embedder(output, precision="fp32").embed_images([image])[0]
    theirs = Embedder(base, precision="fp32").embed_images([image])[0]
    model = AutoModelForImageClassification.from_pretrained(output).eval()
    pixels = Embedder(output, precision="fp32").preprocess(image)[None]
    with torch.no_grad():
        cls = model.vit(pixel_values=torch.from_numpy(pixels)).last_hidden_state[0, 0]
    np.testing.assert_allclose(mine, (cls / cls.norm()).numpy(), atol=1e-5)
    assert float(mine @ theirs) < 0.999  # the fine-tuned backbone is not the base


def test_unreadable_images_are_skipped(tmp_path, base, data, caplog):
    import shutil

    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    (mine / "circle" / "broken.jpg").write_bytes(b"not a jpeg")
    (mine / "square" / "empty.png").write_bytes(b"")
    result = finetune(mine, tmp_path / "out", quick(base, epochs=1))
    assert result.skipped == 2
    assert result.train_images + result.val_images == 2 * PER_CLASS
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skipped) == 2 and "broken.jpg" in skipped[0]


def test_val_dir(tmp_path, base, data):
    val = make_data(tmp_path / "val", per_class=4, start=200)
    result = finetune(data, tmp_path / "out", quick(base, epochs=2, val_dir=str(val)))
    assert result.train_images == 2 * PER_CLASS and result.val_images == 8


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("one_class", r"has 1 class folder\(s\); fine-tuning needs at least 2"),
        ("empty_class", r"class folder .*square holds no images"),
        ("lonely_image", r"class 'square' has 1 readable image\(s\); it needs at least 2"),
        (
            "output_exists",
            r"exists and is not empty, and fine-tuning never overwrites a model; choose a new",
        ),
        ("output_is_file", r"is a file, not a folder"),
        ("too_many_frozen", r"cannot freeze 4 layers: this model has only 3 blocks"),
        ("fp16_on_cpu", r"fp16 trains on CUDA only"),
        ("unknown_val_class", r"validation folder .* has classes the training folder lacks: cat"),
    ],
)
def test_bad_inputs_are_clear_errors(tmp_path, base, data, setup, message):
    folder, output, config = tmp_path / "data", tmp_path / "out", quick(base, epochs=1)
    make_data(folder, per_class=3)
    if setup == "one_class":
        import shutil

        shutil.rmtree(folder / "square")
    elif setup == "empty_class":
        for f in (folder / "square").iterdir():
            f.unlink()
    elif setup == "lonely_image":
        for f in sorted((folder / "square").iterdir())[1:]:
            f.unlink()
    elif setup == "output_exists":
        output.mkdir()
        (output / "config.json").write_text("{}")
    elif setup == "output_is_file":
        output.write_text("")
    elif setup == "too_many_frozen":
        config = quick(base, freeze_layers=4)
    elif setup == "fp16_on_cpu":
        config = quick(base, precision="fp16")
    elif setup == "unknown_val_class":
        val = make_data(tmp_path / "val", per_class=1)
        (val / "cat").mkdir()
        config = quick(base, val_dir=str(val))
    with pytest.raises(FinetuneError, match=message):
        finetune(folder, output, config, device="cpu")
    if setup == "output_exists":
        assert (output / "config.json").read_text() == "{}"  # untouched


def test_config_checks_its_values():
    with pytest.raises(FinetuneError, match="val split must be between 0 and 1"):
        FinetuneConfig(val_split=1.0)
    with pytest.raises(FinetuneError, match="precision must be one of"):
        FinetuneConfig(precision="int8")


# -- the command line ------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_json(tmp_path, base, data):
    output = tmp_path / "out"
    result = run(
        "finetune", data, "--output", output, "--model", base, "--epochs", 2,
        "--batch-size", 8, "--lr", 1e-3, "--precision", "fp32", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["classes"] == ["circle", "square"]
    assert summary["output"] == str(output.resolve())
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["precision"] == "fp32" and summary["device"] == "cpu"
    assert summary["peak_memory_kind"] == "process RSS" and summary["peak_memory_bytes"] > 0


def test_cli_human_output_and_errors(tmp_path, base, data):
    output = tmp_path / "out"
    args = ["finetune", data, "--output", output, "--model", base, "--precision", "fp32"]
    result = run(*args, "--epochs", 1, "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert "epoch 1/1: train loss " in result.stderr and "val accuracy" in result.stderr
    assert f"simsearch label IMAGE --model {output.resolve()}" in result.stdout
    assert f"simsearch index DIR --index INDEX --model {output.resolve()}" in result.stdout

    again = run(*args)
    assert again.exit_code == 1
    assert again.stderr.startswith(f"Error: {output} exists and is not empty")
    assert again.stderr.strip().endswith("choose a new folder (--output)")
    both = run(*args, "--val-split", 0.3, "--val-dir", data)
    assert both.exit_code == 2 and "--val-split or --val-dir, not both" in both.stderr


def test_cli_resume_takes_the_runs_own_settings(tmp_path, base, data):
    """--resume with no other options continues with the interrupted run's settings; an
    option given that differs is refused."""
    output = tmp_path / "out"

    def stop(step):
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        finetune(data, output, quick(base, epochs=2, seed=5), on_step=stop)
    other = run("finetune", data, "--output", output, "--resume", "--seed", 6)
    assert other.exit_code == 1 and "seed: 5 vs 6" in other.stderr
    result = run("finetune", data, "--output", output, "--resume", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 8
    training = json.loads((output / "simsearch_training.json").read_text())
    assert training["config"]["seed"] == 5 and training["config"]["lr"] == 1e-3


def test_a_diverging_run_stops_and_publishes_nothing(tmp_path, base, data):
    """--lr 1e30 published a model of NaN weights and exited 0; `label` then named one
    class for every image. Now it stops at the first non-finite loss, with one line."""
    output = tmp_path / "model"
    result = CliRunner().invoke(
        cli,
        [
            "finetune", str(data), "-o", str(output), "--model", str(base),
            "--lr", "1e30", "--epochs", "2", "--batch-size", "8", "--precision", "fp32",
        ],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    last = result.stderr.strip().splitlines()[-1]
    assert "training diverged" in last and "--lr" in last
    assert not (output / "model.safetensors").exists()
    assert not (output / "config.json").exists()


def test_the_published_model_is_readable_like_any_file_it_writes(trained):
    """model.safetensors came out 0600: another account (a server's) could not read it."""
    import stat

    _, output = trained
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert stat.S_IMODE((output / name).stat().st_mode) == 0o666 & ~umask, name
