"""The OpenAI-compatible HTTP API, through OpenAI's own Python client, on a real three-process swarm.

The reference is plain llama-cpp-python on the unsplit file: the same greedy text, the same prompt
token count. The model is SmolLM2-135M-Instruct, so chat has a real template to run through.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid

import openai
import pytest

from http_swarm import KEY, call, running_swarm, smollm2_path
from procs import Proc, free_port
from swarm.client import SwarmClient
from swarm.errors import SwarmError

PROMPT = "The three largest cities of France are"
N = 40


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    yield from running_swarm(tmp_path_factory.mktemp("http"))


@pytest.fixture(scope="module")
def client(api):
    with openai.OpenAI(base_url=api.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def llama_reference():
    """llama-cpp-python's greedy completion of PROMPT on the unsplit file, and its prompt token count."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(smollm2_path()), n_ctx=512, verbose=False)
    out = llm.create_completion(PROMPT, max_tokens=N, temperature=0)
    n_prompt = len(llm.tokenize(PROMPT.encode(), add_bos=True, special=True))
    del llm
    return out["choices"][0]["text"], n_prompt, out["usage"]


def test_health_and_models(api, client):
    assert call(api.url + "/health") == (200, {"status": "ok", "state": "ready"})
    models = client.models.list().data
    assert [m.id for m in models] == [smollm2_path().name]


def test_blocking_greedy_completion_is_llama_cpps_text_with_its_usage(client, model, llama_reference):
    text, n_prompt, usage = llama_reference
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
    assert out.choices[0].text == text
    assert out.usage.prompt_tokens == n_prompt == usage["prompt_tokens"]
    assert out.usage.completion_tokens == usage["completion_tokens"]
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.choices[0].finish_reason == "length"


def test_streaming_greedy_completion_is_the_same_text_and_ends_with_usage(client, model, llama_reference):
    text, n_prompt, usage = llama_reference
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len(chunks) > 10  # streamed, not one lump
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == n_prompt
    assert chunks[-1].usage.completion_tokens == usage["completion_tokens"]


def test_greedy_chat_is_llama_cpps_create_chat_completion_with_its_prompt_count(client, model):
    """The model's own chat template (SmolLM2's ChatML with its default system prompt) through the API:
    the same greedy answer and prompt token count as llama-cpp-python's create_chat_completion."""
    import llama_cpp

    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    llm = llama_cpp.Llama(model_path=str(smollm2_path()), n_ctx=512, verbose=False)
    ref = llm.create_chat_completion(messages=messages, max_tokens=N, temperature=0, repeat_penalty=1.0)
    del llm
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=N, temperature=0)
    assert out.choices[0].message.content == ref["choices"][0]["message"]["content"]
    assert out.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert out.usage.completion_tokens == ref["usage"]["completion_tokens"]


def test_chat_streams_and_blocks_alike_for_a_seed(client, model):
    messages = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "What is the tallest mountain in the world?"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0.7, seed=3)
    answer = whole.choices[0].message
    assert answer.role == "assistant" and answer.content.strip()
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0.7,
                                                 seed=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.content
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert whole.usage.prompt_tokens > 10 and whole.usage.completion_tokens > 0


def test_chat_without_sampling_options_is_sampled_and_greedy_is_one_option_away(client, model):
    messages = [{"role": "user", "content": "Name a colour."}]
    greedy = {client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
              .choices[0].message.content for _ in range(2)}
    assert len(greedy) == 1
    sampled = {client.chat.completions.create(model=model, messages=messages, max_tokens=12).choices[0].message.content
               for _ in range(4)}  # Ollama-like defaults (temperature 0.8): four answers are seldom all alike
    assert len(sampled) > 1


def test_seed_gives_the_same_text_and_another_seed_another(client, model):
    def run(seed):
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=seed
                                         ).choices[0].text

    first = run(11)
    assert run(11) == first
    assert run(12) != first


def test_stop_strings_end_the_text_before_them(client, model, llama_reference):
    text = llama_reference[0]
    words = text.split()
    stop = words[len(words) // 2]
    expected = text[:text.index(stop)]
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop, "@@@@"])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_wrong_or_missing_key_gets_401_with_openais_error_body(api, model):
    with openai.OpenAI(base_url=api.url + "/v1", api_key="not-the-key", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.completions.create(model=model, prompt=PROMPT, max_tokens=4)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key" and "key" in e.value.message
    for key in (None, "", "not-the-key"):
        for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/models", None), ("/v1/swarm/status", None)):
            status, answer = call(api.url + path, body, key=key)
            assert status == 401, (path, key)
            assert set(answer["error"]) == {"message", "type", "param", "code"}


BAD = [
    ("/v1/completions", b"{not json", "JSON"),
    ("/v1/completions", b"[1, 2]", "JSON object"),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-4o"}, "model"),
    ("/v1/completions", {"prompt": PROMPT, "n": 2}, "n=1"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": -5}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "seed": "x"}, "seed"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 3}, "logprobs"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "x " * 600, "max_tokens": 4}, "--ctx"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "content"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
]


def test_bad_requests_get_400_saying_what_to_change_and_the_swarm_keeps_serving(api, client, model, llama_reference):
    for path, body, word in BAD:
        status, answer = call(api.url + path, body, key=KEY)
        assert status == 400, (body, answer)
        assert word.lower() in answer["error"]["message"].lower(), (body, answer)
        assert answer["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=3)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
    assert out.choices[0].text == llama_reference[0]


def test_a_body_over_4_mib_gets_413_before_it_is_read_and_the_swarm_keeps_serving(api, client, model,
                                                                                    llama_reference):
    host, port = api.url.split("//")[1].split(":")
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\n").encode()

    def answer(sock) -> bytes:
        got = b""
        while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
            piece = sock.recv(1 << 16)
            if not piece:
                break
            got += piece
        return got

    # A declared length over the limit: refused at once, with not a byte of the body sent.
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + f"Content-Length: {(4 << 20) + 1}\r\n\r\n".encode())
        got = answer(sock)
    assert got.startswith(b"HTTP/1.1 413") and b"larger than 4194304 bytes" in got, got[:300]
    # A body sent without a length (chunked) is counted as it comes, and refused once past the limit.
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        for size in (1 << 20, 1 << 20, 1 << 20, 1 << 20, 1024):
            sock.sendall(b"%x\r\n%s\r\n" % (size, b"x" * size))
        got = answer(sock)
    assert got.startswith(b"HTTP/1.1 413") and b"larger than 4194304 bytes" in got, got[:300]
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
    assert out.choices[0].text == llama_reference[0]


def test_a_client_that_closes_its_stream_frees_its_session(api, client, model, llama_reference):
    for _ in range(6):  # more than --max-sessions 4: a leaked session would make the last ones wait
        stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=400, temperature=0.8, stream=True)
        for i, _chunk in enumerate(stream):
            if i == 3:
                break
        stream.close()
    deadline = time.monotonic() + 20
    while (sessions := call(api.url + "/v1/swarm/status", key=KEY)[1]["sessions"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sessions == []
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
    assert out.choices[0].text == llama_reference[0]


def test_an_http_port_in_use_is_refused_at_once_and_no_http_serves_none(api, tmp_path):
    base = [sys.executable, "-m", "swarm.cli", "join", "--model", str(smollm2_path()), "--host", "127.0.0.1",
            "--key", "a-key-for-nothing-here", "--mdns-interface", "off", "--swarm", f"http-{uuid.uuid4().hex[:6]}"]
    done = subprocess.run([*base, "--port", str(free_port()), "--http-port", str(api.http_port)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and f"HTTP port {api.http_port}" in done.stderr and "--no-http" in done.stderr
    port, http_port = free_port(), free_port()
    proc = Proc(["--model", str(smollm2_path()), "--host", "127.0.0.1", "--port", str(port), "--key", "a-key-for-nothing-here",
                 "--mdns-interface", "off", "--no-http", "--http-port", str(http_port)], tmp_path / "no-http.log")
    try:
        deadline = time.monotonic() + 60
        with SwarmClient(f"127.0.0.1:{port}", key="a-key-for-nothing-here") as c:
            while True:
                try:
                    c.status()
                    break
                except SwarmError:
                    assert time.monotonic() < deadline and proc.p.poll() is None, proc.text()
                    time.sleep(0.3)
        assert call(f"http://127.0.0.1:{http_port}/health") == (0, {})  # nothing listens
        assert "web page" not in proc.text()
    finally:
        proc.stop()
