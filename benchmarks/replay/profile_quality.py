"""`cascadia profile-quality`: a quality profile of a served cascade's own members, judged
by the server's own judge, in the planner's long format.

Every prompt goes to every member model (the entries of ``/v1/models`` that name the
cascade as their ``parent``) as a non-streaming chat request with
``cascade: {"judge_answer": true}``; the server answers with ``cascade.answer_score``, the
configured judge's score of that answer. Routing and quality score are that one number
(the profile's ``single_score``). A request that failed, or whose judge failed, is
written with empty scores: the profile loader drops it and says so, never silently.
"""

from __future__ import annotations

import asyncio
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import aiohttp

from benchmarks.replay.client import Unreachable, base_url, served_models

COLUMNS = ("request_id", "model", "routing_score", "quality_score", "prompt")


@dataclass(frozen=True)
class Judged:
    request_id: str
    model: str
    prompt: str
    score: float | None  # None: the request or its judge failed
    error: str | None = None


def cascade_members(models: Sequence[dict]) -> tuple[str, list[str], dict | None]:
    """(cascade name, member names in stage order, judge info) from /v1/models' data."""
    cascades = [m for m in models if isinstance(m, dict) and isinstance(m.get("cascade"), dict)]
    if not cascades:
        raise Unreachable("the server lists no cascade in /v1/models (is it a Cascadia server?)")
    name = str(cascades[0]["id"])
    members = [str(m["id"]) for m in models if isinstance(m, dict) and m.get("parent") == name]
    stages = [s.get("name") for s in cascades[0]["cascade"].get("stages", [])]
    members.sort(key=lambda m: stages.index(m) if m in stages else len(stages))
    return name, members, cascades[0]["cascade"].get("judge")


async def judge_one(session: aiohttp.ClientSession, url: str, model: str, request_id: str, prompt: str,
                    max_tokens: int, temperature: float, timeout_s: float) -> Judged:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": temperature, "cascade": {"judge_answer": True}}
    try:
        async with session.post(base_url(url) + "/v1/chat/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            doc = await r.json(content_type=None)
            if r.status != 200:
                message = (doc.get("error") or {}).get("message") if isinstance(doc, dict) else None
                return Judged(request_id, model, prompt, None, f"HTTP {r.status}: {message or doc}"[:300])
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        return Judged(request_id, model, prompt, None, f"{type(e).__name__}: {e}"[:300])
    score = (doc.get("cascade") or {}).get("answer_score") if isinstance(doc, dict) else None
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
        why = "the judge failed" if isinstance(doc, dict) and "answer_score" in (doc.get("cascade") or {}) \
            else "the server returned no cascade.answer_score (does it support judge_answer?)"
        return Judged(request_id, model, prompt, None, why)
    return Judged(request_id, model, prompt, float(score))


async def profile(url: str, members: Sequence[str], prompts: dict[str, str], *, max_tokens: int,
                  temperature: float, concurrency: int, timeout_s: float = 600.0, progress=None) -> list[Judged]:
    """Every (prompt, member) pair judged, request-major in the prompts' order."""
    slots = asyncio.Semaphore(concurrency)

    async def one(session, rid, text, model):
        async with slots:
            out = await judge_one(session, url, model, rid, text, max_tokens, temperature, timeout_s)
        if progress is not None:
            progress.update(1)
        return out

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        return list(await asyncio.gather(*(one(session, rid, text, m) for rid, text in prompts.items()
                                            for m in members)))


def write_profile(rows: Sequence[Judged], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for j in rows:
            score = "" if j.score is None else repr(j.score)
            writer.writerow([j.request_id, j.model, score, score, j.prompt])


def profile_quality_main(args) -> int:
    from benchmarks.replay.prompts import BUILTIN_PROMPTS, load_prompt_file
    from cascadia.cli import UsageError
    from cascadia.errors import FileFormatError

    for flag, value in (("--max-tokens", args.max_tokens), ("--concurrency", args.concurrency)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    if not 0.0 <= args.temperature <= 2.0:
        raise UsageError("--temperature must be in [0, 2]")
    if args.prompts not in BUILTIN_PROMPTS and not Path(args.prompts).is_file():
        raise UsageError(f"--prompts: no such file: {args.prompts}")
    try:
        prompts = load_prompt_file(args.prompts)
    except FileFormatError as e:
        raise UsageError(f"--prompts: {e}") from None
    prompts = dict(list(prompts.items())[: args.limit])

    async def models():
        async with aiohttp.ClientSession() as session:
            return await served_models(session, args.url)

    try:
        cascade, members, judge = cascade_members(asyncio.run(models()))
    except Unreachable as e:
        raise UsageError(str(e)) from None
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in members]
        if unknown:
            raise UsageError(f"--models: {unknown} are not members of {cascade!r}; members: {members}")
        members = wanted
    if not members:
        raise UsageError(f"{args.url} lists no member models of {cascade!r}")
    judge_name = (judge or {}).get("name", "unknown")
    print(f"profiling {len(prompts)} prompts x {len(members)} members of {cascade!r} ({', '.join(members)}) with "
          f"the server's {judge_name!r} judge", file=sys.stderr)
    from tqdm import tqdm

    with tqdm(total=len(prompts) * len(members), unit="answer", file=sys.stderr, disable=args.no_progress) as bar:
        rows = asyncio.run(profile(args.url, members, prompts, max_tokens=args.max_tokens,
                                   temperature=args.temperature, concurrency=args.concurrency, progress=bar))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_profile(rows, args.out)
    failed = [j for j in rows if j.score is None]
    for m in members:
        scores = [j.score for j in rows if j.model == m and j.score is not None]
        mean = sum(scores) / len(scores) if scores else float("nan")
        print(f"  {m}: mean {judge_name} score {mean:.2f} over {len(scores)} answers")
    print(f"wrote {args.out}: {len(rows)} rows, {len(failed)} without a score"
          + (f" (e.g. {failed[0].error})" if failed else ""))
    return 0 if len(failed) < len(rows) else 1
