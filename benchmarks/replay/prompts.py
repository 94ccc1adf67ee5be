"""Prompt texts of a given token length, or real prompts from a file.

Synthetic prompts are random common English words (seeded per request, so no two requests
share a prefix and prefix caching cannot flatter the server):

- with the served model's tokenizer (a local Hugging Face directory; by default the
  SmolLM2 cache directory of cascadia.model_store when it exists) the text is cut so that
  the tokenizer counts exactly the requested number of tokens, special tokens included,
  as the server counts a completions prompt;
- without one, ``n`` words: each word of the list is one token with its leading space in
  GPT-style BPE vocabularies, so the count is ~n (documented approximation; the server's
  own count lands in the record's ``prompt_tokens``);
- for a server on simulated engines (``--tokenizer sim``): exactly ``4 n`` characters of
  words, which the simulated engine counts as ``n`` tokens (its rule is 4 characters per
  token, router/engines/sim.py); word prompts would count ~1.3 n there.

Real prompts: MT-Bench questions (FastChat's question.jsonl; ``mtbench`` = the shipped
copy), first turns only (a second turn needs the model's own first answer as history),
cycled over the requests.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Protocol

# Common words that GPT-style BPE vocabularies hold as one token with a leading space.
WORDS = tuple("""the of and to in is that for it as was with be by on not he this are or his from at which but
have an they you were her she there been one all we their has would when if so no will more can out up who
them some time could into only then other its about than these two may first any new very my like our over
such also most after way many must before through years where much your well down should because each just
those people how too little state good make world still own see men work long get here between both life being
under never day same another know while last might us great old year off come since against go came right used
take three small place number part end home water room mother area money story fact month lot study book eye
job word business issue side kind head house service friend father power hour game line member law car city
name team idea body back parent face others level office door health person art war history party result change
morning reason research girl guy moment air teacher force education""".split())

BUILTIN_PROMPTS = {"mtbench": None}  # None: cascadia.quality's shipped MT-Bench questions


class PromptSource(Protocol):
    description: str

    def text(self, index: int, n_tokens: int) -> str:
        """The prompt of request ``index`` (``n_tokens``: the traced input length)."""

    def count(self, text: str) -> int:
        """Tokens of ``text`` as the source counts them (exact or approximate)."""


def _words(index: int, n: int, seed: int) -> list[str]:
    rng = random.Random(seed * 1_000_003 + index)
    return rng.choices(WORDS, k=max(n, 0))


class WordPrompts:
    """~1 token per word (no tokenizer available)."""

    description = "approximate: random common words, ~1 token each (no local tokenizer)"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def text(self, index: int, n_tokens: int) -> str:
        return " ".join(_words(index, n_tokens, self.seed))

    def count(self, text: str) -> int:
        return len(text.split())


class SimPrompts:
    """Exactly ``n_tokens`` under the simulated engine's counting rule."""

    description = "sized for simulated engines: random common words, 4 characters per token"

    def __init__(self, seed: int = 0):
        from router.engines.sim import CHARS_PER_TOKEN

        self.seed = seed
        self.chars_per_token = CHARS_PER_TOKEN

    def text(self, index: int, n_tokens: int) -> str:
        n_chars = max(n_tokens, 1) * self.chars_per_token
        # the shortest word has 2 letters: n_chars / 3 words (with their spaces) always suffice
        text = " ".join(_words(index, n_chars // 3 + 1, self.seed))[:n_chars]
        return text[:-1] + "." if text.endswith(" ") else text  # no trailing space for a server to strip

    def count(self, text: str) -> int:
        from router.engines.sim import approx_tokens

        return approx_tokens(text)


class TokenizerPrompts:
    """Exactly ``n_tokens`` under ``tokenizer`` (special tokens included)."""

    MAX_ROUNDS = 12

    def __init__(self, tokenizer, name: str, seed: int = 0):
        self.tok = tokenizer
        self.seed = seed
        self.description = f"exact token counts with the tokenizer of {name}"
        self._specials = len(tokenizer.encode(""))

    def count(self, text: str) -> int:
        return len(self.tok.encode(text))

    def text(self, index: int, n_tokens: int) -> str:
        target = max(n_tokens - self._specials, 1)
        ids = self.tok.encode(" ".join(_words(index, target + 16, self.seed)), add_special_tokens=False)
        m = min(target, len(ids))
        best, best_gap = "", None
        for _ in range(self.MAX_ROUNDS):  # decode/re-encode can merge or split a token at the cut
            text = self.tok.decode(ids[:m])
            gap = n_tokens - self.count(text)
            if best_gap is None or abs(gap) < abs(best_gap):
                best, best_gap = text, gap
            if gap == 0 or not 1 <= m + gap <= len(ids):
                break
            m += gap
        return best


def load_tokenizer(path: str | Path):
    """A Hugging Face tokenizer from a local directory, never from the network."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def default_tokenizer_dir() -> Path | None:
    """The SmolLM2 cache directory of cascadia.model_store, when it is complete."""
    from cascadia.model_store import MARKER_NAME, default_smollm2_dir

    d = default_smollm2_dir()
    return d if (d / MARKER_NAME).exists() else None


class FilePrompts:
    """Real prompts, cycled; lengths are the prompts' own."""

    def __init__(self, prompts: list[str], name: str, counter: PromptSource):
        if not prompts:
            raise ValueError(f"{name}: no prompts")
        self.prompts = prompts
        self.counter = counter
        self.description = f"{len(prompts)} prompts from {name}, cycled"

    def text(self, index: int, n_tokens: int) -> str:
        return self.prompts[index % len(self.prompts)]

    def count(self, text: str) -> int:
        return self.counter.count(text)


def load_prompt_file(name: str) -> dict[str, str]:
    """First-turn MT-Bench questions from ``name`` (a question.jsonl path or ``mtbench``),
    by request id (``"81-1"``, as in the shipped MT-Bench judgements)."""
    from cascadia.quality import load_mtbench_prompts

    prompts = load_mtbench_prompts(None if name in BUILTIN_PROMPTS else name)
    return {key: text for key, text in prompts.items() if key.endswith("-1")}
