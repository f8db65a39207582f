"""Every expected failure, with its stable code.

Codes are snake_case and never change once released. Within each group they are listed in the
order they are checked, so that a client can tell which rule it broke first (as TigerBeetle
documents its result codes). ``docs/errors.md`` is checked against this module by a test.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LedgerError(Exception):
    """An expected failure: the request was refused and nothing was changed."""

    code: ClassVar[str] = "ledger_error"
    status: ClassVar[int] = 400
    title: ClassVar[str] = "The request was refused"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def to_result(self) -> dict[str, Any]:
        """The error as an item result of a batch."""
        return {"code": self.code, "detail": self.detail, **self.extra}


# --- Access (checked first, before the request's body is read) ---------------------------


class Unauthorized(LedgerError):
    code = "unauthorized"
    title = "A valid API key is required"
    status = 401


class Forbidden(LedgerError):
    code = "forbidden"
    title = "The API key does not allow this (scope or ledger)"
    status = 403


class KeyNotFound(LedgerError):
    code = "key_not_found"
    title = "No such API key"
    status = 404


# --- At the edge (checked before the route runs, in this order) -------------------------------


class RateLimited(LedgerError):
    code = "rate_limited"
    title = "Too many requests for this API key (or, without one, this address)"
    status = 429


class RequestTimeout(LedgerError):
    code = "request_timeout"
    title = "The request's headers or body took too long to arrive"
    status = 408


class HeadersTooLarge(LedgerError):
    code = "headers_too_large"
    title = "The request line and headers are larger than the limit"
    status = 431


class UnsupportedMediaType(LedgerError):
    code = "unsupported_media_type"
    title = "A request body must be sent as Content-Type: application/json"
    status = 415


class UnknownQueryParameter(LedgerError):
    code = "unknown_query_parameter"
    title = "The route does not take this query parameter"
    status = 400


# --- Request shape (checked first, before anything is read from the database) -------------


class InvalidRequest(LedgerError):
    code = "invalid_request"
    title = "The request is malformed"
    status = 422


class InvalidAmount(LedgerError):
    code = "invalid_amount"
    title = "Amounts are strings of 1 to 38 ASCII digits, greater than zero"
    status = 422


class InvalidAsset(LedgerError):
    code = "invalid_asset"
    title = "Assets are written CODE/SCALE, such as USD/2"
    status = 422


class AccountsMustBeDifferent(LedgerError):
    code = "accounts_must_be_different"
    title = "A posting must debit and credit different accounts"
    status = 422


class TimeoutRequiresPending(LedgerError):
    code = "timeout_requires_pending"
    title = "Only a pending transfer can have a timeout"
    status = 422


class HolderNotInAccountName(LedgerError):
    code = "holder_not_in_account_name"
    title = "metadata.holder must be the account's name or a prefix of it (users:alice)"
    status = 422


class LinkedChainOpen(LedgerError):
    code = "linked_chain_open"
    title = "The last item of a batch cannot be linked to a next one"
    status = 422


class PayloadTooLarge(LedgerError):
    code = "payload_too_large"
    title = "The request is larger than the limit"
    status = 413


class BatchTooLarge(LedgerError):
    code = "batch_too_large"
    title = "The batch has more items than the limit"
    status = 413


class IdempotencyKeyMissing(LedgerError):
    code = "idempotency_key_missing"
    title = "An Idempotency-Key is required"
    status = 400


# --- Against the ledger's state, in this order -------------------------------------------------


class LedgerNotFound(LedgerError):
    code = "ledger_not_found"
    title = "No such ledger"
    status = 404


class LedgerExists(LedgerError):
    code = "ledger_exists"
    title = "A ledger with this name exists with other settings"
    status = 409


class IdempotencyKeyReused(LedgerError):
    code = "idempotency_key_reused"
    title = "This key was already used with a different request"
    status = 422


class EffectiveAtOutOfRange(LedgerError):
    code = "effective_at_out_of_range"
    title = "effective_at is further from the recording time than allowed"
    status = 422


class PeriodClosed(LedgerError):
    code = "period_closed"
    title = "The effective date falls in a closed period: post a correction in the open period"
    status = 422


class PeriodNotEnded(LedgerError):
    code = "period_not_ended"
    title = "Only days that have ended (UTC) can be closed"
    status = 422


class PeriodAlreadyClosed(LedgerError):
    code = "period_already_closed"
    title = "The ledger is already closed through this date or later"
    status = 409


class PeriodNotClosed(LedgerError):
    code = "period_not_closed"
    title = "Nothing is closed from this date on, so nothing can be reopened"
    status = 409


class PendingTransferNotFound(LedgerError):
    code = "pending_transfer_not_found"
    title = "No pending transfer with this key"
    status = 422


class PendingTransferAlreadyPosted(LedgerError):
    code = "pending_transfer_already_posted"
    title = "The pending transfer was already posted"
    status = 409


class PendingTransferAlreadyVoided(LedgerError):
    code = "pending_transfer_already_voided"
    title = "The pending transfer was already voided"
    status = 409


class PendingTransferExpired(LedgerError):
    code = "pending_transfer_expired"
    title = "The pending transfer expired"
    status = 409


class TransferNotFound(LedgerError):
    code = "transfer_not_found"
    title = "No transfer with this key"
    status = 404


class TransferNotReversible(LedgerError):
    code = "transfer_not_reversible"
    title = "Only a posted transfer can be reversed"
    status = 409


class PartialNeedsSinglePosting(LedgerError):
    code = "partial_amount_needs_single_posting"
    title = "A partial amount applies only to a transfer with one posting"
    status = 422


class PartialAmountsMismatch(LedgerError):
    code = "partial_amounts_mismatch"
    title = "Give one amount per posting of the transfer, in its order (or one amount, not both)"
    status = 422


class PostAmountExceedsPending(LedgerError):
    code = "post_amount_exceeds_pending"
    title = "The amount to post is more than the pending amount"
    status = 422


class ReversalExceedsRemaining(LedgerError):
    code = "reversal_exceeds_remaining"
    title = "The reversal is more than what remains of the original"
    status = 422


class AssetNotFound(LedgerError):
    code = "asset_not_found"
    title = "The asset is not defined in this ledger"
    status = 422


class AssetScaleMismatch(LedgerError):
    code = "asset_scale_mismatch"
    title = "The asset is defined in this ledger with another scale"
    status = 422


class AmountExceedsAssetMax(LedgerError):
    code = "amount_exceeds_asset_max"
    title = "A posting's amount is more than its asset allows in one posting"
    status = 422


class AssetExists(LedgerError):
    code = "asset_exists"
    title = "The asset is already defined with another scale"
    status = 409


class AccountNotFound(LedgerError):
    code = "account_not_found"
    title = "No such account in this ledger"
    status = 422


class AccountExists(LedgerError):
    code = "account_exists"
    title = "An account with this name exists with other settings"
    status = 409


class AccountClosed(LedgerError):
    code = "account_closed"
    title = "The account is closed"
    status = 422


class AccountFrozen(LedgerError):
    code = "account_frozen"
    title = "The account is frozen and refuses new postings"
    status = 422


class Overflow(LedgerError):
    code = "overflow"
    title = "A balance would exceed 38 digits"
    status = 422


class InsufficientFunds(LedgerError):
    code = "insufficient_funds"
    title = "The account's debits would exceed its credits plus its limit"
    status = 422


class ExceedsDebits(LedgerError):
    code = "exceeds_debits"
    title = "The account's credits would exceed its debits plus its limit"
    status = 422


class AccountBalanceNotZero(LedgerError):
    code = "account_balance_not_zero"
    title = "Only an account whose balances are all zero can be closed"
    status = 409


class LinkedTransferFailed(LedgerError):
    code = "linked_transfer_failed"
    title = "Another item of this linked chain failed"
    status = 422


# --- Lookups -----------------------------------------------------------------------------------


class AccountNotFoundForRead(LedgerError):
    code = "account_not_found"
    title = "No such account in this ledger"
    status = 404


class WebhookNotFound(LedgerError):
    code = "webhook_not_found"
    title = "No such webhook subscription on this ledger"
    status = 404


class DeadDeliveryNotFound(LedgerError):
    code = "dead_delivery_not_found"
    title = "No dead-lettered delivery of this event to this webhook subscription"
    status = 404


class WebhookTargetRefused(LedgerError):
    code = "webhook_target_refused"
    title = (
        "The webhook URL's host resolves to an address the server may not call (a private,"
        " loopback or link-local one not in LEDGER_WEBHOOK_ALLOWED_NETWORKS), or to none"
    )
    status = 422


class WebhookLimitReached(LedgerError):
    code = "webhook_limit_reached"
    title = "The ledger has as many webhook subscriptions as it may (webhooks_per_ledger_max)"
    status = 409


class PositionOutOfRange(LedgerError):
    code = "position_out_of_range"
    title = "The position is beyond the log's head"
    status = 422


class InvalidCursor(LedgerError):
    code = "invalid_cursor"
    title = "The cursor is not one this server gave out"
    status = 400


# --- Moving and restoring a ledger (`ledger import`, `ledger verify --checkpoint`) -----------


class ExportInvalid(LedgerError):
    code = "export_invalid"
    title = "The export does not verify (chain, Merkle roots, signatures, rules): nothing imported"
    status = 422


class ImportTargetExists(LedgerError):
    code = "import_target_exists"
    title = "The target database already has a ledger of that name; import never writes over one"
    status = 409


class SignedHistoryLost(LedgerError):
    code = "signed_history_lost"
    title = "The log ends before a checkpoint that was signed: a restore lost signed history"
    status = 409


class StateDiffersFromLog(LedgerError):
    code = "state_differs_from_log"
    title = "A row the writer decides by differs from what the log says: changed behind its back"
    status = 409


# --- Audit (`ledger seal`, checkpoints, proofs) ---------------------------------------------


class SigningKeyMissing(LedgerError):
    code = "signing_key_missing"
    title = "This server has no signing key (LEDGER_SIGNING_KEY_FILE)"
    status = 409


class NothingToSeal(LedgerError):
    code = "nothing_to_seal"
    title = "The ledger's log is empty: there is no tree head to sign"
    status = 409


class CheckpointNotFound(LedgerError):
    code = "checkpoint_not_found"
    title = "No checkpoint of that tree size"
    status = 404


class EventNotFound(LedgerError):
    code = "event_not_found"
    title = "No event at that position in the ledger's log"
    status = 404


class ProofOutOfRange(LedgerError):
    code = "proof_out_of_range"
    title = "A proof needs 1 <= position (or first tree size) <= tree size <= the log's head"
    status = 422


# --- The server's own fault: nothing happened; retrying will not help ------------------------


class Misconfigured(LedgerError):
    code = "server_misconfigured"
    title = (
        "The database refused the server's login this operation (its grants or URL are wrong):"
        " nothing happened"
    )
    status = 500


# --- Transient: the outcome is unknown or nothing happened; retry with the same key ----------


class Unavailable(LedgerError):
    code = "unavailable"
    title = "The ledger cannot take this request now; retry with the same key"
    status = 503


class Overloaded(Unavailable):
    code = "overloaded"
    title = "Too many commands are waiting; retry with the same key"
    status = 503


class Timeout(Unavailable):
    code = "timeout"
    title = "The command was not committed in time; its outcome is unknown, retry with the same key"
    status = 503


class ReplicaBehind(Unavailable):
    code = "replica_behind"
    title = "The replica has not replayed the position asked (min_position) yet; retry"
    status = 503


class NotReplicated(Unavailable):
    code = "not_replicated"
    title = "The primary has no synchronous standby now; writes are refused until it has; retry"
    status = 503


def all_error_classes() -> list[type[LedgerError]]:
    """Every error class, in the order they are declared (which is the order of checking)."""
    return [
        obj
        for obj in globals().values()
        if isinstance(obj, type) and issubclass(obj, LedgerError) and obj is not LedgerError
    ]


_ADVICE = {
    400: "Fix the request; do not resend it as is.",
    401: "Send `Authorization: Bearer lk_<id>_<secret>` with a valid, unexpired key.",
    403: "Use a key with the scope and ledger this needs (docs/security.md).",
    404: "Check the name or key.",
    408: "Send the whole request promptly (the connection is closed).",
    409: "The resource's state forbids it: read it, then decide.",
    413: "Split the request.",
    500: "Tell the operator (the server's database grants); retrying will not help until then.",
    415: "Send `Content-Type: application/json`.",
    422: "Fix the request; do not resend it as is.",
    429: "Wait `Retry-After` seconds, then resend (with the same Idempotency-Key).",
    431: "Send shorter headers and URL.",
    503: "Retry with the same Idempotency-Key (after Retry-After).",
}

_OTHERS = (
    (
        "invalid_json",
        422,
        "The body is not JSON, or JSON that means two things (a duplicate key,"
        " NaN or Infinity, nesting too deep)",
        "Send plain JSON.",
    ),
    ("not_found", 404, "No such route", "Check the path (the API is under `/v1`)."),
    ("method_not_allowed", 405, "The route exists with another method", "Check the method."),
    (
        "internal_error",
        500,
        "A bug; the outcome may be unknown",
        "Retry with the same Idempotency-Key, and report it.",
    ),
    ("not_ready", 503, "`/readyz` only: the database cannot be reached", "Wait."),
)


def render_markdown() -> str:
    """``docs/errors.md``: every code, grouped, in checking order (``python -m ledger.errors``)."""
    import inspect
    import re
    import sys

    source = inspect.getsource(sys.modules[__name__])
    heads = [(m.start(), m.group(1)) for m in re.finditer(r"^# --- (.+?) -+$", source, re.M)]
    lines = [
        "# Errors",
        "",
        "<!-- Generated: `python -m ledger.errors > docs/errors.md`; a test keeps it current -->",
        "",
        "Every refusal is `application/problem+json` (RFC 9457) with a stable `code`; in a batch,",
        'an item\'s error is `{"code", "detail"}`. **Within each group, codes are listed in the',
        "order they are checked**: a request that breaks several rules gets the first one listed.",
        "A refused request stores and changes nothing.",
        "",
        "4xx is a definite refusal: nothing happened, so fix the request rather than resend it.",
        "503 means the outcome may be unknown: **retry with the same Idempotency-Key**, which",
        "applies the command once or replays its first result. A lost database connection is",
        "never turned into a 4xx.",
    ]
    header = ["", "| code | HTTP | meaning | what to do |", "| --- | --- | --- | --- |"]
    group = None
    for cls in all_error_classes():
        at = source.index(f"class {cls.__name__}(")
        here = [title for start, title in heads if start < at][-1]
        if here != group:
            lines += ["", f"## {here}", *header]
            group = here
        lines.append(f"| `{cls.code}` | {cls.status} | {cls.title} | {_ADVICE[cls.status]} |")
    lines += ["", "## Outside the ledger's rules", *header]
    lines += [f"| `{c}` | {s} | {m} | {a} |" for c, s, m, a in _OTHERS]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
