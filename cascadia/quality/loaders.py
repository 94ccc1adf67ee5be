"""Readers and a writer for quality-profile files.

Formats (``QUALITY_FORMATS``):

- ``long``: ``request_id, model, routing_score[, quality_score][, prompt]`` — the
  project's own format (shared/DESIGN.md). Without ``quality_score`` the routing score
  is the quality score. Other columns (e.g. ``input_tokens``) are ignored and named in
  the profile's notes.
- ``mtbench``: RouteLLM's MT-Bench judgements ``question_id, turn, category, model,
  score``; ``request_id = f"{question_id}-{turn}"``; scores on FastChat's 1–10 scale.
  A missing or negative score (FastChat writes -1 when it cannot parse the judge's
  rating) means "no judgement", never a score.
- ``wide``: an id column, then one score column per model. A column is metadata, not a
  model, when its name is in ``WIDE_METADATA_COLUMNS`` or ends with one of
  ``WIDE_METADATA_SUFFIXES`` (so ``prompt_chars`` of gsm8k_correctness.csv is metadata).

Common rules: a non-numeric score is a ``QualityFormatError`` naming file and line; an
empty score means "not judged". A request that lacks a score for some model cannot be
replayed, so it is dropped, counted in ``n_dropped``, named in ``notes`` and announced
with a warning. Model names are kept exactly as the source spells them. Columns are
ordered weakest first (ascending mean quality score, ties by first appearance): the
likely cascade order, but a caller with a cascade spec should ``restrict()`` to it.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from cascadia.jsonl import read_jsonl

from cascadia.quality.profile import QualityFormatError, QualityProfile

WIDE_METADATA_COLUMNS = frozenset(
    {"prompt", "prompt_chars", "prompt_tokens", "input_tokens", "output_tokens", "category", "turn"}
)
WIDE_METADATA_SUFFIXES = ("_chars", "_tokens", "_len", "_length")
MTBENCH_SCORE_RANGE = (1.0, 10.0)

_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "quality"
BUILTIN_PROFILES: dict[str, str] = {
    "mtbench": "mtbench_gpt4_judgements.csv",
    "gsm8k": "gsm8k_correctness.csv",
}
MTBENCH_QUESTIONS_FILE = "mtbench_questions.jsonl"


def builtin_profile_path(name: str) -> Path:
    """Path of a shipped profile by short name (``"mtbench"``, ``"gsm8k"``) or of the
    MT-Bench questions (``"mtbench-questions"``)."""
    if name == "mtbench-questions":
        return _DATA_DIR / MTBENCH_QUESTIONS_FILE
    if name not in BUILTIN_PROFILES:
        raise KeyError(
            f"no built-in quality profile {name!r}; available: {sorted(BUILTIN_PROFILES)}"
        )
    return _DATA_DIR / BUILTIN_PROFILES[name]


@dataclass
class _Scores:
    """(request, model) -> (routing, quality) as read, before the profile is assembled."""

    path: Path
    pairs: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    requests: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    models: dict[str, None] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, line: int, request_id: str, model: str, routing: float | None, quality: float | None) -> None:
        self.requests.setdefault(request_id, None)
        self.models.setdefault(model, None)
        if (request_id, model) in self.pairs:
            raise QualityFormatError(self.path, line, f"second score for request {request_id!r}, model {model!r}")
        if routing is not None and quality is not None:
            self.pairs[(request_id, model)] = (routing, quality)


def _score(text: str, column: str, path: Path, line: int) -> float | None:
    """A float, or None when the cell is empty or NaN (not judged)."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise QualityFormatError(path, line, f"{column} is not a number: {text!r}") from None
    if math.isnan(value):
        return None
    if math.isinf(value):
        raise QualityFormatError(path, line, f"{column} is infinite: {text!r}")
    return value


def _csv_rows(path: Path, required: Sequence[str]) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    fh = open(path, newline="", encoding="utf-8-sig")
    reader = csv.reader(fh)
    header = [name.strip() for name in next(reader, [])]
    if not header:
        fh.close()
        raise QualityFormatError(path, None, "file is empty (no header line)")
    missing = [c for c in required if c not in header]
    if missing:
        fh.close()
        raise QualityFormatError(path, 1, f"missing column(s) {missing}; the header has {header}")

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        with fh:
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise QualityFormatError(
                        path, reader.line_num, f"expected {len(header)} fields as in the header, got {len(row)}"
                    )
                yield reader.line_num, dict(zip(header, row))

    return header, rows()


def _read_long(path: Path) -> tuple[_Scores, tuple[float, float] | None]:
    scores = _Scores(path)
    header, rows = _csv_rows(path, ("request_id", "model", "routing_score"))
    has_quality = "quality_score" in header
    ignored = [c for c in header if c not in ("request_id", "model", "routing_score", "quality_score", "prompt")]
    if ignored:
        scores.notes.append(f"ignored columns {ignored}")
    for line, row in rows:
        request_id, model = row["request_id"].strip(), row["model"].strip()
        if not request_id or not model:
            raise QualityFormatError(path, line, "empty request_id or model")
        routing = _score(row["routing_score"], "routing_score", path, line)
        quality = _score(row["quality_score"], "quality_score", path, line) if has_quality else routing
        scores.add(line, request_id, model, routing, quality)
        if "prompt" in row:
            scores.prompts.setdefault(request_id, row["prompt"])
    return scores, None


def _read_mtbench(path: Path) -> tuple[_Scores, tuple[float, float] | None]:
    scores = _Scores(path)
    _, rows = _csv_rows(path, ("question_id", "turn", "model", "score"))
    unjudged = 0
    low, high = MTBENCH_SCORE_RANGE
    for line, row in rows:
        qid, turn, model = row["question_id"].strip(), row["turn"].strip(), row["model"].strip()
        if not qid or not turn or not model:
            raise QualityFormatError(path, line, "empty question_id, turn or model")
        value = _score(row["score"], "score", path, line)
        if value is not None and value < 0:
            value = None  # FastChat's -1: the judge's rating could not be parsed
        if value is None:
            unjudged += 1
        elif not low <= value <= high:
            raise QualityFormatError(path, line, f"score {value} is outside MT-Bench's {low:g}-{high:g} scale")
        scores.add(line, f"{qid}-{turn}", model, value, value)
    if unjudged:
        scores.notes.append(f"{unjudged} judgement rows had a missing or negative (failed) score")
    return scores, MTBENCH_SCORE_RANGE


def _is_wide_metadata(column: str) -> bool:
    return column in WIDE_METADATA_COLUMNS or column.endswith(WIDE_METADATA_SUFFIXES)


def _read_wide(path: Path) -> tuple[_Scores, tuple[float, float] | None]:
    scores = _Scores(path)
    header, rows = _csv_rows(path, ())
    id_column = header[0]
    model_columns = [c for c in header[1:] if not _is_wide_metadata(c)]
    if not model_columns:
        raise QualityFormatError(path, 1, f"no model score columns after the id column in {header}")
    metadata = [c for c in header[1:] if _is_wide_metadata(c)]
    if metadata:
        scores.notes.append(f"metadata columns (not models): {metadata}")
    for line, row in rows:
        request_id = row[id_column].strip()
        if not request_id:
            raise QualityFormatError(path, line, f"empty {id_column}")
        if request_id in scores.requests:
            raise QualityFormatError(path, line, f"second row for {id_column} {request_id!r}")
        for model in model_columns:
            value = _score(row[model], model, path, line)
            scores.add(line, request_id, model, value, value)
        if "prompt" in row:
            scores.prompts[request_id] = row["prompt"]
    return scores, None


_Reader = Callable[[Path], tuple[_Scores, "tuple[float, float] | None"]]
QUALITY_FORMATS: dict[str, _Reader] = {
    "long": _read_long,
    "mtbench": _read_mtbench,
    "wide": _read_wide,
}


def sniff_quality_format(path: str | Path) -> str:
    """Tell the format from the CSV header: long, mtbench, or otherwise wide."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = {name.strip() for name in next(csv.reader(fh), [])}
    if not header:
        raise QualityFormatError(path, None, "file is empty (no header line)")
    if {"request_id", "model", "routing_score"} <= header:
        return "long"
    if {"question_id", "turn", "model", "score"} <= header:
        return "mtbench"
    return "wide"


def _observed_range(*arrays: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([a.reshape(-1) for a in arrays])
    if np.all((values == 0.0) | (values == 1.0)):
        return (0.0, 1.0)  # binary correctness, even if one value never occurs
    return (float(values.min()), float(values.max()))


def load_quality(path: str | Path, fmt: str | None = None) -> QualityProfile:
    """Read a quality file (see the module docstring for formats and rules)."""
    path = Path(path)
    fmt = sniff_quality_format(path) if fmt is None else fmt
    if fmt not in QUALITY_FORMATS:
        raise ValueError(f"unknown quality format {fmt!r}; known: {sorted(QUALITY_FORMATS)}")
    scores, fixed_range = QUALITY_FORMATS[fmt](path)
    models = list(scores.models)
    complete = [r for r in scores.requests if all((r, m) in scores.pairs for m in models)]
    complete_set = set(complete)
    dropped = [r for r in scores.requests if r not in complete_set]
    if not complete:
        raise QualityFormatError(
            path, None, f"no request has a score for every model {models} ({len(dropped)} incomplete)"
        )
    if dropped:
        shown = ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        scores.notes.append(f"dropped {len(dropped)} request(s) lacking a score for some model: {shown}")
        warnings.warn(f"{path}: {scores.notes[-1]}", UserWarning, stacklevel=2)
    routing = np.array([[scores.pairs[(r, m)][0] for m in models] for r in complete])
    quality = np.array([[scores.pairs[(r, m)][1] for m in models] for r in complete])
    order = np.argsort(quality.mean(axis=0), kind="stable")
    models = [models[i] for i in order]
    routing, quality = routing[:, order], quality[:, order]
    has_prompts = bool(scores.prompts) and all(r in scores.prompts for r in complete)
    return QualityProfile(
        models=tuple(models),
        request_ids=tuple(complete),
        routing_scores=routing,
        quality_scores=quality,
        score_range=fixed_range or _observed_range(routing, quality),
        # A long file whose two columns agree everywhere (e.g. one we saved from a
        # single-score source) still has only one score.
        single_score=bool(np.array_equal(routing, quality)),
        source=f"{fmt}:{path.name}",
        n_dropped=len(dropped),
        notes=tuple(scores.notes),
        prompts=tuple(scores.prompts[r] for r in complete) if has_prompts else None,
    )


def save_quality_long(profile: QualityProfile, path: str | Path) -> None:
    """Write ``profile`` in the long format (plus a ``prompt`` column when it has prompts)."""
    rows = profile.to_long_rows()
    columns = ["request_id", "model", "routing_score", "quality_score"]
    if profile.prompts is not None:
        columns.append("prompt")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        # csv writes floats with repr(), so a load after a save gives the same numbers.
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def load_mtbench_prompts(path: str | Path | None = None) -> dict[str, str]:
    """``{"81-1": first-turn text, "81-2": second-turn text, ...}`` from FastChat's
    question.jsonl (the shipped copy by default), to pass to ``profile.with_prompts``.

    A second turn's text is the follow-up message alone; its conversation history is
    the first turn and the model's own first answer, which differ per model.
    """
    path = builtin_profile_path("mtbench-questions") if path is None else Path(path)
    prompts: dict[str, str] = {}
    for line, obj in read_jsonl(path, QualityFormatError):
        if not isinstance(obj, dict) or "question_id" not in obj or not isinstance(obj.get("turns"), list):
            raise QualityFormatError(path, line, "needs 'question_id' and a 'turns' list")
        for k, turn in enumerate(obj["turns"], start=1):
            prompts[f"{obj['question_id']}-{k}"] = str(turn)
    if not prompts:
        raise QualityFormatError(path, None, "file is empty")
    return prompts
