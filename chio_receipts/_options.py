"""Flags shared by several commands, declared once.

:func:`option_group` makes a decorator that replaces a command's ``<name>: <Settings>`` parameter by
a set of typer options, and builds the settings object from them when the command runs. The Kafka
and Temporal connection flags are two such groups. ``MetricsPort`` and ``MetricsHost`` are the
Prometheus endpoint of every long-running service. ``SidecarTokenOption`` is the secret of the
sidecar credential a client command calls with.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import typer

__all__ = [
    "DEFAULT_METRICS_HOST",
    "MetricsHost",
    "MetricsPort",
    "SidecarTokenOption",
    "option_group",
]

F = TypeVar("F", bound=Callable[..., Any])


def option_group(
    name: str, options: Mapping[str, tuple[Any, Any]], build: Callable[[dict[str, Any]], Any]
) -> Callable[[F], F]:
    """A decorator giving a command the flags ``options`` (parameter name: (hint, default)); the
    command receives ``build(values)`` as its keyword argument ``name``."""

    def decorate(fn: F) -> F:
        # eval_str: under ``from __future__ import annotations`` the command's own Annotated
        # options are strings, and typer reads the explicit signature below as it is.
        signature = inspect.signature(fn, eval_str=True)
        kept = [p for p in signature.parameters.values() if p.name != name]
        added = [
            inspect.Parameter(
                option, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint
            )
            for option, (hint, default) in options.items()
        ]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {option: kwargs.pop(option) for option in options}
            return fn(*args, **{name: build(values)}, **kwargs)

        command.__signature__ = signature.replace(parameters=kept + added)  # type: ignore[attr-defined]
        return command  # type: ignore[return-value]

    return decorate


MetricsPort = Annotated[
    int | None,
    typer.Option(envvar="CHIO_METRICS_PORT", help="Serve Prometheus metrics on this port."),
]
MetricsHost = Annotated[
    str,
    typer.Option(
        envvar="CHIO_METRICS_HOST",
        help="Address the metrics server binds (loopback unless configured).",
    ),
]
DEFAULT_METRICS_HOST = "127.0.0.1"

SidecarTokenOption = Annotated[
    str | None,
    typer.Option(
        "--sidecar-token",
        envvar="CHIO_SIDECAR_TOKEN",
        help="Secret of the sidecar credential to call with, sent as a bearer token and never "
        "printed (CHIO_SIDECAR_TOKEN; made by 'sidecar credential add').",
        show_default=False,
    ),
]
