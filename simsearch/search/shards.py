"""Parquet shards of vectors, opened and checked before an index is built from them.

A shard folder holds `*.parquet` files (`simsearch export --format parquet --shard-rows N`
writes part-00000.parquet, part-00001.parquet, ...), read in name order. Each has the
columns `id` (integers, unique over all shards), `vector` (a list of float16, float32 or
float64, the same length everywhere) and optionally `path` (text) and `path_bytes` (the
name's bytes, preferred where present): the export's format, and what clip-retrieval and
autofaiss read. Rows are numbered across the shards in that order; the on-disk index
stores row numbers and maps them to ids.

What a shard claims is data: every batch is checked (no nulls, the right length, finite,
not zero) before it is used, and vectors are L2-normalised, so inner product is cosine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.errors import ShardError

BATCH_ROWS = 65_536  # rows decoded at a time: 200 MB of float32 at 768 dims


@dataclass(frozen=True)
class Shard:
    """One parquet file: its rows are global rows offset .. offset + rows - 1."""

    path: Path
    rows: int
    offset: int


@dataclass(frozen=True)
class ShardSet:
    """The shards of a folder, in name order, with the dimension they all share."""

    folder: Path
    shards: tuple[Shard, ...]
    dim: int
    rows: int
    has_paths: bool


@dataclass(frozen=True)
class Batch:
    """Checked rows of one shard: global row numbers, ids, unit vectors, path bytes."""

    rows: np.ndarray  # int64
    ids: np.ndarray  # int64
    vectors: np.ndarray  # float32, (n, dim), unit length
    paths: list[bytes] | None


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ShardError(
            "parquet shards need pyarrow: pip install 'simsearch[parquet]'", param="shards"
        ) from None
    return pa, pq


def shard_files(folder: Path) -> list[Path]:
    """The parquet files of a shard folder, in name order (hidden names, such as an
    export's temporary files, are not shards)."""
    return sorted(
        p for p in Path(folder).glob("*.parquet") if p.is_file() and not p.name.startswith(".")
    )


def open_shards(folder: str | os.PathLike) -> ShardSet:
    """Read the schema and row count of every shard in `folder`; raise ShardError for a
    folder with none, a file that is not parquet, a missing or mistyped column, or
    fixed vector lengths that differ between shards."""
    pa, pq = _pyarrow()
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{folder} is not a folder of parquet shards", param="shards", path=folder)
    files = shard_files(folder)
    if not files:
        raise ShardError(f"{folder} holds no .parquet files", param="shards", path=folder)
    shards, dim, offset, has_paths, first = [], None, 0, True, None
    for path in files:
        try:
            meta = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(f"{path} is not a parquet file: {exc}", path=path) from None
        schema = meta.schema_arrow
        _check_schema(schema, path, pa)
        vector = schema.field("vector").type
        if pa.types.is_fixed_size_list(vector):
            size = vector.list_size
        else:
            size = _first_length(meta, path)
        if dim is not None and size is not None and size != dim:
            raise ShardError(
                f"{path.name} has {size}-dim vectors but {first} has {dim}-dim ones: every "
                "shard must hold vectors of one dimension",
                path=path,
            )
        if size is not None and dim is None:
            dim, first = size, path.name
        has_paths = has_paths and ("path" in schema.names or "path_bytes" in schema.names)
        rows = meta.metadata.num_rows
        shards.append(Shard(path, rows, offset))
        offset += rows
    if dim is None or dim < 1:
        raise ShardError(f"{folder}: the shards hold no vectors", path=folder)
    return ShardSet(folder, tuple(shards), dim, offset, has_paths)


def _check_schema(schema, path: Path, pa) -> None:
    for name in ("id", "vector"):
        if name not in schema.names:
            raise ShardError(
                f"{path.name} has no {name!r} column (it has {', '.join(schema.names)}); a "
                "shard needs id (int64) and vector (a list of floats)",
                path=path,
            )
    kind = schema.field("id").type
    if not pa.types.is_integer(kind) or kind == pa.uint64():
        raise ShardError(f"{path.name}: column 'id' is {kind}, not int64", path=path)
    vector = schema.field("vector").type
    lists = pa.types.is_list(vector) or pa.types.is_large_list(vector)
    if not (lists or pa.types.is_fixed_size_list(vector)) or not pa.types.is_floating(
        vector.value_type
    ):
        raise ShardError(
            f"{path.name}: column 'vector' is {vector}, not a list of floats", path=path
        )


def _first_length(meta, path: Path) -> int | None:
    """The length of the first vector of a shard whose vectors are variable-length lists
    (every batch is checked against it later)."""
    for batch in meta.iter_batches(batch_size=1, columns=["vector"]):
        if len(batch) and batch.column(0)[0].is_valid:
            return len(batch.column(0)[0])
    return None


def read_batches(shard: Shard, dim: int, batch_rows: int = BATCH_ROWS) -> Iterator[Batch]:
    """Yield the checked rows of `shard`, `batch_rows` at a time; ShardError names the
    first row (of the file, from 0) that is null, of another length, not finite or zero."""
    _, pq = _pyarrow()
    meta = pq.ParquetFile(shard.path)
    names = meta.schema_arrow.names
    path_column = "path_bytes" if "path_bytes" in names else "path" if "path" in names else None
    columns = ["id", "vector"] + ([path_column] if path_column else [])
    start = 0
    for batch in meta.iter_batches(batch_size=batch_rows, columns=columns):
        n = len(batch)
        ids_column = batch.column(0)
        if ids_column.null_count:
            row = start + _first_null(ids_column)
            raise ShardError(f"{shard.path.name}: row {row} has no id", path=shard.path)
        ids = ids_column.to_numpy().astype(np.int64, copy=False)
        vectors = _vectors(batch.column(1), dim, shard, start)
        paths = None
        if path_column:
            values = batch.column(2).to_pylist()
            if path_column == "path":
                values = [b"" if v is None else os.fsencode(v) for v in values]
            paths = [b"" if v is None else v for v in values]
        rows = np.arange(shard.offset + start, shard.offset + start + n, dtype=np.int64)
        yield Batch(rows, ids, vectors, paths)
        start += n
    if start != shard.rows:
        raise ShardError(
            f"{shard.path.name} changed while it was read ({start} rows, not {shard.rows})",
            path=shard.path,
        )


def _first_null(column) -> int:
    return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])


def _vectors(column, dim: int, shard: Shard, start: int) -> np.ndarray:
    """The column's vectors as unit float32 rows, checked."""
    name = shard.path.name
    if column.null_count:
        row = start + _first_null(column)
        raise ShardError(f"{name}: row {row} has no vector", path=shard.path)
    if hasattr(column, "value_lengths"):  # variable-length lists
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(lengths != dim)
        if len(wrong):
            row = start + int(wrong[0])
            raise ShardError(
                f"{name}: row {row} has a {int(lengths[wrong[0]])}-dim vector, the shards' "
                f"others are {dim}-dim",
                path=shard.path,
            )
    flat = column.flatten()
    if flat.null_count:
        row = start + _first_null(flat) // dim
        raise ShardError(f"{name}: row {row} has a null in its vector", path=shard.path)
    vectors = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), dim)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        row = start + int(np.flatnonzero(~finite)[0])
        raise ShardError(
            f"{name}: row {row} has a vector that is not finite (NaN or infinity)",
            path=shard.path,
        )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    zero = norms[:, 0] <= 0
    if zero.any():
        row = start + int(np.flatnonzero(zero)[0])
        raise ShardError(f"{name}: row {row} has a zero vector (no direction)", path=shard.path)
    vectors /= norms
    return vectors


def duplicate_ids(ids: np.ndarray) -> np.ndarray:
    """The ids that occur more than once in `ids` (sorted; empty when all are unique)."""
    ordered = np.sort(ids)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    return np.unique(repeated)
