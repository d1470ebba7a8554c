"""OpenAI request bodies -> GenerateRequest: the sampling defaults, and what is refused (pure, no swarm)."""

from __future__ import annotations

import pytest

from swarm.http.bodies import ApiError, parse_chat, parse_completion
from swarm.sampling import CHAT_DEFAULTS, SamplingParams

MODELS = ("m.gguf", "m")
HI = [{"role": "user", "content": "hi"}]


def test_chat_without_sampling_options_gets_the_chat_defaults_and_a_given_option_replaces_one():
    assert parse_chat({"messages": HI}, MODELS).request.sampling == CHAT_DEFAULTS
    ask = parse_chat({"messages": HI, "top_p": 0.5, "seed": 3}, MODELS)
    assert ask.request.sampling == SamplingParams(**{**CHAT_DEFAULTS.__dict__, "top_p": 0.5, "seed": 3})


def test_temperature_zero_is_plain_greedy_for_chat_and_completions():
    for ask in (parse_chat({"messages": HI, "temperature": 0}, MODELS),
                parse_completion({"prompt": "x", "temperature": 0}, MODELS)):
        assert ask.request.sampling == SamplingParams()  # greedy, repeat penalty off
    assert parse_completion({"prompt": "x"}, MODELS).request.sampling.greedy
    assert parse_completion({"prompt": "x", "temperature": 0.7}, MODELS).request.sampling == SamplingParams(temperature=0.7)


def test_fields_become_the_request():
    ask = parse_chat({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                                 {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                              {"type": "text", "text": "b"}]},
                                                 {"role": "assistant", "content": None}],
                      "max_completion_tokens": 9, "stop": "END", "stream": True,
                      "stream_options": {"include_usage": True}, "user": "ignored"}, MODELS)
    assert ask.request.messages == (("system", "be brief"), ("user", "ab"), ("assistant", ""))
    assert (ask.request.max_tokens, ask.request.stop, ask.stream, ask.include_usage, ask.model) == (
        9, ("END",), True, True, "m.gguf")
    assert parse_completion({"prompt": ["only one"]}, MODELS).request.prompt == "only one"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n": 2}, "n"), ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"), ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"), ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "seed": -1}, "seed"), ({"prompt": "x", "top_k": 1.5}, "top_k"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"), ({"prompt": "x", "model": "other"}, "model"),
    ({"prompt": "x", "stream_options": True}, "stream_options"), ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
])
def test_impossible_or_unsupported_values_are_refused_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        parse_completion(body, MODELS)
    assert e.value.status == 400 and e.value.param == param and e.value.message


def test_a_refusal_has_openais_error_body():
    with pytest.raises(ApiError) as e:
        parse_chat({"messages": [{"role": "tool", "content": "x"}]}, MODELS)
    assert e.value.body() == {"error": {"message": e.value.message, "type": "invalid_request_error",
                                        "param": "messages[0].role", "code": None}}
    with pytest.raises(ApiError):
        parse_chat({"messages": HI, "response_format": {"type": "json_object"}}, MODELS)
    assert parse_chat({"messages": HI, "logprobs": False, "frequency_penalty": 0}, MODELS)  # "off" is fine
