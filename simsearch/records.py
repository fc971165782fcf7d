"""Small frozen dataclasses that the API returns; `dataclasses.asdict` turns them into JSON."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Hit:
    """One search result: an indexed image and its cosine similarity to the query."""

    id: int
    path: str
    score: float


@dataclass(frozen=True)
class FileFacts:
    """What dedup's keep rule compares of a file: its true pixel size (from the header, as
    displayed), its encoding, its size and age."""

    width: int
    height: int
    format: str | None  # "JPEG", "PNG", "WEBP", ...; None where the file could not be read
    lossless: bool | None  # None: unknown (the file could not be read)
    size: int  # bytes
    mtime_ns: int


def facts_text(facts: FileFacts) -> str:
    """A file's facts in words, e.g. "4000x3000 JPEG lossy, 3.1 MB, 2024-05-01"."""
    encoding = {True: " lossless", False: " lossy", None: ""}[facts.lossless]
    day = time.strftime("%Y-%m-%d", time.localtime(facts.mtime_ns / 1e9))
    return (
        f"{facts.width}x{facts.height} {facts.format or '?'}{encoding}, "
        f"{_megabytes(facts.size)}, {day}"
    )


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1_000_000 else f"{size / 1e3:.0f} KB"


@dataclass(frozen=True)
class Duplicate:
    """An image found to be a near-duplicate of a group's kept image."""

    id: int
    path: str
    score: float  # cosine similarity to the kept image
    facts: FileFacts | None = None
    why: str = ""  # the first rule by which the kept image won: "higher resolution", ...


@dataclass(frozen=True)
class DuplicateGroup:
    """Near-duplicate images: the one to keep (by the keep rule) and the others."""

    keep_id: int
    keep_path: str
    duplicates: tuple[Duplicate, ...]
    keep_facts: FileFacts | None = None
    # Other indexed paths naming the kept file or a duplicate (symlinks, hard links, a
    # folder indexed under two names): the same files, never duplicates, never acted on.
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Calibration:
    """A dedup threshold calibrated on edited copies of the index's own images."""

    threshold: float  # the cosine that separated copies from other images best (F-beta)
    precision: float  # of the pairs at or above it on the sample, the share that were copies
    recall: float  # of the edited copies, the share at or above it
    images: int  # indexed images sampled and edited
    copies: int  # edited copies embedded (images x edits)
    others: int  # scores of the sampled images' nearest other indexed images
    lowest_copy: float
    highest_other: float | None
    recall_by_edit: dict[str, float] = field(default_factory=dict)
    neighbours: int = 0
    seed: int = 0
    created: str = ""
    # neighbours estimated to be copies already in the collection, not mistakes (method 2
    # on); from method 3 also what the edited copies stand for in the F1 (precision, recall)
    copies_among_others: float | None = None
    # 1: neighbours above the image's copies' median dropped, the rest counted as mistakes
    # (stored calibrations from before method 2 read as 1); 2, 3: see simsearch.ops.calibrate
    method: int = 1


@dataclass(frozen=True)
class Cluster:
    """One cluster of a clustering run: its size and the images nearest its centre."""

    id: int  # 1 = the largest cluster
    size: int  # images assigned to it now
    cohesion: float  # mean cosine similarity of its images to its centre
    central: tuple[Hit, ...]  # the images nearest its centre, best first; score: cosine


@dataclass(frozen=True)
class ClusterRun:
    """How a clustering was made, as stored with it (`Index.clustering()`)."""

    k: int  # clusters asked for, or chosen by `auto`
    clusters: int  # clusters that got images (k, unless a centroid attracted none)
    chosen_by: str  # "given", or the criterion `auto` used
    seed: int
    images: int  # images assigned by the run
    trained_on: int  # vectors in the random sample k-means trained on
    iterations: int
    cohesion: float  # mean cosine similarity of the images to their centre
    silhouette: float  # mean silhouette (cosine distance) on a sample; -1..1, higher = apart
    created_at: float  # when the run finished (Unix time)
    seconds: float
    candidates: tuple[tuple[int, float], ...] = ()  # auto: (K, silhouette) of each K tried


@dataclass(frozen=True)
class MoveReport:
    """What moving, deleting or putting back duplicates did."""

    action: str  # "move", "delete" or "undo"
    files: int  # files moved, deleted or put back
    bytes: int  # their total size
    skipped: list[tuple[str, str]]  # (path, why it was left alone)
    manifest: str | None  # the manifest that logs the moves (move, undo)


@dataclass(frozen=True)
class FailedFile:
    """A file that could not be indexed, and why."""

    path: str
    error: str


@dataclass(frozen=True)
class AddSummary:
    """What one `Index.add` run did."""

    seen: int  # image files found under the given paths
    indexed: int  # new or changed files that got a vector in this run
    unchanged: int  # skipped: same size and mtime as when last indexed
    failed: int  # could not be read or decoded; see Index.failed()
    moved: int = 0  # renamed or moved files (same content): kept their id and vector
    removed: int = 0  # gone from disk, so removed from the index
    reused: int = 0  # of `indexed`: vector copied from a byte-identical file, no model call
    # Folders given that held files but no image we index: suffix ("" for none) -> how
    # many files had it (the CLI says how to include them).
    skipped_suffixes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # Seconds per stage: listing, decoding (thread time), waiting (the model idle, waiting
    # for decoded images), model, database, faiss.
    stages: dict[str, float] = field(default_factory=dict)
    # Why the vector index was rebuilt during the run (auto changed type, IVF retrained,
    # tombstones swept), or None.
    rebuilt: str | None = None


@dataclass(frozen=True)
class Label:
    """One guess of a classification head: a class name from the model's id2label, and its
    softmax probability."""

    label: str
    score: float


@dataclass(frozen=True)
class ImageLabels:
    """The top labels of one image, best first; `error` says why there are none."""

    path: str
    labels: tuple[Label, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class LabelSummary:
    """What one `Index.label_images` run did."""

    model: str  # the label model as recorded (hub id or absolute folder)
    top: int  # labels stored per image
    labelled: int  # images labelled in this run
    already: int  # images that already had labels from this model
    failed: int  # indexed images whose file could not be read again; tried next run
    relabelled: bool = False  # labels of another model (or another top) were replaced
    seconds: float = 0.0


@dataclass(frozen=True)
class IndexInfo:
    """Counts and settings of an index, as `simsearch info` shows them."""

    path: str
    indexed: int  # images that have a vector
    failed: int
    model: str
    weights_sha256: str
    revision: str | None
    architecture: str
    dim: int
    layer: int
    num_layers: int
    pool: str
    precision: str
    preprocessing: dict
    size_bytes: int
    format_version: int
    index_type: str = "auto"  # as requested
    index_built: str = "flat"  # what was built: flat, hnsw, ivf, ivfpq or factory
    index_factory: str = "Flat"  # the FAISS factory string of what was built
    index_reason: str = ""  # why that was built (auto says what it chose)
    tombstones: int = 0  # removed or replaced entries still in the FAISS index
    dedup_calibration: dict | None = None  # the calibrated dedup threshold, when made
    label_model: str | None = None  # what made the stored labels (index --label-model)
    label_top: int = 0  # labels stored per image
    labelled: int = 0  # images with stored labels
    clustering: ClusterRun | None = None  # the last `cluster` run, or None
    clustered: int = 0  # images that have a cluster (the others came after the run)


def stages_line(seconds: dict[str, float]) -> str:
    """Return the time per stage of an indexing run as one line for people."""
    s = {k: seconds.get(k, 0.0) for k in ("listing", "decoding", "waiting", "model")}
    writes = seconds.get("database", 0.0) + seconds.get("faiss", 0.0)
    return (
        f"time: listing {s['listing']:.1f} s, reading and decoding {s['decoding']:.1f} s "
        f"(thread time; the model waited {s['waiting']:.1f} s for it), model "
        f"{s['model']:.1f} s, database and index writes {writes:.1f} s"
    )


@dataclass(frozen=True)
class OnnxExport:
    """What `export_model` wrote, and how its files compared with PyTorch on real images."""

    output: str  # the export's folder
    model: str  # the source model (hub id or folder)
    layer: int  # the hidden state baked in (absolute)
    num_layers: int
    pool: str
    dim: int
    opset: int
    input_size: list[int]  # [height, width] the graph takes
    validated_on: str  # which images the figures come from
    images: int
    fp32_min_cosine: float  # ONNX fp32 vs PyTorch fp32, per image
    fp32_mean_cosine: float
    fp32_mb: float  # model.onnx, megabytes
    int8_mb: float | None = None  # model.int8.onnx, when made with --int8
    int8_scope: str | None = None  # which linear layers are int8
    int8_smoothing: float | None = None  # SmoothQuant's alpha, None if not smoothed
    int8_min_cosine: float | None = None  # int8 vs PyTorch fp32, per image
    int8_mean_cosine: float | None = None
    int8_recall_at_10: float | None = None  # of PyTorch fp32's 10 nearest among the images
    classes: int | None = None  # classifier.onnx's classes, when the model has a head
    classifier_min_cosine: float | None = None  # of its logits against PyTorch's
    classifier_top1_agreement: float | None = None  # share of images with the same top class
    seconds: float = 0.0


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of fine-tuning: the training loss and how the model did on validation."""

    epoch: int  # 1-based
    step: int  # optimiser steps taken when the epoch ended
    train_loss: float  # mean cross-entropy over the epoch's training images (augmented)
    val_loss: float
    val_accuracy: float
    lr: float  # learning rate of the backbone at the epoch's last step
    seconds: float
    best: bool = False  # the best epoch so far: its weights are the ones kept


@dataclass(frozen=True)
class DistillResult:
    """What a finished distillation made: a student of the index's model, saved at `output`."""

    output: str  # the student's folder: --model for `index` and `search` of that index
    teacher: str  # the index's model, whose space the student embeds into
    recall_at_10: float  # student-embedded held-out queries against teacher-embedded ones
    mean_cosine: float  # between a held-out image's student and teacher vectors
    held_out_images: int
    train_images: int
    skipped: int  # images of the index that could not be read
    layers: int
    hidden: int
    heads: int
    flops_ratio: float | None  # the student's FLOPs over the teacher's (None: not known)
    student_images_per_second: float
    teacher_images_per_second: float | None
    epochs: int
    steps: int
    device: str
    precision: str
    seconds: float
    history: tuple = ()  # per epoch: {"epoch", "step", "loss", "lr", "seconds"}
    init: str = "random"  # how the student started: "teacher" (thinned from it) or "random"
    teacher_blocks: tuple = ()  # a thinned student's: the teacher's blocks it took, 1-based
    image_size: int | None = None  # the side of the images the student sees, in px
    teacher_image_size: int | None = None  # the teacher's


@dataclass(frozen=True)
class FinetuneResult:
    """What a finished fine-tuning run made: the best epoch's model, saved at `output`."""

    output: str  # the save_pretrained folder: usable as --model by index and label
    classes: tuple[str, ...]  # class names, in label id order
    best_epoch: int
    best_accuracy: float
    best_loss: float
    epochs_run: int
    steps: int
    stopped_early: bool  # stopped by --patience before the last epoch
    train_images: int
    val_images: int
    skipped: int  # images that could not be read or decoded, left out
    device: str
    precision: str  # the arithmetic used (auto resolved)
    seconds: float
    peak_memory_bytes: int | None = None  # CUDA: peak allocated; CPU: the process's peak RSS
    peak_memory_kind: str | None = None  # "cuda allocated" or "process RSS"
    history: tuple[EpochRecord, ...] = ()


def hit_score(s) -> float:
    """A cosine as shown: float32 rounding can put a unit vector's own score at 1.0000001."""
    return round(min(1.0, max(-1.0, float(s))), 6)
