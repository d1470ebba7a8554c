"""The shard cache's cap: LRU eviction, holds across real processes, kill -9, the CLI, real slicing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarm import shardcache
from swarm.messages import ShardSpec
from swarm.errors import BadInputError, ModelFileError
from swarm.layers import LayerRange

HOUR = 3600.0
# A process that holds a path until killed: `hold` as a node holds its shard, `fetch` as a fetch holds
# the lock file of its partial download.
HOLDER = """
import fcntl, os, sys, time
from swarm import shardcache
path, how = sys.argv[1], sys.argv[2]
if how == "hold":
    held = shardcache.hold(path)
else:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def shards(tmp_path, monkeypatch) -> Path:
    """A private, empty cache (no cap from the environment); its shards folder."""
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(shardcache.LIMIT_ENV, raising=False)
    return shardcache.shards_dir()


def fake(folder: Path, name: str, size: int = 1000, used_ago: float = 0.0) -> Path:
    """A file of `size` bytes in the shards folder, last used `used_ago` seconds ago."""
    path = folder / name
    path.write_bytes(os.urandom(size))
    t = time.time() - used_ago
    os.utime(path, (t, t))
    return path


def name(i: int, start: int = 0, end: int = 4) -> str:
    return f"llama-{i:016x}-L{start}-{end}.gguf"


@pytest.fixture
def holder():
    """Start processes that hold a path; they are killed at the end."""
    procs = []

    def start(path: Path, how: str = "hold") -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), how], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def names(entries) -> list[str]:
    return [e.name for e in entries]


# ---------------------------------------------------------------- pure logic on small files


def test_least_recently_used_go_first_until_the_cap_is_met(shards):
    a, b, c = (fake(shards, name(i), 1000, ago) for i, ago in ((1, 3 * HOUR), (2, 2 * HOUR), (3, HOUR)))
    assert names(shardcache.entries()) == [a.name, b.name, c.name]
    result = shardcache.evict(2500)
    assert names(result.removed) == [a.name] and result.total == 2000 and not result.over
    assert not a.exists() and b.exists() and c.exists()
    assert names(shardcache.evict(1000).removed) == [b.name]
    assert shardcache.evict(1000).removed == [] and c.exists()


def test_a_use_makes_a_shard_the_most_recent(shards):
    a = fake(shards, name(1), used_ago=2 * HOUR)
    b = fake(shards, name(2), used_ago=HOUR)
    shardcache.touch(a)
    assert (shards / f".{a.name}.used").exists()  # the shard's own mtime stays: digests are keyed by it
    assert names(shardcache.entries()) == [b.name, a.name]
    assert names(shardcache.evict(1000).removed) == [b.name]


def test_kept_and_older_than(shards):
    old = fake(shards, name(1), used_ago=10 * HOUR)
    new = fake(shards, name(2), used_ago=0.5 * HOUR)
    result = shardcache.evict(None, older_than=HOUR)  # no cap: only the age decides
    assert names(result.removed) == [old.name] and new.exists()
    assert shardcache.evict(0, keep=[new]).removed == [] and new.exists()
    assert names(shardcache.evict(0).removed) == [new.name]


def test_dry_run_removes_nothing(shards):
    a = fake(shards, name(1))
    assert names(shardcache.evict(0, dry_run=True).removed) == [a.name] and a.exists()


def test_a_hold_in_this_process_protects_until_released(shards):
    a = fake(shards, name(1), used_ago=HOUR)
    with shardcache.hold(a) as path:
        assert path == a
        assert [e.in_use for e in shardcache.entries()] == [True]
        result = shardcache.evict(0)
        assert result.removed == [] and names(result.in_use) == [a.name] and result.over and a.exists()
    assert [e.in_use for e in shardcache.entries()] == [False]
    assert names(shardcache.evict(0).removed) == [a.name]


def test_holding_a_missing_file_says_what_to_do(shards):
    with pytest.raises(ModelFileError, match="does not exist"):
        shardcache.hold(shards / name(1))


def test_files_outside_the_shards_folder_are_never_touched(shards, tmp_path):
    model = shards.parent / "models" / "mine.gguf"
    model.parent.mkdir()
    model.write_bytes(b"x" * 5000)
    profile = shards.parent / "profiles" / "p.json"
    profile.parent.mkdir()
    profile.write_text("{}")
    elsewhere = fake(tmp_path, name(9))
    shardcache.after_write(elsewhere)  # a shard written outside the cache (`swarm shard -o`)
    shardcache.touch(elsewhere)
    assert shardcache.entries() == [] and shardcache.evict(0).removed == []
    assert model.exists() and profile.exists() and elsewhere.exists()
    assert not (tmp_path / f".{elsewhere.name}.used").exists()


def test_leftovers_of_dead_writers_are_cleaned(shards):
    dead = fake(shards, f".{name(1)}.4242.tmp", used_ago=HOUR)  # a slicer killed mid-write
    fresh = fake(shards, f".{name(2)}.4243.tmp")  # a slicer writing right now
    orphan = shards / f".{name(3)}.used"  # the use record of a shard that is gone
    orphan.touch()
    assert names(shardcache.evict(None).removed) == [dead.name]
    assert not dead.exists() and fresh.exists() and not orphan.exists()


def test_parse_limit():
    assert shardcache.parse_limit("20GB") == 20 << 30
    assert shardcache.parse_limit(" 500mb ") == 500 << 20
    for word in ("none", "OFF", "0", "0GB", "unlimited"):
        assert shardcache.parse_limit(word) is None
    with pytest.raises(BadInputError, match="cannot read --cache-limit 'abc'.*20GB.*none"):
        shardcache.parse_limit("abc")
    with pytest.raises(BadInputError, match="negative"):
        shardcache.parse_limit("-5GB")
    from swarm.join import parse_size  # --max-memory: one size grammar for both options

    for text in ("4GB", "512M", "1.5GiB", "1000", "2 tb", "0.5K"):
        assert shardcache.parse_limit(text) == parse_size(text)


def test_limit_from_the_environment_or_the_default(shards, monkeypatch):
    monkeypatch.setenv(shardcache.LIMIT_ENV, "3GB")
    assert shardcache.limit_from_env_or_default() == 3 << 30
    monkeypatch.setenv(shardcache.LIMIT_ENV, "none")
    assert shardcache.limit_from_env_or_default() is None
    monkeypatch.setenv(shardcache.LIMIT_ENV, "lots")
    with pytest.raises(BadInputError, match=r"\$SWARM_CACHE_LIMIT 'lots'"):
        shardcache.limit_from_env_or_default()
    monkeypatch.delenv(shardcache.LIMIT_ENV)
    assert shardcache.limit_from_env_or_default() <= shardcache.DEFAULT_LIMIT
    fake(shards, name(1), 1000)
    # A small disk: half of what the cache could take (free space plus its shards).
    monkeypatch.setattr(shardcache.shutil, "disk_usage", lambda _: _Usage(3000))
    assert shardcache.default_limit() == (3000 + 1000) // 2


class _Usage:
    def __init__(self, free: int):
        self.free = free


# ---------------------------------------------------------------- other processes


def test_a_shard_held_by_another_process_is_kept_until_it_is_killed(shards, holder):
    held = fake(shards, name(1), used_ago=3 * HOUR)
    free = fake(shards, name(2), used_ago=2 * HOUR)
    proc = holder(held)
    assert {e.name: e.in_use for e in shardcache.entries()} == {held.name: True, free.name: False}
    result = shardcache.evict(0)
    assert names(result.removed) == [free.name] and names(result.in_use) == [held.name] and held.exists()
    os.kill(proc.pid, signal.SIGKILL)  # no release, no cleanup: the kernel drops the lock
    proc.wait()
    assert names(shardcache.evict(0).removed) == [held.name] and not held.exists()


def test_a_download_in_progress_is_kept_and_a_dead_ones_partial_goes(shards, holder):
    part = fake(shards, f".{name(1)}.part", 500, used_ago=HOUR)
    proc = holder(shards / f".{name(1)}.lock", "fetch")  # what transfer.fetch_shard holds while it writes
    [entry] = shardcache.entries()
    assert entry.partial and entry.in_use
    assert shardcache.evict(0).removed == [] and part.exists()
    proc.kill()
    proc.wait()
    assert names(shardcache.evict(0).removed) == [part.name] and not part.exists()


def test_fetching_a_shard_evicts_older_ones_but_not_itself(shards, tmp_path, monkeypatch):
    from swarm.transfer import fetch_shard, iter_chunks

    old = fake(shards, name(1), 3000, used_ago=HOUR)
    data = os.urandom(2000)
    source = tmp_path / "served.gguf"
    source.write_bytes(data)
    spec = ShardSpec("s", name(2), len(data), hashlib.sha256(data).hexdigest(), LayerRange(0, 1), 1)
    monkeypatch.setenv(shardcache.LIMIT_ENV, "1")  # one byte: nothing unused may stay
    path, fetched = fetch_shard(lambda shard_id, offset: iter_chunks(source, offset), spec, shards, progress=False)
    assert fetched and path.read_bytes() == data and not old.exists()
    assert names(shardcache.entries()) == [path.name]


# ---------------------------------------------------------------- real slicing of the real model


def test_cutting_shards_of_the_real_model_evicts_the_least_recently_used(model_path, shards, monkeypatch, caplog):
    from swarm.engine import Shard
    from swarm.slicing import slice_model

    monkeypatch.setenv(shardcache.LIMIT_ENV, "1")  # one byte: every shard no one uses goes at the next cut
    caplog.set_level(logging.INFO, logger="swarm.shardcache")
    a = slice_model(model_path, LayerRange(1, 2)).path
    b = slice_model(model_path, LayerRange(2, 3)).path
    assert b.parent == shards and b.exists() and not a.exists()
    assert f"evicted {a.name}" in caplog.text
    loaded = Shard(b, n_ctx=64)  # a loaded shard holds its file
    try:
        c = slice_model(model_path, LayerRange(3, 4)).path
        assert b.exists() and c.exists()
        assert {e.name: e.in_use for e in shardcache.entries()} == {b.name: True, c.name: False}
    finally:
        loaded.close()
    d = slice_model(model_path, LayerRange(4, 5)).path
    assert names(shardcache.entries()) == [d.name]
    assert slice_model(model_path, LayerRange(4, 5)).path == d  # reused, not cut again


# ---------------------------------------------------------------- the command line


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_cli_lists_and_prunes(shards, holder):
    held = fake(shards, name(1, 0, 4), 3 << 20, used_ago=5 * 24 * HOUR)
    mid = fake(shards, name(2, 4, 8), 2 << 20, used_ago=2 * HOUR)
    new = fake(shards, name(3, 8, 12), 1 << 20, used_ago=HOUR)
    ancient = fake(shards, name(4, 12, 16), 1 << 20, used_ago=10 * 24 * HOUR)
    proc = holder(held)  # loading it is a use: it is the most recent now

    done = cli("cache")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "4 file(s), 7.0 MB of a" in lines[0] and "default" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == [held.name, new.name, mid.name, ancient.name]
    assert lines[2].endswith("in use") and "0:4" in lines[2] and "llama" in lines[2]

    listed = json.loads(cli("cache", "list", "--json", "--cache-limit", "2MB").stdout)
    assert listed["limit"] == 2 << 20 and listed["total"] == 7 << 20
    assert [(s["name"], s["in_use"], s["layers"]) for s in listed["shards"]] == [
        (held.name, True, [0, 4]), (new.name, False, [8, 12]), (mid.name, False, [4, 8]),
        (ancient.name, False, [12, 16])]

    done = cli("cache", "prune", "--older-than", "1d")  # under the default cap: only the age counts
    assert done.returncode == 0, done.stderr
    assert f"removed {ancient.name}" in done.stdout and "removed 1 file(s)" in done.stdout and not ancient.exists()
    done = cli("cache", "prune", "--cache-limit", "4MB", "--dry-run")
    assert done.returncode == 0 and done.stdout.startswith(f"would remove {mid.name}") and mid.exists()
    done = cli("cache", "prune", "--cache-limit", "2MB")
    assert done.returncode == 0, done.stderr
    assert f"removed {mid.name}" in done.stdout and f"removed {new.name}" in done.stdout
    assert f"kept {held.name} (3.0 MB): in use" in done.stdout and "still over the cap" in done.stdout
    assert not mid.exists() and not new.exists() and held.exists()

    pruned = json.loads(cli("cache", "prune", "--all", "--json").stdout)
    assert pruned["removed"] == [] and [e["name"] for e in pruned["in_use"]] == [held.name]
    proc.kill()
    proc.wait()
    done = cli("cache", "prune", "--all")
    assert done.returncode == 0 and f"removed {held.name}" in done.stdout and not held.exists()


@pytest.mark.parametrize("args,env,message", [
    (["cache", "--cache-limit", "abc"], {}, "cannot read --cache-limit 'abc'"),
    (["cache", "prune", "--cache-limit=-5GB"], {}, "negative"),
    (["cache"], {"SWARM_CACHE_LIMIT": "abc"}, "cannot read $SWARM_CACHE_LIMIT 'abc'"),
    (["cache", "prune"], {"SWARM_CACHE_LIMIT": "none"}, "use --all"),
    (["cache", "prune", "--older-than", "soon"], {}, "like 7d"),
    (["cache", "list", "--all"], {}, "for `swarm cache prune`"),
    (["join", "--cache-limit", "abc"], {}, "cannot read --cache-limit 'abc'"),
    (["join", "--cache-limit", "-1"], {}, "negative"),
    (["join"], {"SWARM_CACHE_LIMIT": "12 parsecs"}, "$SWARM_CACHE_LIMIT"),
])
def test_cli_refuses_bad_input(shards, args, env, message):
    done = cli(*args, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
