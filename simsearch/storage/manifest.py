"""The index folder's format: its files, the version of their layout, and the manifest that
says what produced its vectors (and is checked against any model that is to add to them).

Nothing here imports more than the standard library and simsearch.errors, so that the layers
above storage (models, search, ops) read a manifest without loading SQLAlchemy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from simsearch.errors import IndexFormatError, ManifestMismatchError

# Version of the on-disk layout (manifest.json, meta.sqlite, vectors.faiss). Bumped on any
# incompatible change; an index with a newer version is refused rather than misread.
FORMAT_VERSION = 1

# The largest vector dimension an index may have: above any vision model's (ViT-G: 1664),
# and small enough that a damaged manifest cannot size allocations from it.
MAX_DIM = 1 << 16

# The index folder's files: the manifest (a copy of the database's, readable without it),
# the SQLite database (the truth), and the FAISS file (a cache of the database's vectors).
MANIFEST_FILE = "manifest.json"
DATABASE_FILE = "meta.sqlite"
VECTORS_FILE = "vectors.faiss"


@dataclass(frozen=True)
class Manifest:
    """What produced an index's vectors: everything that must match for vectors to compare."""

    model: str  # the model as the user named it (hub id or folder)
    weights_sha256: str  # identity of the weights: the check that matters
    architecture: str  # config.model_type, e.g. "vit", "dinov2"
    layer: int  # absolute hidden-state index: 0 = patch embeddings, num_layers = last block
    num_layers: int
    pool: str  # "cls" or "mean"
    dim: int
    preprocessing: dict = field(default_factory=dict)
    revision: str | None = None  # hub commit, when the model came from the hub
    precision: str = "fp32"
    metric: str = "cosine"
    index_type: str = "auto"  # what the user asked for: a name or a FAISS factory string
    dedup_calibration: dict | None = None  # records.Calibration as a dict, once calibrated
    format_version: int = FORMAT_VERSION
    # What config.json says the model computes (models.weights.hash_config); None in indexes made
    # before it was recorded, which then compare by weights alone.
    config_sha256: str | None = None
    # When the vectors of this manifest come from a student (`simsearch distill`) of the
    # model above: {"model", "weights_sha256", "teacher", "recall_at_10"}. An index keeps the
    # teacher's identity; a student only ever adds approximations of its vectors.
    student: dict | None = None

    def to_json(self) -> str:
        data = asdict(self)
        if data["student"] is None:  # as indexes made before students were wrote it
            del data["student"]
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the manifest") -> Manifest:
        """Read a manifest, or raise IndexFormatError naming `source` and what is wrong
        with it (not JSON, a field of the wrong type or out of range)."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise IndexFormatError(f"{source} is damaged: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise IndexFormatError(f"{source} is damaged: not a JSON object")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise IndexFormatError(
                f"index format version {version!r} is not supported by this simsearch "
                f"(it reads versions up to {FORMAT_VERSION}); upgrade simsearch"
            )
        known = {f.name for f in fields(cls)}
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:  # a required field missing
            raise IndexFormatError(f"{source} is damaged: {exc}") from None
        problem = manifest._problem()
        if problem:
            raise IndexFormatError(f"{source} is damaged: {problem}")
        return manifest

    def _problem(self) -> str | None:
        """What makes this manifest unusable, or None."""

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        checks = [
            (isinstance(self.model, str) and self.model != "", "model", "a name"),
            (isinstance(self.weights_sha256, str), "weights_sha256", "a hash"),
            (is_int(self.num_layers) and self.num_layers >= 0, "num_layers", "a count"),
            (is_int(self.layer) and 0 <= self.layer <= self.num_layers, "layer", "a layer"),
            (self.pool in ("cls", "mean"), "pool", "cls or mean"),
            (is_int(self.dim) and 1 <= self.dim <= MAX_DIM, "dim", f"1 to {MAX_DIM}"),
            (isinstance(self.preprocessing, dict), "preprocessing", "an object"),
            (isinstance(self.index_type, str), "index_type", "a string"),
            (self.metric == "cosine", "metric", "cosine"),
            (
                self.dedup_calibration is None or isinstance(self.dedup_calibration, dict),
                "dedup_calibration",
                "an object",
            ),
            (self.student is None or isinstance(self.student, dict), "student", "an object"),
        ]
        for ok, name, wanted in checks:
            if not ok:
                return f"its {name} is {getattr(self, name)!r}, not {wanted}"
        return None

    def check_compatible(self, other: Manifest) -> None:
        """Raise ManifestMismatchError naming each setting where `other` differs from this index."""
        diffs = []
        if other.student and other.weights_sha256 != self.weights_sha256:
            raise ManifestMismatchError(
                f"{other.student.get('model')} is a student of another model "
                f"({other.student.get('teacher')!r}, weights {other.weights_sha256[:12]}), not "
                f"of this index's {self.model!r} (weights {self.weights_sha256[:12]}): a student "
                "searches only its teacher's index; distill a student from this index instead",
                param="model",
            )
        if other.weights_sha256 != self.weights_sha256:
            diffs.append(
                f"model: index was built with {self.model!r} "
                f"(weights {self.weights_sha256[:12]}), not {other.model!r} "
                f"(weights {other.weights_sha256[:12]})"
            )
        if self.config_sha256 and other.config_sha256 and other.config_sha256 != self.config_sha256:
            diffs.append(
                f"model config: {other.model!r} has the same weights under another config.json "
                "(activation, layer-norm epsilon, ...), which gives other vectors"
            )
        for name in ("layer", "pool", "dim", "preprocessing"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                diffs.append(f"{name}: index has {mine!r}, requested {theirs!r}")
        if diffs:
            raise ManifestMismatchError(
                "this index was built with different settings; "
                + "; ".join(diffs)
                + ". A different model, layer or pooling needs a new index",
                fix="new-index",
            )
