"""The model's own tokenizer in the router process, so a vLLM stage's chat template and token
counts need no round trip to its engine actor.

`RayEngine` asks its actor for both before every request unless the model directory is on
this machine too (the usual single-host case, and any cluster with shared storage). Then
the tokenizer is loaded here once, on first use, from the same directory vLLM loaded
(transformers' AutoTokenizer, which is also what vLLM uses for Hugging Face tokenizers), in
a worker thread so the event loop keeps serving meanwhile. A directory that is not here,
or a tokenizer that does not load, means "ask the actor" for good; that is decided once.

The rendering must equal the engine's own: `apply_chat_template(..., tokenize=False,
add_generation_prompt=True)` and `len(encode(text))` with the tokenizer's default special
tokens, exactly as `cascadia.vllm_adapter.AsyncEngine` does. The engine-marked test in
tests/test_router_engines.py compares the two on a live engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

log = logging.getLogger("cascadia.router")


def load_hf_tokenizer(model_dir: str) -> Any:
    """The tokenizer saved in `model_dir`, never fetched from the network."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


class LocalTokenizer:
    """Lazily loaded tokenizer of a local model directory; `get()` is None when unavailable."""

    def __init__(self, model_dir: str | None, *, loader: Callable[[str], Any] = load_hf_tokenizer):
        self.model_dir = model_dir
        self._loader = loader
        self._tokenizer: Any = None
        self._settled = model_dir is None or not os.path.isdir(model_dir)
        self._lock: asyncio.Lock | None = None
        self.error: str | None = None
        if model_dir is not None and self._settled:
            self.error = f"{model_dir} is not a directory on this host"

    @property
    def available(self) -> bool:
        return self._tokenizer is not None

    async def get(self) -> Any:
        """The tokenizer, loading it on the first call; None if it cannot be had here."""
        if self._settled:
            return self._tokenizer
        if self._lock is None:  # made here: a Lock belongs to the loop that first uses it
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self._settled:
                try:
                    self._tokenizer = await asyncio.to_thread(self._loader, self.model_dir)
                except Exception as e:  # any failure: the engine actor renders instead
                    self.error = f"{type(e).__name__}: {e}"
                    log.warning("tokenizer of %s not loadable in the router (%s); asking the engine instead",
                                self.model_dir, self.error)
                self._settled = True
        return self._tokenizer

    @staticmethod
    def render_chat(tokenizer: Any, messages: list[dict]) -> str:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError("the chat template did not return text")
        return text

    @staticmethod
    def count(tokenizer: Any, text: str) -> int:
        # On the event loop: a single encode holds the GIL throughout, so a worker thread
        # would not free the loop, and it is ~0.1 ms for a chat turn (a few ms at 50k chars).
        return len(tokenizer.encode(text))
