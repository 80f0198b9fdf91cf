"""The current OpenTelemetry span's ids, when the worker traces (optional dependency).

With ``temporalio.contrib.opentelemetry.TracingInterceptor`` placed before the Chio interceptor
in the worker's interceptor list, the attempt runs inside the ``RunActivity`` span; its trace id
(32 lowercase hex) and span id (16 lowercase hex) go into the step's receipt and its outcome.
Without ``opentelemetry-api`` installed (the ``otel`` extra), or outside a recording span, both
are empty.
"""

from __future__ import annotations

from typing import Any

__all__ = ["current_trace_ids"]

_get_current_span: Any
try:
    from opentelemetry.trace import get_current_span as _get_current_span
except ImportError:  # installs without the otel extra
    _get_current_span = None

_NONE = ("", "")


def current_trace_ids() -> tuple[str, str]:
    """``(trace_id, span_id)`` of the current span as W3C hex, or ``("", "")``."""
    if _get_current_span is None:
        return _NONE
    context = _get_current_span().get_span_context()
    if not context.is_valid:
        return _NONE
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
