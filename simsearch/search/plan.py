"""Choosing the FAISS index to build: the plan for a collection (`plan_index`), and the
checks a FAISS factory string passes before it becomes an index's type (`check_factory`,
cheap; `try_index_type`, a full trial in a child process).

The named types (INDEX_TYPES) map to factory strings sized for the collection: exact search
(Flat), a graph (HNSW), inverted lists (IVF) or compressed codes with exact re-ranking
(IVF-PQ); `auto` picks one by the collection's size. Any other FAISS factory string is taken
as given once it has passed its trial.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch import config
from simsearch.config import HNSW_M, IVF_MAX_LISTS, IVF_TRAIN_PER_LIST, PQ_DIMS_PER_CODE
from simsearch.errors import IndexTypeError
from simsearch.search.vectors import VectorIndex, faiss_message

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """The FAISS index to build for a collection of `n` vectors, and why."""

    kind: str  # flat | hnsw | ivf | ivfpq | factory
    factory: str  # the FAISS index_factory string
    reason: str  # one line a user can read: what was asked, what was chosen, why
    min_train: int = 0  # vectors needed to train it (0: needs no training)


def ivf_lists(n: int) -> int:
    """Inverted lists for `n` vectors: ~4 sqrt(n) (FAISS's rule of thumb), at least 39
    training vectors each, at most IVF_MAX_LISTS."""
    return max(1, min(int(4 * math.sqrt(n)), n // IVF_TRAIN_PER_LIST, IVF_MAX_LISTS))


def pq_codes(dim: int) -> int:
    """PQ sub-quantisers: about dim / PQ_DIMS_PER_CODE but at least 16 (small vectors need
    finer codes), an even number dividing dim (4-bit fast-scan codes pack two per byte)."""
    target = min(dim, max(16, dim // PQ_DIMS_PER_CODE))
    return max(m for m in range(2, target + 1, 2) if dim % m == 0)


def plan_index(requested: str, n: int, dim: int) -> Plan:
    """Decide what to build for `requested` (a name from INDEX_TYPES or a factory string)."""
    requested = requested.strip()
    name = requested.lower()
    if name == "auto":
        if n <= config.AUTO_FLAT_MAX_VECTORS:
            reason = (
                f"auto: exact search, fast enough up to {config.AUTO_FLAT_MAX_VECTORS:,} vectors"
            )
            return _plan("flat", n, dim, reason)
        # The count is the one the choice was made at: the reason is kept with the build.
        if n * dim * 4 <= config.AUTO_HNSW_MAX_BYTES:
            reason = f"auto: chosen at {n:,} vectors, a graph answers in ~2 ms"
            return _plan("hnsw", n, dim, reason)
        return _plan(
            "ivfpq",
            n,
            dim,
            f"auto: chosen at {n:,} vectors, which would take {n * dim * 4 / 2**30:.1f} GiB "
            "uncompressed; compressed codes with exact re-ranking",
        )
    if name in INDEX_TYPES:
        return _plan(name, n, dim, f"{name} as requested")
    check_factory(requested, dim)
    return Plan("factory", requested, f"FAISS factory {requested!r} as requested")


def _plan(kind: str, n: int, dim: int, reason: str) -> Plan:
    if kind == "flat":
        return Plan("flat", "Flat", reason)
    if kind == "hnsw":
        return Plan("hnsw", f"HNSW{HNSW_M}", reason)
    # IVF types need training data; below that, exact search stands in until there is enough.
    lists = ivf_lists(n)
    if kind == "ivf":
        factory, min_train = f"IVF{lists},Flat", IVF_TRAIN_PER_LIST
    else:
        factory, min_train = f"IVF{lists},PQ{pq_codes(dim)}x4fs", 16 * IVF_TRAIN_PER_LIST
    if n < min_train:
        return Plan("flat", "Flat", f"{reason}; flat until {min_train:,} vectors to train it")
    return Plan(kind, factory, reason, min_train)


def check_factory(factory: str, dim: int) -> None:
    """Raise IndexTypeError unless FAISS builds `factory` for `dim`-dim vectors (cheap: an
    empty index; `try_index_type` also uses it)."""
    import faiss

    if not re.fullmatch(r"[A-Za-z0-9_,.=x]+", factory):
        raise IndexTypeError(f"{factory!r} is not an index type ({', '.join(INDEX_TYPES)})")
    if re.match(r"IDMap", factory, re.IGNORECASE):
        raise IndexTypeError(
            f"{factory!r}: simsearch maps image ids itself; give the index without IDMap "
            f"(e.g. {factory.split(',', 1)[-1]!r})"
        )
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        detail = faiss_message(exc)
        raise IndexTypeError(
            f"{factory!r} is neither an index type ({', '.join(INDEX_TYPES)}) nor a FAISS "
            f"factory string for {dim}-dim vectors: {detail}"
        ) from None


# Vectors a factory string is tried on before it is saved as an index's type.
TRIAL_VECTORS = 2048


def try_index_type(requested: str, dim: int, timeout: float = 300.0) -> None:
    """Raise IndexTypeError unless a FAISS factory string `requested` trains, adds, removes,
    searches, saves and loads on TRIAL_VECTORS random vectors; the named types are known
    to. Tried in a child process: FAISS checks some parameters with C++ assertions that
    abort the whole process (HNSW0 did, and every later command on that index too)."""
    if requested.strip().lower() in INDEX_TYPES:
        return
    check_factory(requested, dim)
    code = (
        "import sys; from simsearch.search.plan import _trial; "
        "_trial(sys.argv[1], int(sys.argv[2]))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, requested, str(dim)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise IndexTypeError(
            f"{requested!r}: trying it on {TRIAL_VECTORS:,} vectors took over {timeout:.0f} s"
        ) from None
    if done.returncode == 0:
        if done.stdout.strip():
            log.warning("%s", done.stdout.strip())
        return
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode < 0 or done.returncode == 134:
        number = -done.returncode if done.returncode < 0 else signal.SIGABRT
        why = f"FAISS aborted ({signal.Signals(number).name})"
        detail = next((line for line in lines if "assert" in line.lower()), "")
        why += f": {detail.split(' in ')[0].strip()}" if detail else ""
    else:
        why = lines[-1] if lines else f"exit status {done.returncode}"
    raise IndexTypeError(
        f"{requested!r} is not a usable index type: tried on {TRIAL_VECTORS:,} random "
        f"{dim}-dim vectors, {why}"
    )


def _trial(factory: str, dim: int) -> None:
    """Put `factory` through what an index does (see try_index_type); in a child process."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((TRIAL_VECTORS, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    ids = np.arange(1, TRIAL_VECTORS + 1, dtype=np.int64)
    try:
        index = VectorIndex(dim, factory=factory)
        if not index.is_trained:
            try:
                index.train(data)
            except IndexTypeError as exc:
                if "at least as large as number of clusters" not in str(exc):
                    raise
                # Built, but too many lists to train on a trial's vectors: the rest of the
                # trial waits for the collection (training then says if it is too small).
                print(f"{factory}: checked as far as training, which needs more vectors")
                return
        index.add(ids, data)
        index.remove(ids[:10])
        index.search(data[:5], 10)
        with tempfile.TemporaryDirectory() as folder:
            index.save(Path(folder) / "trial.faiss")
            loaded = VectorIndex.load(Path(folder) / "trial.faiss", dim, factory=factory)
            loaded.search(data[:5], 10)
    except Exception as exc:  # any failure is the answer
        print(f"{type(exc).__name__}: {faiss_message(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
