"""Who may call the server, from where, and how much a request may send.

- **API key.** Writing endpoints (``POST /items`` stores an item, ``POST /recommendations`` runs the LM and
  stores its profile) need the key from the environment variable ``key_env`` (default ``RECLM_API_KEY``) in an
  ``X-API-Key`` or ``Authorization: Bearer`` header, compared in constant time. On loopback a key is optional
  (without one, writes are open to local clients only); :meth:`AccessPolicy.for_bind` refuses a non-loopback
  bind without one, and a keyless server refuses writes that arrive on a non-loopback address (403) however
  it was bound. Reads need no key.
- **Trusted hosts.** The ``Host`` header must name loopback (``localhost``, ``127.0.0.1``, ``::1``), the
  address the connection arrived on, the bind host or a name in ``allowed_hosts`` (``*``: any), else 400: a
  DNS-rebinding page (``Host: evil.example`` resolving to 127.0.0.1) cannot reach the server from a browser.
- **Body size.** A request body over ``max_body_bytes`` (default 1 MiB) gets 413, read no further.

Every refusal is a JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reclm.utils import is_loopback

DEFAULT_KEY_ENV = "RECLM_API_KEY"
MAX_BODY_BYTES = 1 << 20
MIN_KEY_CHARS = 16
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without port, brackets or trailing dot, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")


@dataclass(frozen=True)
class AccessPolicy:
    """See the module docstring; :meth:`for_bind` builds one for a bind host."""

    api_key: str | None = None
    key_env: str = DEFAULT_KEY_ENV
    allowed_hosts: frozenset[str] = field(default=LOOPBACK_NAMES)
    max_body_bytes: int = MAX_BODY_BYTES

    @classmethod
    def for_bind(
        cls,
        host: str = "127.0.0.1",
        key_env: str = DEFAULT_KEY_ENV,
        allowed_hosts: Iterable[str] = (),
        max_body_bytes: int = MAX_BODY_BYTES,
        environ: Mapping[str, str] | None = None,
    ) -> AccessPolicy:
        """The policy of a server bound to ``host``; a ``ValueError`` (one line) when ``host`` is not loopback
        and ``key_env`` holds no key, or the key is shorter than :data:`MIN_KEY_CHARS`."""
        if not key_env:
            raise ValueError("--api-key-env: name an environment variable")
        key = (os.environ if environ is None else environ).get(key_env) or None
        if key is None and not is_loopback(host):
            raise ValueError(
                f"--host {host} is not loopback: set an API key in ${key_env} (clients send it as X-API-Key), "
                "or bind 127.0.0.1"
            )
        if key is not None and len(key) < MIN_KEY_CHARS:
            raise ValueError(
                f"${key_env} is too short ({len(key)} characters, at least {MIN_KEY_CHARS}): "
                "e.g. python -c 'import secrets; print(secrets.token_urlsafe())'"
            )
        if max_body_bytes < 1:
            raise ValueError(f"--max-body-bytes {max_body_bytes}: must be at least 1")
        names = set(LOOPBACK_NAMES) | {host_name(h) for h in allowed_hosts if h.strip()}
        if host not in WILDCARD_BINDS:
            names.add(host_name(host))
        return cls(key, key_env, frozenset(names), max_body_bytes)

    def host_ok(self, header: str | None, local: str | None) -> bool:
        """Whether a request with this ``Host`` header, arriving on the local address ``local``, is let in."""
        if "*" in self.allowed_hosts:
            return True
        name = host_name(header or "")
        return bool(name) and (name in self.allowed_hosts or name == host_name(local or ""))

    def key_ok(self, given: str | None) -> bool:
        if self.api_key is None or not given:
            return False
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.api_key.encode("utf-8"))


def given_key(headers: Mapping[str, str]) -> str | None:
    """The key of ``X-API-Key``, else of ``Authorization: Bearer <key>``."""
    key = headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def local_host(scope: Scope) -> str | None:
    """The address the connection arrived on (ASGI ``server``), None when unknown (e.g. a Unix socket)."""
    server = scope.get("server")
    return str(server[0]) if server and server[1] is not None else None


class GuardMiddleware:
    """Pure ASGI middleware: the ``Host`` check (400) and the body size limit (413), before any routing. The
    body is read here (up to the limit) and handed on whole, so a chunked body is bounded as a declared one."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not self.policy.host_ok(headers.get("host"), local_host(scope)):
            await reply(send, 400, "Host header not allowed (start the server with --allowed-host NAME)")
            return
        limit = self.policy.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and not (declared.isascii() and declared.isdigit()):
            await reply(send, 400, "Content-Length is not a number")
            return
        if declared is not None and int(declared) > limit:
            await reply(send, 413, f"request body over {limit} bytes")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await reply(send, 413, f"request body over {limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


async def reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
