"""The long fuzz run: the targets of tests/test_fuzz_wire.py and tests/test_fuzz_files.py, for minutes each.

    python scripts/fuzz.py                       # 3 minutes per target
    python scripts/fuzz.py --minutes 1 --targets grpc,steps
    python scripts/fuzz.py --examples 5000       # a number of cases per target instead of a time

Targets: grpc (every handler of both services, random and mutated messages, against a real coordinator
process), steps (raw frames on its step stream), kv (damaged blobs, forged states, deltas and headers;
what passes the checks is imported into llama.cpp in a child process), gguf (mutated headers of the tiny
model and, when installed, the packaged default model). Prints, per target, the cases tried, the crashes
(a process that died, or an INTERNAL/UNKNOWN answer: an exception that escaped a handler), the hangs, and
whether the server still answered a normal request at the end. Exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

from google.protobuf.message import DecodeError  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzz_files as ff  # noqa: E402
import fuzzing as fz  # noqa: E402
from swarm.engine.kvblob import _parse_kv_blob  # noqa: E402

CHUNK = 200  # cases per hypothesis run; runs repeat with new seeds until the budget is spent


def _drive(name: str, strategy, case, budget_s: float, examples: int | None, base_seed: int) -> int:
    """Run `case(value)` on values of `strategy` until the time or the number of examples is used up."""
    done, t0, i = 0, time.monotonic(), 0
    while (examples is None and time.monotonic() - t0 < budget_s) or (examples is not None and done < examples):
        n = CHUNK if examples is None else min(CHUNK, examples - done)
        count = [0]

        @seed(base_seed + i)
        @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(value):
            if examples is None and time.monotonic() - t0 >= budget_s:
                return
            count[0] += 1
            case(value)

        run()
        done += count[0]
        i += 1
        print(f"  {name}: {done} cases, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return done


class Wire:
    """The grpc and steps targets, on one coordinator process (started again if one dies)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        (tmp / "swarm-0").mkdir()
        self.target = fz.Target(tmp / "swarm-0", hang_s=15.0)
        self.kv = ff.kv_material(self.target.swarm.tmp / "tiny.gguf")["full"]
        self.restarts = 0

    def _restart_if_dead(self) -> None:
        if not self.target.alive():
            self.target.close()
            self.restarts += 1
            path = self.tmp / f"swarm-{self.restarts}"
            path.mkdir()
            self.target = fz.Target(path, hang_s=15.0)

    def grpc(self, tally: fz.Tally, budget_s: float, examples: int | None, base_seed: int) -> None:
        t = self.target
        cases = []
        for service, method in fz.methods():
            cls = fz.getattr_path(method.input_type)
            cases.append(st.tuples(st.just((service, method)), st.lists(
                fz.message_strategy(cls, [t.address, t.step_address]), min_size=1, max_size=2)))
            seeds = [s.SerializeToString() for s in t.seeds(self.kv)[method.name]]
            cases.append(st.tuples(st.just((service, method)), st.tuples(st.sampled_from(seeds), fz.mutations(),
                                                                          st.just(cls))))

        def case(value):
            (service, method), requests = value
            if isinstance(requests, tuple):  # a mutation of a valid request
                raw, ops, cls = requests
                try:
                    requests = [cls.FromString(fz.mutate(raw, ops))]
                except DecodeError:
                    return
            self.target.prepare(method.name)
            self.target.judge(tally, f"{method.name}({requests!r:.400})", *self.target.call(service, method, requests))
            if not self.target.alive() or not self.target.answers():
                tally.answering = self.target.alive() and self.target.answers()
                self._restart_if_dead()
            self.target.restore()

        tally.cases = 0
        _drive("grpc", st.one_of(cases), case, budget_s, examples, base_seed)
        tally.answering = self.target.alive() and self.target.answers()

    def steps(self, tally: fz.Tally, budget_s: float, examples: int | None, base_seed: int) -> None:
        t = self.target
        valid = fz.pb.ForwardRequest(session_id=fz.SESSION, n_positions=1, tokens=[1],
                                     layers=fz.pb.LayerSpan(start=0, end=fz.N_LAYER)).SerializeToString()
        streams = fz.step_streams(valid)

        def case(stream):
            via, data = stream
            self.target.judge_frames(tally, f"{via}: {data[:200]!r}", *self.target.send_raw(data, via))
            if not self.target.alive() or not self.target.step_answers():
                tally.answering = False
                self._restart_if_dead()

        _drive("steps", streams, case, budget_s, examples, base_seed)
        left = self.target.wait_connections_closed()
        if left:
            tally.hangs.append(("thread leak", f"{left} step connections still open after their callers left"))
        tally.answering = tally.answering and self.target.step_answers()

    def close(self) -> None:
        self.target.close()


def kv_target(tmp: Path, tally: fz.Tally, budget_s: float, examples: int | None, base_seed: int) -> None:
    from tiny_models import write_tiny_llama

    model = write_tiny_llama(tmp / "kv-tiny.gguf")
    kv = ff.kv_material(model)
    worker = ff.ImportWorker(model)
    head, dhead = _parse_kv_blob(kv["full"])[0], _parse_kv_blob(kv["delta"])[0]
    hot = ff.kv_fields(kv["full_payload"])
    edits = st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in ff.HEAD_EDITS.items()})
    strategy = st.one_of(
        st.tuples(st.just("blob"), st.sampled_from(["full", "delta"]), fz.mutations(hot=list(range(16)))),
        st.tuples(st.just("full"), fz.mutations(hot=hot), st.integers(-(1 << 31), 1 << 31), st.integers(0, 3)),
        st.tuples(st.just("delta"), fz.mutations(hot=list(range(0, 48, 4)))),
        st.tuples(st.just("head"), edits),
    )

    def imported(blob, what):
        answer = worker.load(blob)
        if answer.startswith("crash") or "BUG" in answer:
            tally.crashes.append((what, answer))
        elif not (answer == "ok" or answer.startswith(("KVStateError", "BadInputError"))):
            tally.bugs.append((what, answer))

    def case(value):
        tally.cases += 1
        kind, *rest = value
        if kind == "blob":
            problems = ff.kv_checks(kv, fz.mutate(kv[rest[0]], rest[1]), "blob")
        elif kind == "full":
            payload = ff.shift_positions(fz.mutate(kv["full_payload"], rest[0]), rest[2], rest[1] if rest[2] else 0)
            problems = ff.kv_checks(kv, payload, "full")
            imported(ff.forge(head, payload), repr(value)[:300])
        elif kind == "delta":
            problems = ff.kv_checks(kv, fz.mutate(kv["delta_payload"], rest[0]), "delta")
        else:
            problems = []
            imported(ff.forge(head, kv["full_payload"], rest[0]), repr(value))
        tally.bugs += [(repr(value)[:300], p) for p in problems]

    _drive("kv", strategy, case, budget_s, examples, base_seed)
    answer = worker.load(kv["full"])  # a valid state still loads
    tally.answering = answer == "ok"
    if not tally.answering:
        tally.bugs.append(("a valid KV state after the run", answer))
    worker.close()
    del dhead


def gguf_target(tmp: Path, tally: fz.Tally, budget_s: float, examples: int | None, base_seed: int) -> None:
    from tiny_models import write_tiny_llama

    inputs = [ff.gguf_material(write_tiny_llama(tmp / "gguf-tiny.gguf"))]
    try:
        from swarm.models import resolve_model

        data, start = ff.gguf_material(resolve_model("default"))
        inputs.append((data[:start], start))  # its header alone (with the vocabulary): 100 MB copies are slow
    except Exception as e:  # noqa: BLE001 - the tiny model is enough
        print(f"  gguf: the default model is not available ({e}); the tiny model only", file=sys.stderr)
    fields = [ff.gguf_fields(d) for d, _ in inputs]
    strategy = st.integers(0, len(inputs) - 1).flatmap(
        lambda i: st.tuples(st.just(i), fz.mutations(hot=fields[i]), st.booleans()))

    def case(value):
        i, ops, header_only = value
        data, start = inputs[i]
        tally.cases += 1
        problem = ff.gguf_check(fz.mutate(data[:start] if header_only else data, ops))
        if problem:
            (tally.hangs if problem.startswith("took") else tally.bugs).append((repr(value)[:300], problem))

    _drive("gguf", strategy, case, budget_s, examples, base_seed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="time per target (default 3)")
    ap.add_argument("--examples", type=int, default=None, help="cases per target instead of a time")
    ap.add_argument("--targets", default="grpc,steps,kv,gguf")
    ap.add_argument("--seed", type=int, default=None, help="base seed (default: random, printed)")
    args = ap.parse_args()
    base = args.seed if args.seed is not None else random.randrange(1 << 30)
    targets = args.targets.split(",")
    print(f"fuzzing {', '.join(targets)}: {args.examples or ''}{' cases' if args.examples else f'{args.minutes:g} min'}"
          f" per target, seed {base}")
    budget = args.minutes * 60
    results = {}
    with tempfile.TemporaryDirectory(prefix="swarm-fuzz-") as tmp:
        tmp = Path(tmp)
        os.environ["SWARM_CACHE_DIR"] = str(tmp / "cache")
        wire = Wire(tmp) if {"grpc", "steps"} & set(targets) else None
        try:
            for name in targets:
                tally = results[name] = fz.Tally()
                t0 = time.monotonic()
                if name in ("grpc", "steps"):
                    getattr(wire, name)(tally, budget, args.examples, base)
                elif name == "kv":
                    kv_target(tmp, tally, budget, args.examples, base)
                elif name == "gguf":
                    gguf_target(tmp, tally, budget, args.examples, base)
                else:
                    raise SystemExit(f"unknown target {name!r}: grpc, steps, kv or gguf")
                print(tally.line(name) + f"  ({time.monotonic() - t0:.0f} s)", flush=True)
                if tally.codes:
                    print("    outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.codes.items())))
                for kind in ("crashes", "bugs", "hangs"):
                    for what, detail in getattr(tally, kind)[:5]:
                        print(f"    {kind[:-1] if kind != 'crashes' else 'crash'}: {what}\n      -> {str(detail)[:600]}")
        finally:
            if wire is not None:
                print(f"coordinator restarts after a crash: {wire.restarts}")
                wire.close()
    return 0 if all(t.ok() for t in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
