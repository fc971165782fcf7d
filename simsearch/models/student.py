"""A student: a small backbone that `simsearch distill` trained to reproduce an index's own
vectors, so that it embeds into its teacher's space and searches the teacher's index.

    STUDENT/
      config.json, model.safetensors   the student backbone (save_pretrained)
      preprocessor_config.json         the teacher's: the index's preprocessing, its sizes
                                       scaled when the student sees smaller images
      projection.safetensors           `weight` (dim, hidden) and `bias` (dim,): the student's
                                       [CLS] into the teacher's dimension; its metadata names
                                       the teacher's weights and config hashes
      simsearch_student.json           the teacher's identity (the space the vectors live in),
                                       the student's own weights hash, the training settings,
                                       the measured agreement and speed

A student folder is data from outside like any model folder: `read_student` validates it
whole before anything loads it. Its record must be well formed, its weights must be the ones
it was published with (the hash covers model.safetensors and projection.safetensors), and
the teacher its record names must be the one the projection's metadata names: a record
edited to claim another teacher, or weights swapped after training, is refused. (Without a
secret, someone who rewrites both consistently cannot be stopped; what this stops is the
mix-up: a folder copied over, a record edited by hand, weights from another run.)

Nothing here imports torch: an index checks a student against its manifest without it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from simsearch.errors import ModelLoadError
from simsearch.media.preprocess import Preprocessing
from simsearch.models.weights import SAFETENSORS_HEADER_LIMIT, hash_weights
from simsearch.storage.manifest import MAX_DIM, Manifest

STUDENT_FILE = "simsearch_student.json"
PROJECTION_FILE = "projection.safetensors"

# Version of simsearch_student.json's layout; another version is refused, not misread.
STUDENT_FORMAT = 1

# The largest image side a student record may name (a ViT at 8,192 px already has 262,144
# patches of 16 px): a larger number is an edited record, not a model.
MAX_IMAGE_SIDE = 8192

# A student record is a few kilobytes; a larger one is not read.
STUDENT_READ_LIMIT = 1 << 20

# What the teacher record must hold, and of what type: the Manifest fields that decide
# whether two sets of vectors compare.
TEACHER_FIELDS = {
    "model": str,
    "weights_sha256": str,
    "architecture": str,
    "layer": int,
    "num_layers": int,
    "pool": str,
    "dim": int,
    "preprocessing": dict,
}


@dataclass(frozen=True)
class Student:
    """A student folder's validated record: whose space it embeds into, and how well."""

    folder: Path
    teacher: dict  # TEACHER_FIELDS, plus config_sha256 and revision (None when absent)
    weights_sha256: str  # the student's own (model.safetensors + projection.safetensors)
    hidden: int  # the student backbone's width: the projection's input
    agreement: dict  # recall_at_10, mean_cosine, ... as distill measured them
    record: dict  # the whole simsearch_student.json
    image_size: int | None = None  # the side of the images it sees; None: its teacher's

    def preprocessing(self) -> dict:
        """The preprocessing the student's own folder must have: its teacher's, scaled to
        the student's image size when that is smaller or larger."""
        teacher = Preprocessing.from_dict(self.teacher["preprocessing"])
        if self.image_size is None or self.image_size == teacher.input_side():
            return self.teacher["preprocessing"]
        return teacher.scaled_to(self.image_size).to_dict()

    @property
    def dim(self) -> int:
        return int(self.teacher["dim"])

    def manifest(self, model_id: str, precision: str) -> Manifest:
        """The manifest of the vectors this student makes: its teacher's space (weights,
        config, layer, pooling, dim, preprocessing), with `model_id` as the model and the
        student named in `student`."""
        t = self.teacher
        return Manifest(
            model=model_id,
            weights_sha256=t["weights_sha256"],
            revision=t.get("revision"),
            architecture=t["architecture"],
            layer=t["layer"],
            num_layers=t["num_layers"],
            pool=t["pool"],
            dim=t["dim"],
            preprocessing=t["preprocessing"],
            precision=precision,
            config_sha256=t.get("config_sha256"),
            student=self.summary(),
        )

    def summary(self) -> dict:
        """What a manifest and `info` say about the student: it, its teacher, its agreement,
        and the side of the images it sees where that is not its teacher's."""
        summary = {
            "model": str(self.folder),
            "weights_sha256": self.weights_sha256,
            "teacher": self.teacher["model"],
            "recall_at_10": self.agreement.get("recall_at_10"),
        }
        if self.preprocessing() != self.teacher["preprocessing"]:
            summary["image_size"] = self.image_size
        return summary

    def describe(self) -> str:
        recall = self.agreement.get("recall_at_10")
        measured = f", recall@10 {recall:.3f} against it" if isinstance(recall, float) else ""
        return f"a student of {self.teacher['model']}{measured}"


def input_preprocessing(preprocessing: dict, student: dict | None) -> Preprocessing:
    """The preprocessing a model's input takes, from a manifest's (the space its vectors
    live in) and its `student` summary: a student that sees smaller images than its
    teacher scales the teacher's to its `image_size`."""
    pre = Preprocessing.from_dict(preprocessing)
    side = (student or {}).get("image_size")
    return pre if side is None else pre.scaled_to(int(side))


def student_image_size(folder: str | Path) -> int | None:
    """The image size a student folder's record names (None: its teacher's, or not a
    student), read without checking the folder (loading it checks)."""
    try:
        record = json.loads((Path(folder) / STUDENT_FILE).read_bytes()[:STUDENT_READ_LIMIT])
        side = record["student"].get("image_size")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return side if isinstance(side, int) and not isinstance(side, bool) else None


def is_student(folder: str | Path) -> bool:
    """True when `folder` is a model folder that `simsearch distill` wrote."""
    return (Path(folder).expanduser() / STUDENT_FILE).is_file()


def read_student(folder: Path) -> Student:
    """Return the validated record of the student in `folder`, or raise ModelLoadError
    saying what is wrong with it (see the module's docstring for what is checked)."""
    path = folder / STUDENT_FILE
    try:
        if path.stat().st_size > STUDENT_READ_LIMIT:
            raise _bad(folder, f"{STUDENT_FILE} is {path.stat().st_size:,} bytes, not a record")
        record = json.loads(path.read_bytes())
    except OSError as exc:
        raise _bad(folder, f"cannot read {STUDENT_FILE}: {exc.strerror}") from None
    except ValueError as exc:
        raise _bad(folder, f"{STUDENT_FILE} is not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise _bad(folder, f"{STUDENT_FILE} is not a JSON object")
    if record.get("format") != STUDENT_FORMAT:
        raise _bad(
            folder,
            f"{STUDENT_FILE} has format {record.get('format')!r}; this simsearch reads "
            f"format {STUDENT_FORMAT}: upgrade simsearch, or distill the student again",
        )
    teacher = record.get("teacher")
    if not isinstance(teacher, dict):
        raise _bad(folder, f"{STUDENT_FILE} names no teacher")
    for name, kind in TEACHER_FIELDS.items():
        value = teacher.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _bad(folder, f"the teacher's {name} in {STUDENT_FILE} is {value!r}")
    if not 1 <= teacher["dim"] <= MAX_DIM or not 0 <= teacher["layer"] <= teacher["num_layers"]:
        raise _bad(folder, f"the teacher's dim or layer in {STUDENT_FILE} is out of range")
    for name in ("config_sha256", "revision"):
        if teacher.get(name) is not None and not isinstance(teacher.get(name), str):
            raise _bad(folder, f"the teacher's {name} in {STUDENT_FILE} is {teacher[name]!r}")
    student = record.get("student")
    if not isinstance(student, dict) or not isinstance(student.get("weights_sha256"), str):
        raise _bad(folder, f"{STUDENT_FILE} does not record the student's weights hash")
    hidden = student.get("hidden_size")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or not 1 <= hidden <= MAX_DIM:
        raise _bad(folder, f"the student's hidden_size in {STUDENT_FILE} is {hidden!r}")
    side = student.get("image_size")
    if side is not None and (
        not isinstance(side, int) or isinstance(side, bool) or not 1 <= side <= MAX_IMAGE_SIDE
    ):
        raise _bad(folder, f"the student's image_size in {STUDENT_FILE} is {side!r}")
    try:
        if side is not None:
            Preprocessing.from_dict(teacher["preprocessing"]).scaled_to(side)
    except (KeyError, TypeError, ValueError):
        raise _bad(
            folder, f"the teacher's preprocessing in {STUDENT_FILE} cannot be scaled to {side} px"
        ) from None
    agreement = record.get("agreement") or {}
    if not isinstance(agreement, dict):
        raise _bad(folder, f"the agreement in {STUDENT_FILE} is not an object")

    if hash_weights(folder) != student["weights_sha256"]:
        raise _bad(
            folder,
            "its weights are not the ones it was distilled with (their SHA-256 differs from "
            f"the one {STUDENT_FILE} records): they were replaced or changed",
        )
    claimed = projection_metadata(folder)
    for name in ("weights_sha256", "config_sha256"):
        if claimed.get(f"teacher_{name}") != (teacher.get(name) or ""):
            raise _bad(
                folder,
                f"{STUDENT_FILE} names another teacher than the one it was trained for "
                f"(its teacher's {name} is not the one {PROJECTION_FILE} records): the record "
                "was edited",
            )
    return Student(
        folder=folder,
        teacher={**teacher, "config_sha256": teacher.get("config_sha256")},
        weights_sha256=student["weights_sha256"],
        hidden=hidden,
        agreement=agreement,
        record=record,
        image_size=side,
    )


def projection_metadata(folder: Path) -> dict:
    """The `__metadata__` of the student's projection.safetensors, read from its header."""
    file = folder / PROJECTION_FILE
    try:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8).ljust(8, b"\0"))
            if length > SAFETENSORS_HEADER_LIMIT:
                raise _bad(folder, f"{PROJECTION_FILE} is not a safetensors file")
            header = json.loads(fh.read(length))
    except OSError as exc:
        raise _bad(folder, f"cannot read {PROJECTION_FILE}: {exc.strerror}") from None
    except ValueError:
        raise _bad(folder, f"{PROJECTION_FILE} is not a safetensors file") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def projection_metadata_for(teacher: dict) -> dict[str, str]:
    """What distill writes into projection.safetensors' metadata: the teacher it serves."""
    return {
        "format": "simsearch-student-projection",
        "teacher_weights_sha256": teacher["weights_sha256"],
        "teacher_config_sha256": teacher.get("config_sha256") or "",
    }


def load_projection(student: Student):
    """Return the student's projection as a torch Linear(hidden, dim), or ModelLoadError
    when the file does not hold exactly a weight (dim, hidden) and a bias (dim,), finite."""
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(student.folder / PROJECTION_FILE)
    except Exception as exc:
        raise _bad(student.folder, f"cannot read {PROJECTION_FILE}: {exc}") from None
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    wanted = {"weight": (student.dim, student.hidden), "bias": (student.dim,)}
    if shapes != wanted:
        raise _bad(
            student.folder,
            f"{PROJECTION_FILE} holds {shapes}, not the {wanted} of a {student.hidden}-wide "
            f"student in a {student.dim}-dim teacher's space",
        )
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise _bad(student.folder, f"{PROJECTION_FILE} holds values that are not finite")
    projection = torch.nn.Linear(student.hidden, student.dim)
    with torch.no_grad():
        projection.weight.copy_(tensors["weight"].float())
        projection.bias.copy_(tensors["bias"].float())
    return projection.eval()


def _bad(folder: Path, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"the student model in {folder} cannot be used: {what}; distill it again",
        path=folder,
        param="model",
    )
