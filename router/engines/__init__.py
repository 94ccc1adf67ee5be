"""Engine implementations of `router.protocol.Engine`, by kind.

`ENGINE_KINDS` names each kind's module and its start-up entry; modules are imported only
when a kind is used, so choosing `sim` never imports Ray or vLLM.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

ENGINE_KINDS: dict[str, tuple[str, str]] = {
    "vllm": ("router.engines.vllm_ray", "start_vllm_engine"),  # async: (name, settings, ...) -> RayEngine
    "sim": ("router.engines.sim", "SimulatedEngine"),  # (name, iteration_model, config, kv_blocks, ...)
    "openai": ("router.engines.openai_http", "OpenAIEngine"),  # (name, base_url, model, *, api_key, ...)
}


def engine_factory(kind: str) -> Callable[..., Any]:
    """The constructor (sim) or async starter (vllm) of an engine kind."""
    if kind not in ENGINE_KINDS:
        raise KeyError(f"unknown engine kind {kind!r}; known: {sorted(ENGINE_KINDS)}")
    module, attr = ENGINE_KINDS[kind]
    return getattr(importlib.import_module(module), attr)
