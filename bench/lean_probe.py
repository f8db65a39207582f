"""What a lean path for single transfers could gain at most: a probe, not a feature.

    .venv/bin/python bench/lean_probe.py     # about two minutes

Serves the bench's ledger twice, alternating, and loads each with wrk (64 connections, single
transfers, 10 s, two rounds): the app as it is, and the same app behind ``Lean``, an ASGI
layer that answers ``POST /v1/ledgers/{ledger}/transfers`` itself (authentication and the
scope check, the same pydantic model and domain command, the same service call and answer)
and hands everything else to the app. ``Lean`` skips what a real lean path would have to keep
(the guard's strict JSON check and body bound, the rate limiter, metrics, access log, request
ids, problem+json errors), so the difference is an upper bound of what one could save.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import orjson  # noqa: E402

_PATH = re.compile(r"/v1/ledgers/([a-z0-9][a-z0-9_.-]{0,63})/transfers")


class Lean:
    """An ASGI layer in front of the app that answers single transfers itself."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.owner = app
        """The FastAPI app whose state (service, authenticator) is used."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        match = (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and _PATH.fullmatch(scope["path"])
        )
        if not match:
            await self.app(scope, receive, send)
            return
        from api import schemas
        from api.auth import authenticate
        from api.errors import from_ledger_error
        from ledger import errors

        scope["app"] = self.owner
        headers = {k.lower(): v for k, v in scope["headers"]}
        ledger = match.group(1)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            principal = await authenticate(scope, (headers.get(b"authorization") or b"").decode())
            principal.require("transfers", ledger)
            key = (headers.get(b"idempotency-key") or b"").decode() or secrets.token_hex(16)
            command = schemas.TransferIn.model_validate_json(b"".join(chunks)).command(key)
            result = await self.owner.state.service.post_transfer(
                ledger,
                command,
                {"actor": principal.actor, "request_id": secrets.token_hex(16),
                 "idempotency_key": key},
            )
        except errors.LedgerError as exc:
            await from_ledger_error(exc)(scope, receive, send)
            return
        body = orjson.dumps(result.body)
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class LeanInGuard(Lean):
    """The same, but behind the guard middleware (request id, access log, metrics, the rate
    limiter, the body bound and the strict JSON check all kept): only FastAPI's routing,
    parameter resolution and response machinery are skipped."""

    def __init__(self, app: Any, full: Any) -> None:
        super().__init__(app)
        self.owner = full


def behind_guard(app: Any) -> Any:
    """``app`` with LeanInGuard put right under its Guard, once the middleware stack is built."""
    from api.middleware import Guard

    build = app.build_middleware_stack

    def build_with_lean() -> Any:
        stack = build()
        layer = stack
        while not isinstance(layer, Guard):
            layer = layer.app
        layer.app = LeanInGuard(layer.app, app)
        return stack

    app.build_middleware_stack = build_with_lean
    return app


@contextmanager
def serve(url: str, lean: bool | str) -> Any:
    import run

    port = run.free_port()
    wrap = (
        "import sys; sys.path.insert(0, 'bench'); from lean_probe import Lean, behind_guard; "
        if lean
        else ""
    )
    served = {False: "app", True: "Lean(app)", "guard": "behind_guard(app)"}[lean]
    code = (
        f"import uvicorn; {wrap}from api.app import create_app; from ledger.settings import"
        f" Settings; app = create_app({url!r}, Settings(pool_size=8, projections=False)); "
        f"uvicorn.run({served}, host='127.0.0.1', port={port},"
        " log_level='warning', access_log=False)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_LOG_LEVEL"] = "warning"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with suppress(OSError), run.socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        else:
            raise SystemExit("lean_probe: the server did not start")
        yield port, proc.pid
    finally:
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


def main() -> None:
    import run
    from profile_http import _cpu_s

    with run.cluster() as (server_url, _), run.database(server_url, "ledger_lean") as url:
        run.migrate(url)

        async def prepare() -> None:
            pool = run.postgres.async_pool(url, 4)
            await pool.open()
            svc = run.LedgerService(pool)
            await run.setup_ledger(svc)
            await svc.close()
            await pool.close()
            run.TOKEN[0] = await run.make_key(url)

        run.asyncio.run(prepare())
        label = {False: "the app", "guard": "lean behind the guard", True: "lean, no guard"}
        for round_ in (1, 2):
            modes: tuple[bool | str, ...] = (False, "guard", True)
            for lean in modes:
                with serve(url, lean) as (port, pid):
                    run.wrk(port, 16, 2)  # warm up
                    before = _cpu_s(pid)
                    found = run.wrk(port, 64, 10)
                    cpu = (_cpu_s(pid) - before) / found["requests"] * 1e6
                print(
                    f"lean_probe: round {round_}, {label[lean]}:"
                    f" {found['rate']:,.0f} transfers/s, p50 {found['p50']:.1f} ms,"
                    f" p99 {found['p99']:.1f} ms, server CPU {cpu:,.0f} µs per request;"
                    f" load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
