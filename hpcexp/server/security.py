"""Access control of the dashboard: one ASGI middleware in front of every route.

- **Token.** The server makes a random token (``secrets.token_urlsafe``) and prints it
  once, in its URL. The first request carrying ``?token=`` gets an HttpOnly,
  SameSite=Strict cookie and a redirect to the same page without the token, so it stays
  out of the address bar, the history and any Referer. Scripts send
  ``Authorization: Bearer TOKEN`` instead. Everything is compared with
  ``hmac.compare_digest``. No credentials: 401; wrong credentials: 403; both answer a
  fixed text that tells nothing about the project.
- **Cookie name per server.** Cookies are not scoped by port, so two users' servers on
  one machine would overwrite each other's cookie; the name carries a digest of the
  token, so each server only ever reads its own.
- **Host check.** Bound to loopback (or a unix socket), a request whose Host header is
  not ``localhost``/``127.0.0.1``/``[::1]`` (any port, for ``ssh -L``) is refused: a page
  of another site whose name was rebound to 127.0.0.1 (DNS rebinding) gets nothing.
- **CSRF.** Every POST from a browser carries a token derived from the access token
  (``csrf_token`` form field or ``X-CSRF-Token`` header) and, when the browser sends
  one, a same-origin ``Origin``; requests with the Bearer header need no CSRF token (a
  foreign page cannot set that header).
- **Encoded separators.** A raw path holding ``%2F``, ``%5C`` or ``%00`` is refused before
  routing, so an encoded slash can never smuggle a path component.
- **Headers.** A strict Content-Security-Policy (no inline script, nothing from other
  origins), ``no-referrer``, ``nosniff``, no framing, ``no-store``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl, quote, urlencode

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
ENCODED_SEPARATOR = re.compile(rb"%(2f|5c|00)", re.IGNORECASE)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


def cookie_name(token: str) -> str:
    return "hpcexp_" + hashlib.sha256(b"hpcexp-cookie:" + token.encode()).hexdigest()[:12]


def csrf_token(token: str) -> str:
    return hmac.new(token.encode(), b"hpcexp-csrf", hashlib.sha256).hexdigest()


def same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode())


def host_name(host_header: str) -> str:
    """``name`` of a Host header ``name[:port]`` (IPv6 in brackets), lower-cased."""
    h = host_header.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[: end + 1] if end > 0 else h
    return h.rsplit(":", 1)[0] if ":" in h else h


def _cookies(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            out.setdefault(k, v)
    return out


async def _plain(send: Callable[..., Awaitable[Any]], status: int, text: str,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store"),
                            *SECURITY_HEADERS, *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


class Security:
    """Wraps the app: refuses bad hosts, encoded separators and requests without the token."""

    def __init__(self, app: ASGIApp, *, token: str, check_host: bool = True, secure: bool = False) -> None:
        self.app = app
        self.token = token
        self.cookie = cookie_name(token)
        self.csrf = csrf_token(token)
        self.check_host = check_host
        self.secure = secure

    async def __call__(self, scope: Scope, receive: Callable[..., Awaitable[Any]],
                       send: Callable[..., Awaitable[Any]]) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.check_host and host_name(headers.get("host", "")) not in LOOPBACK_NAMES:
            await _plain(send, 403, "403 Forbidden: this server answers only to localhost\n")
            return
        raw_path = scope.get("raw_path") or scope.get("path", "").encode()
        if ENCODED_SEPARATOR.search(raw_path):
            await _plain(send, 400, "400 Bad Request: encoded '/', '\\' or NUL in the path\n")
            return
        auth = self._credential(scope, headers)
        if auth == "query-ok":
            await self._set_cookie_and_redirect(scope, send)
            return
        if auth == "none":
            await _plain(send, 401, "401 Unauthorized: open the URL that `hpcexp serve` printed "
                                    "(it carries the access token)\n")
            return
        if auth == "bad":
            await _plain(send, 403, "403 Forbidden: wrong access token\n")
            return
        if scope.get("method") not in ("GET", "HEAD", "OPTIONS"):
            # Under Referrer-Policy no-referrer a browser's own form POST says "Origin: null":
            # that one is left to the CSRF token; any named foreign origin is refused here.
            origin = headers.get("origin")
            if origin not in (None, "null") and \
                    host_name(origin.split("://", 1)[-1]) != host_name(headers.get("host", "")):
                await _plain(send, 403, "403 Forbidden: cross-origin request\n")
                return
        scope.setdefault("state", {})
        scope["state"]["auth"] = auth
        scope["state"]["csrf"] = self.csrf

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                hdrs = list(message.get("headers", []))
                names = {k.lower() for k, _ in hdrs}
                hdrs += [h for h in SECURITY_HEADERS if h[0] not in names]
                if b"cache-control" not in names:
                    hdrs.append((b"cache-control", b"no-store"))
                message = {**message, "headers": hdrs}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _credential(self, scope: Scope, headers: dict[str, str]) -> str:
        query = scope.get("query_string", b"").decode("latin-1")
        params = parse_qsl(query, keep_blank_values=True)
        given = [v for k, v in params if k == "token"]
        if given:
            return "query-ok" if len(given) == 1 and same(given[0], self.token) else "bad"
        authz = headers.get("authorization")
        if authz is not None:
            scheme, _, value = authz.partition(" ")
            return "bearer" if scheme.lower() == "bearer" and same(value.strip(), self.token) else "bad"
        cookies = _cookies(headers.get("cookie", ""))
        if self.cookie in cookies:
            return "cookie" if same(cookies[self.cookie], self.token) else "bad"
        return "none"

    async def _set_cookie_and_redirect(self, scope: Scope, send: Callable[..., Awaitable[Any]]) -> None:
        query = scope.get("query_string", b"").decode("latin-1")
        rest = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "token"]
        location = quote(scope.get("root_path", "") + scope.get("path", "/"), safe="/")
        if rest:
            location += "?" + urlencode(rest)
        cookie = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if self.secure else "")
        await _plain(send, 303, "See Other\n", [(b"location", location.encode("utf-8", "surrogateescape")),
                                                  (b"set-cookie", cookie.encode())])


def check_csrf(scope_state: dict[str, Any], form_value: str | None, header_value: str | None) -> bool:
    """True when this POST may act: a Bearer client, or the right CSRF token."""
    if scope_state.get("auth") == "bearer":
        return True
    expected = scope_state.get("csrf", "")
    return bool(expected) and (same(form_value, expected) or same(header_value, expected))
