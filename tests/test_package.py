"""The package: every module imports on its own, the public names stay, the command line works end to end."""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import swarm
from conftest import PROMPTS

MODULES = sorted(m.name for m in pkgutil.walk_packages(swarm.__path__, "swarm.")  # subpackages too
                 if not m.name.endswith(".__main__"))  # (those run a program when imported)
ROOT = Path(swarm.__file__).parent

# Data flows one way: a module imports only from its own layer or the ones below (docs/architecture.md).
LAYERS = [
    {"errors", "layers", "messages", "sampling", "textstream", "cache", "shardcache", "models", "gguf_file",
     "slicing", "kvstate", "_proto"},  # the shared vocabulary and the files
    {"engine", "chat_template", "profiling", "transfer", "rangefetch", "planner", "placement", "failover", "discovery",
     "calibration"},
    {"node", "chain"},
    {"wire"},
    {"coordinator"},
    {"http"},
    {"client"},
    {"join", "local"},
    {"cli"},
]


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_alone(name):
    subprocess.run([sys.executable, "-c", f"import {name}"], check=True, timeout=120)


def _imports(path: Path) -> set[str]:
    """The swarm modules and outside packages a source file imports, as absolute names."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.update([module] if node.module else [f"{module}.{a.name}" for a in node.names])
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "swarm" or len(parts) < 2:
        return None
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), None)


def _sources():
    return [p for p in sorted(ROOT.rglob("*.py")) if "_proto" not in p.parts]


def test_every_module_has_a_layer():
    tops = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in _sources()} - {"__init__"}
    assert tops == set().union(*LAYERS) - {"_proto"}, "add new modules to LAYERS (and to docs/architecture.md)"


def test_data_flows_one_way():
    wrong = []
    for path in _sources():
        mine = _layer("swarm." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        for module in _imports(path):
            theirs = _layer(module)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{path.relative_to(ROOT.parent)} imports {module}")
    assert not wrong, "a lower layer imports a higher one:\n" + "\n".join(wrong)


def test_protobuf_only_at_the_wire():
    found = [f"{p.relative_to(ROOT.parent)}: {m}" for p in _sources() if p.relative_to(ROOT).parts[0] != "wire"
             for m in _imports(p) if m.startswith(("swarm._proto", "google.protobuf"))]
    assert not found, "protobuf outside swarm/wire/:\n" + "\n".join(found)


def test_modules_stay_small():
    long = [f"{p.relative_to(ROOT.parent)}: {n} lines" for p in _sources()
            if (n := len(p.read_text().splitlines())) > 450]
    assert not long, "modules over 450 lines (split the second job out):\n" + "\n".join(long)


def test_public_names():
    assert set(swarm.__all__) == {
        "BadInputError", "ContextFullError", "EngineError", "KVStateError", "ModelFileError",
        "ShardRangeError", "SwarmError", "UnsupportedModelError", "LayerRange", "ShardRole",
    }
    assert all(issubclass(getattr(swarm, n), swarm.SwarmError) for n in swarm.__all__ if n.endswith("Error"))


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "swarm.cli", *args], capture_output=True, text=True, timeout=600, env=env
    )


def test_swarm_run_streams_the_reference_text_through_three_shards(reference, _private_cache):
    prompt = PROMPTS[0]
    _, expected, _ = reference.run(prompt)
    import llama_cpp

    n = 24
    done = _cli("run", "-m", "gemma3-270m", "-p", prompt, "-n", str(n), "--shards", "3", "--stats")
    assert done.returncode == 0, done.stderr
    assert "cut into 3 shards: 0:6 (first" in done.stderr
    assert "decode" in done.stderr and "tokens/s" in done.stderr
    llm = llama_cpp.Llama(model_path=str(reference.path), n_ctx=512, verbose=False, vocab_only=True)
    text = llm.detokenize(expected[:n]).decode("utf-8", errors="replace")
    assert done.stdout == prompt + text + "\n"


def test_a_shard_of_global_attention_layers_only_runs_or_is_refused_clearly(reference):
    """Gemma 3's layers 5, 11 and 17 are its only global-attention layers, so a shard of layer 17 alone has no
    sliding-window layer. It must run like any other cut (the reference text) or be refused with an error
    that names the range; it must not take the process down inside llama.cpp (it aborted in
    `GGML_ASSERT(hparams.is_swa_any())`, exit -6, where the planner or `--layers 17:18` can put such a range)."""
    prompt, n = PROMPTS[0], 16
    _, expected, _ = reference.run(prompt)
    import llama_cpp

    done = _cli("run", "-m", "gemma3-270m", "-p", prompt, "-n", str(n), "--split", "0:17,17:18")
    if done.returncode == 2:  # refused: it must say which range and why, as every CLI error does
        assert "17:18" in done.stderr and "Traceback" not in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr[-3000:]
    llm = llama_cpp.Llama(model_path=str(reference.path), n_ctx=512, verbose=False, vocab_only=True)
    assert done.stdout == prompt + llm.detokenize(expected[:n]).decode("utf-8", errors="replace") + "\n"


def test_swarm_shard_and_info(model_path, tmp_path):
    done = _cli("shard", "-m", "gemma3-270m", "--layers", "6:12", "-o", str(tmp_path))
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip()
    assert path.endswith("-L6-12.gguf")
    info = _cli("info", "-m", path)
    assert info.returncode == 0 and "layers        6:12 of 18 (middle)" in info.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "-m", "/nonexistent.gguf"], "does not exist"),
        (["run", "-m", "gemma3-270m", "--split", "0:6,6:20"], "the model has 18 layers"),
        (["run", "--split", "0-6"], "START:END"),
        (["run", "--top-p", "2"], "top_p must be in"),
        (["shard", "-m", "gemma3-270m", "--layers", "10:30"], "outside the model"),
        (["run", "-n", "600"], "raise --ctx or lower --max-tokens"),
        (["run", "--threads", "-2"], "--threads must be at least 1"),
        (["run", "--shards", "0"], "--shards must be at least 1"),
    ],
)
def test_cli_errors_are_clear(args, message):
    done = _cli(*args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_layer_capture_falls_back_to_python_when_compiling_fails(tmp_path, model_path):
    """A machine whose compiler fails still runs shards, through the Python callback."""
    import os

    code = (
        "from swarm.chain import LocalChain; import sys;"
        f"c = LocalChain({str(model_path)!r}, 2);"
        "print(c.shards[0]._capture.kind, len(list(c.generate('Hello', 4, stop_at_eog=False))))"
    )
    env = {**os.environ, "CC": "/bin/false", "SWARM_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["python", "4"]


# Records GOMP_SPINCOUNT at the moment llama_cpp (and with it libgomp, which reads it once) is imported.
_SPIN_AT_LOAD = r"""
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "llama_cpp" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
        return None
sys.meta_path.insert(0, Watch())
from swarm.join import resources
resources(with_devices=True)  # what every `swarm join` does first
print(seen)
"""


def test_openmp_spin_is_set_before_llama_cpp_loads():
    """Every `swarm join` lists its devices first; that must not load llama.cpp before the spin is set.

    (It once did: libgomp then spun ~7 ms after every graph, stealing the cores of the shards that
    share a machine.)
    """
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    done = subprocess.run([sys.executable, "-c", _SPIN_AT_LOAD], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['5000']"


# Steps asked for by the main thread, then by four more threads (as gRPC serves a coordinator's
# sessions); counts the threads the process gains from the four beyond the callers themselves.
_GRAPH_THREADS = r"""
import json, os, sys, threading
from swarm.chain import LocalChain
chain = LocalChain(sys.argv[1], 2, n_threads=2)
sid = chain.open_session()
tokens, turn, done, hold = chain.tokenizer.tokenize("Hello"), threading.Lock(), [], threading.Event()
done.append(int(chain.step(sid, tokens).argmax()))  # whatever runs graphs exists from here on
before = len(os.listdir("/proc/self/task"))
def caller():
    with turn:  # one step after another, each from its own thread
        done.append(int(chain.step(sid, [done[-1]]).argmax()))
    hold.wait()  # alive while counting: a thread's OpenMP team lives as long as the thread
callers = [threading.Thread(target=caller) for _ in range(4)]
for t in callers:
    t.start()
while len(done) < 5:
    threading.Event().wait(0.01)
print(len(os.listdir("/proc/self/task")) - before - len(callers), json.dumps(done[:4]))
hold.set()
"""


def test_graphs_run_on_one_thread_whoever_asks(model_path, reference):
    """Each thread that starts a graph leads an OpenMP team of its own; with more OpenMP threads than
    CPUs, libgomp sleeps and wakes its threads at every barrier (a coordinator once did ~75 times per
    step). All graphs run on one compute thread: four more callers add no thread but themselves."""
    done = subprocess.run([sys.executable, "-c", _GRAPH_THREADS, str(model_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    added, tokens = done.stdout.split(" ", 1)
    assert int(added) == 0, f"steps from four threads started {added} more threads (OpenMP teams of their own)"
    assert json.loads(tokens) == reference.run("Hello", 4)[1], "steps from several threads changed the text"


# Runs a few steps with the process held to two CPUs, then prints the CPUs of every thread bound to
# fewer than those two, and the main thread's.
_BINDING = r"""
import json, os, sys
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
allowed = sorted(os.sched_getaffinity(0))
from swarm import engine
from swarm.chain import LocalChain
if sys.argv[3] == "swarm-process":  # as `swarm join` does
    engine.plan_threads(int(sys.argv[2]))
chain = LocalChain(sys.argv[1], 2, n_threads=int(sys.argv[2]))
out = list(chain.generate("Hello", 4, stop_at_eog=False))
threads = [sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")]
print(json.dumps({"allowed": allowed, "bound": sorted(c for c in threads if c != allowed),
                  "main": sorted(os.sched_getaffinity(0)), "tokens": out}))
"""


@pytest.mark.parametrize("threads, env, process, bound", [
    (2, {}, "swarm-process", True),  # the team covers both CPUs: one thread on each
    (1, {}, "swarm-process", False),  # a team on fewer CPUs than the process has: left to the kernel
    (2, {"SWARM_BIND_THREADS": "0"}, "swarm-process", False),  # turned off
    (2, {"OMP_PROC_BIND": "false"}, "swarm-process", False),  # the user's own OpenMP placement wins
    (2, {}, "library-user", False),  # their own threads may run graphs too: libgomp would bind those
])
def test_a_graphs_threads_get_a_cpu_each_only_where_they_use_all(model_path, reference, threads, env, process,
                                                                  bound):
    """Left free, the kernel at times put two threads of a graph's team on one CPU, and every barrier of
    the graph then waited for a time slice. In a `swarm join` process the team is bound one thread per
    CPU where it spans every CPU of the process; no other thread is bound."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this check needs a machine with at least two CPUs")
    environ = {k: v for k, v in os.environ.items()
               if k not in ("GOMP_CPU_AFFINITY", "OMP_PROC_BIND", "OMP_PLACES", "SWARM_BIND_THREADS")}
    done = subprocess.run([sys.executable, "-c", _BINDING, str(model_path), str(threads), process], capture_output=True,
                          text=True, timeout=300, env={**environ, **env})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    cpus = seen["allowed"]
    assert len(cpus) == 2 and seen["main"] == cpus, "only the graph's threads may be bound"
    assert seen["bound"] == ([[cpus[0]], [cpus[1]]] if bound else [])
    assert seen["tokens"] == reference.run("Hello", 4)[1]
