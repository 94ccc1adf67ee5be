"""API keys and per-request limits for the OpenAI-compatible server.

Keys come from ``--api-key KEY`` (repeatable), the ``CASCADIA_API_KEYS`` environment
variable (comma-separated) and ``--api-key-file FILE`` (one key per line, ``#`` comments).
With no key configured the server is open, as vLLM's is.

A request carries its key as ``Authorization: Bearer KEY`` (the header OpenAI clients
send). The check compares the presented key with *every* configured key with
``hmac.compare_digest`` and only then looks at the result, so neither the position of a
matching key nor the length of a common prefix shows in the response time. ``/health``,
``/health/live``, ``/health/ready`` and ``/openapi.json`` stay open (load balancers,
orchestrators, client generators);
``/metrics`` is open unless the server is started with ``--protect-metrics``.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

KEYS_ENV = "CASCADIA_API_KEYS"
OPEN_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/openapi.json"})


class KeyConfigError(ValueError):
    """A key source is unusable; the message says which and why (one line)."""


def load_keys(flag_keys: Sequence[str] = (), key_file: str | None = None,
              environ: dict | None = None) -> tuple[str, ...]:
    """Every configured key, from flags, the environment and a file, without duplicates."""
    env = os.environ if environ is None else environ
    keys: list[str] = [k.strip() for k in flag_keys]
    keys += [k.strip() for k in env.get(KEYS_ENV, "").split(",") if k.strip()]
    if key_file:
        try:
            text = Path(key_file).read_text()
        except OSError as e:
            raise KeyConfigError(f"--api-key-file {key_file}: {e.strerror or e}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    for k in keys:
        if not k:
            raise KeyConfigError("--api-key: an empty key would let anyone in")
        if any(ch.isspace() for ch in k) or not k.isprintable():
            raise KeyConfigError("--api-key: keys may not contain whitespace or control characters")
    return tuple(dict.fromkeys(keys))


def bearer_token(authorization: str | None) -> str | None:
    """The key in an ``Authorization: Bearer KEY`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(presented: str | None, keys: Iterable[str]) -> bool:
    """Constant-time membership: every key is compared, whatever matched first."""
    candidate = (presented or "").encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.encode("utf-8"))
    return matched and bool(presented)  # an empty key never matches, even if one were configured


@dataclass(frozen=True)
class AccessPolicy:
    """Who may call what, and how much one request may ask for."""

    api_keys: tuple[str, ...] = ()
    protect_metrics: bool = False
    max_tokens_limit: int | None = None  # a request may not ask for more output tokens

    def needs_key(self, path: str) -> bool:
        if not self.api_keys or path in OPEN_PATHS:
            return False
        return self.protect_metrics or path != "/metrics"

    def allows(self, path: str, authorization: str | None) -> bool:
        return not self.needs_key(path) or key_matches(bearer_token(authorization), self.api_keys)
