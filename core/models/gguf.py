"""GGUF models (llama.cpp's single-file format) as ordinary float checkpoints.

transformers reads a `.gguf` file (`from_pretrained(folder, gguf_file=name)`) by dequantising every tensor,
which takes seconds to minutes, and the model it returns carries a GGUF quantisation config that
`save_pretrained` does not write back. So a `.gguf` file is converted once, to a float32 Hugging Face folder
(weights, config, tokenizer with its chat template) cached by the SHA-256 of the file's bytes, and every later
load — a run, its eval stage, `serve_teacher.py --model x.gguf` — reads that folder. Keyed by content, not by
path: the same file in two places is one cache entry, and a file replaced in place is a new one.

Cache: `$DSKD_CACHE_DIR/gguf/<sha256>/` (default `~/.cache/dskd/gguf/`), the root that a remote teacher's
tokenizer and head cache uses too. An entry is built in a temporary sibling folder and renamed into place, so a
crash or a concurrent conversion never leaves a half-written entry where a later load would find it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from dskd.errors import ModelError

CACHE_ENV = "DSKD_CACHE_DIR"
MARKER = "dskd-gguf.json"
# transformers lists these two next to the architectures in GGUF_SUPPORTED_ARCHITECTURES; they are key groups.
_NOT_ARCHITECTURES = {"general", "tokenizer"}


def gguf_path(model: str, gguf_file: str = "") -> Path | None:
    """The `.gguf` file that a model setting names (`model` itself, or `gguf_file` inside the folder `model`),
    or None when it names an ordinary checkpoint."""
    if gguf_file:
        return Path(model) / gguf_file if model else Path(gguf_file)
    if model.lower().endswith(".gguf"):
        return Path(model)
    return None


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dskd")
    return Path(base) / "gguf"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_ARCHITECTURES)


def require_gguf_package(path: Path, role: str) -> None:
    try:
        import gguf  # noqa: F401 - only whether it imports matters here
    except ImportError:
        raise ModelError(
            f"{role} {path} is a GGUF file and reading it needs the gguf package, which is not installed; pip install gguf"
        ) from None


def inspect_gguf(path: Path, role: str = "model") -> str:
    """The architecture of the GGUF file at `path`, after checking that the file is whole and that transformers
    can load that architecture. Reads only the header and the tensor index (the file is memory-mapped)."""
    require_gguf_package(path, role)
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelError(f"{role} GGUF file not found: {path}; check the path (or the folder and gguf_file)")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        # A file cut inside its tensor data can still parse when the cut falls after the last tensor's view
        # was built; the extents say for certain whether every tensor's bytes are there.
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        field = reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else ""
    except Exception as exc:  # the reader raises ValueError/IndexError/... on a cut or corrupt header
        raise ModelError(
            f"{role} {path} is not a readable GGUF file ({type(exc).__name__}: {_first_line(exc)}); "
            f"it is probably truncated or not GGUF: download it again"
        ) from None
    if end > size:
        raise ModelError(
            f"{role} {path} is truncated: its tensors need {end:,} bytes but the file has {size:,}; download it again"
        )
    if not reader.tensors:
        raise ModelError(f"{role} {path} holds no tensors; it is not a model GGUF file")
    supported = supported_architectures()
    if architecture not in supported:
        raise ModelError(
            f"{role} {path} is a GGUF model of architecture {architecture or '(none given)'!r}, which transformers "
            f"cannot load from GGUF; supported: {', '.join(supported)}"
        )
    return architecture


def converted_checkpoint(path: str | Path, role: str = "model", *, root: Path | None = None) -> Path:
    """The float32 Hugging Face folder for the GGUF file `path`, converting it on first use."""
    path = Path(path)
    require_gguf_package(path, role)
    if not path.is_file():
        raise ModelError(f"{role} GGUF file not found: {path}; check the path (or the folder and gguf_file)")
    root = root or cache_root()
    digest = file_digest(path)
    target = root / digest
    if (target / MARKER).is_file():
        return target
    architecture = inspect_gguf(path, role)
    # A folder without the marker was not made by a finished conversion (copied in part, or edited): redo it.
    shutil.rmtree(target, ignore_errors=True)
    tmp = root / f".{digest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model, tokenizer = _load_from_gguf(path, role)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Written last: an entry without it was never finished (it cannot be renamed into place without it).
        (tmp / MARKER).write_text(
            json.dumps({"source": path.name, "sha256": digest, "architecture": architecture}, indent=1) + "\n"
        )
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; its entry is as good as ours.
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_from_gguf(path: Path, role: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types with multi-line texts
        raise ModelError(
            f"cannot convert the {role} GGUF file {path} ({type(exc).__name__}: {_first_line(exc)}); "
            f"check that the file loads with transformers' from_pretrained(folder, gguf_file=name)"
        ) from None
    # The weights are now plain float32; without this the saved config would claim GGUF quantisation and
    # from_pretrained would look for a .gguf file in the cache folder.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "no message"
