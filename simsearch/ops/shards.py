"""Build an on-disk IVF-PQ index from a folder of parquet shards, in stages:

1. check: read every shard once, checking each row (simsearch.search.shards) while the
   vectors are written as float16 in row order (for re-ranking), with the ids and paths;
   ids must be unique over all shards. A training sample is drawn on the way.
2. train: the IVF centroids and PQ codebooks, on the sample.
3. fill: one task per shard adds its vectors to a copy of the trained index and writes it;
   in this process one after another (FAISS uses every core for each), or as Ray tasks.
4. merge: the shard indexes become one index file and one .ivfdata file (lists on disk).

Everything is written into a temporary folder beside the output (a name only simsearch
makes), which is renamed to the output when complete; a failure at any stage removes it, so
nothing half-built ever bears the output's name. An existing output is never replaced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simsearch.errors import ShardError
from simsearch.fs.files import TEMP_PREFIX, fsync_dir
from simsearch.progress import Progress, advance, describe, set_total
from simsearch.search import ondisk
from simsearch.search.shards import BATCH_ROWS, ShardSet, duplicate_ids, open_shards, read_batches

log = logging.getLogger(__name__)

TRAINED_FILE = "trained.index"  # inside the temporary folder only


@dataclass(frozen=True)
class BuildReport:
    """What a build made, and how long each stage took (seconds)."""

    output: str
    rows: int
    dim: int
    shards: int
    factory: str
    sample: int
    ray: bool
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)


def build(
    shards: str | os.PathLike,
    output: str | os.PathLike,
    *,
    nlist: int | None = None,
    m: int | None = None,
    sample: int | None = None,
    ray: str | None = None,
    seed: int = 0,
    batch_rows: int = BATCH_ROWS,
    progress: Progress | None = None,
) -> BuildReport:
    """Build the on-disk index of the parquet shards in `shards` as the new folder
    `output`. `nlist`, `m`: inverted lists and PQ codes (None: chosen by size); `sample`:
    training vectors (None: 40 a list); `ray`: fill the shards in Ray tasks, on the
    cluster at this address ("local": a Ray started here for the build; a Ray already
    initialised in this process is used as it is), None: in this process."""
    output = Path(output)
    if os.path.lexists(output):
        raise ShardError(
            f"{output} already exists; choose a new output or remove it",
            param="output",
            path=output,
        )
    if not output.parent.is_dir():
        raise ShardError(f"{output.parent} is not a folder", param="output", path=output)
    found = open_shards(shards)
    factory = ondisk.choose_factory(found.rows, found.dim, nlist, m)
    wanted = min(found.rows, sample) if sample else ondisk.sample_size(factory, found.rows)
    seconds: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + output.name + ".", dir=output.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        started = time.perf_counter()
        training = _check_and_copy(found, tmp, wanted, seed, batch_rows, progress)
        seconds["check"] = _lap(started)

        started = time.perf_counter()
        _stage(progress, f"training {factory} on {len(training):,}", 1)
        index = ondisk.train(factory, found.dim, training)
        del training
        import faiss

        faiss.write_index(index, str(tmp / TRAINED_FILE))
        del index
        advance(progress, 1)
        seconds["train"] = _lap(started)

        started = time.perf_counter()
        _stage(progress, "filling shards", found.rows)
        jobs = [
            (str(tmp / TRAINED_FILE), shard, found.dim, str(tmp / f"shard-{n:05d}.index"))
            for n, shard in enumerate(found.shards)
        ]
        filled = _fill(jobs, batch_rows, ray, lambda shard: advance(progress, shard.rows))
        if filled != found.rows:
            raise ShardError(f"the shard indexes hold {filled} vectors, not {found.rows}")
        seconds["fill"] = _lap(started)

        started = time.perf_counter()
        _stage(progress, "merging", 1)
        merged = ondisk.merge(str(tmp / TRAINED_FILE), [job[3] for job in jobs], tmp)
        for job in jobs:
            os.unlink(job[3])
        os.unlink(tmp / TRAINED_FILE)
        if merged != found.rows:
            raise ShardError(f"the merged index holds {merged} vectors, not {found.rows}")
        advance(progress, 1)
        seconds["merge"] = _lap(started)

        report = BuildReport(
            output=str(output),
            rows=found.rows,
            dim=found.dim,
            shards=len(found.shards),
            factory=factory,
            sample=wanted,
            ray=ray is not None,
            seconds=seconds,
            bytes={p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
        )
        _write_manifest(tmp, found, report)
        _sync_folder(tmp)
        if os.path.lexists(output):  # made while the build ran
            raise ShardError(
                f"{output} already exists; choose a new output or remove it",
                param="output",
                path=output,
            )
        tmp.rename(output)
        fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _check_and_copy(
    found: ShardSet, tmp: Path, wanted: int, seed: int, batch_rows: int, progress
) -> np.ndarray:
    """Stage 1: check every row while writing vectors.npy (float16), ids.npy, the paths;
    return the training sample (`wanted` rows drawn uniformly, float32)."""
    _stage(progress, "checking shards", found.rows)
    chosen = np.sort(np.random.default_rng(seed).choice(found.rows, wanted, replace=False))
    training = np.empty((wanted, found.dim), dtype=np.float32)
    taken = 0
    all_ids = np.empty(found.rows, dtype=np.int64)
    path_end = 0
    with (
        open(tmp / ondisk.VECTORS_FILE, "wb") as vectors,
        open(tmp / ondisk.PATHS_FILE, "wb") as paths,
        open(tmp / ondisk.PATH_OFFSETS_FILE, "wb") as offsets,
    ):
        _npy_header(vectors, "<f2", (found.rows, found.dim))
        _npy_header(offsets, "<i8", (found.rows + 1,))
        offsets.write(np.zeros(1, dtype="<i8").tobytes())
        for shard in found.shards:
            for batch in read_batches(shard, found.dim, batch_rows):
                n = len(batch.rows)
                if n == 0:
                    continue
                first = int(batch.rows[0])
                vectors.write(batch.vectors.astype("<f2").tobytes())
                all_ids[first : first + n] = batch.ids
                names = batch.paths or [b""] * n
                paths.write(b"".join(names))
                ends = path_end + np.cumsum([len(p) for p in names], dtype=np.int64)
                offsets.write(ends.astype("<i8").tobytes())
                path_end = int(ends[-1])
                here = chosen[(chosen >= first) & (chosen < first + n)]
                training[taken : taken + len(here)] = batch.vectors[here - first]
                taken += len(here)
                advance(progress, n)
        for f in (vectors, paths, offsets):
            f.flush()
            os.fsync(f.fileno())
    repeated = duplicate_ids(all_ids)
    if len(repeated):
        raise ShardError(_duplicates_message(found, all_ids, repeated), path=found.folder)
    np.save(tmp / ondisk.IDS_FILE, all_ids)
    return training


def _duplicates_message(found: ShardSet, ids: np.ndarray, repeated: np.ndarray) -> str:
    first = int(repeated[0])
    where = []
    for row in np.flatnonzero(ids == first)[:2]:
        shard = next(s for s in found.shards if s.offset <= row < s.offset + s.rows)
        where.append(f"{shard.path.name} row {int(row) - shard.offset}")
    more = f" ({len(repeated):,} ids repeat in all)" if len(repeated) > 1 else ""
    return f"id {first} appears more than once: {' and '.join(where)}{more}; ids must be unique"


def _fill(jobs: list, batch_rows: int, ray: str | None, done: Callable) -> int:
    """Stage 3: run every shard's fill task; return the vectors added."""
    if ray is None:
        total = 0
        for trained, shard, dim, out in jobs:
            total += ondisk.fill_shard(trained, shard, dim, out, batch_rows)
            done(shard)
        return total
    try:
        import ray as ray_module
    except ImportError:
        raise ShardError(
            "filling shards in Ray tasks needs Ray: pip install 'simsearch[ray]'", param="ray"
        ) from None
    started = not ray_module.is_initialized()
    if started:
        address = None if ray == "local" else ray
        ray_module.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray_module.remote(num_cpus=1)(ondisk.fill_shard)
        pending = {
            task.remote(trained, shard, dim, out, batch_rows): shard
            for trained, shard, dim, out in jobs
        }
        total = 0
        while pending:
            ready, _ = ray_module.wait(list(pending), num_returns=1)
            try:
                total += ray_module.get(ready[0])
            except ray_module.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, ShardError) else exc) from None
            done(pending.pop(ready[0]))
        return total
    finally:
        if started:
            ray_module.shutdown()


def _write_manifest(tmp: Path, found: ShardSet, report: BuildReport) -> None:
    manifest = {
        "format": ondisk.FORMAT,
        "version": ondisk.FORMAT_VERSION,
        "dim": found.dim,
        "rows": found.rows,
        "factory": report.factory,
        "metric": "inner_product",
        "sample": report.sample,
        "shards": [
            {"name": s.path.name, "rows": s.rows, "bytes": s.path.stat().st_size}
            for s in found.shards
        ],
        "source": str(found.folder.absolute()),
        "seconds": report.seconds,
    }
    with open(tmp / ondisk.MANIFEST_FILE, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")


def _sync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(folder)


def _stage(progress, text: str, total: int) -> None:
    describe(progress, text)
    if progress is not None and hasattr(progress, "reset"):
        progress.reset(total=total)
    else:
        set_total(progress, total)


def _lap(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _npy_header(f, descr: str, shape: tuple) -> None:
    np.lib.format.write_array_header_1_0(
        f, {"descr": descr, "fortran_order": False, "shape": shape}
    )
