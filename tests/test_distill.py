"""Distillation: a tiny student learns a tiny teacher index's vectors, resumes where it was
interrupted, is saved as a folder that `index` and `search` take for that index only, and
is refused whole when its folder was tampered with (the attack tests come first)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import draw_image, edited_checkpoint

from simsearch import Index
from simsearch.cli import cli
from simsearch.errors import (
    DistillError,
    LayerError,
    ManifestMismatchError,
    ModelLoadError,
    TrainingInterrupted,
)
from simsearch.models.embed import Embedder
from simsearch.models.student import PROJECTION_FILE, STUDENT_FILE
from simsearch.train.distill import DistillConfig, distill

N_IMAGES = 60
# A student a third of tiny_vit's width, two blocks, patches as tiny_vit's: it trains in a
# few seconds on 32x32 drawings.
SMALL = dict(layers=2, hidden=16, heads=2, batch_size=16, held_out=0.2, workers=1)


def make_photos(folder: Path, start: int, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(start, start + count):
        draw_image(i, (48, 40)).save(folder / f"p{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def teacher_index(tmp_path_factory, tiny_vit) -> Path:
    root = tmp_path_factory.mktemp("distill")
    path = root / "index"
    with Index.create(path, model=tiny_vit, backend="torch", precision="fp32") as idx:
        idx.add(make_photos(root / "photos", 0, N_IMAGES))
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory, teacher_index) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("student") / "student"
    config = DistillConfig(**SMALL, epochs=40, lr=2e-3, precision="fp32")
    return out, distill(teacher_index, out, config, device="cpu")


@pytest.fixture(scope="module")
def thinned(tmp_path_factory, teacher_index) -> tuple[Path, object]:
    """A student thinned from tiny_vit (blocks 2 and 3 of its 3), untrained: lr ~ 0."""
    out = tmp_path_factory.mktemp("thinned") / "student"
    config = DistillConfig(layers=2, epochs=1, lr=1e-9, batch_size=16, held_out=0.2, workers=1,
                           precision="fp32")  # fmt: skip
    return out, distill(teacher_index, out, config, device="cpu")


@pytest.fixture(scope="module")
def half_size(tmp_path_factory, teacher_index) -> tuple[Path, object]:
    """distill's default student of tiny_vit: all its blocks, at 16 px where it sees 32."""
    out = tmp_path_factory.mktemp("half") / "student"
    config = DistillConfig(epochs=20, lr=2e-3, batch_size=16, held_out=0.2, workers=1,
                           precision="fp32")  # fmt: skip
    return out, distill(teacher_index, out, config, device="cpu")


def tampered(student_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(student_dir, copy)
    return copy


# -- attacks: a student folder is data from outside --------------------------------------


def test_a_record_edited_to_claim_another_teacher_is_refused(student, other_vit, tmp_path):
    from simsearch.models.weights import hash_weights

    folder = tampered(student[0], tmp_path)
    record = json.loads((folder / STUDENT_FILE).read_text())
    record["teacher"]["weights_sha256"] = hash_weights(other_vit)
    (folder / STUDENT_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match="names another teacher"):
        Embedder(folder, device="cpu")


def test_weights_swapped_after_training_are_refused(student, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = tampered(student[0], tmp_path)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()},
              folder / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    assert torch.is_tensor(next(iter(weights.values())))
    with pytest.raises(ModelLoadError, match="not the ones it was distilled with"):
        Embedder(folder, device="cpu")


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": 1}', '{"format": 99}'])
def test_a_malformed_record_is_refused(student, tmp_path, text):
    folder = tampered(student[0], tmp_path)
    (folder / STUDENT_FILE).write_text(text)
    with pytest.raises(ModelLoadError, match=r"student model in .* cannot be used"):
        Embedder(folder, device="cpu")


def test_a_projection_of_the_wrong_shape_is_refused(student, tmp_path):
    import torch
    from safetensors.torch import save_file

    from simsearch.models.student import projection_metadata, read_student
    from simsearch.models.weights import hash_weights

    folder = tampered(student[0], tmp_path)
    metadata = projection_metadata(folder)
    save_file({"weight": torch.zeros(32, 8), "bias": torch.zeros(32)},
              folder / PROJECTION_FILE, metadata=metadata)  # fmt: skip
    # ... recorded consistently, so that only the shape is wrong
    record = json.loads((folder / STUDENT_FILE).read_text())
    record["student"]["weights_sha256"] = hash_weights(folder)
    (folder / STUDENT_FILE).write_text(json.dumps(record))
    read_student(folder)  # the record itself is consistent
    with pytest.raises(ModelLoadError, match=r"holds .* not the"):
        Embedder(folder, device="cpu")


def test_a_half_size_students_preprocessing_or_image_size_edited_is_refused(half_size, tmp_path):
    # its preprocessor config put back to the teacher's 32 px: the record says 16
    folder = tampered(half_size[0], tmp_path)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(
        json.dumps({**settings, "size": {"height": 32, "width": 32}})
    )
    with pytest.raises(ModelLoadError, match="not its teacher's preprocessing"):
        Embedder(folder, device="cpu")
    # the record's image size edited to match no preprocessing, or to nonsense
    for side, match in [(24, "not its teacher's preprocessing"), (True, "image_size"),
                        (10**6, "image_size")]:  # fmt: skip
        folder = tampered(half_size[0], tmp_path / str(side))
        record = json.loads((folder / STUDENT_FILE).read_text())
        record["student"]["image_size"] = side
        (folder / STUDENT_FILE).write_text(json.dumps(record))
        with pytest.raises(ModelLoadError, match=match):
            Embedder(folder, device="cpu")


def test_a_tampered_student_adds_nothing_to_the_index(student, teacher_index, tmp_path):
    folder = tampered(student[0], tmp_path)
    (folder / STUDENT_FILE).write_text("{}")
    photos = make_photos(tmp_path / "new", 200, 3)
    with Index.open(teacher_index) as idx:
        before = len(idx)
    with pytest.raises(ModelLoadError), Index.open(teacher_index, model=folder) as idx:
        idx.add(photos)
    with Index.open(teacher_index) as idx:
        assert len(idx) == before


# -- training ----------------------------------------------------------------------------


def test_a_tiny_student_learns_the_teachers_space(student, teacher_index, tmp_path):
    out, result = student
    untrained = distill(
        teacher_index,
        tmp_path / "untrained",
        DistillConfig(**SMALL, epochs=1, lr=1e-9, precision="fp32"),
        device="cpu",
    )
    assert result.mean_cosine > untrained.mean_cosine + 0.3
    assert result.recall_at_10 > untrained.recall_at_10
    assert result.held_out_images == 12 and result.train_images == 48
    record = json.loads((out / STUDENT_FILE).read_text())
    assert record["agreement"]["recall_at_10"] == result.recall_at_10
    assert record["teacher"]["dim"] == 32 and record["student"]["hidden_size"] == 16
    assert 0 < record["flops_ratio"] < 1
    assert record["speed"]["student_images_per_second"] > 0
    assert not (out / "checkpoints").exists()


def test_the_students_vectors_are_what_distill_measured(student, teacher_index):
    out, _ = student
    embedder = Embedder(out, device="cpu", precision="fp32")
    manifest = embedder.manifest()
    with Index.open(teacher_index) as idx:
        teacher = idx.manifest
    teacher.check_compatible(manifest)  # the teacher's space
    assert manifest.student["teacher"] == teacher.model and manifest.dim == 32
    vectors = embedder.embed_images([draw_image(i, (48, 40)) for i in range(4)])
    assert vectors.shape == (4, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_resume_continues_from_the_checkpoint_and_ends_as_an_uninterrupted_run(
    teacher_index, tmp_path
):
    config = DistillConfig(**SMALL, epochs=3, checkpoint_every=2, precision="fp32")
    whole = distill(teacher_index, tmp_path / "whole", config, device="cpu")

    out = tmp_path / "resumed"

    def killed_at_step_5(step):  # before step 5's checkpoint: as a kill would
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(teacher_index, out, config, device="cpu", on_step=killed_at_step_5)
    assert (out / "checkpoints" / "last.pt").is_file()
    with pytest.raises(DistillError, match="interrupted distillation"):
        distill(teacher_index, out, config, device="cpu")
    with pytest.raises(DistillError, match=r"other settings.*epochs"):
        distill(teacher_index, out, DistillConfig(**{**SMALL, "epochs": 5}), resume=True)
    steps = []
    resumed = distill(teacher_index, out, None, resume=True, device="cpu", on_step=steps.append)
    # 3 steps an epoch: the checkpoint of step 4 is in the middle of the second epoch
    assert steps[0] == 5
    assert resumed.steps == whole.steps == 9
    assert resumed.mean_cosine == pytest.approx(whole.mean_cosine, abs=1e-4)
    assert resumed.recall_at_10 == pytest.approx(whole.recall_at_10, abs=0.02)


def test_noise_is_drawn_afresh_each_step_the_same_on_every_run_and_recorded(
    teacher_index, tmp_path
):
    """--noise trains on noisy pixels against the clean images' vectors: the draws are the
    seed's (two runs give the same student, a clean run another), the student's record says
    so, and a run interrupted with noise cannot resume without it."""
    noisy = DistillConfig(**SMALL, epochs=2, noise=0.5, precision="fp32")
    first = distill(teacher_index, tmp_path / "a", noisy, device="cpu")
    again = distill(teacher_index, tmp_path / "b", noisy, device="cpu")
    clean = distill(teacher_index, tmp_path / "c", replace(noisy, noise=0.0), device="cpu")
    assert first.mean_cosine == again.mean_cosine
    assert first.mean_cosine != clean.mean_cosine
    record = json.loads((tmp_path / "a" / STUDENT_FILE).read_text())
    assert record["config"]["noise"] == 0.5

    def killed_at_step_2(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(teacher_index, tmp_path / "d", replace(noisy, checkpoint_every=1), device="cpu",
                on_step=killed_at_step_2)  # fmt: skip
    with pytest.raises(DistillError, match=r"other settings.*noise: 0.5 vs 0.0"):
        distill(teacher_index, tmp_path / "d", replace(noisy, checkpoint_every=1, noise=0.0),
                resume=True)  # fmt: skip
    with pytest.raises(DistillError, match="noise must not be negative"):
        DistillConfig(noise=-0.1)


def test_a_checkpoint_from_before_noise_existed_resumes_without_noise():
    from simsearch.train.distill import checkpoint_config

    newer = ("noise", "index_weight")
    config = DistillConfig(noise=0.3, index_weight=0.5)
    old = {"config": {k: v for k, v in config.__dict__.items() if k not in newer}}
    assert checkpoint_config(old).noise == 0.0
    assert checkpoint_config(old).index_weight == 0.0


def _run_on(targets: np.ndarray, train: np.ndarray, temperature: float = 0.05):
    from types import SimpleNamespace

    from simsearch.train.distill import _Run

    data = SimpleNamespace(targets=targets, train=train, ids=np.arange(len(targets)))
    config = DistillConfig(index_weight=1.0, index_temperature=temperature)
    return _Run(config, 1e-4, data, None, None, None, "cpu", "fp32", Path("."), None, 0.0)


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_the_index_loss_is_zero_only_where_the_student_ranks_the_index_as_its_teacher():
    """The index loss compares how a student vector and its target rank the training
    images' stored vectors: zero for the target itself or a vector that ranks them the
    same, larger the more the order moves; the image's own stored vector is left out."""
    import torch

    rng = np.random.default_rng(0)
    targets = _unit(rng.standard_normal((40, 16)))
    run = _run_on(targets, np.arange(30))  # the last 10 held out: never anchors
    batch = np.array([0, 5, 35])
    target = torch.from_numpy(targets[batch])
    assert run.index_loss(target, target, batch).item() == pytest.approx(0.0, abs=1e-6)
    near = torch.from_numpy(_unit(targets[batch] + 0.05 * rng.standard_normal((3, 16))))
    far = torch.from_numpy(_unit(targets[batch] + 0.5 * rng.standard_normal((3, 16))))
    assert 0 < run.index_loss(near, target, batch) < run.index_loss(far, target, batch)
    # image 0's own stored vector is left out: replacing it changes nothing
    shifted = targets.copy()
    shifted[0] = _unit(rng.standard_normal((1, 16)))[0]
    other = _run_on(shifted, np.arange(30))
    first = run.index_loss(near[:1], target[:1], batch[:1]).item()
    assert other.index_loss(near[:1], target[:1], batch[:1]).item() == pytest.approx(first)
    # another image's does
    shifted[1] = _unit(rng.standard_normal((1, 16)))[0]
    moved = _run_on(shifted, np.arange(30))
    assert moved.index_loss(near[:1], target[:1], batch[:1]).item() != pytest.approx(first)
    # a held-out image (35) has no vector among the anchors: none of theirs is left out
    held = run.index_loss(near[2:], target[2:], batch[2:]).item()
    shifted = targets.copy()
    shifted[29] = _unit(rng.standard_normal((1, 16)))[0]
    assert _run_on(shifted, np.arange(30)).index_loss(
        near[2:], target[2:], batch[2:]
    ).item() != pytest.approx(held)
    assert len(run.anchors) == 30


def test_the_index_loss_keeps_at_most_its_cap_of_anchors(monkeypatch):
    """A large index: the loss ranks against a seeded sample of the training vectors, the
    same one on every run (a resume), so memory stays bounded."""
    import torch

    monkeypatch.setattr("simsearch.train.distill.INDEX_LOSS_ANCHORS", 8)
    rng = np.random.default_rng(1)
    targets = _unit(rng.standard_normal((40, 16)))
    runs = [_run_on(targets, np.arange(30)) for _ in range(2)]
    batch = np.array([0, 5, 35])
    near = torch.from_numpy(_unit(targets[batch] + 0.1 * rng.standard_normal((3, 16))))
    target = torch.from_numpy(targets[batch])
    losses = [r.index_loss(near, target, batch).item() for r in runs]
    assert len(runs[0].anchors) == 8 and losses[0] == pytest.approx(losses[1]) and losses[0] > 0
    assert torch.equal(runs[0].anchors, runs[1].anchors)
    kept = np.flatnonzero(runs[0].anchor_row >= 0)
    assert len(kept) == 8 and kept.max() < 30  # training images only
    np.testing.assert_array_equal(runs[0].anchors.numpy(), targets[kept])


def test_a_student_trained_with_the_index_loss_learns_and_records_it(teacher_index, tmp_path):
    config = DistillConfig(**SMALL, epochs=20, lr=2e-3, index_weight=1.0, precision="fp32")
    untrained = distill(teacher_index, tmp_path / "u", replace(config, epochs=1, lr=1e-9),
                        device="cpu")  # fmt: skip
    result = distill(teacher_index, tmp_path / "s", config, device="cpu")
    assert result.mean_cosine > untrained.mean_cosine + 0.05
    record = json.loads((tmp_path / "s" / STUDENT_FILE).read_text())
    assert record["config"]["index_weight"] == 1.0
    with pytest.raises(DistillError, match=r"index temperature must be at least 0\.001"):
        DistillConfig(index_temperature=1e-40)  # cosines over it overflow to inf


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, teacher_index) -> Path:
    """An output folder holding the checkpoint of a run killed at step 2."""
    out = tmp_path_factory.mktemp("interrupted") / "student"

    def killed_at_step_2(step):
        if step == 2:
            raise KeyboardInterrupt

    config = DistillConfig(**SMALL, epochs=2, checkpoint_every=1, precision="fp32")
    with pytest.raises(KeyboardInterrupt):
        distill(teacher_index, out, config, device="cpu", on_step=killed_at_step_2)
    return out


def _edit_config(key, value):
    return lambda c: c["config"].__setitem__(key, value)


def _first_moment(change):
    """An edit of the optimiser's first moment (exp_avg) of its first parameter."""

    def edit(checkpoint):
        state = next(iter(checkpoint["optimizer"]["state"].values()))
        state["exp_avg"] = change(state["exp_avg"])

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _edit_config("noise", "abc"),
        _edit_config("epochs", "3"),
        _edit_config("epochs", 2.5),
        _edit_config("lr", float("nan")),
        _edit_config("augment", "yes"),
        _edit_config("init", 7),
        _edit_config("invented", 1),
        lambda c: c.__setitem__("config", [1, 2]),
        lambda c: c.__setitem__("lr", "fast"),
        lambda c: c.__setitem__("lr", -1.0),
        lambda c: c["state"].__setitem__("step", "four"),
        lambda c: c["state"].__setitem__("invented", 0),
        lambda c: c.__setitem__("state", None),
        lambda c: c.__setitem__("model", {"nonsense": c["rng"]}),
        lambda c: c.__setitem__("optimizer", {"state": 1}),
        lambda c: c.__setitem__("rng", c["rng"][:3]),
        lambda c: c.pop("fingerprint"),
        _edit_config("seed", -1),
        _edit_config("mlp_ratio", float("inf")),
        lambda c: c.__setitem__("lr", 1e300),
        lambda c: (c["config"].__setitem__("lr", 1e-3), c.__setitem__("lr", 5e-4)),
        lambda c: c["state"].__setitem__("epoch", -1),
        lambda c: c["state"].__setitem__("batch", -3),
        lambda c: c["state"].__setitem__("step", -(10**6)),
        lambda c: c["state"].__setitem__("epoch", 99),
        lambda c: c["state"].__setitem__("batch", 10**6),
        lambda c: c["state"].__setitem__("history", [1]),
        lambda c: c["state"].__setitem__("seconds", float("inf")),
        _first_moment(lambda m: m.reshape(-1)[1:]),
        _first_moment(lambda m: m * float("nan")),
        lambda c: c["optimizer"]["param_groups"][0].__setitem__("betas", "x"),
    ],
    ids=[
        "noise-str", "epochs-str", "epochs-float", "lr-nan", "augment-str", "init-int",
        "unknown-setting", "config-list", "lr-str", "lr-negative", "state-step-str",
        "state-unknown", "state-none", "model-other", "optimizer-garbage", "rng-short",
        "no-fingerprint", "seed-negative", "mlp-ratio-inf", "lr-huge", "lr-not-the-settings'",
        "epoch-negative", "batch-negative", "step-negative", "epoch-past-the-end",
        "batch-past-the-end", "history-garbage", "seconds-inf", "moment-shape", "moment-nan",
        "betas-str",
    ],
)  # fmt: skip
def test_an_edited_checkpoint_is_refused_with_one_line_and_left_as_it_was(
    interrupted, teacher_index, tmp_path, edit
):
    """A checkpoint is a file anyone can edit: a value of the wrong type, an unknown setting
    or weights of another shape is a DistillError naming the checkpoint, never a traceback,
    and resuming leaves the folder as it was."""
    out = tampered(interrupted, tmp_path)
    last = edited_checkpoint(out, edit)
    before = last.read_bytes()
    with pytest.raises(DistillError, match="checkpoint") as caught:
        distill(teacher_index, out, None, resume=True, device="cpu")
    assert "\n" not in str(caught.value)
    assert last.read_bytes() == before
    assert not (out / STUDENT_FILE).exists()


def test_the_untouched_checkpoint_resumes(interrupted, teacher_index, tmp_path):
    """The attacks above edit this checkpoint: unedited, it resumes and finishes."""
    result = distill(teacher_index, tampered(interrupted, tmp_path), None, resume=True,
                     device="cpu")  # fmt: skip
    assert result.steps == 6


def test_the_default_learning_rate_follows_how_the_student_starts():
    """A random student trains at LR_RANDOM; a thinned one at LR_TEACHER, or at LR_WHOLE when
    it keeps every block up to the index's layer (the default, half-size student: measured
    best at the lower rate); an asked-for rate wins."""
    from simsearch.train.distill import LR_RANDOM, LR_TEACHER, LR_WHOLE, peak_lr

    assert LR_WHOLE < LR_TEACHER < LR_RANDOM
    config = DistillConfig()
    assert peak_lr(config, "random") == LR_RANDOM
    assert peak_lr(config, "teacher", [1, 2, 3]) == LR_WHOLE
    assert peak_lr(config, "teacher", [2, 3]) == LR_TEACHER
    assert peak_lr(config, "teacher", [1, 3]) == LR_TEACHER
    assert peak_lr(DistillConfig(lr=0.01), "teacher", [1, 2, 3]) == 0.01


def test_a_resume_keeps_the_rate_its_run_started_at(teacher_index, tmp_path):
    """The default rate may change between versions; a resumed run keeps its own: the one
    its checkpoint saved, or, from before the rate was saved, the default then (LR_TEACHER
    for any thinned student)."""
    import torch

    from simsearch.train.distill import LR_TEACHER, LR_WHOLE

    out = tmp_path / "s"

    def killed_at_step_2(step):
        if step == 2:
            raise KeyboardInterrupt

    # the default student of tiny_vit: all its blocks at half size
    config = DistillConfig(epochs=2, batch_size=16, held_out=0.2, workers=1, precision="fp32",
                           checkpoint_every=1)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        distill(teacher_index, out, config, device="cpu", on_step=killed_at_step_2)
    last = out / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["lr"] == LR_WHOLE
    old = tampered(out, tmp_path)
    del checkpoint["lr"]
    torch.save(checkpoint, old / "checkpoints" / "last.pt")
    distill(teacher_index, out, None, resume=True, device="cpu")
    distill(teacher_index, old, None, resume=True, device="cpu")
    assert json.loads((out / STUDENT_FILE).read_text())["lr"] == LR_WHOLE
    assert json.loads((old / STUDENT_FILE).read_text())["lr"] == LR_TEACHER


def test_ctrl_c_saves_and_says_how_to_resume(teacher_index, tmp_path, monkeypatch):
    import simsearch.train.distill as module

    config = DistillConfig(**SMALL, epochs=2, precision="fp32")

    class Requested(module.StopOnCtrlC):
        def __enter__(self):
            super().__enter__()
            self.requested = True  # as if Ctrl-C came during the first step
            return self

    monkeypatch.setattr(module, "StopOnCtrlC", Requested)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 1") as caught:
        distill(teacher_index, tmp_path / "s", config, device="cpu")
    assert caught.value.fix == "resume"
    assert (tmp_path / "s" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "s" / STUDENT_FILE).exists()


def test_a_thinned_student_starts_near_its_teacher(thinned, teacher_index, tmp_path):
    out, result = thinned
    assert result.init == "teacher" and result.teacher_blocks == (2, 3)
    assert (result.layers, result.hidden, result.heads) == (2, 32, 4)
    # untrained, it already agrees with its teacher, as a random student does only trained
    assert result.mean_cosine > 0.85 and result.recall_at_10 >= 0.7
    record = json.loads((out / STUDENT_FILE).read_text())
    assert record["student"]["init"] == "teacher" and record["student"]["teacher_blocks"] == [2, 3]
    assert record["student"]["architecture"] == "vit" and 2 / 3 < record["flops_ratio"] < 0.75
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    # all its teacher's blocks: the teacher itself, to the last digit of the measurement
    whole = distill(
        teacher_index,
        tmp_path / "whole",
        DistillConfig(layers=3, epochs=1, lr=1e-9, batch_size=16, held_out=0.2, workers=1),
        device="cpu",
    )
    assert whole.teacher_blocks == (1, 2, 3) and whole.mean_cosine > 0.9999
    assert whole.recall_at_10 == 1.0


def test_a_thinned_student_loads_indexes_into_the_teachers_index_and_exports(
    thinned, teacher_index, tmp_path
):
    out, _ = thinned
    embedder = Embedder(out, device="cpu", precision="fp32")
    assert embedder.num_layers == 2 and embedder.student is not None
    with Index.open(teacher_index) as idx:
        idx.manifest.check_compatible(embedder.manifest())
    index = tmp_path / "index"
    shutil.copytree(teacher_index, index)
    new = make_photos(tmp_path / "new", 500, 2)
    with Index.open(index, model=out) as idx:
        idx.add(new)
        assert idx.search(new / "p501.png", k=1)[0].path.endswith("p501.png")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from simsearch.models.onnx_export import export_model

    exported = export_model(out, tmp_path / "onnx", validate_dir=None)
    assert exported.fp32_min_cosine >= 0.9999 and exported.dim == 32


def test_the_default_student_sees_half_size_images_with_all_the_teachers_blocks(
    half_size, teacher_index, tmp_path
):
    out, result = half_size
    assert result.init == "teacher" and result.teacher_blocks == (1, 2, 3)
    assert (result.image_size, result.teacher_image_size) == (16, 32)
    # a quarter of the patches: about a quarter of the FLOPs, with the [CLS] token's share
    assert 0.2 < result.flops_ratio < 0.35
    settings = json.loads((out / "preprocessor_config.json").read_text())
    assert settings["size"] == {"height": 16, "width": 16}
    assert json.loads((out / "config.json").read_text())["image_size"] == 16
    record = json.loads((out / STUDENT_FILE).read_text())
    assert record["student"]["image_size"] == 16
    # trained, it agrees with its teacher better than it did untrained
    untrained = distill(
        teacher_index,
        tmp_path / "untrained",
        DistillConfig(epochs=1, lr=1e-9, batch_size=16, held_out=0.2, workers=1),
        device="cpu",
    )
    assert untrained.image_size == 16
    assert result.mean_cosine > untrained.mean_cosine + 0.01
    assert result.recall_at_10 >= untrained.recall_at_10
    # it adds to and searches the teacher's index, from 16-px input
    embedder = Embedder(out, device="cpu", precision="fp32")
    assert embedder.preprocess.input_side() == 16 and embedder.student is not None
    with Index.open(teacher_index) as idx:
        idx.manifest.check_compatible(embedder.manifest())
    index = tmp_path / "index"
    shutil.copytree(teacher_index, index)
    new = make_photos(tmp_path / "new", 700, 2)
    with Index.open(index, model=out) as idx:
        idx.add(new)
        assert idx.search(new / "p701.png", k=1)[0].path.endswith("p701.png")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from simsearch.models.onnx_export import export_model

    exported = export_model(out, tmp_path / "onnx", validate_dir=None)
    assert exported.fp32_min_cosine >= 0.9999 and exported.dim == 32


def test_an_image_size_the_patches_do_not_tile_is_refused(teacher_index, tmp_path):
    base = dict(epochs=1, batch_size=16, held_out=0.2, workers=1)
    with pytest.raises(DistillError, match="not a multiple of its 8-px patches; try 16"):
        distill(teacher_index, tmp_path / "a", DistillConfig(**base, image_size=20), device="cpu")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    # a random student at another size takes it as its own input size
    result = distill(
        teacher_index,
        tmp_path / "b",
        DistillConfig(**base, init="random", layers=1, hidden=16, image_size=24),
        device="cpu",
    )
    assert result.image_size == 24 and result.init == "random"


def test_init_teacher_refuses_what_a_thinned_student_cannot_be(teacher_index, tmp_path):
    base = dict(init="teacher", epochs=1, batch_size=16, held_out=0.2, workers=1)
    with pytest.raises(DistillError, match="has the teacher's hidden; leave hidden out"):
        distill(teacher_index, tmp_path / "a", DistillConfig(**base, hidden=16), device="cpu")
    with pytest.raises(DistillError, match="takes 1 to 3 of the teacher's blocks"):
        distill(teacher_index, tmp_path / "b", DistillConfig(**base, layers=4), device="cpu")
    with pytest.raises(DistillError, match="init must be one of"):
        DistillConfig(init="pretrained")


# -- using a student ---------------------------------------------------------------------


def test_index_and_search_with_the_student_against_the_teachers_index(
    student, teacher_index, tmp_path
):
    out, _ = student
    index = tmp_path / "index"
    shutil.copytree(teacher_index, index)
    new = make_photos(tmp_path / "new", 300, 2)
    with Index.open(index, model=out) as idx:
        manifest_before = idx.manifest
        idx.add(new)
        assert len(idx) == N_IMAGES + 2
        hits = idx.search(new / "p300.png", k=3)
    assert hits[0].path.endswith("p300.png")
    with Index.open(index) as idx:
        assert idx.manifest == manifest_before  # the teacher's, not the student's
    runner = CliRunner()
    result = runner.invoke(
        cli, ["search", str(new / "p301.png"), "--index", str(index), "--model", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "p301.png" in result.output.splitlines()[0]


def test_the_index_refuses_a_student_of_another_model(student, other_vit, tmp_path):
    out, _ = student
    other = tmp_path / "other-index"
    with Index.create(other, model=other_vit, backend="torch") as idx:
        idx.add(make_photos(tmp_path / "p", 0, 2))
    query = make_photos(tmp_path / "q", 10, 1) / "p010.png"
    with (
        pytest.raises(ManifestMismatchError, match="is a student of another model"),
        Index.open(other, model=out) as idx,
    ):
        idx.add(query.parent)
    result = CliRunner().invoke(
        cli, ["search", str(query), "--index", str(other), "--model", str(out)]
    )
    assert result.exit_code != 0 and "student of another model" in result.output


def test_a_student_refuses_another_layer_or_pooling(student):
    out, _ = student
    with pytest.raises(LayerError, match="leave the layer out"):
        Embedder(out, layer=1, device="cpu")
    with pytest.raises(LayerError, match="leave the pooling out"):
        Embedder(out, pool="mean", device="cpu")
    Embedder(out, layer=3, pool="cls", device="cpu")  # the teacher's own: accepted


def test_an_onnx_export_of_the_student_matches_the_torch_student(student, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from simsearch.models.onnx import OnnxEmbedder
    from simsearch.models.onnx_export import export_model

    out, _ = student
    result = export_model(out, tmp_path / "onnx", validate_dir=None)
    assert result.fp32_min_cosine >= 0.9999 and result.dim == 32
    images = [draw_image(i, (48, 40)) for i in range(5)]
    torch_vectors = Embedder(out, device="cpu", precision="fp32").embed_images(images)
    onnx = OnnxEmbedder(tmp_path / "onnx", device="cpu")
    assert np.allclose(onnx.embed_images(images), torch_vectors, atol=1e-4)
    assert onnx.manifest().student["teacher"]


def test_the_cli_trains_a_student_and_prints_its_agreement(teacher_index, tmp_path):
    out = tmp_path / "cli-student"
    args = ["-q", "distill", "--index", str(teacher_index), "--output", str(out)]
    args += ["--layers", "1", "--hidden", "16", "--epochs", "1", "--batch-size", "16"]
    result = CliRunner().invoke(cli, [*args, "--image-size", "16", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["layers"] == 1 and summary["hidden"] == 16 and summary["image_size"] == 16
    assert 0 <= summary["recall_at_10"] <= 1
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "not empty" in again.output


def test_the_onnx_backend_embeds_with_a_students_cached_export(student, teacher_index, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out, _ = student
    index = tmp_path / "index"
    shutil.copytree(teacher_index, index)
    new = make_photos(tmp_path / "new", 400, 1)
    with Index.open(index, model=out, backend="onnx") as idx:
        idx.add(new)
        assert idx.embedder.manifest().student is not None
        assert idx.search(new / "p400.png", k=1)[0].path.endswith("p400.png")


def test_an_index_too_big_for_memory_trains_on_a_sample_with_a_notice(
    teacher_index, monkeypatch, caplog
):
    """Every image's pixels were held at once (twice, while stacked): an index of a million
    photos asked for 300 GB. The pixels now fit a budget (config.DISTILL_MAX_PIXEL_BYTES)."""
    import logging

    from simsearch import config
    from simsearch.train.distill_data import read_index_data

    per_image = 3 * 32 * 32 * 2  # tiny_vit's 32x32 input in float16
    monkeypatch.setattr(config, "DISTILL_MAX_PIXEL_BYTES", 30 * per_image)
    caplog.set_level(logging.WARNING, logger="simsearch")
    data = read_index_data(teacher_index, held_out=0.2, seed=0, max_images=None, workers=1)
    assert len(data.ids) == 30 and data.pixels.shape == (30, 3, 32, 32)
    assert f"training on a sample of 30 of the index's {N_IMAGES} images" in caplog.text
    # Asked for, more are taken; the pixels are the images' as indexing preprocesses them.
    data = read_index_data(teacher_index, held_out=0.2, seed=0, max_images=50, workers=1)
    assert len(data.ids) == 50 and data.pixels.dtype == np.float16
