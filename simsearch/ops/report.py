"""Self-contained HTML pages of search results, duplicate groups and clusters, for people.

Each page is one file: thumbnails are embedded as JPEG data: URIs and the CSS is inline, so it
can be mailed or archived and still shows everything; no JavaScript is needed to view it.
Thumbnails are written into the file as they are made, so memory does not grow with the
page, and the file is renamed into place only when complete.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Protocol, TextIO, TypeVar

from simsearch import config
from simsearch._version import __version__
from simsearch.errors import ReportError
from simsearch.fs.files import replaced_atomically
from simsearch.fs.names import shown
from simsearch.media.thumbnail import Thumbnail, make_thumbnail
from simsearch.records import DuplicateGroup, FileFacts, Hit, facts_text

T = TypeVar("T")


class Cluster(Protocol):
    """What `cluster_page` needs of a cluster (any object with these attributes will do)."""

    id: int
    size: int  # number of images in the cluster
    central: Sequence[Hit]  # its most central images, best first; score: similarity to centre


class _Thumbnails:
    """Makes each distinct image's thumbnail once per page, keeping it in memory only while
    the page still has to show that image again."""

    def __init__(self, paths: Iterable[str]):
        self._remaining = Counter(paths)  # how often each path is still to be shown
        self._kept: dict[str, Thumbnail] = {}

    def get(self, path: str) -> Thumbnail:
        thumb = self._kept.pop(path, None) or make_thumbnail(path)
        self._remaining[path] -= 1
        if self._remaining[path] > 0:
            self._kept[path] = thumb
        return thumb

    def held(self) -> set[str]:
        """The paths whose thumbnails are in memory now."""
        return set(self._kept)


def search_page(
    results: Sequence[tuple[str, Sequence[Hit]]],
    output: Path,
    *,
    title: str = "simsearch: search results",
    complete: str = "the JSON output",
) -> int:
    """Write a page of search results to `output`; return the number of images shown.

    `results` holds (query, hits) per query. A query that names an image file is shown with
    its thumbnail; for an "id:N" query, the hit with id N (an indexed query finds itself)
    gives the image, when it is among the hits.
    """
    rows = [(query, _query_image(query, hits), list(hits)) for query, hits in results]
    sizes = [(image is not None) + len(hits) for _, image, hits in rows]
    plan = _fit(rows, sizes)
    k = max((len(hits) for _, _, hits in rows), default=0)
    summary = [f"{_count(len(rows), 'query', 'queries')}, up to {k} results each."]
    summary += _cut_note(sizes, plan, "queries", complete)
    paths = []
    for (_, image, hits), n in plan:
        paths += ([image] if image else []) + [h.path for h in hits][: n - bool(image)]
    thumbs = _Thumbnails(paths)
    with _page(output, title, summary) as out:
        for (query, image, hits), n in plan:
            out.write(f"<section><h2>Query <code>{_esc(query)}</code></h2><div class=grid>\n")
            if image is not None:
                _figure(out, thumbs.get(image), image, [("query", "query")], role="query")
                n -= 1
            for rank, hit in enumerate(hits[:n], 1):
                _figure(
                    out, thumbs.get(hit.path), hit.path, [("rank", f"#{rank}"), _score(hit.score)]
                )
            if not hits:
                out.write("<p class=empty>No results.</p>\n")
            out.write(_more(len(hits) - n) + "</div></section>\n")
    return len(paths)


def _query_image(query: str, hits: Sequence[Hit]) -> str | None:
    if query.startswith("id:"):
        wanted = query[3:].strip()
        return next((h.path for h in hits if str(h.id) == wanted), None)
    return query if Path(query).is_file() else None


def dedup_page(
    groups: Sequence[DuplicateGroup],
    output: Path,
    *,
    threshold: float | None = None,
    title: str = "simsearch: near-duplicates",
    complete: str = "the JSON output",
) -> int:
    """Write a page of near-duplicate groups to `output`; return the number of images shown.

    Each group shows the image to keep, marked, then its duplicates with their similarity to
    it; every image with the facts the keep rule compared (true resolution, format, lossless
    or not, file size, date) and each duplicate with the rule by which the kept one won.
    """
    sizes = [1 + len(g.duplicates) for g in groups]
    plan = _fit(groups, sizes)
    dups = sum(len(g.duplicates) for g in groups)
    at = f" at similarity {threshold:g} or more" if threshold is not None else ""
    summary = [
        f"{_count(len(groups), 'group')}, {_count(dups, 'duplicate')}{at}. The image to keep "
        "is a real file, not a link, with the highest resolution, then lossless over lossy "
        "encoding, then the largest file, then the oldest date, then the shortest path. "
        "Nothing has been moved or deleted."
    ]
    summary += _cut_note(sizes, plan, "groups", complete)
    paths = []
    for g, n in plan:
        paths += [g.keep_path, *(d.path for d in g.duplicates[: n - 1])]
    thumbs = _Thumbnails(paths)
    with _page(output, title, summary) as out:
        for number, (g, n) in enumerate(plan, 1):
            count = _count(len(g.duplicates), "duplicate")
            out.write(f"<section><h2>Group {number} <small>{count}</small></h2><div class=grid>\n")
            _figure(
                out,
                thumbs.get(g.keep_path),
                g.keep_path,
                [("keep", "keep")],
                role="keep",
                facts=g.keep_facts,
            )
            for d in g.duplicates[: n - 1]:
                why = f"kept: {d.why}" if d.why else ""
                _figure(out, thumbs.get(d.path), d.path, [_score(d.score)], facts=d.facts, note=why)
            out.write(_more(len(g.duplicates) - (n - 1)) + "</div></section>\n")
    return len(paths)


def cluster_page(
    clusters: Sequence[Cluster],
    output: Path,
    *,
    title: str = "simsearch: clusters",
    complete: str = "the JSON output",
) -> int:
    """Write a page of clusters to `output`; return the number of images shown.

    Each cluster (see `Cluster`: id, size, central hits) shows its id and size, then a row of
    its central images with their similarity to the cluster's centre.
    """
    sizes = [len(c.central) for c in clusters]
    plan = _fit(clusters, sizes)
    total = sum(c.size for c in clusters)
    summary = [
        f"{_count(len(clusters), 'cluster')} of {_count(total, 'image')}; each shows its most "
        "central images, scored by similarity to the cluster's centre."
    ]
    summary += _cut_note(sizes, plan, "clusters", complete)
    paths = [h.path for c, n in plan for h in c.central[:n]]
    thumbs = _Thumbnails(paths)
    with _page(output, title, summary) as out:
        for c, n in plan:
            size = _count(c.size, "image")
            out.write(f"<section><h2>Cluster {c.id} <small>{size}</small></h2><div class=grid>\n")
            for hit in c.central[:n]:
                _figure(out, thumbs.get(hit.path), hit.path, [_score(hit.score)])
            if not c.central:
                out.write("<p class=empty>No images to show.</p>\n")
            out.write(_more(c.size - n) + "</div></section>\n")
    return len(paths)


def _fit(rows: Sequence[T], sizes: Sequence[int], budget: int | None = None) -> list[tuple[T, int]]:
    """Return (row, figures shown) for the rows that fit in `budget` figures, in order: rows
    are shown whole until one no longer fits, which is cut; rows after it are left out."""
    budget = config.MAX_PAGE_FIGURES if budget is None else budget
    plan: list[tuple[T, int]] = []
    for row, size in zip(rows, sizes, strict=True):
        if budget <= 0 and size > 0:
            break
        plan.append((row, min(size, budget)))
        budget -= plan[-1][1]
    return plan


def _cut_note(sizes: Sequence[int], plan: Sequence[tuple[object, int]], noun: str, how: str):
    """Return the line that says the page was cut short, if it was, as a list of 0 or 1;
    `how` names what lists everything (the CLI: its command with --json)."""
    shown, total = sum(n for _, n in plan), sum(sizes)
    if shown == total:
        return []
    return [
        f"To stay small enough to open, this page shows the first {shown:,} of {total:,} "
        f"images ({len(plan):,} of {len(sizes):,} {noun}); use {how} for all of them."
    ]


@contextmanager
def _page(output: Path, title: str, summary: Sequence[str]) -> Iterator[TextIO]:
    """Yield the open page body; the head is written first, the footer last, and the file
    replaces `output` only when complete."""
    output = Path(output)
    try:
        # errors="replace": a file name that is not valid UTF-8 (undecodable bytes arrive as
        # lone surrogates) shows a ? for each such byte, as ls does; its link stays exact.
        with (
            replaced_atomically(output) as tmp,
            open(tmp, "w", encoding="utf-8", errors="replace") as out,
        ):
            out.write(_HEAD.format(title=_esc(title), css=_CSS))
            out.write(f"<header><h1>{_esc(title)}</h1>\n")
            for line in summary:
                out.write(f"<p>{_esc(line)}</p>\n")
            out.write("</header><main>\n")
            yield out
            made = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
            out.write(f"</main><footer>Made by simsearch {__version__}, {made}.</footer>\n")
            out.write("</body></html>\n")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ReportError(f"cannot write the report {output}: {reason}") from None


def _figure(
    out: TextIO,
    thumb: Thumbnail,
    path: str,
    tags: Sequence[tuple[str, str]],
    *,
    role: str = "",
    facts: FileFacts | None = None,
    note: str = "",
) -> None:
    """Write one image: its thumbnail (or a box with the reason it has none) linking to the
    original, its tags ((css class, text): a role, a rank, a score), its name and folder
    and, with `facts`, what dedup's keep rule compared of it, then `note`."""
    link = _esc(_file_uri(path))
    name = Path(path).name or path
    if thumb.uri is not None:
        picture = (
            f'<img src="{thumb.uri}" width={thumb.width} height={thumb.height} alt="{_esc(name)}">'
        )
    else:
        reason = _esc(thumb.error)
        picture = f'<span class=missing role=img aria-label="{_esc(name)}">{reason}</span>'
    labels = "".join(
        f"<b class={kind}{_TAG_TITLES.get(kind, '')}>{_esc(text)}</b>" for kind, text in tags
    )
    folder = path[: len(path) - len(name)] if path.endswith(name) else ""
    out.write(
        f'<figure class="{role}"><a href="{link}" title="{_esc(path)}">{picture}</a>'
        f"<figcaption><span class=tags>{labels}</span>"
        f'<a class=name href="{link}">{_esc(name)}</a><span class=dir>{_esc(folder)}</span>'
    )
    if facts is not None:
        out.write(f"<span class=facts>{_esc(facts_text(facts))}</span>")
    if note:
        out.write(f"<span class=facts>{_esc(note)}</span>")
    out.write("</figcaption></figure>\n")


# Hover text that says what a tag means.
_TAG_TITLES = {
    "score": ' title="cosine similarity (1 = the same picture)"',
    "keep": (
        ' title="the one to keep: a real file, highest resolution, lossless, largest file, '
        'oldest, shortest path"'
    ),
}


def _file_uri(path: str) -> str:
    try:
        return Path(path).absolute().as_uri()
    except ValueError:  # a path Path cannot turn into a URI: link to nothing rather than fail
        return "#"


def _more(hidden: int) -> str:
    return f"<p class=more>and {hidden:,} more</p>" if hidden > 0 else ""


def _score(score: float) -> tuple[str, str]:
    return "score", f"{score:.4f}"


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n:,} {singular if n == 1 else plural or singular + 's'}"


def _esc(text: object) -> str:
    # shown: a file name that is not UTF-8 appears with its bytes escaped (caf\xe9.jpg).
    return html.escape(shown(str(text)), quote=True)


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="simsearch">
<title>{title}</title>
<style>{css}</style>
</head><body>
"""

# Light and dark themes follow the reader's system setting; the grid fits as many columns
# as the window holds.
_CSS = """
:root{--bg:#f6f6f4;--card:#fff;--ink:#1d1d1f;--muted:#6e6e73;--line:#ddd;--keep:#1f8f4e;
--query:#2f6fd6;--tile:#e9e9e6}
@media (prefers-color-scheme:dark){:root{--bg:#161617;--card:#232325;--ink:#f2f2f2;
--muted:#a1a1a6;--line:#3a3a3c;--keep:#3ec47a;--query:#6aa2ff;--tile:#2c2c2e}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{padding:20px 24px 8px}h1{margin:0 0 6px;font-size:22px}
header p{margin:4px 0;color:var(--muted);max-width:70em}
main{padding:0 24px 24px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;
margin:16px 0;padding:12px 16px 16px}
h2{margin:0 0 12px;font-size:16px;overflow-wrap:anywhere}
h2 small{color:var(--muted);font-weight:normal;margin-left:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:14px}
figure{margin:0;display:flex;flex-direction:column;border:2px solid transparent;
border-radius:8px;padding:4px}
figure.keep{border-color:var(--keep)}figure.query{border-color:var(--query)}
figure>a{text-decoration:none;display:flex;align-items:center;justify-content:center;aspect-ratio:1;
background:var(--tile);border-radius:5px;overflow:hidden}
figure img{max-width:100%;max-height:100%;width:auto;height:auto;display:block}
.missing{padding:12px;color:#b3261e;font-size:13px;text-align:center;overflow-wrap:anywhere}
figcaption{font-size:12px;padding-top:6px;display:flex;flex-direction:column;gap:2px}
.tags b{display:inline-block;margin-right:6px;font-size:13px}
.score{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:15px!important}
.rank{color:var(--muted);font-weight:normal}
b.keep,b.query{color:#fff;border-radius:4px;padding:0 6px;text-transform:uppercase;
letter-spacing:.04em}
b.keep{background:var(--keep)}b.query{background:var(--query)}
a.name{color:var(--ink);font-size:13px;text-decoration:none;overflow-wrap:anywhere}
a.name:hover{text-decoration:underline}.dir{color:var(--muted);overflow-wrap:anywhere}
.facts{color:var(--muted)}
.more,.empty{align-self:center;color:var(--muted);margin:0}
footer{padding:0 24px 24px;color:var(--muted);font-size:12px}
"""
