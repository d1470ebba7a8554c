"""The swarm over the network: real `swarm join` processes on 127.0.0.1, the real Gemma 3 270M model.

One three-node swarm (coordinator 0:6, nodes 6:12 and 12:18, each node with its own empty cache so
shard files travel over gRPC, one chunk corrupted on purpose) serves most tests; a two-node swarm found
by mDNS serves the discovery test.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import uuid

import grpc
import numpy as np
import pytest

from conftest import N_TOKENS, PROMPTS
from procs import Proc, Swarm, free_port
from swarm import messages as m
from swarm import wire
from swarm._proto import swarm_pb2 as pb
from swarm._proto import swarm_pb2_grpc as pbg
from swarm.client import SwarmClient
from swarm.errors import AuthError, BadInputError
from swarm.layers import LayerRange
from swarm.wire import steps, tls
from swarm.slicing import shard_info

KEY = "test-key-123-swarm-tests"


@pytest.fixture(scope="module")
def three(tmp_path_factory, model_path):
    tmp = tmp_path_factory.mktemp("three")
    swarm = Swarm(tmp, model_path, ["--layers", "0:6", "--max-sessions", "4"],
                  [["--layers", "6:12"], ["--layers", "12:18"]], key=KEY,
                  coordinator_env={"SWARM_FAULT_CORRUPT_CHUNKS": "1"})
    try:
        swarm.wait_ready()
        yield swarm
    finally:
        swarm.close()


def _node(three, layers: str) -> dict:
    for n in three.client.status()["nodes"]:
        if n["has_layers"] and f"{n['layers']['start']}:{n['layers']['end']}" == layers:
            return n
    raise AssertionError(f"no node holds {layers}")


def test_three_nodes_give_llama_cpp_text(three, reference):
    for prompt in PROMPTS:
        _, expected, _ = reference.run(prompt)
        got = three.client.complete(prompt, max_tokens=N_TOKENS)
        assert got.tokens == expected, prompt
        assert got.finish_reason == ("length" if len(expected) == N_TOKENS else "stop")


def test_four_concurrent_sessions_each_match_their_solo_run(three, reference):
    prompts = PROMPTS + ["Once upon a time, in a small village by the sea,"]
    expected = {p: reference.run(p)[1] for p in prompts}
    results, errors = {}, []

    def run(p):
        try:
            with SwarmClient(three.address, key=KEY) as c:  # a client per thread, like separate users
                results[p] = c.complete(p, max_tokens=N_TOKENS).tokens
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for p in prompts:
        assert results[p] == expected[p], p


def test_shards_arrived_over_the_wire_verified_and_a_corrupt_chunk_was_fetched_again(three):
    logs = "".join(p.text() for p in three.procs[1:])
    assert "failed its checksum" in logs, logs[-3000:]
    for i, layers in ((0, "6:12"), (1, "12:18")):
        shards = three.tmp / f"node{i}-cache" / "shards"
        assert not list(shards.glob(".*.part"))
        # Besides its own shard, a node holds the small slices it was measured with.
        held = {str(shard_info(f).layers): f for f in shards.glob("*.gguf")}
        assert layers in held and set(held) <= {layers, "1:2", "1:7"}, held
        assert f"serving layers {layers}" in three.procs[1 + i].text()


def test_status_json_shows_the_layer_map(three):
    done = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--json", "--coordinator", three.address,
                           "--key", KEY], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["state"] == "ready" and status["n_layer"] == 18
    assert status["chat_template"] == "llama.cpp built-in gemma"  # Gemma 3 270M's GGUF carries no template
    spans = sorted((n["layers"]["start"], n["layers"]["end"]) for n in status["nodes"] if n["has_layers"])
    assert spans == [(0, 6), (6, 12), (12, 18)]
    assert all(n["state"] == "ready" for n in status["nodes"])
    assert sum(n["is_coordinator"] for n in status["nodes"]) == 1
    # Every node names its step stream; the coordinator's, with a fixed --port, is on the port after it.
    assert all(n["step_address"] for n in status["nodes"])
    (me,) = [n for n in status["nodes"] if n["is_coordinator"]]
    assert int(me["step_address"].rsplit(":", 1)[1]) == int(three.address.rsplit(":", 1)[1]) + 1
    human = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--coordinator", three.address, "--key", KEY],
                           capture_output=True, text=True, timeout=60)
    assert human.returncode == 0 and "12:18" in human.stdout and "ready" in human.stdout


def test_cli_generate_streams_the_reference_text(three, reference, model_path):
    from swarm.engine import Tokenizer

    prompt = PROMPTS[0]
    _, expected, _ = reference.run(prompt)
    done = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", prompt, "-n", "24", "--stats",
                           "--coordinator", three.address, "--key", KEY], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    tok = Tokenizer(model_path)
    try:
        text = b"".join(tok.piece(t) for t in expected[:24]).decode("utf-8", errors="replace")
    finally:
        tok.close()
    assert done.stdout.decode().rstrip("\n") == text
    assert b"tokens/s" in done.stderr


def test_chat_answers_once_with_the_models_template(three):
    done = subprocess.run([sys.executable, "-m", "swarm.cli", "chat", "-p", "Say hello.", "-n", "12", "--temperature", "0",
                           "--coordinator", three.address, "--key", KEY], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with SwarmClient(three.address, key=KEY) as c:
        again = c.chat_complete([{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0)
    assert done.stdout == again.text + "\n"  # greedy: the same answer through the CLI and the library
    assert again.tokens


def _gemma_prompt_tokens(model_path, messages) -> list[int]:
    """The prompt for a conversation in Gemma's turn format (Gemma 3 270M's GGUF has no template, so
    the coordinator uses Gemma's), written out here by hand and tokenized by plain llama-cpp-python."""
    import llama_cpp

    text = "".join(f"<start_of_turn>{'model' if role == 'assistant' else role}\n{content.strip()}<end_of_turn>\n"
                   for role, content in messages) + "<start_of_turn>model\n"
    llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=True)
    finally:
        del llm


def test_interactive_chat_keeps_history_and_resets(three, model_path):
    """The second turn is answered with the first exchange in its prompt, and /reset forgets it: the
    coordinator's prompt count for each turn is that of the conversation so far rendered in Gemma's format,
    and each answer is the library's answer to exactly that conversation."""
    n = 12
    first, second = "Hi!", "Say it again."
    session = f"{first}\n{second}\n/reset\n{first}\n{second}\n/quit\n"
    done = subprocess.run([sys.executable, "-m", "swarm.cli", "chat", "-n", str(n), "--temperature", "0", "--stats",
                           "--coordinator", three.address, "--key", KEY], input=session, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "conversation forgotten" in done.stderr
    answers = [line for line in done.stdout.split("> ") if line.strip()]
    assert len(answers) == 4 and answers[0] == answers[2]  # after /reset the same question gets the same answer
    with SwarmClient(three.address, key=KEY) as c:
        one = c.chat_complete([("user", first)], max_tokens=n, temperature=0)
        history = [("user", first), ("assistant", one.text), ("user", second)]
        two = c.chat_complete(history, max_tokens=n, temperature=0)
        alone = c.chat_complete([("user", second)], max_tokens=n, temperature=0)
    # The question is one whose answer depends on the history (or the check below would prove nothing).
    assert two.text != alone.text
    # Everything the CLI printed, turn by turn (the /reset line prints no answer): the same answers again
    # after /reset, so it started from an empty conversation.
    assert done.stdout == f"> {one.text}\n> {two.text}\n> > {one.text}\n> {two.text}\n> "
    counts = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("prompt ")]
    expected = [len(_gemma_prompt_tokens(model_path, h)) for h in (history[:1], history)]
    assert [one.prompt_tokens, two.prompt_tokens] == expected
    assert counts == expected * 2, done.stderr


def test_stop_strings_and_sampling_options(three, reference):
    _, expected, _ = reference.run(PROMPTS[2])
    with SwarmClient(three.address, key=KEY) as c:
        full = c.complete(PROMPTS[2], max_tokens=N_TOKENS)
        assert full.tokens == expected
        stop = full.text[10:14]
        cut = c.complete(PROMPTS[2], max_tokens=N_TOKENS, stop=[stop])
        assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
        a = c.complete(PROMPTS[0], max_tokens=20, temperature=0.8, top_k=40, top_p=0.9, seed=11)
        b = c.complete(PROMPTS[0], max_tokens=20, temperature=0.8, top_k=40, top_p=0.9, seed=11)
        assert a.tokens == b.tokens and len(a.tokens) == 20  # seeded sampling is reproducible


# Every sampling option set away from its default, at a temperature high enough that changing any of them
# (repeat_last_n aside) changes the draw within a few tokens on this model; the test checks that it does.
SAMPLED = dict(temperature=1.2, top_k=20, top_p=0.9, min_p=0.05, repeat_penalty=1.3, repeat_last_n=16, seed=7)


def test_seeded_sampling_through_the_swarm_is_llama_cpps_logits_sampled_alike(three, reference):
    """The options must reach the final shard: the swarm's draw equals the same seeded draw made on plain
    llama-cpp-python's logits of the unsplit model. Reproducing it twice would not show that (a swarm that
    dropped the options would be greedy, and reproducible too)."""
    prompt, n = PROMPTS[0], 48
    expected = reference.sample(prompt, n, **SAMPLED)
    # The reference itself must tell each option apart, or equality would not prove it arrived.
    assert expected != reference.run(prompt, n)[1], "the sampled reference is the greedy text"
    for option, other in (("temperature", 0.6), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0),
                          ("repeat_penalty", 1.0), ("seed", 8)):
        assert reference.sample(prompt, 24, **{**SAMPLED, option: other}) != expected[:24], option
    got = three.client.complete(prompt, max_tokens=n, **SAMPLED)
    assert got.tokens == expected


def test_wrong_or_missing_key_is_refused(three, tmp_path):
    with SwarmClient(three.address, key="not-the-key-of-this-swarm") as c:
        with pytest.raises(AuthError, match="wrong swarm key"):
            c.status()
        with pytest.raises(AuthError, match="wrong swarm key"):
            c.complete("hello", max_tokens=2)
    node = _node(three, "6:12")
    ca = tls.credentials(KEY).ca_pem
    strangers = {  # no TLS; TLS without a certificate; a certificate of another swarm's key
        "plain": lambda a: grpc.insecure_channel(a),
        "anonymous": lambda a: grpc.secure_channel(a, grpc.ssl_channel_credentials(ca), options=tls.CHANNEL_OPTIONS),
        "other swarm": lambda a: wire.channel(a, "not-the-key-of-this-swarm"),
    }
    from google.protobuf import message_factory

    for kind, dial in strangers.items():
        for service, address in (("Coordinator", three.address), ("Node", three.address), ("Node", node["address"])):
            ch = dial(address)
            try:
                for method in pb.DESCRIPTOR.services_by_name[service].methods:  # every method of the service
                    request = message_factory.GetMessageClass(method.input_type)()
                    path = f"/{pb.DESCRIPTOR.package}.{service}/{method.name}"
                    if method.client_streaming:
                        call = ch.stream_unary(path, request_serializer=type(request).SerializeToString)
                        fire = lambda: call(iter([request]), timeout=10)  # noqa: E731
                    elif method.server_streaming:
                        call = ch.unary_stream(path, request_serializer=type(request).SerializeToString)
                        fire = lambda: list(call(request, timeout=10))  # noqa: E731
                    else:
                        call = ch.unary_unary(path, request_serializer=type(request).SerializeToString)
                        fire = lambda: call(request, timeout=10)  # noqa: E731
                    with pytest.raises(grpc.RpcError) as e:
                        fire()
                    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (kind, path)  # refused in the handshake
            finally:
                ch.close()
    intruder = Proc(["--coordinator", three.address, "--key", "wrong-key-of-no-swarm", "--host", "127.0.0.1", "--mdns-interface", "off",
                     "--name", "intruder"], tmp_path / "intruder.log", {"SWARM_CACHE_DIR": str(tmp_path / "c")})
    assert intruder.p.wait(60) == 1
    assert "wrong swarm key" in intruder.text()
    assert "intruder" not in json.dumps(three.client.status())


def _raw_node(address: str):
    ch = wire.channel(address, KEY)
    return ch, pbg.NodeStub(ch)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_malformed_requests_get_invalid_argument_and_the_node_keeps_serving(three, reference):
    node = _node(three, "6:12")
    ch, stub = _raw_node(node["address"])
    span = pb.LayerSpan(start=6, end=12)
    sid = f"probe-{uuid.uuid4().hex[:6]}"
    row = np.zeros((1, 640), np.float32).tobytes()
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    try:
        code, text = _code(lambda: stub.Forward(pb.ForwardRequest(
            session_id="no-such-session", start=0, n_positions=1, tokens=[1], hidden=row, layers=span), timeout=10))
        assert code == invalid and "unknown session" in text
        stub.OpenSession(pb.OpenSessionRequest(session_id=sid, layers=span), timeout=10)
        code, text = _code(lambda: stub.Forward(pb.ForwardRequest(
            session_id=sid, start=0, n_positions=1, tokens=[1], hidden=row[:-4], layers=span), timeout=10))
        assert code == invalid and "wrong hidden-state size" in text
        code, text = _code(lambda: stub.Forward(pb.ForwardRequest(
            session_id=sid, start=7, n_positions=1, tokens=[1], hidden=row, layers=span), timeout=10))
        assert code == invalid and "positions must continue" in text
        code, text = _code(lambda: stub.Forward(pb.ForwardRequest(
            session_id=sid, start=0, n_positions=100_000, tokens=[1], hidden=row, layers=span), timeout=10))
        assert code == invalid and "positions" in text
        huge = bytes(20 << 20)  # 20 MB of "hidden states" for one position
        code, text = _code(lambda: stub.Forward(pb.ForwardRequest(
            session_id=sid, start=0, n_positions=1, tokens=[1], hidden=huge, layers=span), timeout=30))
        assert code == invalid and "wrong hidden-state size" in text
        nan = np.full((1, 640), np.nan, np.float32).tobytes()
        code, text = _code(lambda: stub.Forward(pb.ForwardRequest(
            session_id=sid, start=0, n_positions=1, tokens=[1], hidden=nan, layers=span), timeout=10))
        assert code == invalid and "NaN" in text
        code, text = _code(lambda: stub.Forward(pb.ForwardRequest(
            session_id=sid, start=0, n_positions=1, tokens=[1], hidden=row, layers=pb.LayerSpan(start=0, end=6)),
            timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "holds layers 6:12" in text
        code, text = _code(lambda: stub.OpenSession(pb.OpenSessionRequest(session_id="", layers=span), timeout=10))
        assert code == invalid and "session id" in text
        code, text = _code(lambda: stub.Assign(pb.AssignRequest(
            has_shard=True, shard=pb.ShardSpec(file_name="../../etc/passwd", sha256="0" * 64), n_ctx=512,
            max_sessions=1, n_batch=512), timeout=10))
        assert code == invalid
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)
    finally:
        ch.close()
    # The first shard refuses out-of-vocabulary tokens before llama.cpp sees them.
    ch, stub = _raw_node(three.address)
    try:
        sid2 = sid + "b"
        first = pb.LayerSpan(start=0, end=6)
        stub.OpenSession(pb.OpenSessionRequest(session_id=sid2, layers=first), timeout=10)
        code, text = _code(lambda: stub.Forward(pb.ForwardRequest(
            session_id=sid2, start=0, n_positions=1, tokens=[10**9], layers=first), timeout=10))
        assert code == invalid and "outside the vocabulary" in text
        code, text = _code(lambda: stub.Forward(pb.ForwardRequest(
            session_id=sid2, start=0, n_positions=1, tokens=[5], layers=first, next=[]), timeout=10))
        assert code == invalid and "route ends" in text
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid2), timeout=10)
    finally:
        ch.close()
    # Requests to the coordinator.
    with SwarmClient(three.address, key=KEY) as c:
        with pytest.raises(BadInputError, match="empty"):
            c.complete("", max_tokens=2)
        with pytest.raises(BadInputError, match="top_p"):  # the client checks it, and so does the coordinator:
            c.complete("hi", temperature=1.0, top_p=1.5)
        with wire.channel(three.address, KEY) as ch:
            code, text = _code(lambda: list(pbg.CoordinatorStub(ch).Generate(pb.GenerateRequest(
                prompt="hi", sampling=pb.Sampling(temperature=1.0, top_p=1.5)), timeout=10)))
            assert code == invalid and "top_p" in text
        with pytest.raises(BadInputError, match="a session holds 512"):
            c.complete("word " * 600, max_tokens=2)
        with pytest.raises(BadInputError, match="role"):
            c.chat_complete([{"role": "wizard", "content": "hi"}])
        # ...and everyone still serves, with the same text as before.
        _, expected, _ = reference.run(PROMPTS[1])
        assert c.complete(PROMPTS[1], max_tokens=N_TOKENS).tokens == expected


def test_step_stream_refuses_bad_keys_and_malformed_steps_and_the_node_keeps_serving(three, reference):
    node = _node(three, "6:12")
    address = node["step_address"]
    assert address and address != node["address"]
    span = LayerRange(6, 12)
    row = np.zeros((1, 640), np.float32).tobytes()
    with pytest.raises(AuthError, match="wrong --key"):
        steps.StepLinks("not-the-key-of-this-swarm").call(address, m.Step("x", 0, (1,), span), timeout=10).result()
    links = steps.StepLinks(KEY)
    for step, text in (
        (m.Step("no-such", 0, (1,), span, row), "unknown session"),
        (m.Step("x", 0, (1,), span, row[:-4]), "hidden-state size"),
        (m.Step("x", 0, (1,), span, row, next=(m.Hop("127.0.0.1:1", LayerRange(12, 18)),)), "no step address"),
    ):
        with pytest.raises(BadInputError, match=text):  # INVALID_ARGUMENT
            links.call(address, step, timeout=10).result()
    with tls.credentials(KEY).wrap_client(socket.create_connection(wire.split_address(address), timeout=10)) as c:
        c.sendall(steps.MAGIC + struct.pack("<IB", 1 << 30, 1))
        assert b"over the limit" in c.recv(4096)
    links.close()
    _, expected, _ = reference.run(PROMPTS[0])
    assert three.client.complete(PROMPTS[0], max_tokens=N_TOKENS).tokens == expected


def test_mdns_discovery_without_coordinator_address(tmp_path, model_path, reference):
    name = f"t-{uuid.uuid4().hex[:8]}"
    swarm = Swarm(tmp_path, model_path, ["--layers", "0:9", "--swarm", name, "--max-sessions", "1"], [[]],
                  via_mdns=name)
    try:
        swarm.wait_ready()
        assert "by mDNS" in swarm.procs[1].text()
        with SwarmClient(swarm=name, mdns_interface="127.0.0.1", key=swarm.key) as c:  # found by mDNS too
            assert c.address.endswith(f":{swarm.port}")
            status = c.status()
            spans = sorted((n["layers"]["start"], n["layers"]["end"]) for n in status["nodes"] if n["has_layers"])
            assert spans == [(0, 9), (9, 18)]  # the node without a pin took the rest
            _, expected, _ = reference.run(PROMPTS[0])
            assert c.complete(PROMPTS[0], max_tokens=N_TOKENS).tokens == expected
    finally:
        swarm.close()


def test_local_swarm_command_chats_through_three_processes(tmp_path):
    """The README's first command, with the default model (SmolLM2-135M-Instruct, 30 layers) and its chat sampling."""
    done = subprocess.run([sys.executable, "-m", "swarm.cli", "local", "--nodes", "3", "-p", "Say hello.", "-n", "8",
                           "--stats"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "0:10 on coordinator, 10:20 on node1, 20:30 on node2" in done.stderr
    assert done.stdout.strip() and "tokens/s" in done.stderr


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "swarm.cli", "join", "--coordinator", f"127.0.0.1:{free_port()}",
                               "--key", "a-key-for-nothing-here", "--host", "127.0.0.1", "--port", str(port), "--mdns-interface", "off"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "--port" in done.stderr
        done = subprocess.run([sys.executable, "-m", "swarm.cli", "join", "--coordinator", f"127.0.0.1:{free_port()}",
                               "--key", "a-key-for-nothing-here", "--host", "127.0.0.1", "--step-port", str(port), "--mdns-interface", "off"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "--step-port" in done.stderr


def test_a_client_that_stops_reading_frees_its_session(three, reference):
    import time

    with SwarmClient(three.address, key=KEY) as c:
        for _ in range(6):  # more than --max-sessions 4: leaked slots would make the last ones wait and fail
            for _piece in c.generate(PROMPTS[0], max_tokens=400):
                break
        deadline = time.monotonic() + 30
        while c.status()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.status()["sessions"] == []
        _, expected, _ = reference.run(PROMPTS[0])
        assert c.complete(PROMPTS[0], max_tokens=N_TOKENS).tokens == expected
