"""The HTTP API's routes over the collection as a whole: clusters, duplicate groups and acting
on them (a dry run unless confirmed; undone by a manifest's name, never its path), and the
background index run."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from simsearch.errors import QueryError
from simsearch.ops.movelog import read_header
from simsearch.records import DuplicateGroup
from simsearch.server import schemas as s
from simsearch.server.routes import ERRORS, NotFound, _server

router = APIRouter(prefix="/api")


@router.get("/clusters", response_model=s.ClustersOut, responses=ERRORS, tags=["clusters"])
def clusters(request: Request, top: int = Query(8, ge=0, le=100)) -> s.ClustersOut:
    """The last clustering run and its clusters, each with its `top` most central images."""
    server = _server(request)
    with server.lock:
        run = server.index.clustering()
        found = server.index.clusters(top)
    out = []
    for c in found:
        central = [s.HitOut(**h) for h in server.describe(list(c.central))]
        out.append(s.ClusterOut(id=c.id, size=c.size, cohesion=c.cohesion, central=central))
    return s.ClustersOut(run=None if run is None else dataclasses.asdict(run), clusters=out)


@router.get("/clusters/{cluster}", response_model=s.MembersOut, responses=ERRORS, tags=["clusters"])
def cluster_members(
    request: Request,
    cluster: int,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> s.MembersOut:
    """The images of one cluster, nearest its centre first."""
    server = _server(request)
    with server.lock:
        if server.index.clustering() is None or not 1 <= cluster <= 1_000_000:
            raise NotFound(f"there is no cluster {cluster}")
        try:
            members = server.index.cluster_members(cluster)
        except QueryError as exc:
            raise NotFound(str(exc)) from None
    page = [s.HitOut(**h) for h in server.describe(members[offset : offset + limit])]
    return s.MembersOut(cluster=cluster, total=len(members), items=page)


def _group(g: DuplicateGroup) -> s.GroupOut:
    facts = lambda f: None if f is None else dataclasses.asdict(f)  # noqa: E731
    return s.GroupOut(
        keep_id=g.keep_id,
        keep_path=g.keep_path,
        keep_facts=facts(g.keep_facts),
        duplicates=[
            s.DuplicateOut(id=d.id, path=d.path, score=d.score, why=d.why, facts=facts(d.facts))
            for d in g.duplicates
        ],
        aliases=list(g.aliases),
    )


@router.get("/duplicates", response_model=s.DuplicatesOut, responses=ERRORS, tags=["duplicates"])
def duplicates(
    request: Request,
    threshold: float | None = Query(None, ge=0.0, le=1.0),
    offset: int = Query(0, ge=0),
    limit: int = Query(20, ge=1, le=500),
) -> s.DuplicatesOut:
    """Near-duplicate groups at the calibrated threshold (or `threshold`), a page at a time;
    each names the image the keep rule keeps and the facts it compared."""
    server = _server(request)
    cut = server.threshold(threshold)
    groups = server.duplicate_groups(cut)
    return s.DuplicatesOut(
        threshold=cut,
        total=len(groups),
        offset=offset,
        items=[_group(g) for g in groups[offset : offset + limit]],
    )


@router.post("/duplicates/calibrate", responses=ERRORS, tags=["duplicates"])
def calibrate(request: Request) -> dict:
    """Calibrate the index's dedup threshold on edited copies of its own images (as
    `dedup --calibrate`; it needs the model and takes seconds to minutes) and keep it."""
    server = _server(request)
    with server.model_turn(), server.lock:
        found = server.index.calibrate_dedup()
    return dataclasses.asdict(found)


@router.post("/duplicates/move", response_model=s.MoveOut, responses=ERRORS, tags=["duplicates"])
def move_duplicates(request: Request, body: s.MoveIn) -> s.MoveOut:
    """Move the duplicates of the chosen groups (by kept id) to the server's move folder,
    as `dedup --move-to` does; without `confirm` only say what would move."""
    server = _server(request)
    target = server.move_folder()
    groups = server.duplicate_groups(server.threshold(body.threshold))
    if body.keep_ids is not None:
        wanted = set(body.keep_ids)
        groups = [g for g in groups if g.keep_id in wanted]
        missing = wanted - {g.keep_id for g in groups}
        if missing:
            raise NotFound(f"no duplicate group keeps image {min(missing)}", param="keep_ids")
    if not body.confirm:
        moves = [
            {"id": d.id, "path": d.path, "keep_path": g.keep_path, "score": d.score}
            for g in groups
            for d in g.duplicates
        ]
        size = sum((d.facts.size if d.facts else 0) for g in groups for d in g.duplicates)
        return s.MoveOut(dry_run=True, files=len(moves), bytes=size, moves=moves)
    with server.lock:
        report = server.index.move_duplicates(groups, target)
    return s.MoveOut(
        dry_run=False,
        files=report.files,
        bytes=report.bytes,
        skipped=[list(pair) for pair in report.skipped],
        manifest=None if report.manifest is None else report.manifest.rsplit("/", 1)[-1],
    )


def _logged_moves(path) -> tuple[dict, int]:
    """A manifest's checked header and how many moves it logs. The header comes first (a
    regular file, its first line bounded): counting the lines of a FIFO named like a
    manifest waited forever, of a link to /dev/zero filled memory."""
    header = read_header(path)
    with path.open("rb") as lines:
        return header, max(0, sum(1 for _ in lines) - 1)


@router.get("/moves", response_model=list[s.ManifestOut], tags=["duplicates"])
def moves(request: Request) -> list[s.ManifestOut]:
    """The manifests of the moves made into the server's move folder, newest first."""
    out = []
    for path in _server(request).manifests():
        try:
            header, count = _logged_moves(path)
        except (QueryError, OSError):
            continue
        out.append(s.ManifestOut(name=path.name, created=header.get("created"), moves=count))
    return out


@router.post("/moves/undo", response_model=s.MoveOut, responses=ERRORS, tags=["duplicates"])
def undo(request: Request, body: s.UndoIn) -> s.MoveOut:
    """Put back the files a manifest (by name) logs, into the index with their vectors;
    without `confirm` only say how many it would."""
    server = _server(request)
    try:
        path = server.manifest_named(body.manifest)
    except QueryError as exc:
        raise NotFound(str(exc), param="manifest") from None
    _, count = _logged_moves(path)
    if not body.confirm:
        return s.MoveOut(dry_run=True, files=count, bytes=0, manifest=path.name)
    with server.lock:
        report = server.index.undo_moves(path)
    return s.MoveOut(
        dry_run=False,
        files=report.files,
        bytes=report.bytes,
        skipped=[list(pair) for pair in report.skipped],
        manifest=path.name,
    )


def _status(request: Request) -> dict:
    server = _server(request)
    with server.lock:
        roots = server.index.roots()
    return {**server.job.snapshot(), "roots": roots}


@router.get("/index", response_model=s.IndexStatus, tags=["indexing"])
def index_status(request: Request) -> dict:
    """The background index run: running or not, files done of total, its last summary."""
    return _status(request)


@router.post(
    "/index",
    response_model=s.IndexStatus,
    status_code=202,
    responses={409: {"model": s.Error}, 400: {"model": s.Error}},
    tags=["indexing"],
)
def start_index(request: Request):
    """Start indexing the index's folders again (new, changed and removed files), in the
    background; 409 while a run is going. Follow it at GET /api/index or as server-sent
    events at /api/index/events."""
    started = _server(request).start_index_run()
    if not started:
        return JSONResponse(
            {"error": "an index run is already going", "type": "Conflict"}, status_code=409
        )
    return _status(request)
