"""Shard files over the wire: the coordinator streams checksummed chunks, a node resumes and verifies them.

The server side (`iter_chunks`) cuts a file into chunks that each carry the sha256 of their data. The
client side (`fetch_shard`) writes verified chunks into a hidden `.NAME.part` file next to the final
one, resumes from its size after a bad chunk, a dropped stream or a restart, checks the whole file's
sha256 and only then renames it into place, so a shard file under its final name is always complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from . import cache, shardcache
from .errors import AuthError, BadInputError, NotReadyError, PeerError, SwarmError
from .messages import ShardChunk, ShardSpec

try:  # POSIX only: keeps two processes sharing a cache from writing the same .part at once
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
FAULT_ENV = "SWARM_FAULT_CORRUPT_CHUNKS"
# Seconds slept before retry n is RETRY_SLEEP_S * n: long enough for a restarting coordinator, short
# enough that one flaky chunk costs nothing noticeable. Tests lower it.
RETRY_SLEEP_S = 0.2
_MB = 1 << 20
# Refusals that another attempt cannot fix (wrong key, unknown shard, offset past the coordinator's
# file): retrying them would only delay the error.
_PERMANENT = (AuthError, BadInputError, NotReadyError)
# A fetch: (shard id, offset) -> the file's chunks from there; raises SwarmError when the call fails.
Fetch = Callable[[str, int], Iterable[ShardChunk]]
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class TransferError(SwarmError):
    """A shard transfer that could not complete; the message says what to do."""


# ---------------------------------------------------------------- server side


def iter_chunks(path: Path, offset: int, chunk_size: int = CHUNK_SIZE,
                corrupt_chunks: frozenset[int] = frozenset()) -> Iterator[ShardChunk]:
    """Server side: the file from `offset` in chunks, each with the sha256 of its data."""
    if chunk_size <= 0:
        raise BadInputError(f"chunk size must be positive, got {chunk_size}")
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if offset < 0 or offset > size:
            raise BadInputError(
                f"cannot send {path.name} from offset {offset}: the file is {size} bytes; "
                f"delete the partial download on the node so it starts again from 0")
        f.seek(offset)
        pos = offset
        while pos < size:
            data = f.read(min(chunk_size, size - pos))
            if not data:  # the file shrank under us; the client's whole-file check reports it
                break
            digest = hashlib.sha256(data).hexdigest()
            if pos // chunk_size in corrupt_chunks:
                # Flipped after hashing, so the chunk arrives with a checksum that does not match.
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            yield ShardChunk(offset=pos, data=data, sha256=digest, file_size=size)
            pos += len(data)


def fault_chunks_from_env() -> frozenset[int]:
    """Chunk indexes to corrupt once, from SWARM_FAULT_CORRUPT_CHUNKS='3,7' (tests only; empty normally)."""
    raw = os.environ.get(FAULT_ENV, "").strip()
    if not raw:
        return frozenset()
    try:
        indexes = frozenset(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise BadInputError(
            f"cannot read {FAULT_ENV}={raw!r}: write chunk indexes separated by commas, e.g. 3,7 "
            f"(or unset it; it is a fault injection for tests)") from None
    if any(i < 0 for i in indexes):
        raise BadInputError(f"{FAULT_ENV}={raw!r} holds a negative chunk index; indexes start at 0")
    log.warning("fault injection on: chunks %s will be sent corrupted once (%s)",
                ",".join(map(str, sorted(indexes))), FAULT_ENV)
    return indexes


# ---------------------------------------------------------------- progress


class Progress:
    """A progress bar on stderr for a long transfer (a `\\r`-updated bar on a terminal, a log line every 25% otherwise)."""

    WIDTH = 30
    REDRAW_S = 0.1  # a terminal redraw at most this often; a 1 MiB chunk can arrive every millisecond

    def __init__(self, label: str, total: int, stream=None):
        self.label = label
        self.total = max(int(total), 0)
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError, OSError):
            self.tty = False
        self.done = 0
        self._base: int | None = None  # bytes present at the first update (a resume), left out of the rate
        self._t0 = time.monotonic()
        self._drawn_at = 0.0
        self._next_quarter = 25
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _percent(self, done: int) -> int:
        return 100 if self.total == 0 else done * 100 // self.total

    def _text(self) -> str:
        elapsed = time.monotonic() - self._t0
        rate = (self.done - (self._base or 0)) / _MB / elapsed if elapsed > 0 else 0.0
        return (f"{self._percent(self.done):3d}% {self.done / _MB:.1f}/{self.total / _MB:.1f} MB "
                f"{rate:.1f} MB/s")

    def _write(self, text: str) -> None:
        # The bar is decoration: a closed or broken stream must never fail the transfer.
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def update(self, done: int) -> None:
        """Record `done` bytes of `total` and redraw when it is worth it."""
        if self._closed:
            return
        self.done = min(max(int(done), 0), self.total)
        if self._base is None:
            self._base = self.done
            # A resumed transfer starts past some quarters; report only the ones still ahead.
            self._next_quarter = (self._percent(self.done) // 25 + 1) * 25
            if not self.tty:
                return
        if self.tty:
            now = time.monotonic()
            if now - self._drawn_at >= self.REDRAW_S or self.done == self.total:
                self._drawn_at = now
                filled = self.WIDTH * self._percent(self.done) // 100
                bar = "#" * filled + "." * (self.WIDTH - filled)
                self._write(f"\r{self.label} [{bar}] {self._text()}")
        else:
            pct = self._percent(self.done)
            if pct >= self._next_quarter:
                self._write(f"{self.label}: {self._text()}\n")
                self._next_quarter = (pct // 25 + 1) * 25

    def close(self) -> None:
        """Finish the bar's line (a terminal keeps the last drawing)."""
        if self._closed:
            return
        if self.tty:
            self._drawn_at = 0.0  # force the final state onto the screen
            self.update(self.done)
            self._write("\n")
        self._closed = True


# ---------------------------------------------------------------- client side


def _check_spec(spec: ShardSpec) -> None:
    """Refuse a ShardSpec whose name or digest could not be used safely (it comes over the network)."""
    name = spec.file_name
    if (not name or "/" in name or "\\" in name or "\x00" in name or name.startswith(".")
            or ".." in name or not name.endswith(".gguf") or len(name.encode()) > 255):
        raise BadInputError(
            f"refusing shard file name {name!r}: it must be a plain file name ending in .gguf, without "
            f"'/', '..' or a leading '.'; the coordinator sent a bad assignment (upgrade or restart it)")
    if not _SHA256_HEX.fullmatch(spec.sha256):
        raise BadInputError(
            f"shard {spec.shard_id!r} came with sha256 {spec.sha256!r}, not 64 lowercase hex digits; "
            f"the coordinator sent a bad assignment (upgrade or restart it)")


@contextlib.contextmanager
def _exclusive(dest_dir: Path, name: str):
    """Hold a lock on `name` in dest_dir, so only one fetcher (thread or process) writes its .part."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(dest_dir / f".{name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _chunk_problem(chunk: ShardChunk, expected: int, size: int) -> str | None:
    """Why `chunk` cannot be written at `expected` of a `size`-byte file, or None when it can."""
    if chunk.offset != expected:
        return f"chunk at offset {chunk.offset} arrived where offset {expected} was expected"
    if not chunk.data:
        return f"chunk at offset {expected} was empty"
    if expected + len(chunk.data) > size:
        return f"chunk at offset {expected} runs past the shard's {size} bytes"
    if hashlib.sha256(chunk.data).hexdigest() != chunk.sha256:
        return f"chunk at offset {expected} failed its checksum"
    return None


def fetch_shard(fetch: Fetch, spec: ShardSpec, dest_dir: Path, progress: bool = True,
                max_retries: int = 5) -> tuple[Path, bool]:
    """Get spec's file into dest_dir/spec.file_name, verified by sha256; returns (path, whether bytes were transferred)."""
    _check_spec(spec)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / spec.file_name
    with _exclusive(dest_dir, spec.file_name):
        # Checked under the lock: another fetcher may just have finished this very file.
        if final.is_file() and final.stat().st_size == spec.size and cache.file_digest(final) == spec.sha256:
            shardcache.touch(final)  # a reuse counts as a use for the cache's eviction order
            return final, False
        if final.exists():
            log.info("%s is present but is not the shard the coordinator assigned; fetching it again", final.name)
        _download(fetch, spec, final, progress, max_retries)
    shardcache.after_write(final)  # keep the cache under its cap; never evicts `final`
    return final, True


def _download(fetch: Fetch, spec: ShardSpec, final: Path, progress: bool, max_retries: int) -> None:
    """Fill the .part next to `final`, verify it whole, and rename it into place."""
    size = spec.size
    part = final.with_name(f".{final.name}.part")
    if part.exists() and part.stat().st_size > size:
        log.warning("%s is larger than the shard's %d bytes; starting the download again", part.name, size)
        part.unlink()
    t0 = time.monotonic()
    bar = Progress(f"fetching {final.name}", size) if progress else None
    try:
        with open(part, "ab") as f:  # append mode: every write lands at the end, which is `done`
            done = f.tell()
            start = done
            if done:
                log.info("resuming %s at offset %d of %d (%.1f of %.1f MB already here)",
                         final.name, done, size, done / _MB, size / _MB)
            else:
                log.info("fetching shard %s as %s (%.1f MB)", spec.shard_id, final.name, size / _MB)
            if bar:
                bar.update(done)
            other_size = None  # the coordinator's file size, when it is not the assignment's
            failures = 0  # consecutive attempts that failed without adding a byte
            while done < size:
                attempt_start = done
                problem = None
                stream = None
                other_size = None
                try:
                    stream = fetch(spec.shard_id, done)
                    for chunk in stream:
                        if chunk.file_size and chunk.file_size != size:
                            other_size = chunk.file_size
                            break
                        problem = _chunk_problem(chunk, done, size)
                        if problem:
                            break
                        f.write(chunk.data)
                        done += len(chunk.data)
                        if bar:
                            bar.update(done)
                        if done == size:
                            break
                    else:
                        if done < size:
                            problem = f"the stream ended at offset {done} of {size}"
                except _PERMANENT as e:
                    raise TransferError(
                        f"the coordinator refused to send shard {spec.shard_id!r} from offset {done} "
                        f"({e}); check that the node uses the swarm's key and the "
                        f"coordinator still serves this model") from e
                except PeerError as e:
                    problem = f"the stream broke at offset {done} ({e})"
                finally:
                    # Stop the server sending the rest of a stream we no longer read (a no-op once it ended).
                    cancel = getattr(stream, "cancel", None)
                    if callable(cancel):
                        cancel()
                if other_size is not None:
                    break
                if problem is None:
                    break
                failures = 0 if done > attempt_start else failures + 1
                if failures > max_retries:
                    raise TransferError(
                        f"could not fetch shard {spec.shard_id!r} ({final.name}): {problem}, "
                        f"{failures} attempts in a row without progress; check the network and the "
                        f"coordinator's log, then assign again (the {done} bytes already here are kept "
                        f"and the next attempt resumes from them)")
                log.warning("%s; fetching again from %d", problem, done)
                # Everything before `done` was verified; drop whatever else could have reached the file.
                f.flush()
                f.truncate(done)
                time.sleep(RETRY_SLEEP_S * (failures + 1))
            if other_size is None:
                f.flush()
                os.fsync(f.fileno())
    finally:
        if bar:
            bar.close()
    if other_size is not None:
        # The bytes here belong to another version of the file: resuming from them could never verify.
        part.unlink(missing_ok=True)
        raise TransferError(
            f"the coordinator's {final.name} is {other_size} bytes but the assignment says {size}: its file "
            f"changed after the assignment; wait for the coordinator to assign the shard again (or restart "
            f"the node)")
    digest = cache.sha256_file(part)
    if digest != spec.sha256:
        part.unlink(missing_ok=True)
        raise TransferError(
            f"{final.name} arrived complete but its sha256 is {digest}, not the {spec.sha256} the "
            f"coordinator announced: its file probably changed during the transfer; the partial file was "
            f"deleted, so assign the shard again to fetch it from scratch")
    os.replace(part, final)
    _fsync_dir(final.parent)
    elapsed = max(time.monotonic() - t0, 1e-9)
    sent = size - start
    log.info("fetched %s: %.1f MB in %.2f s (%.1f MB/s)", final.name, sent / _MB, elapsed, sent / _MB / elapsed)
