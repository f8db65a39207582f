"""Bearer-token authentication for /v1 (checked by :class:`api.middleware.Guard` before a body
is read, and by the WebSocket route). Off when ``LEDGER_API_TOKENS`` is empty.

``LEDGER_API_TOKENS`` is ``name:token,name:token``; the name is the actor recorded in the
metadata of every event the request causes.
"""

from __future__ import annotations

import hmac

from fastapi import WebSocket

from ledger import errors


class Unauthorized(errors.LedgerError):
    code = "unauthorized"
    title = "A valid bearer token is required"
    status = 401


def parse_tokens(text: str) -> dict[str, str]:
    """``"alice:s3cret,bob:xyz"`` → ``{"s3cret": "alice", "xyz": "bob"}``."""
    tokens: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, token = part.partition(":")
        if not sep or not name or len(token) < 8:
            raise ValueError(
                "LEDGER_API_TOKENS: expected name:token pairs, tokens of 8+ characters"
            )
        tokens[token] = name
    return tokens


def actor_for(tokens: dict[str, str], authorization: str | None) -> str:
    if not tokens:
        return "anonymous"
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        for token, name in tokens.items():
            if hmac.compare_digest(token.encode(), presented.encode()):
                return name
    raise Unauthorized("send Authorization: Bearer <token>")


def ws_actor(websocket: WebSocket) -> str:
    return actor_for(websocket.app.state.tokens, websocket.headers.get("authorization"))
