"""Where the swarm keeps files it can rebuild: the default model, shards, digests."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path

_digest_lock = threading.Lock()
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The cache root: $SWARM_CACHE_DIR, else $XDG_CACHE_HOME/swarm, else ~/.cache/swarm."""
    root = os.environ.get("SWARM_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "swarm")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def subdir(name: str) -> Path:
    path = cache_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, block: int = 4 << 20) -> str:
    """sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so big models are hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_dir() / "digests.json"
    with _digest_lock:
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError):
            known = {}
        if key in known:
            return known[key]
        log.info("computing the sha256 of %s (once per file version; large models take a while)", path.name)
        value = sha256_file(path)
        # Forget digests of older versions of this file.
        known = {k: v for k, v in known.items() if not k.startswith(f"{path}|")}
        known[key] = value
        atomic_write_text(index, json.dumps(known, indent=1, sort_keys=True))
        return value


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def key_file(swarm: str) -> Path:
    """Where a coordinator on this machine leaves its address and key for local clients (mode 0600)."""
    return subdir("swarms") / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', swarm)}.json"


def local_key(swarm: str) -> str | None:
    """The key of a coordinator of `swarm` started on this machine by this user, if any."""
    try:
        return json.loads(key_file(swarm).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
