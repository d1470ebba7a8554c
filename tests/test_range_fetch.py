"""A node builds its shard from the model's URL with HTTP Range requests: byte-identical, verified, resumable."""

from __future__ import annotations

import http.server
import logging
import re
import threading
from pathlib import Path

import pytest

from swarm import rangefetch
from swarm.cache import file_digest
from swarm.layers import LayerRange
from swarm.messages import ShardSpec
from swarm.slicing import slice_model
from swarm.transfer import iter_chunks
from tests.tiny_models import write_tiny_llama


class RangeServer(http.server.ThreadingHTTPServer):
    """Serves one file; `mode`: "range" (206 for a Range), "norange" (always 200 whole), "corrupt" (flips bytes
    past the header), "drop" (the first tensor response is cut after `drop_after` bytes)."""

    daemon_threads = True

    def __init__(self, path: Path, mode: str = "range", drop_after: int = 0):
        self.path, self.mode, self.drop_after = path, mode, drop_after
        self.ranges: list[str] = []
        self.body_bytes = 0
        self.dropped = False
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{self.path.name}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        srv: RangeServer = self.server
        size = srv.path.stat().st_size
        rng = self.headers.get("Range")
        srv.ranges.append(rng)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if srv.mode == "norange" or not m:
            data = srv.path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for i in range(0, len(data), 65536):
                    self.wfile.write(data[i:i + 65536])
                    srv.body_bytes += len(data[i:i + 65536])
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        start = int(m.group(1))
        end = min(int(m.group(2)) + 1 if m.group(2) else size, size)
        with open(srv.path, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        if srv.mode == "corrupt" and start > 4096:
            body = bytes(b ^ 0xFF for b in body[:16]) + body[16:]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.mode == "drop" and not srv.dropped and start > 0 and len(body) > srv.drop_after:
            srv.dropped = True
            self.wfile.write(body[:srv.drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    return path


def coordinator_spec(model: Path, layers: LayerRange, out: Path) -> ShardSpec:
    shard = slice_model(model, layers, out)
    return ShardSpec(shard.shard_id, shard.path.name, shard.path.stat().st_size, file_digest(shard.path), layers,
                     shard.n_layer_total)


def coordinator_fetch(out: Path, calls: list):
    def fetch(shard_id: str, offset: int):
        calls.append((shard_id, offset))
        return iter_chunks(next(out.glob("*.gguf")), offset)
    return fetch


@pytest.mark.parametrize("layers", [LayerRange(0, 2), LayerRange(1, 3), LayerRange(2, 4)])
def test_shard_from_url_is_the_coordinators(model, tmp_path, layers):
    spec = coordinator_spec(model, layers, tmp_path / "coord")
    srv = RangeServer(model)
    try:
        calls = []
        path, moved = rangefetch.fetch_shard_via_url(srv.url, coordinator_fetch(tmp_path / "coord", calls), spec,
                                                     tmp_path / "node", progress=False)
    finally:
        srv.shutdown()
    assert moved and calls == []  # nothing came from the coordinator
    assert path.read_bytes() == (tmp_path / "coord" / spec.file_name).read_bytes()
    assert file_digest(path) == spec.sha256
    assert all(r and r.startswith("bytes=") for r in srv.ranges)


def test_wrong_bytes_are_caught_and_the_coordinator_serves(model, tmp_path, caplog):
    layers = LayerRange(1, 3)
    spec = coordinator_spec(model, layers, tmp_path / "coord")
    srv = RangeServer(model, mode="corrupt")
    calls = []
    try:
        with caplog.at_level(logging.WARNING, logger="swarm.rangefetch"):
            path, moved = rangefetch.fetch_shard_via_url(srv.url, coordinator_fetch(tmp_path / "coord", calls), spec,
                                                         tmp_path / "node", progress=False)
    finally:
        srv.shutdown()
    assert "sha256" in caplog.text and "from the coordinator" in caplog.text
    assert calls == [(spec.shard_id, 0)]  # the fallback ran, from scratch
    assert moved and file_digest(path) == spec.sha256
    assert path.read_bytes() == (tmp_path / "coord" / spec.file_name).read_bytes()
    assert not list((tmp_path / "node").glob(".*.part"))


def test_interrupted_fetch_resumes_with_the_rest(model, tmp_path, monkeypatch):
    layers = LayerRange(1, 3)
    spec = coordinator_spec(model, layers, tmp_path / "coord")
    monkeypatch.setattr(rangefetch, "READ_SIZE", 1024)
    srv = RangeServer(model, mode="drop", drop_after=3000)
    try:
        path = rangefetch.fetch_from_url(srv.url, spec, tmp_path / "node", progress=False)
    finally:
        srv.shutdown()
    assert srv.dropped and file_digest(path) == spec.sha256
    tensor_ranges = [tuple(map(int, r[6:].split("-"))) for r in srv.ranges if not r.startswith("bytes=0-")]
    # The cut range is asked for again from where it stopped, not from its start.
    pairs = [(a, b) for a, b in zip(tensor_ranges, tensor_ranges[1:]) if a[1] == b[1]]
    assert len(pairs) == 1, srv.ranges
    (cut, again), = pairs
    assert again[0] == cut[0] + 3000, srv.ranges
    assert len(tensor_ranges) == len(set(r[1] for r in tensor_ranges)) + 1  # nothing else asked for twice


def test_server_without_range_falls_back_without_reading_the_model(model, tmp_path, caplog):
    spec = coordinator_spec(model, LayerRange(1, 3), tmp_path / "coord")
    srv = RangeServer(model, mode="norange")
    calls = []
    try:
        with caplog.at_level(logging.WARNING, logger="swarm.rangefetch"):
            path, _ = rangefetch.fetch_shard_via_url(srv.url, coordinator_fetch(tmp_path / "coord", calls), spec,
                                                     tmp_path / "node", progress=False)
    finally:
        srv.shutdown()
    assert "does not serve byte ranges" in caplog.text
    assert calls == [(spec.shard_id, 0)] and file_digest(path) == spec.sha256
    assert len(srv.ranges) == 1  # one request, answered 200: closed at once, no second try


def test_unreachable_url_falls_back(model, tmp_path):
    spec = coordinator_spec(model, LayerRange(0, 2), tmp_path / "coord")
    calls = []
    path, _ = rangefetch.fetch_shard_via_url("http://127.0.0.1:9/x.gguf", coordinator_fetch(tmp_path / "coord", calls),
                                             spec, tmp_path / "node", progress=False)
    assert calls and file_digest(path) == spec.sha256


def test_swarm_node_gets_its_shard_from_the_models_url(tmp_path, model_path, reference):
    """A real swarm: the coordinator names the URL, the node with an empty cache builds its shard from it."""
    from tests.procs import Swarm

    srv = RangeServer(Path(model_path))
    swarm = Swarm(tmp_path, model_path, ["--layers", "0:9", "--max-sessions", "1", "--model-url", srv.url],
                  [["--layers", "9:18"]])
    try:
        client = swarm.wait_ready()
        node_log = swarm.procs[1].text()
        assert "from the model's URL" in node_log and "fetching it from the coordinator" not in node_log, node_log
        tensor_requests = [r for r in srv.ranges if r and not r.startswith("bytes=0-")]
        assert tensor_requests  # the node asked for its tensors' ranges, not the whole file
        prompt = "The capital of France is"
        _, expected, _ = reference.run(prompt, 16)
        assert client.complete(prompt, max_tokens=16).tokens == expected
    finally:
        swarm.close()
        srv.shutdown()
