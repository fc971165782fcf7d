"""The HTTP API's routes (under /api): searching, images, the collection, duplicates and the
background index run. Handlers are plain functions (FastAPI runs them in its thread pool)
that turn requests into calls on the Server in `request.app.state.server`."""

from __future__ import annotations

import dataclasses
import mimetypes
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse

from simsearch.errors import ImageError, QueryError
from simsearch.media.decode import decode_image
from simsearch.server import schemas as s
from simsearch.server.state import Server

router = APIRouter(prefix="/api")
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": s.Error},
    401: {"model": s.Error},
    404: {"model": s.Error},
    409: {"model": s.Error},
    413: {"model": s.Error},
    422: {"model": s.Error},
}
CHUNK = 1 << 16
# Uploads decoded at once, whatever the number of clients: each decode may take up to
# MAX_DECODE_BYTES (400 MiB) before it is reduced, and the thread pool runs 40 requests.
# In threads of their own, not the requests': the C allocator keeps what a thread's
# decode freed for that thread, so decoding in 40 threads held 40 decodes' memory.
DECODES_AT_ONCE = 2
_decoder = ThreadPoolExecutor(DECODES_AT_ONCE, thread_name_prefix="simsearch-decode")
MAX_ID = 2**63 - 1  # SQLite's INTEGER: no image has an id outside +-2**63 (asking raised)


class NotFound(QueryError):
    """An id, cluster or manifest that does not exist (404)."""


def _server(request: Request) -> Server:
    return request.app.state.server


def _unit(vectors: list[list[float]], dim: int, what: str) -> np.ndarray:
    try:
        matrix = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1)
    except ValueError:  # ragged: [[1, 2], [1]]
        raise QueryError(f"{what} must each have {dim} numbers", param=what) from None
    if matrix.shape[1] != dim:
        raise QueryError(f"{what} must have {dim} numbers, not {matrix.shape[1]}", param=what)
    norms = np.linalg.norm(matrix, axis=1)
    if not np.all(np.isfinite(matrix)) or np.any(norms == 0):
        raise QueryError(f"{what} must be finite and not all zero", param=what)
    return (matrix / norms[:, None]).astype(np.float32)


def _answer(
    server: Server,
    positives: list[tuple[str, np.ndarray]],
    negatives: list[np.ndarray],
    combine: bool,
    f: s.Filters,
) -> s.SearchOut:
    if not positives:
        raise QueryError("give at least one image, id or vector to search by")
    names = [name for name, _ in positives]
    matrix = np.stack([v for _, v in positives])
    if combine or negatives:
        summed = matrix.sum(axis=0) - (np.sum(negatives, axis=0) if negatives else 0)
        norm = float(np.linalg.norm(summed))
        if not np.isfinite(norm) or norm < 1e-6:
            raise QueryError("the examples cancel out: the negatives equal the positives")
        matrix, names = (summed / norm)[None, :].astype(np.float32), ["combined"]
    results = server.search(
        matrix, f.k, nprobe=f.nprobe, ef=f.ef, rerank=f.rerank, label=f.label, cluster=f.cluster
    )
    return s.SearchOut(
        results=[
            s.Result(query=name, hits=[s.HitOut(**h) for h in server.describe(hits)])
            for name, hits in zip(names, results, strict=True)
        ]
    )


@router.get("/health", tags=["serving"])
def health() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready", tags=["serving"], responses={503: {"model": s.Error}})
def ready(request: Request) -> Response:
    """Readiness: the index is open and the model loaded (503 until then)."""
    server = _server(request)
    loaded = server.shared is not None
    body = {"ready": loaded, "model": "loaded" if loaded else server.model_error or "loading"}
    return JSONResponse(body, status_code=200 if loaded else 503)


@router.get("/search", response_model=s.SearchOut, responses=ERRORS, tags=["search"])
def search_by_id(
    request: Request,
    id: list[int] = Query(..., max_length=s.MAX_QUERIES),  # noqa: B008
    k: int = Query(s.DEFAULT_K, ge=1, le=s.MAX_K),
    label: str | None = Query(None, max_length=200),
    cluster: int | None = Query(None, ge=1, le=1_000_000),
    nprobe: int | None = Query(None, ge=1, le=65536),
    ef: int | None = Query(None, ge=1, le=65536),
    rerank: int | None = Query(None, ge=0, le=100),
) -> s.SearchOut:
    """Search by indexed ids (?id=42, repeated for several): no model involved."""
    server = _server(request)
    f = s.Filters(k=k, label=label, cluster=cluster, nprobe=nprobe, ef=ef, rerank=rerank)
    vectors = _stored(server, id)
    return _answer(server, [(f"id:{i}", v) for i, v in zip(id, vectors, strict=True)], [], False, f)


@router.post("/query", response_model=s.SearchOut, responses=ERRORS, tags=["search"])
def search_by_json(request: Request, body: s.QueryIn) -> s.SearchOut:
    """Search by ids and vectors; with negatives or `combine`, one query of them all."""
    server = _server(request)
    dim = server.index.manifest.dim
    positives = [(f"id:{i}", v) for i, v in zip(body.ids, _stored(server, body.ids), strict=True)]
    if body.vectors:
        positives += [(f"vector:{n}", v) for n, v in enumerate(_unit(body.vectors, dim, "vectors"))]
    negatives = list(_stored(server, body.negative_ids))
    if body.negative_vectors:
        negatives += list(_unit(body.negative_vectors, dim, "negative_vectors"))
    return _answer(server, positives, negatives, body.combine, body)


@router.post("/search", response_model=s.SearchOut, responses=ERRORS, tags=["search"])
def search_by_upload(
    request: Request,
    images: list[UploadFile] = File([]),  # noqa: B008
    negative_images: list[UploadFile] = File([]),  # noqa: B008
    ids: str = Form("", max_length=2000),
    negative_ids: str = Form("", max_length=2000),
    combine: bool = Form(False),
    k: int = Form(s.DEFAULT_K, ge=1, le=s.MAX_K),
    label: str | None = Form(None, max_length=200),
    cluster: int | None = Form(None, ge=1, le=1_000_000),
    nprobe: int | None = Form(None, ge=1, le=65536),
    ef: int | None = Form(None, ge=1, le=65536),
    rerank: int | None = Form(None, ge=0, le=100),
) -> s.SearchOut:
    """Search by uploaded images (multipart), and ids ("3,7"): each its own query, or, with
    negatives or `combine`, one ("like these, not like those")."""
    server = _server(request)
    if len(images) + len(negative_images) > s.MAX_QUERIES:
        raise QueryError(f"at most {s.MAX_QUERIES} images a request", param="images")
    preprocess = server.load_model().preprocess if images or negative_images else None
    decoded = [_decode(u, preprocess) for u in images]
    decoded_negative = [_decode(u, preprocess) for u in negative_images]
    vectors = server.embed(decoded + decoded_negative)
    positives = [(f"image:{u.filename or n}", vectors[n]) for n, u in enumerate(images)]
    pos_ids, neg_ids = _ids(ids, "ids"), _ids(negative_ids, "negative_ids")
    positives += [(f"id:{i}", v) for i, v in zip(pos_ids, _stored(server, pos_ids), strict=True)]
    negatives = list(vectors[len(images) :]) + list(_stored(server, neg_ids))
    f = s.Filters(k=k, label=label, cluster=cluster, nprobe=nprobe, ef=ef, rerank=rerank)
    return _answer(server, positives, negatives, combine, f)


def _ids(text: str, what: str) -> list[int]:
    parts = [p.strip().removeprefix("id:") for p in text.replace(" ", ",").split(",")]
    try:
        found = [int(p) for p in parts if p]
    except ValueError:
        raise QueryError(f"{what} must be ids separated by commas", param=what) from None
    if len(found) > s.MAX_QUERIES:
        raise QueryError(f"at most {s.MAX_QUERIES} {what} a request", param=what)
    return found


def _no_such_id(ids: list[int], param: str | None) -> None:
    for i in ids:
        if not -MAX_ID - 1 <= i <= MAX_ID:
            raise NotFound(f"no indexed image has id {i}", param=param)


def _stored(server: Server, ids: list[int]) -> np.ndarray:
    if not ids:
        return np.empty((0, server.index.manifest.dim), np.float32)
    _no_such_id(ids, "ids")
    try:
        return server.stored_vectors(ids)
    except QueryError as exc:
        raise NotFound(str(exc), param=exc.param) from None


def _decode(upload: UploadFile, preprocess):
    """An uploaded image decoded as the indexer decodes it: within its bounds (pixels,
    decoded bytes), reduced right after decoding to what the model's `preprocess` needs (a
    request's images are held until embedded: a 200 KB PNG of 12000x12000 would hold
    576 MB), and refused here when too thin for its resize (in the shared batch, that
    error failed every other client's request embedded with it)."""
    data = upload.file.read()
    if not data:
        raise ImageError(f"{upload.filename or 'the upload'}: empty file")
    try:
        name = upload.filename or "upload"
        return _decoder.submit(decode_image, data, draft=preprocess, name=name).result()
    except ImageError as exc:
        raise ImageError(f"{upload.filename or 'the upload'}: {exc}") from None


BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.get(
    "/images/{image_id}",
    response_class=StreamingResponse,
    responses={**ERRORS, 200: {"content": {"image/*": BINARY, "application/octet-stream": BINARY},
                               "description": "The file's bytes"}},
    tags=["images"],
)  # fmt: skip
def original(request: Request, image_id: int) -> StreamingResponse:
    """The indexed file behind an id, streamed with its content type."""
    path, mtime_ns = _indexed(request, image_id)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise NotFound(f"image {image_id} cannot be read: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device put where the image was
        os.close(fd)
        raise ImageError(f"image {image_id} is not a regular file any more")
    if mtime_ns is not None and st.st_mtime_ns != mtime_ns:
        # Not the file that was indexed: perhaps an edit, perhaps a link to some other file
        # put in its place (checked on the open file, so it cannot be swapped after this).
        os.close(fd)
        raise ImageError(f"image {image_id} changed since it was indexed (index again)")
    fh = os.fdopen(fd, "rb")

    def chunks():
        left = st.st_size  # never past the size fstat gave: a /proc file says 0, yet reads on
        with fh:
            while left > 0 and (block := fh.read(min(CHUNK, left))):
                left -= len(block)
                yield block

    kind = mimetypes.guess_type(os.fsdecode(path))[0] or ""
    if not kind.startswith("image/") or "svg" in kind:
        # A file indexed by name (`simsearch index page.html`, a PNG that is HTML too) must
        # not run as a page of this origin: only raster image types are sent as themselves.
        kind = "application/octet-stream"
    headers = {"content-length": str(st.st_size), "x-content-type-options": "nosniff",
               "content-disposition": "inline",
               "content-security-policy": "default-src 'none'; sandbox"}  # fmt: skip
    return StreamingResponse(chunks(), media_type=kind, headers=headers)


@router.get(
    "/images/{image_id}/thumbnail",
    response_class=Response,
    responses={**ERRORS, 200: {"content": {"image/jpeg": BINARY}, "description": "A JPEG"}},
    tags=["images"],
)
def thumbnail(request: Request, image_id: int, size: int = Query(256, ge=32, le=512)) -> Response:
    """A JPEG thumbnail of an indexed image, its longest side `size` pixels at most."""
    _indexed(request, image_id)
    try:
        jpeg = _server(request).thumbnail(image_id, size)
    except ImageError as exc:
        raise ImageError(f"image {image_id}: {exc}") from None
    return Response(jpeg, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})


def _indexed(request: Request, image_id: int) -> tuple[str, int | None]:
    """The stored path of an id and the mtime the file had when it was indexed."""
    _no_such_id([image_id], None)
    try:
        return _server(request).image_path(image_id)
    except QueryError as exc:
        raise NotFound(str(exc)) from None


@router.get("/info", responses=ERRORS, tags=["collection"])
def info(request: Request) -> dict:
    """What `simsearch info --json` says, and the folders the index was given."""
    server = _server(request)
    with server.lock:
        facts = dataclasses.asdict(server.index.info())
        facts["roots"] = server.index.roots()
    return facts


@router.get("/labels", tags=["collection"])
def labels(request: Request) -> dict:
    """The stored label names (for filtering)."""
    server = _server(request)
    with server.lock:
        return {"labels": server.index.store.label_names()}


@router.get("/failed", response_model=s.PageOfFailed, tags=["collection"])
def failed(
    request: Request, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)
) -> s.PageOfFailed:
    """Files that could not be indexed, and why."""
    server = _server(request)
    with server.lock:
        rows = server.index.failed()
    items = [s.FailedOut(**dataclasses.asdict(f)) for f in rows[offset : offset + limit]]
    return s.PageOfFailed(total=len(rows), items=items)
