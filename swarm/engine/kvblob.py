"""The KV blob: a session's KV state in a self-describing, checksummed envelope, and chains of deltas.

`Shard.export_kv` and `Shard.checkpoint_kv` write blobs, `Shard.import_kv` reads them; `join_kv` puts
a full state and the deltas after it together. Pure bytes: nothing here calls llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Sequence

from .. import kvstate
from ..errors import KVStateError

_KV_MAGIC = b"SWARMKV2"


@dataclass(frozen=True)
class KVBase:
    """What a node remembers of the last checkpoint it sent of a session, to send only what changed next."""

    lineage: str  # names the chain of checkpoints: a full state and the deltas on top of it
    n_past: int
    edit: int
    positions: tuple  # per stream, the cell positions it held (numpy arrays)


def kv_header(blob: bytes, verify: bool = False) -> dict:
    """The header of a blob from `export_kv` or `checkpoint_kv` (shard_id, layers, n_past, the layout, and
    for a delta the length of the state it builds on), read without hashing the payload unless `verify`:
    `import_kv` and `join_kv` verify the whole blob before llama.cpp sees it."""
    if verify:
        return _parse_kv_blob(blob)[0]
    if len(blob) < len(_KV_MAGIC) + 4 or not bytes(blob[:len(_KV_MAGIC)]) == _KV_MAGIC:
        raise KVStateError("this is not a swarm KV state (bad magic); it must come from Shard.export_kv")
    (hlen,) = struct.unpack_from("<I", blob, len(_KV_MAGIC))
    return _parse_kv_blob(blob[:len(_KV_MAGIC) + 4 + hlen], verify=False)[0]  # the header alone: no copy


def _parse_kv_blob(blob: bytes, verify: bool = True) -> tuple[dict, bytes]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise KVStateError("a KV state must be bytes from Shard.export_kv")
    blob = bytes(blob)
    if len(blob) < len(_KV_MAGIC) + 4 or not blob.startswith(_KV_MAGIC):
        raise KVStateError("this is not a swarm KV state (bad magic); it must come from Shard.export_kv")
    (hlen,) = struct.unpack_from("<I", blob, len(_KV_MAGIC))
    start = len(_KV_MAGIC) + 4
    if start + hlen > len(blob):
        raise KVStateError("KV state is truncated (its header runs past the end)")
    try:
        head = json.loads(blob[start:start + hlen])
    except ValueError:
        raise KVStateError("KV state header is damaged") from None
    payload = blob[start + hlen:]
    if not isinstance(head, dict) or verify and _kv_digest(head, payload) != head.get("sha256"):
        raise KVStateError("KV state is damaged or truncated (checksum mismatch); export it again")
    types = {"shard_id": str, "layers": list, "n_past": int, "n_ctx": int, "max_sessions": int, "flash_attn": bool,
             "lineage": str}
    if any(type(head.get(k)) is not t for k, t in types.items()) or len(head["layers"]) != 2 or (
            "base" in head and type(head["base"]) is not int):
        raise KVStateError("KV state header is malformed; export it again with this version")
    return head, payload


def join_kv(blobs: Sequence[bytes]) -> bytes:
    """A full KV state (from `export_kv` or `checkpoint_kv`) and the deltas taken after it, in order, as
    one full state for `import_kv`; every piece's checksum is verified first."""
    if not blobs:
        raise KVStateError("no KV state to join")
    parsed = [_parse_kv_blob(b) for b in blobs]
    head = dict(parsed[0][0])
    if "base" in head:
        raise KVStateError("a chain of KV states must start with a full one")
    for h, _ in parsed[1:]:
        same = all(h.get(k) == head.get(k) for k in ("shard_id", "layers", "n_ctx", "max_sessions", "flash_attn",
                                                     "lineage"))
        if not same or h.get("base") != head["n_past"]:
            raise KVStateError(f"KV delta for {h.get('base')} positions does not follow the state of {head['n_past']} "
                               "before it (another session, shard or chain); take a full checkpoint again")
        head["n_past"] = h["n_past"]
    head.pop("sha256", None)
    if len(parsed) == 1:
        return bytes(blobs[0])
    try:
        payload = kvstate.apply(parsed[0][1], [p for _, p in parsed[1:]])
    except (ValueError, TypeError, IndexError, MemoryError) as e:  # KVStateError is a ValueError too
        if isinstance(e, KVStateError):
            raise
        raise KVStateError(f"these KV pieces do not fit together ({e}); take a full checkpoint again") from None
    return _pack_kv(head, payload)


def _pack_kv(head: dict, payload: bytes) -> bytes:
    head = dict(head, sha256=_kv_digest(head, payload))
    header = json.dumps(head, sort_keys=True).encode()
    return b"".join((_KV_MAGIC, struct.pack("<I", len(header)), header, payload))


def _kv_digest(head: dict, payload: bytes) -> str:
    """sha256 over the header (without its digest) and the payload."""
    meta = json.dumps({k: v for k, v in head.items() if k != "sha256"}, sort_keys=True).encode()
    h = hashlib.sha256(struct.pack("<Q", len(meta)) + meta)
    h.update(payload)
    return h.hexdigest()
