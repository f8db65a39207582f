"""The HTTP server behind ``ledger serve``: uvicorn, with what it lacks against bad clients.

uvicorn bounds an idle kept-alive connection (``keep_alive_s``) but nothing else about a
client that is slow on purpose: a connection that sends nothing, half a request line, headers
a byte a minute, or a body it never finishes is held open for ever, each one a socket, a
parser and (for a body) a task. :class:`EdgeProtocol` is uvicorn's own httptools protocol with
three additions, each a few lines around uvicorn's callbacks:

- a cap on open HTTP connections (``connections_max``): one past it gets a short 503 and is
  closed at once, before anything is parsed (WebSocket streams count against
  ``stream_clients_max`` instead);
- a deadline for the request line and headers (``header_timeout_s``, from the connection's
  start or the end of the previous request) and a cap on their size (``header_bytes_max``):
  past either, 408 or 431 and a close;
- a deadline for the body (``body_timeout_s``): the Guard (api/middleware.py) answers 408
  when a handler waits longer than that for a body; this closes the connection a moment later
  in every case, also for a body that no handler reads.

And one thing for speed: a response leaves in one socket write, not two (:class:`OneWrite`).

TLS is the standard library's, from a certificate and key file (a key file readable by
anyone but its owner is refused). Proxies: see docs/operations.md, "Behind a proxy".
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any, ClassVar

import httptools
import orjson
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ledger import errors, limits
from ledger.settings import Settings, SettingsError

BODY_GRACE_S = 1.0
"""The server closes a connection whose body is late this long after the Guard's 408 was due,
so that the Guard answers first when a handler is waiting for the body."""


class _HeadTooLarge(Exception):
    pass


class OneWrite(asyncio.Transport):
    """The transport as uvicorn's ``RequestResponseCycle`` sees it: a write is held until the
    next write, which takes it along in one send, or until the end of this turn of the event
    loop, whichever comes first; ``close`` sends what is held first.

    uvicorn writes a response's status line and headers at ``http.response.start`` and its body
    at ``http.response.body``: two sends for every response, and on loopback TCP each send
    also does the receiver's TCP work inside the sender's system call. A JSON answer sends
    both in the same turn, so here they leave together, with the same bytes in the same order.
    What is held is one write at most, never past the turn it was written in (a streamed
    response's head, or a ``100 Continue``, is sent at the end of the turn as before, not kept
    until a later chunk). The protocol sends what is held before anything it writes or closes
    itself (:meth:`EdgeProtocol.flush`), and drops it when the connection is lost.
    """

    __slots__ = ("_flush_at_turn_end", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush_at_turn_end: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is None:
            self._held = bytes(data)
            self._flush_at_turn_end = self._loop.call_soon(self.flush)
            return
        self._held = None
        if self._flush_at_turn_end is not None:
            self._flush_at_turn_end.cancel()
            self._flush_at_turn_end = None
        self._transport.write(held + data)

    def flush(self) -> None:
        """Sends what is held, if anything."""
        held, self._held = self._held, None
        if self._flush_at_turn_end is not None:
            self._flush_at_turn_end.cancel()
            self._flush_at_turn_end = None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def drop(self) -> None:
        """Forgets what is held: the connection is gone."""
        self._held = None
        if self._flush_at_turn_end is not None:
            self._flush_at_turn_end.cancel()
            self._flush_at_turn_end = None

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a connection cap, header and body deadlines, and a
    header size cap. The bounds are class attributes: :func:`protocol_for` makes a subclass
    per server."""

    connections_max: ClassVar[int] = limits.connections_max
    open_connections: ClassVar[set[EdgeProtocol]] = set()
    """This server's HTTP connections (a WebSocket leaves it on upgrade: streams are bounded
    by ``stream_clients_max`` instead, and must not crowd out HTTP requests)."""
    header_timeout_s: ClassVar[float] = limits.header_timeout_s
    body_timeout_s: ClassVar[float] = limits.body_timeout_s
    header_bytes_max: ClassVar[int] = limits.header_bytes_max

    writer: OneWrite
    """What the current response is written through (made with the connection)."""
    _deadline: asyncio.TimerHandle | None = None
    _head_bytes = 0  # bytes received since the head began (with any body in the same read)
    _head_exact = 0  # bytes of the head's line and complete headers, as parsed
    _reading_head = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.writer = OneWrite(transport, self.loop)
        self.open_connections.add(self)
        if len(self.open_connections) > self.connections_max:
            self._refuse(errors.Unavailable("too many connections; retry in a moment"))
            return
        # Also a connection that never sends a byte: uvicorn arms no timer for it.
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open_connections.discard(self)
        self._disarm()
        self.writer.drop()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, plus a head past its size: a complete one is caught by the callbacks
        # (raised there, wrapped by httptools in HttpParserCallbackError); one still
        # incomplete (httptools buffers a header until its end) by counting what came in.
        if self._reading_head:
            self._head_bytes += len(data)
        self._parse(data)
        if (
            self._reading_head
            and self._head_bytes > self.header_bytes_max
            and not self.transport.is_closing()
        ):
            self._refuse(errors.HeadersTooLarge(f"over {self.header_bytes_max} bytes"))

    def _parse(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__cause__ or exc.__context__, _HeadTooLarge):
                self._refuse(errors.HeadersTooLarge(f"over {self.header_bytes_max} bytes"))
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the WebSocket protocol takes over the connection, with its own pings
        self.open_connections.discard(self)
        self.writer.flush()  # what is held goes before the WebSocket protocol writes
        super().handle_websocket_upgrade()

    # One write per response (OneWrite): the cycle writes through it; whatever the protocol
    # writes or closes itself goes after what the cycle has written.

    def flush(self) -> None:
        """Sends what the current response has written and is held."""
        self.writer.flush()

    def send_400_response(self, msg: str) -> None:
        self.writer.flush()
        super().send_400_response(msg)

    def on_response_complete(self) -> None:
        self.writer.flush()  # a HEAD answer's head, or a streamed answer's last chunk
        super().on_response_complete()

    def shutdown(self) -> None:
        self.writer.flush()
        super().shutdown()

    def timeout_keep_alive_handler(self) -> None:
        self.writer.flush()
        super().timeout_keep_alive_handler()

    # Parser callbacks: the head is counted as it is parsed, then the deadline moves on.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a request on a kept-alive connection: its head starts
            self._arm(self.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head, self._head_exact = False, 0
        self._arm(self.body_timeout_s + BODY_GRACE_S)
        super().on_headers_complete()
        if self.cycle is not None:  # this request's cycle (or, on an upgrade, the last one)
            self.cycle.transport = self.writer

    def on_message_complete(self) -> None:
        self._disarm()  # the request is in; answering it is the application's time
        self._reading_head, self._head_bytes = True, 0
        super().on_message_complete()

    # The deadline

    def _count(self, size: int) -> None:
        self._head_exact += size
        if self._head_exact > self.header_bytes_max:
            raise _HeadTooLarge

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        self.writer.flush()
        if self._reading_head:
            self._refuse(
                errors.RequestTimeout(
                    f"the request's headers did not arrive within {self.header_timeout_s:g} s"
                )
            )
        else:  # a body still arriving: the Guard has answered 408 if a handler was waiting
            self.transport.close()

    def _refuse(self, error: errors.LedgerError) -> None:
        """A problem+json answer written straight to the socket, then a close: for what
        happens before there is a request to hand to the application."""
        self._disarm()
        body = orjson.dumps(
            {
                "type": f"https://ledger.dev/problems/{error.code}",
                "title": error.title,
                "status": error.status,
                "detail": error.detail,
                "code": error.code,
            }
        )
        head = [
            STATUS_LINE[error.status],
            b"content-type: application/problem+json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
        ]
        if error.status == 503:
            head.append(b"retry-after: 1\r\n")
        self.writer.flush()
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.transport.close()


def protocol_for(settings: Settings) -> type[EdgeProtocol]:
    """An :class:`EdgeProtocol` with the settings' bounds."""
    bounds: dict[str, Any] = {
        "connections_max": settings.connections_max,
        "header_timeout_s": settings.header_timeout_s,
        "body_timeout_s": settings.body_timeout_s,
        "open_connections": set(),
    }
    return type("EdgeProtocol", (EdgeProtocol,), bounds)


def check_key_file(path: Path) -> None:
    """Refuses a private key that anyone but its owner may read (as ssh does)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SettingsError(f"LEDGER_TLS_KEY_FILE: cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SettingsError(
            f"LEDGER_TLS_KEY_FILE: {path} is readable by others"
            f" (mode {stat.S_IMODE(mode):o}); run chmod 600 {path}"
        )


def tls_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS options from the settings, refused in one line when unusable."""
    tls: dict[str, Any] = {}
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise SettingsError("LEDGER_TLS_CERT_FILE and LEDGER_TLS_KEY_FILE go together")
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        check_key_file(settings.tls_key_file)
        if not os.access(settings.tls_cert_file, os.R_OK):
            raise SettingsError(f"LEDGER_TLS_CERT_FILE: cannot read {settings.tls_cert_file}")
        tls = {
            "ssl_certfile": str(settings.tls_cert_file),
            "ssl_keyfile": str(settings.tls_key_file),
        }
    return tls


def build(app: FastAPI, settings: Settings, host: str, port: int) -> uvicorn.Server:
    """The uvicorn server ``ledger serve`` runs (``server.run()``; an HTTP worker of
    ``--workers N`` hands it its own ``SO_REUSEPORT`` socket, api/workers.py)."""
    tls = tls_options(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_for(settings),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=int(max(1, round(settings.keep_alive_s))),
        # X-Forwarded-For/-Proto only from the proxies named (uvicorn otherwise trusts
        # 127.0.0.1 by default, which would let any local process choose its address).
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
        server_header=False,
        **tls,
    )
    return uvicorn.Server(config)
