"""A node's shard from the model's public URL: only its own tensors' bytes, over HTTP Range requests.

The node reads the GGUF header from the URL, lays the shard out with the slicer's own recipe
(`slicing.shard_pieces` and `gguf_file.gguf_layout`, the code that writes the coordinator's file), asks
the server for the byte ranges of its tensors, and writes them into a `.NAME.part` file that a later
attempt resumes from. The whole file must match the sha256 the coordinator announced before it is
renamed into place; on any failure (no Range support, a broken server, a wrong hash) the caller falls
back to the coordinator, so nothing unverified is ever loaded.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from . import cache
from .errors import ModelFileError, SwarmError
from .gguf_file import GGUFFile, TensorSource, gguf_layout, parse_gguf_header
from .messages import ShardSpec
from .slicing import model_layer_count, shard_pieces
from .transfer import Progress, _check_spec, _exclusive, _fsync_dir, fetch_shard

log = logging.getLogger(__name__)

HEAD_FIRST = 1 << 20  # the first header request; doubled until the header parses
HEAD_MAX = 256 << 20
READ_SIZE = 1 << 20
TIMEOUT_S = 30.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class RangeFetchError(SwarmError):
    """The model's URL could not give this shard; the node fetches it from the coordinator instead."""


def _get(url: str, start: int, end: int):
    """An open response for bytes [start, end) of `url`; RangeFetchError unless the server honours the range."""
    if not url.lower().startswith(("http://", "https://")):
        raise RangeFetchError(f"{url!r} is not an HTTP(S) URL")
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end - 1}"})
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RangeFetchError(f"{url}: {e}") from e
    if resp.status != 206:
        resp.close()  # a 200 would send the whole model: stop at once
        raise RangeFetchError(f"{url} answered {resp.status} to a Range request: it does not serve byte ranges")
    m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    if not m or int(m.group(1)) != start:
        resp.close()
        raise RangeFetchError(f"{url} sent Content-Range {resp.headers.get('Content-Range')!r} for bytes {start}-{end - 1}")
    resp.total = int(m.group(3))
    return resp


def read_header(url: str) -> GGUFFile:
    """The GGUF header of the model at `url`, read with Range requests of growing size."""
    n = HEAD_FIRST
    while True:
        with _get(url, 0, n) as resp:
            total = resp.total
            buf = resp.read()
        try:
            return parse_gguf_header(buf, Path(url.rsplit("/", 1)[-1] or "model.gguf"), total)
        except ModelFileError:
            if len(buf) >= total or n >= HEAD_MAX:
                raise
            n *= 2


def _copy_range(url: str, src: TensorSource, skip: int, out, bar: Progress | None, done: int) -> int:
    """Append bytes [skip, nbytes) of tensor `src` to `out`; returns the file's new length."""
    start, end = src.src_offset + skip, src.src_offset + src.nbytes
    with _get(url, start, end) as resp:
        while start < end:
            data = resp.read(min(READ_SIZE, end - start))
            if not data:
                raise RangeFetchError(f"{url} ended the response at byte {start} of {end}")
            out.write(data)
            start += len(data)
            done += len(data)
            if bar:
                bar.update(done)
    return done


def fetch_from_url(url: str, spec: ShardSpec, dest_dir: Path, progress: bool = True, attempts: int = 3) -> Path:
    """Build spec's shard in dest_dir from the model at `url`, verified by sha256; RangeFetchError if it cannot."""
    _check_spec(spec)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / spec.file_name
    with _exclusive(dest_dir, spec.file_name):
        if final.is_file() and final.stat().st_size == spec.size and cache.file_digest(final) == spec.sha256:
            return final
        model = read_header(url)
        if model_layer_count(model) != spec.n_layer_total:
            raise RangeFetchError(f"{url} holds a {model_layer_count(model)}-layer model, not the swarm's "
                                  f"{spec.n_layer_total}")
        lookahead = 1 if _lookahead_guess(model, spec) else 0
        blobs, tensors = shard_pieces(model, spec.layers, spec.shard_id, lookahead)
        pieces = gguf_layout(blobs, tensors, model.alignment)
        if sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces) != spec.size:
            raise RangeFetchError(f"the shard built from {url} would not be the coordinator's {spec.size} bytes")
        part = final.with_name(f".{final.name}.part")
        last: Exception | None = None
        for _ in range(attempts):
            try:
                _fill(url, pieces, part, spec, progress)
                break
            except (RangeFetchError, OSError) as e:
                last = e
                log.warning("fetching %s from %s stopped (%s); resuming", final.name, url, e)
        else:
            raise RangeFetchError(f"could not fetch {final.name} from {url}: {last}")
        digest = cache.sha256_file(part)
        if digest != spec.sha256:
            part.unlink(missing_ok=True)
            raise RangeFetchError(f"{final.name} built from {url} has sha256 {digest}, not the coordinator's "
                                  f"{spec.sha256}: the URL serves another file")
        os.replace(part, final)
        _fsync_dir(dest_dir)
    log.info("fetched %s from the model's URL %s", final.name, url)
    return final


def _lookahead_guess(model: GGUFFile, spec: ShardSpec) -> bool:
    """Whether the coordinator's shard carries a look-ahead block: the one layout of its announced size."""
    for extra in (0, 1):
        blobs, tensors = shard_pieces(model, spec.layers, spec.shard_id, extra)
        size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in gguf_layout(blobs, tensors, model.alignment))
        if size == spec.size:
            return bool(extra)
    return False


def _fill(url: str, pieces: list, part: Path, spec: ShardSpec, progress: bool) -> None:
    """Write the shard's pieces into `part`, skipping the bytes a previous attempt left there."""
    if part.exists() and part.stat().st_size > spec.size:
        part.unlink()
    bar = Progress(f"fetching {spec.file_name} from the model's URL", spec.size) if progress else None
    try:
        with open(part, "ab") as f:
            done = f.tell()
            if done:
                log.info("resuming %s at offset %d of %d", spec.file_name, done, spec.size)
            if bar:
                bar.update(done)
            pos = 0
            for p in pieces:
                n = len(p) if isinstance(p, bytes) else p.nbytes
                if pos + n > done:
                    skip = done - pos if done > pos else 0
                    if isinstance(p, bytes):
                        f.write(p[skip:])
                        done = pos + n
                    else:
                        try:
                            done = _copy_range(url, p, skip, f, bar, done)
                        finally:
                            f.flush()
                pos += n
            f.flush()
            os.fsync(f.fileno())
    finally:
        if bar:
            bar.close()


def fetch_shard_via_url(url: str | None, fetch, spec: ShardSpec, dest_dir: Path, progress: bool = True) -> tuple[Path, bool]:
    """Spec's shard from the model's URL when one is named and it works, else from the coordinator."""
    if url:
        try:
            return fetch_from_url(url, spec, dest_dir, progress), True
        except (RangeFetchError, ModelFileError, OSError) as e:
            log.warning("cannot build %s from the model's URL (%s); fetching it from the coordinator",
                        spec.file_name, e)
    return fetch_shard(fetch, spec, dest_dir, progress=progress)
