"""Small frozen dataclasses that the API returns; `dataclasses.asdict` turns them into JSON."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Hit:
    """One search result: an indexed image and its cosine similarity to the query."""

    id: int
    path: str
    score: float


@dataclass(frozen=True)
class Duplicate:
    """An image found to be a near-duplicate of a group's kept image."""

    id: int
    path: str
    score: float  # cosine similarity to the kept image


@dataclass(frozen=True)
class DuplicateGroup:
    """Near-duplicate images: the one to keep (by the keep policy) and the others."""

    keep_id: int
    keep_path: str
    duplicates: tuple[Duplicate, ...]


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

    def line(self) -> str:
        how = "given" if self.chosen_by == "given" else "chosen by auto"
        return (
            f"{self.clusters} clusters of {self.images} images (k={self.k} {how}, "
            f"seed {self.seed}, silhouette {self.silhouette:.3f}, "
            f"mean similarity to centre {self.cohesion:.3f}, {self.seconds:.1f} s)"
        )


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
    seconds: float = 0.0
    # Seconds per stage: listing, decoding (thread time), waiting (the model idle, waiting
    # for decoded images), model, database, faiss.
    stages: dict[str, float] = field(default_factory=dict)
    # Why the vector index was rebuilt during the run (auto changed type, IVF retrained,
    # tombstones swept), or None.
    rebuilt: str | None = None

    def line(self) -> str:
        reused = f" ({self.reused} copied from identical files)" if self.reused else ""
        return (
            f"{self.seen} files seen, {self.indexed} indexed{reused}, "
            f"{self.unchanged} skipped as unchanged, {self.failed} failed, "
            f"{self.moved} moved, {self.removed} removed ({self.seconds:.1f} s)"
        )


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
