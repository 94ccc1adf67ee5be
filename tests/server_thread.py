"""Test helpers: an aiohttp app served on 127.0.0.1 by an event loop in a thread of its own
(so synchronous or separate-loop clients can hammer it), and the reliability log."""

from __future__ import annotations

import asyncio
import json
import os
import threading

from aiohttp import web


class ServerThread:
    """``app`` on 127.0.0.1:<free port>; ``call(coro)`` runs a coroutine on the server's loop."""

    def __init__(self, app: web.Application):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self.ready.set()
        self.loop.run_forever()

    def start(self) -> "ServerThread":
        self.thread.start()
        assert self.ready.wait(10), "the server thread did not start"
        return self

    def call(self, coro, timeout_s: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def record_figure(test: str, **figures) -> None:
    """Append the figures a reliability test measured to $CASCADIA_RELIABILITY_LOG (JSON
    lines) when set; RELIABILITY.md is written from that file."""
    path = os.environ.get("CASCADIA_RELIABILITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, **figures}) + "\n")


def served_port(proc, lines: list[str], timeout_s: float = 120.0) -> int | None:
    """The port a `cascadia serve --port 0` subprocess (stdout piped, text) says it serves
    on, reading its output into ``lines`` until then; None if it exits or times out first."""
    import re
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        lines.append(line)
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return int(m.group(1))
    return None
