"""OpenTelemetry traces: off unless an exporter is configured, and then one trace per request.

A transfer's trace (the request's, continued from a W3C ``traceparent`` header if it came with
one) holds the HTTP server span (FastAPI's own instrumentation, given our provider), then
``ledger.queue_wait`` (from the writer's queue until its group is taken), then
``ledger.write`` (its part in the group, linked to the group's span) with ``ledger.commit``
under it (the group's COMMIT, which it shares). The group's span, ``ledger.group``, is shared
by the requests it serves: a child of the first (sampled) one, linked to and from every one;
it holds the transaction: ``ledger.load`` (the head lock and every read, pipelined: one round
trip), ``ledger.decide`` (the rules, no I/O), ``ledger.append`` (the set-based inserts),
``db.commit``. A request whose trace is not sampled (``OTEL_TRACES_SAMPLER``) makes none of
these, and a group none of whose requests is sampled makes none either.

Configured from the standard environment variables, read once, by :func:`from_environment`:

- ``OTEL_TRACES_EXPORTER``: ``otlp`` (needs the ``otlp`` extra: ``pip install 'ledger[otlp]'``),
  ``console`` (spans as JSON on stderr), or ``none``; unset, tracing is on only if
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (OTLP).
- ``OTEL_SERVICE_NAME`` (``ledger``), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
  ``OTEL_BSP_*``: read by the OpenTelemetry SDK itself. ``OTEL_SDK_DISABLED=true`` turns it off.

Off, nothing here makes a span object: every helper checks one module global first and returns
a shared no-op (measured in bench/tracing_overhead.py, docs/performance.md "Tracing overhead").
The provider is ours, not the global one, so that tests can swap exporters in one process.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace

from ledger.settings import SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

TRACER: trace.Tracer | None = None
"""The ledger's tracer; None when tracing is off (the one check on the hot path)."""
_provider: TracerProvider | None = None
_NULL = contextlib.nullcontext()
_LINKS_MAX = 128
"""Links from a group's span to the requests it serves (the SDK's default limit)."""


class ConfigurationError(SettingsError):
    """An OTEL_* variable that cannot be honoured (one line, as a bad setting is)."""


def enabled() -> bool:
    return TRACER is not None


def provider() -> TracerProvider | None:
    return _provider


def configure(exporter: SpanExporter, *, batch: bool = True) -> None:
    """Turns tracing on with ``exporter`` (batched, off the request path; ``batch=False``
    exports each span as it ends, for tests)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    global TRACER, _provider
    shutdown()
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME") or "ledger"}
    )
    made = TracerProvider(resource=resource, shutdown_on_exit=True)
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    made.add_span_processor(processor)
    _provider = made
    TRACER = made.get_tracer("ledger")


def shutdown() -> None:
    """Flushes and turns tracing off."""
    global TRACER, _provider
    if _provider is not None:
        _provider.shutdown()
    TRACER, _provider = None, None


def from_environment(environ: Mapping[str, str] | None = None) -> bool:
    """Configures tracing from the OTEL_* variables unless already on; True if it is on."""
    if TRACER is not None:
        return True
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    chosen = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not chosen:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        chosen = "otlp" if endpoint else "none"
    if chosen == "none":
        return False
    configure(_exporter(chosen))
    return True


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)  # stdout is the commands' data
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError:
            raise ConfigurationError(
                "OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: pip install 'ledger[otlp]'"
            ) from None
        exporter: SpanExporter = OTLPSpanExporter()  # endpoint, headers: OTEL_EXPORTER_OTLP_*
        return exporter
    raise ConfigurationError(
        f"OTEL_TRACES_EXPORTER={name!r} is not supported; use otlp, console or none"
    )


# --- Spans for the write path ------------------------------------------------------------------


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A child of the current span if that one is recorded; else (tracing off, or a trace not
    sampled) a shared no-op. Never a root: the write path's spans belong to a group."""
    if TRACER is None or not trace.get_current_span().is_recording():
        return _NULL
    return TRACER.start_as_current_span(name, attributes=attributes)


@dataclass(slots=True)
class Queued:
    """A unit of work waiting in a writer's queue: the request's context and the wait."""

    parent: otel_context.Context
    wait: trace.Span


def queued(commands: int) -> Queued | None:
    """Starts the queue wait under the current span (the request's); None when off, or when
    the request's trace is not sampled (OTEL_TRACES_SAMPLER): then nothing is made for it."""
    if TRACER is None:
        return None
    current = trace.get_current_span().get_span_context()
    if current.is_valid and not current.trace_flags.sampled:
        return None
    parent = otel_context.get_current()
    wait = TRACER.start_span(
        "ledger.queue_wait", context=parent, attributes={"ledger.commands": commands}
    )
    return Queued(parent, wait)


class _Traced(Protocol):
    @property
    def trace(self) -> Queued | None: ...


@dataclass(slots=True)
class _Group:
    span: trace.Span
    members: list[trace.Span]
    commit: list[trace.Span] = field(default_factory=list)


_GROUP: ContextVar[_Group | None] = ContextVar("ledger_trace_group", default=None)


def group(
    ledger: str, units: Sequence[_Traced], commands: int
) -> contextlib.AbstractContextManager[Any]:
    """The group's span, current while its transaction runs; each unit's wait ends here and its
    ``ledger.write`` span starts. A shared no-op when tracing is off."""
    if TRACER is None:
        return _NULL
    return _group(TRACER, ledger, units, commands)


@contextlib.contextmanager
def _group(
    tracer: trace.Tracer, ledger: str, units: Sequence[_Traced], commands: int
) -> Iterator[None]:
    waiting = [u.trace for u in units if u.trace is not None]
    queued_units = [q for q in waiting if q.wait.is_recording()]  # sampled
    for q in waiting:
        q.wait.end()
    if not queued_units:  # no request of the group is sampled: nothing to record
        yield
        return
    attributes: dict[str, str | int] = {
        "ledger.name": ledger,
        "ledger.commands": commands,
        "ledger.units": len(units),
    }
    # Under the first request it serves (so that it is sampled with it), linked to every one
    top = tracer.start_span(
        "ledger.group",
        context=queued_units[0].parent,
        attributes=attributes,
        links=[trace.Link(q.wait.get_span_context()) for q in queued_units[:_LINKS_MAX]],
    )
    shared = [trace.Link(top.get_span_context())]
    members = [
        tracer.start_span("ledger.write", context=q.parent, attributes=attributes, links=shared)
        for q in queued_units
    ]
    state = _Group(top, members)
    token = _GROUP.set(state)
    failure: BaseException | None = None
    try:
        with trace.use_span(top, end_on_exit=False):
            yield
    except BaseException as exc:
        failure = exc
        raise
    finally:
        _GROUP.reset(token)
        commit = state.commit[-1] if state.commit else None
        start = getattr(commit, "start_time", None)
        end = getattr(commit, "end_time", None)
        for member in members:
            if start is not None and end is not None:
                # The commit this request shares, in its own trace.
                tracer.start_span(
                    "ledger.commit",
                    context=trace.set_span_in_context(member),
                    start_time=start,
                    links=[trace.Link(commit.get_span_context())] if commit else (),
                ).end(end_time=end)
            if failure is not None:
                member.record_exception(failure)
                member.set_status(trace.StatusCode.ERROR, type(failure).__name__)
            member.end()
        if failure is not None:
            top.record_exception(failure)
            top.set_status(trace.StatusCode.ERROR, type(failure).__name__)
        top.end()


def commit_started() -> trace.Span | None:
    """The ``db.commit`` span (ended by :func:`commit_ended`); None when off or not sampled."""
    if TRACER is None or not trace.get_current_span().is_recording():
        return None
    commit = TRACER.start_span("db.commit", attributes={"db.system.name": "postgresql"})
    state = _GROUP.get()
    if state is not None:
        state.commit.append(commit)
    return commit


def commit_ended(commit: trace.Span | None) -> None:
    if commit is not None:
        commit.end()


# --- Logs ---------------------------------------------------------------------------------------


def add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: ``trace_id`` and ``span_id`` on each line logged inside a span."""
    if TRACER is None:
        return event
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event
