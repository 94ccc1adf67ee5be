"""Workload traces: arrival times and token counts of requests, and how to reshape them."""

from cascadia.traces.builtin import BUILTIN_TRACES, builtin_trace_path
from cascadia.traces.loaders import TRACE_FORMATS, load_trace, sniff_trace_format
from cascadia.traces.trace import (
    Trace,
    TraceFormatError,
    TraceSummary,
    poisson_arrivals,
    scale_lengths,
    scale_rate,
    scale_time,
    summarize,
    window,
)

__all__ = [
    "BUILTIN_TRACES",
    "TRACE_FORMATS",
    "Trace",
    "TraceFormatError",
    "TraceSummary",
    "builtin_trace_path",
    "load_trace",
    "poisson_arrivals",
    "scale_lengths",
    "scale_rate",
    "scale_time",
    "sniff_trace_format",
    "summarize",
    "window",
]
