"""On-disk cache of what a client fetches once per teacher: its tokenizer files and its LM head.

Entries live under `<root>/<fingerprint>/`, so a changed model (new weights, tokenizer or dtype) never reuses
a stale head. Head tensors are stored as the raw wire bytes with their sha256 (as announced by the server and
verified on arrival); a cached tensor whose bytes no longer match is ignored and fetched again. Every file is
written to a temporary name first and renamed, so a crash mid-write leaves no half entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

DEFAULT_ROOT_ENV = "DSKD_CACHE_DIR"


def default_root() -> Path:
    base = os.environ.get(DEFAULT_ROOT_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dskd")
    return Path(base) / "teachers"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TeacherCache:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) / "teachers" if root is not None else default_root()

    def folder(self, fingerprint: str) -> Path:
        if not fingerprint or not fingerprint.isalnum():
            raise ValueError(f"fingerprint {fingerprint!r} cannot name a cache folder")
        return self.root / fingerprint

    # -- tokenizer ----------------------------------------------------------------------------------------

    def tokenizer_dir(self, fingerprint: str) -> Path | None:
        folder = self.folder(fingerprint) / "tokenizer"
        manifest = folder / "manifest.json"
        if not manifest.exists():
            return None
        try:
            files = json.loads(manifest.read_text())
            for name, digest in files.items():
                if hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest:
                    return None
        except (OSError, ValueError):
            return None
        return folder

    def save_tokenizer(self, fingerprint: str, files: dict[str, bytes]) -> Path:
        folder = self.folder(fingerprint) / "tokenizer"
        for name, data in files.items():
            if Path(name).name != name or name.startswith("."):
                raise ValueError(f"tokenizer file name {name!r} is not a plain file name")
            _atomic_write(folder / name, data)
        manifest = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        _atomic_write(folder / "manifest.json", json.dumps(manifest, sort_keys=True).encode())  # last: marks complete
        return folder

    # -- LM head ------------------------------------------------------------------------------------------

    def load_head(self, fingerprint: str, dtype_name: str) -> tuple[dict, dict[str, bytearray]] | None:
        """`(meta, {tensor name: bytes})` of a cached head whose checksums still hold, else None."""
        folder = self.folder(fingerprint)
        meta_path = folder / f"head-{dtype_name}.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            tensors = {}
            for spec in meta["tensors"]:
                data = bytearray((folder / f"head-{dtype_name}.{spec['name']}.bin").read_bytes())
                if hashlib.sha256(data).hexdigest() != spec["sha256"]:
                    return None
                tensors[spec["name"]] = data
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return meta, tensors

    def save_head(self, fingerprint: str, dtype_name: str, meta: dict, tensors: dict[str, bytes | bytearray]) -> None:
        folder = self.folder(fingerprint)
        for name, data in tensors.items():
            _atomic_write(folder / f"head-{dtype_name}.{name}.bin", bytes(data))
        _atomic_write(
            folder / f"head-{dtype_name}.json", json.dumps(meta, sort_keys=True).encode()
        )  # last: marks complete
