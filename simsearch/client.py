"""`Client(url, token=...)`: a `simsearch serve` server from Python, with the method names
and results of `Index` for searching, so that a script switches between a local index and
a remote one by changing one line. The standard library's HTTP only: no extra to install.

    from simsearch import Client
    with Client("http://127.0.0.1:8000") as index:
        for hit in index.search("query.jpg", k=5):
            print(hit.score, hit.path)
"""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simsearch.config import DEFAULT_K
from simsearch.errors import QueryError, RemoteError
from simsearch.records import FailedFile, Hit

DEFAULT_TIMEOUT = 120.0  # seconds: a first query may wait for the server's model to load


class Client:
    """A simsearch server at `url`; `token` when it was started with one."""

    def __init__(
        self, url: str = "http://127.0.0.1:8000", *, token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release (each call is one request); for symmetry with Index."""

    # -- searching, as Index does ----------------------------------------------------------

    def search(self, query, k: int = DEFAULT_K, **params) -> list[Hit]:
        """The `k` indexed images most similar to `query`: an image file, a PIL image, an
        indexed id (an int or "id:N") or a vector. `params`: see `search_many`."""
        return self.search_many([query], k, **params)[0]

    def search_many(
        self,
        queries: Sequence,
        k: int = DEFAULT_K,
        *,
        nprobe: int | None = None,
        ef: int | None = None,
        rerank: int | None = None,
        label: str | None = None,
        cluster: int | None = None,
        negatives: Sequence = (),
    ) -> list[list[Hit]]:
        """The hits for each query, as `Index.search_many`. With `negatives` (images, ids
        or vectors), one list: the images like the queries together and unlike those."""
        filters = {"k": k, "nprobe": nprobe, "ef": ef, "rerank": rerank, "label": label,
                   "cluster": cluster}  # fmt: skip
        filters = {key: v for key, v in filters.items() if v is not None}
        pos, neg = _sorted(queries), _sorted(negatives)
        combine = bool(negatives)
        if not (pos.images or neg.images):
            body = {**filters, "ids": pos.ids, "negative_ids": neg.ids, "combine": combine,
                    "vectors": pos.vectors, "negative_vectors": neg.vectors}  # fmt: skip
            answer = self._json("POST", "/api/query", body)
            order = [("id", n) for n in range(len(pos.ids))]
            order += [("vector", n) for n in range(len(pos.vectors))]
        else:
            if pos.vectors or neg.vectors:
                raise QueryError("a request with images cannot also search by vectors")
            fields = {**{key: str(v) for key, v in filters.items()}, "combine": str(combine),
                      "ids": ",".join(map(str, pos.ids)),
                      "negative_ids": ",".join(map(str, neg.ids))}  # fmt: skip
            files = [("images", name, data) for name, data in pos.images]
            files += [("negative_images", name, data) for name, data in neg.images]
            answer = self._multipart("/api/search", fields, files)
            order = [("image", n) for n in range(len(pos.images))]
            order += [("id", n) for n in range(len(pos.ids))]
        results = [[_hit(h) for h in r["hits"]] for r in answer["results"]]
        if combine:
            return results
        # Back into the order the queries were given in.
        by_kind = dict(zip(order, results, strict=True))
        return [by_kind[(kind, n)] for kind, n in pos.order]

    # -- the collection --------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What `Index.info()` holds, as a dict, and the folders the index was given."""
        return self._json("GET", "/api/info")

    def failed(self) -> list[FailedFile]:
        out, offset = [], 0
        while True:
            page = self._json("GET", f"/api/failed?offset={offset}&limit=1000")
            out += [FailedFile(**f) for f in page["items"]]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return out

    def health(self) -> bool:
        try:
            return self._json("GET", "/api/health").get("status") == "ok"
        except (OSError, RemoteError):
            return False

    # -- HTTP ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, data: bytes | None, kind: str | None) -> Any:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if kind:
            request.add_header("Content-Type", kind)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": raw.decode("utf-8", "replace")[:200] or exc.reason}
            raise RemoteError(
                str(body.get("error", exc.reason)), status=exc.code,
                kind=str(body.get("type", "")), param=body.get("param"), fix=body.get("fix"),
            ) from None  # fmt: skip

    def _json(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        return self._request(method, path, data, None if body is None else "application/json")

    def _multipart(self, path: str, fields: dict[str, str], files: list) -> Any:
        boundary = uuid.uuid4().hex
        out = io.BytesIO()
        for name, value in fields.items():
            out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                      f"{value}\r\n".encode())  # fmt: skip
        for field, filename, data in files:
            safe = urllib.parse.quote(filename)
            out.write(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                f'filename="{safe}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            )
            out.write(data)
            out.write(b"\r\n")
        out.write(f"--{boundary}--\r\n".encode())
        return self._request(
            "POST", path, out.getvalue(), f"multipart/form-data; boundary={boundary}"
        )


class _Queries:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.vectors: list[list[float]] = []
        self.images: list[tuple[str, bytes]] = []
        self.order: list[tuple[str, int]] = []


def _sorted(queries: Sequence) -> _Queries:
    """Queries split into ids, vectors and image uploads, remembering their order."""
    out = _Queries()
    for q in queries:
        if isinstance(q, np.ndarray):
            out.order.append(("vector", len(out.vectors)))
            out.vectors.append(np.asarray(q, dtype=np.float64).ravel().tolist())
        elif isinstance(q, (int, np.integer)) and not isinstance(q, bool):
            out.order.append(("id", len(out.ids)))
            out.ids.append(int(q))
        elif isinstance(q, str) and q.startswith("id:") and q[3:].isdigit():
            out.order.append(("id", len(out.ids)))
            out.ids.append(int(q[3:]))
        elif isinstance(q, (str, os.PathLike)):
            path = Path(q).expanduser()
            out.order.append(("image", len(out.images)))
            out.images.append((path.name, path.read_bytes()))
        elif hasattr(q, "save"):  # a PIL image
            buf = io.BytesIO()
            q.save(buf, "PNG")
            out.order.append(("image", len(out.images)))
            out.images.append(("image.png", buf.getvalue()))
        else:
            raise QueryError(f"cannot search by a {type(q).__name__}")
    return out


def _hit(h: dict) -> Hit:
    return Hit(int(h["id"]), str(h["path"]), float(h["score"]))
