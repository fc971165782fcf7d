"""The JSON shapes of the HTTP API (pydantic models): FastAPI validates requests against
them and publishes them in /openapi.json, so clients and the fuzzer see the same contract."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from simsearch.config import DEFAULT_K

MAX_K = 1000  # hits per query a request may ask for
MAX_QUERIES = 64  # ids, vectors or images one request may search by


class Error(BaseModel):
    """Every error: a message, the simsearch error type, and its fields when it has them."""

    error: str
    type: str
    param: str | None = None
    fix: str | None = None


class LabelOut(BaseModel):
    label: str
    score: float


class HitOut(BaseModel):
    id: int
    path: str
    score: float
    size: int | None = None  # bytes
    width: int | None = None
    height: int | None = None
    labels: list[LabelOut] = []
    cluster: int | None = None


class Result(BaseModel):
    query: str  # "id:42", "image:name.jpg", "vector:0", or "combined"
    hits: list[HitOut]


class SearchOut(BaseModel):
    results: list[Result]


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(DEFAULT_K, ge=1, le=MAX_K)
    nprobe: int | None = Field(None, ge=1, le=65536)
    ef: int | None = Field(None, ge=1, le=65536)
    rerank: int | None = Field(None, ge=0, le=100)
    label: str | None = Field(None, max_length=200)
    cluster: int | None = Field(None, ge=1, le=1_000_000)


class QueryIn(Filters):
    """Search by indexed ids and vectors (JSON). Each is a query of its own, unless
    `combine` or negatives are given: then one query, the sum of the positives' unit
    vectors minus the negatives' ("like these, not like those")."""

    ids: list[int] = Field([], max_length=MAX_QUERIES)
    vectors: list[list[float]] = Field([], max_length=MAX_QUERIES)
    negative_ids: list[int] = Field([], max_length=MAX_QUERIES)
    negative_vectors: list[list[float]] = Field([], max_length=MAX_QUERIES)
    combine: bool = False


class FailedOut(BaseModel):
    path: str
    error: str


class PageOfFailed(BaseModel):
    total: int
    items: list[FailedOut]


class ClusterOut(BaseModel):
    id: int
    size: int
    cohesion: float
    central: list[HitOut]


class ClustersOut(BaseModel):
    run: dict[str, Any] | None
    clusters: list[ClusterOut]


class MembersOut(BaseModel):
    cluster: int
    total: int
    items: list[HitOut]


class DuplicateOut(BaseModel):
    id: int
    path: str
    score: float
    why: str
    facts: dict[str, Any] | None = None


class GroupOut(BaseModel):
    keep_id: int
    keep_path: str
    keep_facts: dict[str, Any] | None = None
    duplicates: list[DuplicateOut]
    aliases: list[str] = []


class DuplicatesOut(BaseModel):
    threshold: float
    total: int  # groups
    offset: int
    items: list[GroupOut]


class MoveIn(BaseModel):
    # Strict: JSON's own types only, as the schema says; pydantic's lax mode took
    # "confirm": "yes" or 1 for true, "threshold": false for 0.0 (every pair a duplicate).
    model_config = ConfigDict(extra="forbid", strict=True)

    # the groups to act on, by their kept image's id; None: every group at the threshold
    keep_ids: list[int] | None = Field(None, max_length=100_000)
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    confirm: bool = False  # False: a dry run that says what would move


class MoveOut(BaseModel):
    dry_run: bool
    files: int
    bytes: int
    moves: list[dict[str, Any]] = []  # the dry run's plan: id, path, keep_path
    skipped: list[list[str]] = []
    manifest: str | None = None  # its name, for undo


class UndoIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # as MoveIn

    manifest: str = Field(..., max_length=200)
    confirm: bool = False


class ManifestOut(BaseModel):
    name: str
    created: str | None
    moves: int


class IndexStatus(BaseModel):
    running: bool
    done: int
    total: int | None
    started: float | None
    finished: float | None
    summary: dict[str, Any] | None
    error: str | None
    version: int
    roots: list[str] = []
