"""Readers for the public trace formats, one function per format behind one registry.

Every reader reports a bad record as ``TraceFormatError("<file>:<line>: <what>")`` rather
than skipping it: a silently shortened trace would make every latency number built on it
wrong without anyone noticing. The only records left out on purpose are those with 0
input or 0 output tokens (BurstGPT writes failed requests that way); they are counted in
``Trace.n_dropped``, described in ``Trace.notes`` and announced with a warning.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from cascadia.jsonl import read_jsonl

from cascadia.traces.trace import Trace, TraceFormatError, poisson_arrivals, scale_rate

# ShareGPT has no token counts. ~4 characters per token is the usual rule of thumb for
# English text under GPT-style BPE tokenizers; we round up and never go below 1.
SHAREGPT_CHARS_PER_TOKEN = 4.0
SHAREGPT_DEFAULT_RATE_RPS = 1.0
# Mooncake's published traces hash every 512-token block of the prompt.
MOONCAKE_BLOCK_TOKENS = 512

_SHAREGPT_HUMAN = frozenset({"human", "user"})
_SHAREGPT_ASSISTANT = frozenset({"gpt", "chatgpt", "assistant", "bard", "model"})


@dataclass
class _Records:
    """Requests as they are read, before they become an immutable Trace."""

    path: Path
    times_s: list[float] = field(default_factory=list)
    input_tokens: list[int] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    prompts: list[str] | None = None
    hash_ids: list[tuple[int, ...]] | None = None
    dropped_lines: list[int] = field(default_factory=list)

    def keep(self, line: int, time_s: float, n_in: int, n_out: int) -> bool:
        """Record one request unless it carries no tokens; return whether it was kept."""
        if n_in == 0 or n_out == 0:
            self.dropped_lines.append(line)
            return False
        self.times_s.append(time_s)
        self.input_tokens.append(n_in)
        self.output_tokens.append(n_out)
        return True


def _token_count(text: str, column: str, path: Path, line: int) -> int:
    try:
        value = int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            raise TraceFormatError(path, line, f"{column} is not a number: {text!r}") from None
        if not as_float.is_integer():
            raise TraceFormatError(path, line, f"{column} is not a whole number: {text!r}")
        value = int(as_float)
    if value < 0:
        raise TraceFormatError(path, line, f"{column} is negative: {text!r}")
    return value


def _seconds(text: str, column: str, path: Path, line: int, scale: float = 1.0) -> float:
    try:
        value = float(text) * scale
    except (TypeError, ValueError):
        raise TraceFormatError(path, line, f"{column} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise TraceFormatError(path, line, f"{column} is not finite: {text!r}")
    return value


def _csv_rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, values of ``columns``) for each data row; blank lines are skipped."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise TraceFormatError(path, None, "file is empty (no header line)")
        header = [name.strip() for name in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise TraceFormatError(path, 1, f"missing column(s) {missing}; the header has {header}")
        picks = [header.index(c) for c in columns]
        width = len(header)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != width:
                raise TraceFormatError(
                    path, reader.line_num, f"expected {width} fields as in the header, got {len(row)}"
                )
            yield reader.line_num, [row[i].strip() for i in picks]


def _azure_timestamp(text: str, path: Path, line: int, days: dict[str, int]) -> tuple[int, float]:
    """(day ordinal, seconds into that day) of ``2023-11-16 18:15:46.6805900``.

    datetime cannot parse 7 fractional digits on every supported Python, and splitting
    into day + seconds keeps sub-microsecond precision that one epoch float would lose.
    """
    try:
        date_text, time_text = text.replace("T", " ").split(" ", 1)
        offset_s = 0.0
        if time_text.endswith("Z"):
            time_text = time_text[:-1]
        for sign, mark in ((1.0, "+"), (-1.0, "-")):
            if mark in time_text:
                time_text, zone = time_text.split(mark, 1)
                zone_h, _, zone_m = zone.partition(":")
                offset_s = sign * (int(zone_h) * 3600 + int(zone_m or 0) * 60)
        day = days.get(date_text)
        if day is None:
            day = days[date_text] = dt.date.fromisoformat(date_text).toordinal()
        hours, minutes, secs = time_text.split(":")
        of_day = int(hours) * 3600 + int(minutes) * 60 + float(secs) - offset_s
    except ValueError:
        raise TraceFormatError(
            path, line, f"TIMESTAMP is not 'YYYY-MM-DD HH:MM:SS.fffffff': {text!r}"
        ) from None
    return day, of_day


def _load_azure(path: Path) -> _Records:
    records = _Records(path)
    day_cache: dict[str, int] = {}
    origin: tuple[int, float] | None = None
    for line, (stamp, context, generated) in _csv_rows(
        path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
    ):
        day, of_day = _azure_timestamp(stamp, path, line, day_cache)
        if origin is None:
            origin = (day, of_day)
        # Subtract day and seconds separately: small numbers keep the 100 ns digits.
        time_s = (day - origin[0]) * 86400.0 + (of_day - origin[1])
        n_in = _token_count(context, "ContextTokens", path, line)
        n_out = _token_count(generated, "GeneratedTokens", path, line)
        records.keep(line, time_s, n_in, n_out)
    return records


def _load_burstgpt(path: Path) -> _Records:
    records = _Records(path)
    for line, (stamp, request, response) in _csv_rows(
        path, ("Timestamp", "Request tokens", "Response tokens")
    ):
        time_s = _seconds(stamp, "Timestamp", path, line)
        n_in = _token_count(request, "Request tokens", path, line)
        n_out = _token_count(response, "Response tokens", path, line)
        records.keep(line, time_s, n_in, n_out)
    return records


def _json_field(obj: dict, key: str, path: Path, line: int) -> Any:
    if key not in obj:
        raise TraceFormatError(path, line, f"missing field {key!r}")
    return obj[key]


def _load_mooncake(path: Path) -> _Records:
    records = _Records(path)
    hashes: list[tuple[int, ...]] = []
    has_hashes: bool | None = None
    for line, obj in read_jsonl(path, TraceFormatError):
        if not isinstance(obj, dict):
            raise TraceFormatError(path, line, f"expected a JSON object, got {type(obj).__name__}")
        time_s = _seconds(_json_field(obj, "timestamp", path, line), "timestamp", path, line, 1e-3)
        n_in = _token_count(str(_json_field(obj, "input_length", path, line)), "input_length", path, line)
        n_out = _token_count(str(_json_field(obj, "output_length", path, line)), "output_length", path, line)
        line_has = "hash_ids" in obj
        if has_hashes is None:
            has_hashes = line_has
        elif line_has != has_hashes:
            raise TraceFormatError(path, line, "hash_ids must be on every line or on none")
        block = ()
        if line_has:
            raw = obj["hash_ids"]
            if not isinstance(raw, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in raw
            ):
                raise TraceFormatError(path, line, "hash_ids is not a list of integers")
            block = tuple(raw)
        if records.keep(line, time_s, n_in, n_out):
            hashes.append(block)
    if has_hashes is None:
        raise TraceFormatError(path, None, "file is empty (no JSON lines)")
    if has_hashes:
        records.hash_ids = hashes
    return records


def _approx_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / SHAREGPT_CHARS_PER_TOKEN))


def _sharegpt_conversations(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line where it starts, conversation) for each element of the top-level array.

    Decoding element by element (instead of json.load) is what lets a structural
    error name the line of the conversation it is in.
    """
    text = path.read_text(encoding="utf-8-sig")
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip_space(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_space(0)
    if pos == len(text):
        raise TraceFormatError(path, None, "file is empty")
    if text[pos] != "[":
        raise TraceFormatError(path, line_of(pos), "expected a JSON array of conversations")
    pos = skip_space(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise TraceFormatError(path, err.lineno, f"bad JSON: {err.msg}") from None
        yield line_of(pos), item
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            return
        else:
            raise TraceFormatError(path, line_of(min(pos, len(text) - 1)), "bad JSON: expected ',' or ']'")


def _load_sharegpt(path: Path) -> _Records:
    """One request per human turn that a gpt turn answers; prompt = the human text only."""
    records = _Records(path, prompts=[])
    unanswered: list[int] = []
    for line, conv in _sharegpt_conversations(path):
        if not isinstance(conv, dict) or not isinstance(conv.get("conversations"), list):
            raise TraceFormatError(path, line, "conversation has no 'conversations' list")
        turns = conv["conversations"]
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(
                turn.get("value"), str
            ):
                raise TraceFormatError(
                    path, line, f"turn {k} of conversation {conv.get('id')!r} needs string 'from' and 'value'"
                )
        for k, turn in enumerate(turns):
            if turn["from"].lower() not in _SHAREGPT_HUMAN:
                continue
            answer = turns[k + 1] if k + 1 < len(turns) else None
            if answer is None or answer["from"].lower() not in _SHAREGPT_ASSISTANT:
                unanswered.append(line)
                continue
            records.keep(line, 0.0, _approx_tokens(turn["value"]), _approx_tokens(answer["value"]))
            records.prompts.append(turn["value"])
    # Human turns without an answer have no output length; count them like other drops.
    records.dropped_lines.extend(unanswered)
    return records


_Loader = Callable[[Path], _Records]

# name -> (reader, whether the source has its own timestamps). Filled explicitly.
TRACE_FORMATS: dict[str, tuple[_Loader, bool]] = {
    "azure": (_load_azure, True),
    "burstgpt": (_load_burstgpt, True),
    "mooncake": (_load_mooncake, True),
    "sharegpt": (_load_sharegpt, False),
}


def sniff_trace_format(path: str | Path) -> str:
    """Guess the format from the extension (.jsonl, .json) or, for CSV, the header."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "mooncake"
    if suffix == ".json":
        return "sharegpt"
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = [name.strip() for name in next(csv.reader(fh), [])]
    if not header:
        raise TraceFormatError(path, None, "file is empty")
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= set(header):
        return "azure"
    if {"Timestamp", "Request tokens", "Response tokens"} <= set(header):
        return "burstgpt"
    raise TraceFormatError(
        path, 1, f"cannot tell the trace format from header {header}; pass fmt= one of {sorted(TRACE_FORMATS)}"
    )


def load_trace(
    path: str | Path, fmt: str | None = None, *, seed: int = 0, rate_rps: float | None = None
) -> Trace:
    """Read a trace file into a :class:`Trace` named after the file.

    ``fmt`` is one of ``TRACE_FORMATS`` or None to sniff it. Sources without timestamps
    (ShareGPT) get Poisson arrivals at ``rate_rps`` (default 1 req/s) drawn with ``seed``;
    for sources with timestamps a given ``rate_rps`` rescales the clock to that mean rate.
    """
    path = Path(path)
    fmt = sniff_trace_format(path) if fmt is None else fmt
    if fmt not in TRACE_FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; known: {sorted(TRACE_FORMATS)}")
    reader, timestamped = TRACE_FORMATS[fmt]
    records = reader(path)
    n = len(records.input_tokens)
    dropped = len(records.dropped_lines)
    if n == 0:
        extra = f" ({dropped} records had 0 tokens)" if dropped else ""
        raise TraceFormatError(path, None, f"no requests in the file{extra}")
    notes: list[str] = []
    if dropped:
        shown = ", ".join(str(x) for x in records.dropped_lines[:5])
        more = ", ..." if dropped > 5 else ""
        what = (
            "human turns with no assistant answer after them"
            if fmt == "sharegpt"
            else "records with 0 input or 0 output tokens (failed requests)"
        )
        notes.append(f"dropped {dropped} {what}; lines {shown}{more}")
        warnings.warn(f"{path}: {notes[-1]}", UserWarning, stacklevel=2)
    if timestamped:
        times = np.asarray(records.times_s, dtype=np.float64)
        order = np.argsort(times, kind="stable")
        if np.any(order != np.arange(n)):
            # Out-of-order rows are still real requests: sort them rather than fail.
            notes.append("rows were not in time order; sorted by timestamp")
        arrival = times[order] - times[order[0]]
    else:
        order = np.arange(n)
        rate = SHAREGPT_DEFAULT_RATE_RPS if rate_rps is None else rate_rps
        arrival = poisson_arrivals(n, rate, seed)
        notes.append(
            f"arrivals synthesised: Poisson at {rate} req/s, seed {seed}; token counts "
            f"approximated as ceil(chars / {SHAREGPT_CHARS_PER_TOKEN:g}), min 1"
        )
    trace = Trace(
        name=path.stem,
        arrival_s=arrival,
        input_tokens=np.asarray(records.input_tokens, dtype=np.int64)[order],
        output_tokens=np.asarray(records.output_tokens, dtype=np.int64)[order],
        prompts=None if records.prompts is None else tuple(records.prompts[i] for i in order),
        hash_ids=None if records.hash_ids is None else tuple(records.hash_ids[i] for i in order),
        hash_block_tokens=MOONCAKE_BLOCK_TOKENS,
        n_dropped=dropped,
        notes=tuple(notes),
    )
    if timestamped and rate_rps is not None:
        trace = scale_rate(trace, rate_rps)
    return trace
