"""One socket write per response (api/server.py, ``OneWrite``), and nothing else changed.

Two kinds of proof, both on real sockets:

- byte for byte: the same small ASGI app is served in this process by uvicorn's own httptools
  protocol and by ours (``EdgeProtocol``), on uvloop and on asyncio's loop, and each case
  (JSON, empty, HEAD, streamed, 100-continue, pipelined, HTTP/1.0, connection close, a body past
  the transport's high-water mark read slowly, errors before and after the head, WebSocket
  upgrade, TLS, a client that hangs up mid-stream) must get the same bytes from both;
- one write: the client's kernel counts the TCP data segments it received (``TCP_INFO``,
  ``tcpi_data_segs_in``); on loopback a send under the MSS is one segment, so a response of a
  few hundred bytes arrives as one segment if and only if it was one send. uvicorn's own
  protocol is measured the same way and must show two, so that the count can fail. The same
  is checked against a real ``ledger serve`` process.

And the uvicorn internals we rely on are pinned by their shape (the last tests).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import logging
import socket
import ssl
import struct
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import uvloop
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from api.server import EdgeProtocol, OneWrite
from tests.support import served

TCP_INFO_DATA_SEGS_IN = 152
"""Offset of ``tcpi_data_segs_in`` (u32) in Linux's ``struct tcp_info`` (since 4.6)."""

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}
BIG_BYTES = 3 * 1024 * 1024  # past the transport's high-water mark: pause_writing, then resume
finished: list[str] = []
"""Paths whose handler ran to its end (the app appends; a test reads)."""


# --- The app: one path per case -------------------------------------------------------------


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        message = await receive()
        await send({"type": "websocket.send", "text": "echo:" + message.get("text", "")})
        await send({"type": "websocket.close", "code": 1000})
        return
    if scope["type"] != "http":
        return
    path = scope["path"]
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        more = message.get("more_body", False)
    json_head = [(b"content-type", b"application/json")]
    if path == "/json":
        payload = b'{"ok":true,"echo":"%s"}' % body[:50]
        await send({"type": "http.response.start", "status": 201,
                    "headers": [*json_head, (b"content-length", b"%d" % len(payload))]})
        await send({"type": "http.response.body", "body": payload})
    elif path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/stream":  # chunked, some chunks in the head's turn, some after a pause
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/csv")]})
        for i in range(6):
            await send({"type": "http.response.body", "body": b"row,%d\n" % i, "more_body": True})
            if i % 2:
                await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif path == "/slow-first-chunk":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await asyncio.sleep(1.5)
        await send({"type": "http.response.body", "body": b"late"})
    elif path == "/big":
        payload = bytes(range(256)) * (BIG_BYTES // 256)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(payload))]})
        await send({"type": "http.response.body", "body": payload})
    elif path == "/endless":  # until the client hangs up (uvicorn's send then returns at once)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(400):
            await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
            await asyncio.sleep(0.005)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/fail-after-head":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"10")]})
        raise RuntimeError("the handler fails after its head (on purpose)")
    elif path == "/fail-before-head":
        raise RuntimeError("the handler fails before its head (on purpose)")
    else:
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
    finished.append(path)


# --- Serving it in this process -------------------------------------------------------------


def _ours() -> type[HttpToolsProtocol]:
    return type("EdgeProtocol", (EdgeProtocol,), {"open_connections": set()})


@contextlib.contextmanager
def serving(
    protocol: type[HttpToolsProtocol], loop_name: str, tls: ssl.SSLContext | None = None
) -> Iterator[int]:
    """``protocol`` over ``app`` on a loop of its own in a thread; yields the port."""
    loop = LOOPS[loop_name]()
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
    config.load()
    state = ServerState()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def factory() -> asyncio.Protocol:
        return protocol(config=config, server_state=state, app_state={}, _loop=loop)

    server = asyncio.run_coroutine_threadsafe(
        loop.create_server(factory, "127.0.0.1", 0, ssl=tls), loop
    ).result(10)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:

        async def stop() -> None:
            server.close()  # on the loop's thread: asyncio's Server is not thread-safe
            for connection in list(state.connections):
                connection.shutdown()
            await asyncio.sleep(0.05)
            for task in list(state.tasks):
                task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _connect(port: int, tls: ssl.SSLContext | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls is not None:
        return tls.wrap_socket(sock, server_hostname="127.0.0.1")
    return sock


def _until_closed(sock: socket.socket, limit_s: float = 15.0, pause_s: float = 0.0) -> bytes:
    """Everything until the server closes (bounded); ``pause_s`` between reads: a slow reader."""
    chunks = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError, ssl.SSLError):
            break
        if not chunk:
            break
        chunks.append(chunk)
        if pause_s:
            time.sleep(pause_s)
    return b"".join(chunks)


def _exchange(port: int, request: bytes, tls: ssl.SSLContext | None = None,
              pause_s: float = 0.0) -> bytes:
    with _connect(port, tls) as sock:
        sock.sendall(request)
        return _until_closed(sock, pause_s=pause_s)


def _data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, TCP_INFO_DATA_SEGS_IN)[0])


def _one_response(sock: socket.socket) -> bytes:
    """One response with a content-length, read whole (keep-alive: the server does not close)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed early after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    assert len(body) == length, "one request, one response: nothing may follow"
    return head + b"\r\n\r\n" + body


H = b"Host: 127.0.0.1\r\n"
CASES: dict[str, bytes] = {
    "json": b"POST /json HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nConnection: close\r\n\r\nhello",
    "empty body (204)": b"GET /empty HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
    "HEAD": b"HEAD /json HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
    "HEAD, then GET on the same connection": b"HEAD /json HTTP/1.1\r\n" + H + b"\r\n"
    + b"GET /json HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
    "streamed (chunked)": b"GET /stream HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
    "pipelined, three in one send": (b"GET /json HTTP/1.1\r\n" + H + b"\r\n") * 2
    + b"GET /stream HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
    "HTTP/1.0 (no keep-alive)": b"GET /json HTTP/1.0\r\n\r\n",
    "not found": b"GET /nowhere HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
    "fails after its head": b"GET /fail-after-head HTTP/1.1\r\n" + H + b"\r\n",
    "fails before its head (500)": b"GET /fail-before-head HTTP/1.1\r\n" + H + b"\r\n",
    "invalid request (400)": b"GET /json HTTP/1.1\r\n" + H + b"\r\n" + b"BAD\x00 REQUEST\r\n\r\n",
    "keep-alive then close": b"GET /json HTTP/1.1\r\n" + H + b"\r\n"
    + b"GET /empty HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
}


@pytest.fixture(autouse=True)
def _quiet_handler_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.CRITICAL, logger="uvicorn.error")  # the failing paths log on purpose
    yield


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("case", CASES)
def test_every_response_is_byte_for_byte_what_uvicorn_sends(case: str, loop_name: str) -> None:
    answers = []
    for protocol in (HttpToolsProtocol, _ours()):
        with serving(protocol, loop_name) as port:
            answers.append(_exchange(port, CASES[case]))
    assert answers[0], "uvicorn answered nothing: the case proves nothing"
    assert answers[1] == answers[0]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_body_past_the_high_water_mark_read_slowly_arrives_whole_and_identical(
    loop_name: str,
) -> None:
    request = b"GET /big HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
    answers = []
    for protocol in (HttpToolsProtocol, _ours()):
        with serving(protocol, loop_name) as port:
            answers.append(_exchange(port, request, pause_s=0.002))
    assert len(answers[0]) > BIG_BYTES
    assert answers[1] == answers[0]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_expect_100_continue_is_sent_before_the_body_is_and_the_rest_is_identical(
    loop_name: str,
) -> None:
    head = (b"POST /json HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\n\r\n")
    answers = []
    for protocol in (HttpToolsProtocol, _ours()):
        with serving(protocol, loop_name) as port, _connect(port) as sock:
            sock.sendall(head)
            sock.settimeout(5)  # a 100 held back would leave both sides waiting
            first = sock.recv(65536)
            assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b"hello")
            answers.append(first + _until_closed(sock))
    assert answers[1] == answers[0]
    assert b'"echo":"hello"' in answers[1]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_streamed_head_is_not_held_until_a_slow_first_chunk(loop_name: str) -> None:
    with serving(_ours(), loop_name) as port, _connect(port) as sock:
        sock.sendall(b"GET /slow-first-chunk HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
        sock.settimeout(1.0)  # the chunk comes 1.5 s after the head
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert head.endswith(b"transfer-encoding: chunked\r\n\r\n")
        sock.settimeout(10)
        assert _until_closed(sock) == b"4\r\nlate\r\n0\r\n\r\n"


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_websocket_upgrade_is_identical_and_then_speaks_websocket(loop_name: str) -> None:
    request = (b"GET /ws HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    # a masked text frame "hi" (mask 0): FIN + text, masked, length 2
    frame = b"\x81\x82\x00\x00\x00\x00hi"
    answers = []
    for protocol in (HttpToolsProtocol, _ours()):
        with serving(protocol, loop_name) as port, _connect(port) as sock:
            sock.sendall(request)
            sock.settimeout(5)
            got = b""
            while b"\r\n\r\n" not in got:
                got += sock.recv(65536)
            sock.sendall(frame)
            answers.append(got + _until_closed(sock, limit_s=5))
    assert answers[0].startswith(b"HTTP/1.1 101 ")
    assert b"echo:hi" in answers[0]
    assert answers[1].split(b"\r\n")[0] == answers[0].split(b"\r\n")[0]
    # the websockets library writes a date header of its own: compare without it
    assert _without_date(answers[1]) == _without_date(answers[0])


def _without_date(answer: bytes) -> bytes:
    return b"\r\n".join(x for x in answer.split(b"\r\n") if not x.lower().startswith(b"date:"))


def _tls_pair(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from tests.test_edge import _self_signed

    cert, key = _self_signed(tmp)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    client_side = ssl.create_default_context(cafile=cert)
    return server_side, client_side


@pytest.mark.parametrize("loop_name", LOOPS)
def test_over_tls_the_answers_are_identical(loop_name: str, tmp_path: Path) -> None:
    server_side, client_side = _tls_pair(tmp_path)
    answers = []
    for protocol in (HttpToolsProtocol, _ours()):
        with serving(protocol, loop_name, tls=server_side) as port:
            answers.append(b"".join(
                _exchange(port, CASES[case], tls=client_side)
                for case in ("json", "streamed (chunked)", "pipelined, three in one send")
            ))
    assert answers[0].count(b"HTTP/1.1 ") == 5
    assert answers[1] == answers[0]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_client_hanging_up_mid_stream_leaves_the_server_quiet_and_serving(
    loop_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio")
    finished.clear()
    with serving(_ours(), loop_name) as port:
        with _connect(port) as sock:
            sock.sendall(b"GET /endless HTTP/1.1\r\n" + H + b"\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        deadline = time.monotonic() + 10
        while "/endless" not in finished and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "/endless" in finished  # the handler ran on, its sends returning at once
        assert b'"ok":true' in _exchange(port, CASES["json"])
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


# --- One write: counted by the client's kernel ------------------------------------------------


def _segments_per_response(port: int, request: bytes, times: int = 5) -> list[int]:
    with _connect(port) as sock:
        counts = []
        for _ in range(times):
            before = _data_segments_in(sock)
            sock.sendall(request)
            _one_response(sock)
            time.sleep(0.02)  # let anything sent late arrive and be counted against this one
            counts.append(_data_segments_in(sock) - before)
        return counts


def _typical(counts: list[int]) -> int:
    """The median count: on a loaded machine a stray segment (a retransmission) can add one
    to a single response's count, never take one away."""
    return sorted(counts)[len(counts) // 2]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_response_arrives_in_one_segment_where_uvicorn_sends_two(loop_name: str) -> None:
    request = b"POST /json HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello"
    with serving(HttpToolsProtocol, loop_name) as port:
        uvicorns = _segments_per_response(port, request, 7)
    with serving(_ours(), loop_name) as port:
        ours = _segments_per_response(port, request, 7)
    assert min(uvicorns) >= 2, uvicorns  # the count can tell two sends from one
    assert _typical(ours) == 1 and min(ours) == 1, ours


def test_over_a_real_ledger_serve_each_answer_is_one_segment(database_url: str) -> None:
    with served(database_url) as (base, token):
        port = int(base.rsplit(":", 1)[1])
        auth = b"Authorization: Bearer " + token.encode() + b"\r\n"
        body = b'{"name": "one-write"}'
        create = (b"POST /v1/ledgers HTTP/1.1\r\n" + H + auth + b"Idempotency-Key: ow-1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                  + body)
        requests = {
            "healthz": b"GET /healthz HTTP/1.1\r\n" + H + b"\r\n",
            "a ledger created, then replayed": create,
            "a problem (404)": b"GET /v1/ledgers/nowhere HTTP/1.1\r\n" + H + auth + b"\r\n",
        }
        for name, request in requests.items():
            counts = _segments_per_response(port, request, 5)
            assert _typical(counts) == 1 and min(counts) == 1, (name, counts)


# --- The uvicorn internals this relies on, pinned by their shape ------------------------------


def _self_transport_uses(cls: type) -> dict[str, set[str]]:
    """Per method of ``cls``: the attributes it uses on ``self.transport``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    uses: dict[str, set[str]] = {}
    for method in tree.body[0].body:  # type: ignore[attr-defined]
        if isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(method):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "transport"
                    and isinstance(node.value.value, ast.Name)
                    and node.value.value.id == "self"
                ):
                    uses.setdefault(method.name, set()).add(node.attr)
    return uses


def test_uvicorns_response_cycle_uses_only_what_one_write_offers() -> None:
    uses = _self_transport_uses(httptools_impl.RequestResponseCycle)
    assert set().union(*uses.values()) <= {"write", "close", "is_closing"}, uses
    assert "write" in uses["send"]  # still the head and the body, through the cycle's transport
    for name in ("write", "close", "is_closing"):
        assert name in OneWrite.__dict__


def test_uvicorns_protocol_writes_itself_only_where_we_flush_first() -> None:
    uses = _self_transport_uses(HttpToolsProtocol)
    touching = {"write", "close", "set_protocol"}
    writes_or_closes = {m for m, attrs in uses.items() if attrs & touching}
    # each of these is overridden to send what is held first (connection_lost drops it)
    assert writes_or_closes == {
        "connection_lost", "handle_websocket_upgrade", "send_400_response",
        "timeout_keep_alive_handler", "shutdown",
    }, writes_or_closes
    for name in writes_or_closes:
        assert name in EdgeProtocol.__dict__, name


def test_uvicorns_protocol_hands_its_transport_and_completion_to_each_cycle() -> None:
    source = inspect.getsource(HttpToolsProtocol.on_headers_complete)
    assert "self.cycle = RequestResponseCycle(" in source
    assert "transport=self.transport," in source
    assert "on_response=self.on_response_complete," in source
    assert "on_response_complete" in EdgeProtocol.__dict__


# --- The collector's young generation (api/app.py) ------------------------------------------


def test_a_serving_app_collects_its_young_objects_less_often_and_restores_it_when_it_stops(
    database_url: str,
) -> None:
    import gc

    from ledger import limits
    from tests.support import api_client

    before = gc.get_threshold()
    assert before[0] != limits.gc_young_objects_max  # else this proves nothing
    with api_client(database_url) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_threshold() == (limits.gc_young_objects_max, *before[1:])
    assert gc.get_threshold() == before
