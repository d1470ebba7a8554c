"""The shard cache's size cap: shards in use are held, the least recently used others are evicted.

A process that loads a shard holds a shared `flock` on the shard file for as long as it is loaded
(`hold`). Eviction deletes a file only while it holds an exclusive lock on it taken without waiting,
so no file that a process on this machine holds is ever deleted, and a process that dies, even by
kill -9, lets go of its locks with its file descriptors: nothing stale is left to block eviction.

When a shard was last used is the mtime of an empty sidecar `.NAME.used`, touched at every hold, at
its release and at every reuse. The shard's own mtime must not move (cache.file_digest remembers
digests by it) and atimes are unreliable (noatime and relatime mounts, and any read updates them).

Only `*.gguf` files in the cache's `shards/` folder count and are evicted, with the partial downloads
`.NAME.part` that no fetch is writing (a fetch holds `.NAME.lock`, see transfer.py). Nothing outside
that folder (the user's models, `profiles/`, `models/`) is ever touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from . import cache
from .errors import BadInputError, ModelFileError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: an open file cannot be deleted there anyway
    fcntl = None

log = logging.getLogger(__name__)

LIMIT_ENV = "SWARM_CACHE_LIMIT"
# 20 GB: a full set of shards of a ~30B model at Q4, or a few layouts of a 7-8B one. On a disk where
# that is more than half of what the cache could take (free space plus the shards), half of it: a
# full disk breaks more than cutting or fetching a shard again costs.
DEFAULT_LIMIT = 20 << 30
NO_LIMIT = ("none", "off", "unlimited", "0")
# A temporary file written to this recently may belong to a live writer, lock or not.
WRITE_GRACE_S = 60.0
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)", re.IGNORECASE)
_warned_over = False  # whether after_write warned that in-use shards alone exceed the cap
_SHARD_NAME = re.compile(r"^(?P<arch>.+)-(?P<id>[0-9a-f]{16})-L(?P<start>\d+)-(?P<end>\d+)\.gguf$")


def shards_dir() -> Path:
    """The cache's shard folder, the only place eviction deletes anything."""
    return cache.subdir("shards")


def _in_cache(path: Path) -> bool:
    return path.resolve().parent == shards_dir().resolve()


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.used")


def _download_lock(part: Path) -> Path:
    """transfer._exclusive's lock of the download `.NAME.part`: `.NAME.lock`."""
    return part.with_name(part.name[: -len(".part")] + ".lock")


# ---------------------------------------------------------------- limits


def parse_limit(text: str, source: str = "--cache-limit") -> int | None:
    """A cap in bytes from '20GB', '500MB', '1.5G' or plain bytes; None for `none`/`off`/`0` (no cap)."""
    raw = (text or "").strip()
    if raw.lower() in NO_LIMIT:
        return None
    if raw.startswith("-"):
        raise BadInputError(f"{source} {text!r} is negative; give a size like 20GB, or `none` for no cap")
    # The grammar of join.parse_size (--max-memory), kept here because this low module may not import join.
    m = _SIZE.fullmatch(raw)
    if not m:
        raise BadInputError(f"cannot read {source} {text!r}: give a size like 20GB or 500MB (K, M, G, T are "
                            "powers of 1024), or `none` (or 0) for no cap")
    value = int(float(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m[2].upper()])
    return value or None  # "0GB" too: 0 means no cap, as with --max-memory


def default_limit() -> int:
    """20 GB, or half of what the cache could take (free space plus its shards) on a smaller disk."""
    folder = shards_dir()
    used = sum(e.size for e in entries(probe=False))
    return min(DEFAULT_LIMIT, (shutil.disk_usage(folder).free + used) // 2)


def limit_from_env_or_default() -> int | None:
    """The cap in bytes: $SWARM_CACHE_LIMIT when set (None: no cap), else `default_limit()`."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    return parse_limit(raw, f"${LIMIT_ENV}") if raw else default_limit()


# ---------------------------------------------------------------- use


def touch(path: str | os.PathLike) -> None:
    """Record a use of a shard file in the cache (least recently used ones are evicted first)."""
    path = Path(path)
    if not _in_cache(path):
        return
    try:
        _sidecar(path).touch()
    except OSError as e:  # the order of eviction is not worth failing a load for
        log.debug("could not record the use of %s: %s", path.name, e)


class Hold:
    """A shared lock on a shard file while it is loaded: no eviction deletes it until `release()`.

    Use as `with hold(path):` or keep the handle and call `release()` when the shard is unloaded.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = _open_held(self.path)
        touch(self.path)

    def release(self) -> None:
        """Let eviction have the file again; calling it twice is harmless."""
        fd, self._fd = self._fd, None
        if fd is not None:
            touch(self.path)  # last used: when it stopped being used
            os.close(fd)  # the lock goes with the descriptor

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # pragma: no cover - best effort; the kernel drops the lock at exit anyway
        with contextlib.suppress(Exception):
            self.release()


def hold(path: str | os.PathLike) -> Hold:
    """Keep a shard file from eviction while it is in use (a node's shard, a probe, a file being offered)."""
    return Hold(path)


def _open_held(path: Path) -> int:
    """A descriptor of `path` with a shared lock on the file that is at `path` now."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ModelFileError(f"shard file {path} does not exist (evicted from the cache, or deleted); "
                                 "assign or cut it again") from None
        if fcntl is None:  # pragma: no cover
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError as e:  # a filesystem without locks: load anyway, eviction treats it as in use
            log.debug("cannot lock %s (%s); it is loaded without protection from eviction", path.name, e)
            return fd
        # An eviction may have deleted the file between open and flock: the lock must be on the file
        # that the path names now, or it protects nothing.
        st = os.fstat(fd)
        try:
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise ModelFileError(f"shard file {path} was removed or replaced while it was being loaded; "
                         "assign or cut it again")


def mark_writing(f) -> None:
    """Lock a temporary file being written into the cache, so no prune takes it for a dead writer's."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)


# ---------------------------------------------------------------- listing


@dataclass(frozen=True)
class Entry:
    """A shard file in the cache, or a partial download of one (or a dead slicer's temporary file)."""

    path: Path
    size: int
    last_used: float  # unix time
    in_use: bool = False
    partial: bool = False

    @property
    def name(self) -> str:
        return self.path.name


def _locked(path: Path, create: bool = False) -> int | None:
    """A descriptor holding an exclusive lock on `path`, or None when someone else holds it.

    Raises FileNotFoundError when `path` is missing and not `create`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666) if create else os.open(path, os.O_RDONLY)
    if fcntl is None:  # pragma: no cover
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        pass  # held
    except OSError as e:  # no locks on this filesystem: cannot tell, so count it as in use
        log.debug("cannot lock %s: %s", path.name, e)
    os.close(fd)
    return None


def _in_use(path: Path, partial: bool) -> bool:
    try:
        fd = _locked(_download_lock(path) if partial else path)
    except FileNotFoundError:
        return False  # no lock file: no fetch ever started here, or the shard just went
    if fd is None:
        return True
    os.close(fd)
    return False


def entries(probe: bool = True) -> list[Entry]:
    """Shard files and partial downloads in the cache, least recently used first (`probe`: find which are in use)."""
    out = []
    for path in shards_dir().iterdir():
        partial = path.name.startswith(".") and path.name.endswith(".gguf.part")
        if not (partial or (path.name.endswith(".gguf") and not path.name.startswith("."))):
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue  # removed while listing
        if not stat.S_ISREG(st.st_mode):
            continue
        used = 0.0
        if not partial:
            with contextlib.suppress(FileNotFoundError):
                used = _sidecar(path).stat().st_mtime
        out.append(Entry(path, st.st_size, max(st.st_mtime, used), probe and _in_use(path, partial), partial))
    return sorted(out, key=lambda e: (e.last_used, e.name))


def describe(entry: Entry) -> dict:
    """What a cache entry holds, as far as its name and `swarm.shard.*` metadata tell cheaply."""
    base = entry.name.lstrip(".")
    m = _SHARD_NAME.match(base[:base.find(".gguf") + len(".gguf")])  # also `.NAME.part`, `.NAME.PID.tmp`
    info = {"arch": m["arch"] if m else None, "model": None, "n_layer_total": None,
            "layers": [int(m["start"]), int(m["end"])] if m else None}
    if entry.partial:
        return info
    from .gguf_file import read_gguf  # reads the header only, remembered per file version

    try:
        model = read_gguf(entry.path)
    except ModelFileError:
        return info  # a damaged file: the name says enough to decide to remove it
    info["arch"], info["model"] = model.arch, model.get("general.name")
    if "swarm.shard.layer_start" in model.kvs:
        info["layers"] = [model.get("swarm.shard.layer_start"), model.get("swarm.shard.layer_end")]
        info["n_layer_total"] = model.get("swarm.shard.n_layer_total")
    return info


# ---------------------------------------------------------------- eviction


@dataclass
class Eviction:
    """What an eviction removed, what it kept because it was in use, and what is left."""

    limit: int | None
    removed: list[Entry] = field(default_factory=list)
    in_use: list[Entry] = field(default_factory=list)  # would have gone, but a process holds them
    total: int = 0  # bytes left (or, on a dry run, that would be left)

    @property
    def over(self) -> bool:
        return self.limit is not None and self.total > self.limit


def _remove(entry: Entry, dry_run: bool) -> bool:
    """Delete one entry under its exclusive lock; False when it is in use (or was replaced meanwhile)."""
    try:
        # A partial download is guarded by its fetch's lock file; creating it (as a fetch does) closes the
        # window in which a fetch could start writing the .part we delete.
        fd = _locked(_download_lock(entry.path), create=True) if entry.partial else _locked(entry.path)
    except FileNotFoundError:
        return True  # already gone
    if fd is None:
        return False
    try:
        if not entry.partial:
            st, now = os.fstat(fd), os.stat(entry.path)
            if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                return False  # a new file took the name: it is not the one that was least recently used
        if not dry_run:
            entry.path.unlink(missing_ok=True)
            _sidecar(entry.path).unlink(missing_ok=True)
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        log.warning("could not remove %s from the shard cache: %s", entry.name, e)
        return False
    finally:
        os.close(fd)  # a fetch waiting on the download's lock starts again from nothing


def _clean_leftovers(folder: Path, dry_run: bool) -> list[Entry]:
    """Remove temporary files of slicers that died (returned), and use records of shards that are gone."""
    now, removed = time.time(), []
    for path in folder.iterdir():
        name = path.name
        try:
            if name.startswith(".") and name.endswith(".gguf.used"):
                if not path.with_name(name[1:-len(".used")]).exists() and not dry_run:
                    path.unlink(missing_ok=True)
                continue
            st = path.stat()
            if not (name.startswith(".") and name.endswith(".tmp") and now - st.st_mtime > WRITE_GRACE_S):
                continue
            fd = _locked(path)  # slicing.slice_model holds its temporary file while it writes
            if fd is not None:
                try:
                    if not dry_run:
                        path.unlink(missing_ok=True)
                    removed.append(Entry(path, st.st_size, st.st_mtime, partial=True))
                finally:
                    os.close(fd)
        except FileNotFoundError:
            continue
    return removed


@contextlib.contextmanager
def _one_evictor(folder: Path):
    """One eviction at a time on this machine: two would each free the same excess."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(folder / ".evict.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield  # closing the file lets go


def evict(limit: int | None, keep: Iterable[str | os.PathLike] = (), older_than: float | None = None,
          dry_run: bool = False) -> Eviction:
    """Delete the least recently used shard files that no process holds until the cache fits `limit`
    bytes (None: no cap; 0: remove all), and any not used for `older_than` seconds; `keep` stays."""
    folder = shards_dir()
    keep = {Path(p).resolve() for p in keep}
    with _one_evictor(folder):
        leftovers = _clean_leftovers(folder, dry_run)  # not counted in the total: they are not entries
        found = entries(probe=False)  # whether each is in use is decided under its lock, in _remove
        result = Eviction(limit, removed=leftovers, total=sum(e.size for e in found))
        now = time.time()
        for entry in found:  # least recently used first
            over = limit is not None and result.total > limit
            stale = older_than is not None and now - entry.last_used > older_than
            if not (over or stale):
                break  # everything after this one was used more recently
            if entry.path.resolve() in keep:
                continue
            if _remove(entry, dry_run):
                result.removed.append(entry)
                result.total -= entry.size
            else:
                result.in_use.append(entry)
    return result


def after_write(path: str | os.PathLike) -> None:
    """Keep the cache under its cap after a new shard file was written into it (never evicts `path`)."""
    path = Path(path)
    if not _in_cache(path):
        return  # a folder of the user's (`swarm shard -o`): not the cache's to prune
    try:
        limit = limit_from_env_or_default()
        if limit is None:
            return
        result = evict(limit, keep=[path])
    except OSError as e:  # housekeeping: the new shard is in place whatever happens here
        log.warning("could not evict from the shard cache in %s: %s", path.parent, e)
        return
    for e in result.removed:
        log.info("evicted %s (%s, last used %s) to keep the shard cache under %s", e.name, human(e.size),
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)), human(limit))
    if result.over:
        global _warned_over
        # Once a warning: with a cap below what is in use, every later write would say it again.
        log.log(logging.INFO if _warned_over else logging.WARNING, "the shard cache holds %s, over its cap of %s: "
                "the rest is in use or just written; raise --cache-limit (or $%s) if this machine should keep more",
                human(result.total), human(limit), LIMIT_ENV)
        _warned_over = True


def human(n: int) -> str:
    """Bytes as the size options write them (GB is 1024^3, as in --max-memory and --cache-limit)."""
    for unit, shift in (("TB", 40), ("GB", 30), ("MB", 20), ("KB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"
