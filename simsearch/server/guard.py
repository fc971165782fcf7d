"""What stands between the network and the index: the token, the request size limit, the
Host and Origin checks. Pure ASGI middleware, so that it runs before any body is read."""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

from starlette.exceptions import HTTPException

COOKIE = "simsearch_token"
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
OPEN_PATHS = {"/api/health"}  # answered without the token: a load balancer's probe


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes the limit: an HTTPException, so that
    FastAPI's body parsing passes it on (as 413) instead of calling it a parse error."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request is over the upload limit of {limit:,} bytes")


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _hostname(host: str) -> str:
    """The name in a Host header, its port left off; a header of another shape whole."""
    bracketed = re.fullmatch(r"(\[[^\]]*\])(:\d*)?", host)  # [::1]:8000, not [::1].evil
    if bracketed:
        return bracketed.group(1)
    named = re.fullmatch(r"([^:]*)(:\d*)?", host)  # localhost:8000
    return named.group(1) if named else host  # else ::1, bare


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class Guard:
    """Refuses, before the app sees it: a request without the token (when one is set); a
    body over `max_body` bytes (413, as declared or as it streams in); a Host header
    naming another site on a loopback server without a token (DNS rebinding); a
    cross-site POST (a page elsewhere driving the API through the user's browser)."""

    def __init__(
        self, app, *, token: str | None, max_body: int, loopback: bool, cors: tuple[str, ...]
    ) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body
        self.loopback = loopback
        self.cors = set(cors)

    def _token_ok(self, scope, headers: dict[str, str]) -> tuple[bool, bool]:
        """(allowed, set the cookie): the token from the header, the cookie or ?token=."""
        if self.token is None:
            return True, False
        given = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header is no token
            cookie = SimpleCookie()
        if COOKIE in cookie:
            given.append(cookie[COOKIE].value)
        from_query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        given += from_query
        expected = self.token.encode()
        # An empty value is never the token, even where one was configured as "" (the
        # library's Settings(token=""); the CLI makes that None): fail closed, not open.
        ok = any(g and hmac.compare_digest(g.encode(), expected) for g in given)
        return ok, ok and bool(from_query)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if self.loopback and self.token is None:
            host = _hostname(headers.get("host", "localhost")).lower()  # names: any case
            if host not in LOOPBACK_HOSTS:
                return await _send_json(
                    send, 403, {"error": f"this server answers only to localhost, not {host}",
                                "type": "Forbidden"},
                )  # fmt: skip
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin:
            # "null" is no exemption: a sandboxed iframe or a data: page elsewhere sends it
            same = origin != "null" and urlsplit(origin).netloc == headers.get("host")
            if not same and origin not in self.cors:
                return await _send_json(
                    send, 403, {"error": f"cross-site request from {origin} refused",
                                "type": "Forbidden"},
                )  # fmt: skip
        allowed, set_cookie = self._token_ok(scope, headers)
        if not allowed and scope["path"] not in OPEN_PATHS:
            return await _send_json(
                send, 401, {"error": "a valid token is required", "type": "Unauthorized"},
                [(b"www-authenticate", b"Bearer")],
            )  # fmt: skip
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await _send_json(send, 413, self._too_large())
        received = 0
        started = over = False

        async def limited_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    over = True
                    raise BodyTooLarge(self.max_body)
            return message

        async def tracking_send(message):
            nonlocal started
            if over:
                # The body was cut off: whatever the app makes of that (a middleware wraps
                # the exception in a group, which FastAPI then calls a parse error, 400),
                # the answer is the 413; the app's own is dropped.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_json(send, 413, self._too_large())
                return
            if message["type"] == "http.response.start":
                started = True
                if not self.cors:  # no page elsewhere may embed a photo (<img>) or read a byte
                    corp = (b"cross-origin-resource-policy", b"same-origin")
                    message["headers"] = [*message["headers"], corp]
                if set_cookie:
                    value = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                    message["headers"] = [*message["headers"], (b"set-cookie", value.encode())]
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:  # BodyTooLarge, bare or in an exception group
            if not over:
                raise
            if not started:
                await _send_json(send, 413, self._too_large())

    def _too_large(self) -> dict:
        return {
            "error": f"the request is over the upload limit of {self.max_body:,} bytes",
            "type": "PayloadTooLarge",
        }
