"""Export an index's vectors with their ids and paths, for numpy, pandas or another store.

Every format is written in chunks from one database snapshot (memory stays flat at any
size) to a temporary name and renamed into place when complete, so a failed or interrupted
export never leaves a file that looks whole.

- npy: a folder with `vectors.npy` (n x dim float32, memory-mappable with
  `np.load(..., mmap_mode="r")`), `ids.npy` (int64) and `paths.txt` (one JSON-quoted path
  per line, so that any file name survives, in the same order: a byte that is not UTF-8 is
  the escape \\udcXX, which `json.loads` turns into the str `open()` takes, and
  `os.fsencode` into the name's bytes); with labels, `labels.txt`
  (one JSON list of [label, probability] pairs per line, null for none); with clusters,
  `clusters.npy` (int64, -1 for none).
- csv: one row per image: `id,path,vector`, the vector a JSON list of floats; then `labels`
  (JSON, as above) and `cluster` (empty for none) when the index has them. The file is
  UTF-8, and a file name that is not holds its own bytes, as the file system does: read it
  with `open(..., encoding="utf-8", errors="surrogateescape")` (pandas:
  `encoding_errors="surrogateescape"`) and each path is the str that names the real file.
- parquet: columns `id` (int64), `path` (string), `path_bytes` (binary: the name's bytes,
  `os.fsdecode(path_bytes)` names the real file), `vector` (fixed-size list of float32),
  and `labels` (list of {label, score}) and `cluster` (int64, null for none) when present;
  `path` is text, so a name that is not UTF-8 has its bytes escaped there (caf\\xe9.jpg);
  needs pyarrow (`pip install 'simsearch[parquet]'`). With `shard_rows`, a new folder of
  parquet files of that many rows each (the last one fewer), part-00000.parquet,
  part-00001.parquet, ...: the shards `simsearch shards build` (and autofaiss) read.

Labels and clusters are exported when the index has any (`index --label-model`,
`simsearch cluster`).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from simsearch.errors import SimsearchError
from simsearch.fs.files import TEMP_PREFIX, replaced_atomically
from simsearch.fs.names import shown
from simsearch.progress import Progress, advance

FORMATS = ("npy", "csv", "parquet")

Chunks = Iterable[tuple[np.ndarray, list[str], np.ndarray, dict[str, list]]]


class ExportError(SimsearchError):
    """The export could not be written (format, destination, missing pyarrow)."""


def export(
    chunks: Chunks,
    total: int,
    dim: int,
    output: Path,
    fmt: str,
    progress: Progress | None = None,
    *,
    extras: Sequence[str] = (),
    shard_rows: int | None = None,
) -> int:
    """Write `total` items from `chunks` (ids, paths, vectors, extras) to `output` in
    format `fmt`; returns how many. `extras`: the extra columns the chunks carry ("labels",
    "cluster"). `progress`: a tqdm-like object, updated per chunk. `shard_rows` (parquet
    only): a folder of parquet files of that many rows each."""
    output = Path(output)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if shard_rows is not None and (fmt != "parquet" or shard_rows < 1):
        raise ExportError("shards are parquet files of at least one row each", param="shard_rows")
    if os.path.lexists(output):  # never replaced, not even an empty folder or a link
        raise ExportError(
            f"{output} already exists; choose a new output or remove it",
            param="output",
            path=output,
        )
    if not output.parent.is_dir():
        raise ExportError(f"{output.parent} is not a folder")
    writer = {"npy": _npy, "csv": _csv, "parquet": _parquet}[fmt]
    if shard_rows is not None:
        writer = functools.partial(_parquet_parts, shard_rows=shard_rows)

    def counted():
        for chunk in chunks:
            yield chunk
            advance(progress, len(chunk[0]))

    try:
        return writer(counted(), total, dim, output, list(extras))
    except FileExistsError:  # made while the export ran
        raise ExportError(
            f"{output} already exists; choose a new output or remove it",
            param="output",
            path=output,
        ) from None


def _npy(chunks: Iterator, total: int, dim: int, output: Path, extras: list[str]) -> int:
    # A folder of our own making (a unique name), removed by that name only on failure.
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + output.name + ".", dir=output.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        # Plain writes after a .npy header, not a memmap: the pages do not pile up in RSS.
        with contextlib.ExitStack() as files:
            vectors = files.enter_context(open(tmp / "vectors.npy", "wb"))
            ids = files.enter_context(open(tmp / "ids.npy", "wb"))
            paths = files.enter_context(open(tmp / "paths.txt", "w", encoding="utf-8"))
            labels = clusters = None
            if "labels" in extras:
                labels = files.enter_context(open(tmp / "labels.txt", "w", encoding="utf-8"))
            if "cluster" in extras:
                clusters = files.enter_context(open(tmp / "clusters.npy", "wb"))
                _npy_header(clusters, "<i8", (total,))
            _npy_header(vectors, "<f4", (total, dim))
            _npy_header(ids, "<i8", (total,))
            done = 0
            for chunk_ids, chunk_paths, chunk_vectors, values in chunks:
                vectors.write(np.ascontiguousarray(chunk_vectors, dtype="<f4").tobytes())
                ids.write(np.ascontiguousarray(chunk_ids, dtype="<i8").tobytes())
                paths.writelines(json.dumps(p) + "\n" for p in chunk_paths)
                if labels is not None:
                    labels.writelines(json.dumps(v) + "\n" for v in values["labels"])
                if clusters is not None:
                    column = [-1 if c is None else c for c in values["cluster"]]
                    clusters.write(np.asarray(column, dtype="<i8").tobytes())
                done += len(chunk_ids)
            for f in (vectors, ids, paths, labels, clusters):
                if f is not None:
                    f.flush()
                    os.fsync(f.fileno())
        if done != total:  # one snapshot gives both: this would be a bug
            raise ExportError(f"read {done} vectors, expected {total}")
        if os.path.lexists(output):
            raise FileExistsError(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return done


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _npy_header(f, descr: str, shape: tuple) -> None:
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)


def _csv(chunks: Iterator, total: int, dim: int, output: Path, extras: list[str]) -> int:
    done = 0
    with (
        replaced_atomically(output, replace=False) as tmp,
        # surrogateescape: a name that is not UTF-8 is written as its own bytes, losslessly.
        open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f,
    ):
        out = csv.writer(f)
        out.writerow(["id", "path", "vector", *extras])
        for chunk_ids, chunk_paths, chunk_vectors, values in chunks:
            for n, (i, path, vector) in enumerate(
                zip(chunk_ids, chunk_paths, chunk_vectors, strict=True)
            ):
                row = [int(i), path, json.dumps([round(float(x), 7) for x in vector])]
                if "labels" in extras:
                    row.append(json.dumps(values["labels"][n]))
                if "cluster" in extras:
                    row.append("" if values["cluster"][n] is None else values["cluster"][n])
                out.writerow(row)
            done += len(chunk_ids)
    return done


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError(
            "parquet export needs pyarrow: pip install 'simsearch[parquet]' "
            "(or export as npy or csv)",
            param="format",
        ) from None
    return pa, pq


_LABEL_FIELDS = [("label", "string"), ("score", "float32")]


def _parquet_schema(pa, dim: int, extras: list[str]):
    label_type = pa.list_(pa.struct([(n, getattr(pa, t)()) for n, t in _LABEL_FIELDS]))
    fields = [
        ("id", pa.int64()),
        ("path", pa.string()),
        ("path_bytes", pa.binary()),
        ("vector", pa.list_(pa.float32(), dim)),
    ]
    fields += [(c, label_type if c == "labels" else pa.int64()) for c in extras]
    return pa.schema(fields)


def _parquet_table(pa, schema, chunk, dim: int, extras: list[str]):
    chunk_ids, chunk_paths, chunk_vectors, values = chunk
    flat = pa.array(np.ascontiguousarray(chunk_vectors, dtype=np.float32).reshape(-1))
    columns = [
        pa.array(chunk_ids, pa.int64()),
        pa.array([shown(p) for p in chunk_paths], pa.string()),
        pa.array([os.fsencode(p) for p in chunk_paths], pa.binary()),
        pa.FixedSizeListArray.from_arrays(flat, dim),
    ]
    if "labels" in extras:
        rows = [
            None if v is None else [{"label": a, "score": b} for a, b in v]
            for v in values["labels"]
        ]
        columns.append(pa.array(rows, schema.field("labels").type))
    if "cluster" in extras:
        columns.append(pa.array(values["cluster"], pa.int64()))
    return pa.table(columns, schema=schema)


def _parquet(chunks: Iterator, total: int, dim: int, output: Path, extras: list[str]) -> int:
    pa, pq = _pyarrow()
    schema = _parquet_schema(pa, dim, extras)
    done = 0
    with replaced_atomically(output, replace=False) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for chunk in chunks:
            writer.write_table(_parquet_table(pa, schema, chunk, dim, extras))
            done += len(chunk[0])
    return done


def _parquet_parts(
    chunks: Iterator, total: int, dim: int, output: Path, extras: list[str], *, shard_rows: int
) -> int:
    """A new folder of parquet files of `shard_rows` rows each, built under a temporary
    name and renamed into place when complete."""
    pa, pq = _pyarrow()
    schema = _parquet_schema(pa, dim, extras)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + output.name + ".", dir=output.parent))
    done, writer, in_part, parts = 0, None, 0, 0
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        for chunk in chunks:
            start = 0
            while start < len(chunk[0]):
                if writer is None:
                    writer = pq.ParquetWriter(tmp / f"part-{parts:05d}.parquet", schema)
                    parts += 1
                end = min(len(chunk[0]), start + shard_rows - in_part)
                piece = _sliced(chunk, start, end)
                writer.write_table(_parquet_table(pa, schema, piece, dim, extras))
                in_part += end - start
                done += end - start
                start = end
                if in_part == shard_rows:
                    writer.close()
                    writer, in_part = None, 0
        if writer is not None:
            writer.close()
            writer = None
        for part in tmp.iterdir():
            with open(part, "rb") as fh:
                os.fsync(fh.fileno())
        if os.path.lexists(output):
            raise FileExistsError(output)
        tmp.rename(output)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return done


def _sliced(chunk, start: int, end: int):
    ids, paths, vectors, values = chunk
    return (
        ids[start:end],
        paths[start:end],
        vectors[start:end],
        {k: v[start:end] for k, v in values.items()},
    )
