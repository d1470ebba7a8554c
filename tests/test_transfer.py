"""Shard transfer over real gRPC on localhost: checksums, resume, interruptions, refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from swarm import transfer, wire
from swarm._proto import swarm_pb2_grpc as pbg
from swarm.errors import BadInputError
from swarm.layers import LayerRange
from swarm.messages import ShardSpec
from swarm.wire.convert import chunk_pb
from swarm.transfer import (
    Progress,
    TransferError,
    fault_chunks_from_env,
    fetch_shard,
    iter_chunks,
)

CHUNK = 1 << 20
SIZE = 5 * CHUNK + 12345  # a ragged last chunk
NAME = "model-0-4.gguf"


class Servicer(pbg.CoordinatorServicer):
    """FetchShard over one file, with knobs for the faults each test needs."""

    def __init__(self, path: Path, corrupt_first: frozenset[int] = frozenset(), corrupt_always=False,
                 abort_after_first: int | None = None):
        self.path = path
        self.corrupt_first = corrupt_first
        self.corrupt_always = corrupt_always
        self.abort_after_first = abort_after_first
        self.offsets: list[int] = []
        self._lock = threading.Lock()

    def FetchShard(self, request, context):
        with self._lock:
            first = not self.offsets
            self.offsets.append(request.offset)
        if self.corrupt_always:
            corrupt = frozenset(range(SIZE // CHUNK + 1))
        else:
            corrupt = self.corrupt_first if first else frozenset()
        for sent, chunk in enumerate(iter_chunks(self.path, request.offset, CHUNK, corrupt)):
            if first and self.abort_after_first is not None and sent == self.abort_after_first:
                context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator going away (test)")
            yield chunk_pb(chunk)


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    """A private digest index, and retries that do not sleep for real."""
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(transfer, "RETRY_SLEEP_S", 0.01)


@pytest.fixture
def source(tmp_path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "served" / NAME
    path.parent.mkdir()
    path.write_bytes(data)
    return path, data


KEY = "transfer-key-of-the-tests"


@pytest.fixture
def serve():
    """Start a real gRPC server for a servicer; returns the fetch a node uses (the wire's, over gRPC)."""
    servers, channels = [], []

    def start(servicer):
        server, port = wire.server("127.0.0.1", 0, KEY)  # mutual TLS, as in the swarm
        pbg.add_CoordinatorServicer_to_server(servicer, server)
        server.start()
        link = wire.CoordinatorLink(f"127.0.0.1:{port}", KEY)
        servers.append(server)
        channels.append(link)
        return link.fetch

    yield start
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(None)


def spec_for(data: bytes, name: str = NAME) -> ShardSpec:
    return ShardSpec("s0", name, len(data), hashlib.sha256(data).hexdigest(), LayerRange(0, 4), 4)


def no_leftovers(dest: Path) -> bool:
    return not list(dest.glob("*.part"))


def test_full_fetch_then_cached(source, serve, tmp_path, capsys, caplog):
    path, data = source
    servicer = Servicer(path)
    fetch = serve(servicer)
    dest = tmp_path / "shards"
    with caplog.at_level(logging.INFO, logger="swarm.transfer"):
        got, fetched = fetch_shard(fetch, spec_for(data), dest, progress=True)
    assert got == dest / NAME and fetched
    assert "MB/s" in caplog.text
    assert f"fetching {NAME}: 100%" in capsys.readouterr().err  # not a terminal: one line per quarter
    assert got.read_bytes() == data
    assert servicer.offsets == [0]
    assert no_leftovers(dest)
    again, fetched = fetch_shard(fetch, spec_for(data), dest, progress=False)
    assert again == got and not fetched
    assert servicer.offsets == [0]  # the server was not asked again


def test_corrupted_chunk_is_refetched(source, serve, tmp_path, caplog):
    path, data = source
    servicer = Servicer(path, corrupt_first=frozenset({2}))
    dest = tmp_path / "shards"
    with caplog.at_level(logging.WARNING, logger="swarm.transfer"):
        got, fetched = fetch_shard(serve(servicer), spec_for(data), dest, progress=False)
    assert fetched and got.read_bytes() == data
    assert servicer.offsets == [0, 2 * CHUNK]  # only the bad chunk onward was asked again
    assert f"chunk at offset {2 * CHUNK} failed its checksum; fetching again from {2 * CHUNK}" in caplog.text


def test_resume_from_part(source, serve, tmp_path):
    path, data = source
    dest = tmp_path / "shards"
    dest.mkdir()
    half = 5 * CHUNK // 2
    (dest / f".{NAME}.part").write_bytes(data[:half])
    servicer = Servicer(path)
    got, fetched = fetch_shard(serve(servicer), spec_for(data), dest, progress=False)
    assert servicer.offsets[0] == half
    assert fetched and got.read_bytes() == data
    assert no_leftovers(dest)


def test_interrupted_stream_resumes(source, serve, tmp_path):
    path, data = source
    servicer = Servicer(path, abort_after_first=2)
    got, fetched = fetch_shard(serve(servicer), spec_for(data), tmp_path / "shards", progress=False)
    assert fetched and got.read_bytes() == data
    assert servicer.offsets == [0, 2 * CHUNK]


def test_stale_final_file_is_replaced(source, serve, tmp_path):
    path, data = source
    dest = tmp_path / "shards"
    dest.mkdir()
    (dest / NAME).write_bytes(data[:-1] + b"!")  # same size, other bytes
    got, fetched = fetch_shard(serve(Servicer(path)), spec_for(data), dest, progress=False)
    assert fetched and got.read_bytes() == data


def test_coordinator_file_of_another_size(source, serve, tmp_path):
    path, data = source
    dest = tmp_path / "shards"
    with pytest.raises(TransferError, match=f"is {SIZE} bytes but the assignment says {SIZE - 1}"):
        fetch_shard(serve(Servicer(path)), spec_for(data[:-1]), dest, progress=False)
    assert not (dest / NAME).exists()
    assert no_leftovers(dest)


def test_wrong_whole_file_sha(source, serve, tmp_path):
    path, data = source
    dest = tmp_path / "shards"
    spec = dataclasses.replace(spec_for(data), sha256=hashlib.sha256(b"other bytes").hexdigest())
    with pytest.raises(TransferError, match="sha256.*assign the shard again"):
        fetch_shard(serve(Servicer(path)), spec, dest, progress=False)
    assert not (dest / NAME).exists()
    assert no_leftovers(dest)


@pytest.mark.parametrize("name", ["../x.gguf", "a/b.gguf", ".hidden.gguf", "x.txt", "", "..", "a\\b.gguf"])
def test_bad_file_names_refused(name, tmp_path):
    def fetch(shard_id, offset):  # must never be reached
        raise AssertionError("fetched despite a bad name")

    with pytest.raises(BadInputError, match="plain file name"):
        fetch_shard(fetch, spec_for(b"x", name), tmp_path / "shards", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_always_corrupt_gives_up(source, serve, tmp_path):
    path, data = source
    servicer = Servicer(path, corrupt_always=True)
    dest = tmp_path / "shards"
    with pytest.raises(TransferError, match="failed its checksum.*3 attempts in a row.*check the network"):
        fetch_shard(serve(servicer), spec_for(data), dest, progress=False, max_retries=2)
    assert servicer.offsets == [0, 0, 0]  # the first attempt and max_retries more
    assert not (dest / NAME).exists()


def test_iter_chunks(source):
    path, data = source
    with pytest.raises(BadInputError, match=f"offset {SIZE + 1}.*{SIZE} bytes"):
        list(iter_chunks(path, SIZE + 1))
    assert list(iter_chunks(path, SIZE)) == []
    chunks = list(iter_chunks(path, 100, CHUNK, frozenset({1})))
    assert [c.offset for c in chunks] == [100 + i * CHUNK for i in range(len(chunks))]
    assert all(c.file_size == SIZE for c in chunks)
    # The chunk at 100 + CHUNK has index 1: its data differs in one byte from what its sha256 describes.
    good = [hashlib.sha256(c.data).hexdigest() == c.sha256 for c in chunks]
    assert good == [True, False] + [True] * (len(chunks) - 2)
    assert chunks[1].data[1:] == data[100 + CHUNK + 1:100 + 2 * CHUNK] and chunks[1].data[0] != data[100 + CHUNK]
    assert b"".join(c.data for c in chunks[2:]) == data[100 + 2 * CHUNK:]


def test_fault_chunks_from_env(monkeypatch):
    monkeypatch.delenv("SWARM_FAULT_CORRUPT_CHUNKS", raising=False)
    assert fault_chunks_from_env() == frozenset()
    monkeypatch.setenv("SWARM_FAULT_CORRUPT_CHUNKS", "3, 7")
    assert fault_chunks_from_env() == frozenset({3, 7})
    monkeypatch.setenv("SWARM_FAULT_CORRUPT_CHUNKS", "three")
    with pytest.raises(BadInputError, match="SWARM_FAULT_CORRUPT_CHUNKS"):
        fault_chunks_from_env()


def test_concurrent_fetches_share_one_transfer(source, serve, tmp_path):
    path, data = source
    servicer = Servicer(path)
    fetch = serve(servicer)
    dest = tmp_path / "shards"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: fetch_shard(fetch, spec_for(data), dest, progress=False), range(2)))
    assert sorted(fetched for _, fetched in results) == [False, True]
    assert servicer.offsets == [0]
    assert (dest / NAME).read_bytes() == data


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_log_lines_and_bar():
    out = io.StringIO()
    bar = Progress("fetching x", 100, stream=out)
    for done in range(0, 101, 10):
        bar.update(done)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["30%", "50%", "80%", "100%"]  # the first past each quarter

    tty = _Tty()
    bar = Progress("fetching x", 100, stream=tty)
    bar.update(40)
    bar.update(100)
    bar.close()
    drawn = tty.getvalue()
    assert drawn.startswith("\rfetching x [") and " 40% " in drawn
    assert drawn.endswith("MB/s\n") and "\r" in drawn.rsplit("100%", 1)[0]
