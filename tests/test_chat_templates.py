"""Chat templates as their authors wrote them, against llama-cpp-python as the outside reference.

- Tiny random-weight models that carry real templates (SmolLM2's ChatML with its default system prompt,
  Llama 3.2, Gemma 3, Mistral 7B Instruct v0.2): the prompt tokens of a conversation are exactly those
  llama-cpp-python's `Llama.create_chat_completion` feeds its model (its Jinja2ChatFormatter, then its
  tokenization), taken from the `generate` call it makes.
- The real SmolLM2-135M-Instruct through a real three-process swarm: the greedy answer is token for token
  llama-cpp-python's `create_chat_completion(temperature=0, repeat_penalty=1.0)` on the unsplit file.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from chat_templates import (GEMMA_3, GEMMA_SPECIALS, LLAMA_3_2, LLAMA_3_SPECIALS, MISTRAL_SPECIALS,
                            MISTRAL_V0_2)
from procs import Swarm
from tiny_models import write_tiny_llama
from swarm.engine import Tokenizer
from swarm.errors import BadInputError, UnsupportedModelError
from swarm.gguf_file import read_gguf
from swarm.models import resolve_model, smollm2_path

KEY = "test-key-chat-templates"
SMOL_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
ASK = {"role": "user", "content": "What is the tallest mountain in the world?"}
ANSWER = {"role": "assistant", "content": "Mount Everest, at 8,849 metres."}
AGAIN = {"role": "user", "content": "  And the second tallest?  "}  # templates that trim must trim it
CONVERSATIONS = {
    "one-question": [ASK],
    "system": [SYSTEM, ASK],
    "multi-turn": [SYSTEM, ASK, ANSWER, AGAIN],
    "multi-turn-no-system": [ASK, ANSWER, AGAIN],
    "unicode": [{"role": "user", "content": "Ünïcødé — 日本語 \"quoted\" <tags> & émojis 🦙\n"}],
}


def _text(tok: Tokenizer, tokens: list[int]) -> str:
    """Tokens back to text, special tokens included (the tiny vocabulary spells spaces as byte tokens of "▁")."""
    return b"".join(tok.piece(t, special=True) for t in tokens).decode().replace("\u2581", " ")


class _Prompt(Exception):
    """Carries the prompt tokens out of llama-cpp-python's `generate` call."""


def llama_cpp_prompt(llm, messages) -> list[int]:
    """The token ids `llm.create_chat_completion(messages)` feeds the model (it generates nothing)."""
    def capture(tokens, **_):
        raise _Prompt(list(tokens))
        yield  # a generator, like the method it stands in for

    llm.generate = capture
    try:
        llm.create_chat_completion(messages=messages, max_tokens=1)
    except _Prompt as e:
        return e.args[0]
    raise AssertionError("create_chat_completion did not reach generate")


def _smollm2_template() -> str:
    return read_gguf(smollm2_path()).get("tokenizer.chat_template")


STYLES = {  # name: (template, BOS text, EOS text, the other special tokens it writes)
    "chatml-smollm2": (_smollm2_template, "<|im_start|>", "<|im_end|>", ()),
    "llama-3.2": (lambda: LLAMA_3_2, "<|begin_of_text|>", "<|eot_id|>", LLAMA_3_SPECIALS),
    "gemma-3": (lambda: GEMMA_3, "<bos>", "<eos>", GEMMA_SPECIALS),
    "mistral-v0.2": (lambda: MISTRAL_V0_2, "<s>", "</s>", MISTRAL_SPECIALS),
}


@pytest.fixture(scope="module")
def styled(tmp_path_factory):
    """One tiny model per template style, with our tokenizer and llama-cpp-python's Llama on it."""
    import llama_cpp

    out = {}
    folder = tmp_path_factory.mktemp("templates")
    for name, (template, bos, eos, specials) in STYLES.items():
        path = write_tiny_llama(folder / f"{name}.gguf", chat_template=template(), bos=bos, eos=eos,
                                specials=specials)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False)
        # The template itself, not one of the four texts llama-cpp-python swaps for a hard-coded format.
        assert llm.chat_format == "chat_template.default"
        out[name] = (Tokenizer(path), llm)
    yield out
    for tok, llm in out.values():
        tok.close()
        del llm


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("style", STYLES)
def test_prompt_tokens_equal_llama_cpp_pythons(styled, style, conversation):
    tok, llm = styled[style]
    messages = CONVERSATIONS[conversation]
    ours = tok.chat_tokens(messages)
    assert tok.chat_format == "gguf (jinja)"
    assert ours == llama_cpp_prompt(llm, messages)
    text = _text(tok, ours)
    assert text.endswith(("<|im_start|>assistant\n", "<|start_header_id|>assistant<|end_header_id|>\n\n",
                          "<start_of_turn>model\n", " [/INST]"))  # the assistant's turn is open
    if style == "chatml-smollm2":
        # The template's own default system prompt, which llama.cpp's built-in chatml leaves out.
        has_system = messages[0]["role"] == "system"
        assert (SMOL_SYSTEM_PROMPT in text) != has_system
        assert SMOL_SYSTEM_PROMPT not in tok.apply_chat_template([(m["role"], m["content"]) for m in messages])
    else:
        # These templates write BOS themselves; tokenizing must not add a second one.
        assert ours[0] == 1 and ours.count(1) == 1
    if style == "llama-3.2":
        assert "Cutting Knowledge Date: December 2023\nToday Date: " in text  # strftime_now filled it in
    if style in ("llama-3.2", "gemma-3") and conversation.startswith("multi-turn"):
        assert "And the second tallest?<" in text  # trimmed, as the template says


@pytest.mark.parametrize("style,messages,says", [
    ("gemma-3", [ASK, ASK], "Conversation roles must alternate"),
    ("mistral-v0.2", [ASK, {"role": "tool", "content": "{}"}], "Only user and assistant roles are supported"),
])
def test_a_conversation_the_template_refuses_is_bad_input_as_in_llama_cpp_python(styled, style, messages, says):
    tok, llm = styled[style]
    with pytest.raises(BadInputError, match=says):
        tok.chat_tokens(messages)
    with pytest.raises(Exception, match=says):  # llama-cpp-python refuses it too (a ValueError)
        llama_cpp_prompt(llm, messages)


def test_transformers_features_render_as_llama_cpp_python_does(tmp_path):
    """tojson with its options and unescaped text, loop controls, {% generation %}, trim and lstrip of
    blocks, a namespace: the environment transformers gives templates, compared token for token."""
    import llama_cpp

    template = (
        "{{ bos_token }}{% set ns = namespace(n=0) %}\n"
        "{% for message in messages %}\n"
        "    {% if loop.index0 > 2 %}{% break %}{% endif %}\n"
        "    {% if message.role == 'system' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "<|im_start|>{{ message['role'] }} {{ message | tojson(indent=2, sort_keys=True) }}"
        "{{ message['content'] | tojson(separators=(',', ':')) }}<|im_end|>\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{% generation %}<|im_start|>assistant {{ ns.n }}\n{% endgeneration %}{% endif %}"
    )
    path = write_tiny_llama(tmp_path / "features.gguf", chat_template=template, bos="<s>", eos="</s>",
                            specials=("<|im_start|>", "<|im_end|>"))
    messages = [SYSTEM, CONVERSATIONS["unicode"][0], ANSWER, AGAIN]
    tok = Tokenizer(path)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False)
    try:
        ours = tok.chat_tokens(messages)
        assert ours == llama_cpp_prompt(llm, messages)
        text = _text(tok, ours)
        assert "日本語 \\\"quoted\\\" <tags> & émojis 🦙" in text  # not ASCII-escaped, not HTML-escaped
        assert "Mount Everest" in text and "second tallest" not in text  # {% break %} after three messages
        assert text.endswith("<|im_start|>assistant 2\n")  # {% continue %} skipped the system message
    finally:
        tok.close()
        del llm


@pytest.mark.parametrize("template,says", [
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "failed on this conversation"),
    ("{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages }}", "failed on this conversation"),
    ("{{ raise_exception('System role not supported') }}", "refused this conversation: System role not supported"),
])
def test_templates_run_sandboxed_and_their_errors_are_bad_input(tmp_path, template, says):
    path = write_tiny_llama(tmp_path / "t.gguf", chat_template=template)
    tok = Tokenizer(path)
    try:
        with pytest.raises(BadInputError, match=says):
            tok.chat_tokens([ASK])
    finally:
        tok.close()


@pytest.mark.parametrize("messages,says", [
    ([{"role": "user"}], "needs a role and a text content"),
    ([("user", 7)], "needs a role and a text content"),
    ([{"role": "", "content": "hi"}], "needs a role"),
    ([{"role": "u" * 65, "content": "hi"}], "a role is a short name"),
    ([{"role": "user", "content": "a\x00b"}], "NUL"),
])
def test_messages_are_checked_before_any_template_sees_them(messages, says):
    from swarm.chat_template import ChatTemplate

    with pytest.raises(BadInputError, match=says):
        ChatTemplate(_smollm2_template(), "<|im_start|>", "<|im_end|>").render(messages)


def test_a_template_that_does_not_compile_refuses_chat_and_keeps_raw_completion(tmp_path):
    path = write_tiny_llama(tmp_path / "broken.gguf", chat_template="{% for message in messages %}{{ message")
    tok = Tokenizer(path)
    try:
        assert tok.chat_format == "gguf (jinja), does not compile"
        with pytest.raises(UnsupportedModelError, match="not valid Jinja.*swarm generate"):
            tok.chat_tokens([ASK])
        assert tok.tokenize("hello")  # raw completion still works
    finally:
        tok.close()


def test_models_without_a_template_use_llama_cpps_builtin_format_or_refuse(tmp_path, model_path):
    gemma = Tokenizer(model_path)  # Gemma 3 270M: its GGUF has no template
    plain = Tokenizer(write_tiny_llama(tmp_path / "plain.gguf"))
    try:
        assert gemma.chat_format == "llama.cpp built-in gemma"
        tokens = gemma.chat_tokens([ASK])
        bos = gemma.tokenize("", add_special=True)
        assert tokens[:1] == bos and tokens.count(bos[0]) == 1  # the built-in text has none: tokenizing adds one
        text = b"".join(gemma.piece(t, special=True) for t in tokens).decode()
        assert text.endswith(f"<start_of_turn>user\n{ASK['content']}<end_of_turn>\n<start_of_turn>model\n")
        assert plain.chat_format == "none"
        with pytest.raises(UnsupportedModelError, match="no chat template"):
            plain.chat_tokens([ASK])
    finally:
        gemma.close()
        plain.close()


# ------------------------------------------------------------ the real SmolLM2 through a real swarm


def llama_cpp_chat(path, messages, max_tokens: int) -> tuple[list[int], list[int], str]:
    """(prompt tokens, answer tokens, answer text) of llama-cpp-python's greedy `create_chat_completion` on
    the unsplit file, a fresh `Llama` with its defaults."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False)
    prompt, answer = [], []
    generate = llm.generate

    def recording(tokens, **options):
        prompt.extend(tokens)
        for token in generate(tokens, **options):
            answer.append(token)
            yield token

    llm.generate = recording
    try:
        reply = llm.create_chat_completion(messages=messages, temperature=0.0, repeat_penalty=1.0,
                                           max_tokens=max_tokens)
        eog = [t for t in answer if llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm._model.model), t)]
    finally:
        del llm
    if eog:  # the end-of-turn token ends the answer; it is not part of it
        answer = answer[:answer.index(eog[0])]
    assert reply["usage"]["prompt_tokens"] == len(prompt)
    assert reply["usage"]["completion_tokens"] == len(answer)
    return prompt, answer, reply["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2-135M-Instruct (30 layers) over three processes: a coordinator and two nodes."""
    swarm = Swarm(tmp_path_factory.mktemp("smol"), smollm2_path(), ["--layers", "0:10"],
                  [["--layers", "10:20"], ["--layers", "20:30"]], key=KEY)
    try:
        swarm.wait_ready()
        yield swarm
    finally:
        swarm.close()


@pytest.mark.parametrize("conversation", ["one-question", "multi-turn"])
def test_greedy_chat_through_the_swarm_equals_llama_cpp_pythons_create_chat_completion(smol, conversation):
    messages, n = CONVERSATIONS[conversation], 48
    prompt, answer, text = llama_cpp_chat(smollm2_path(), messages, n)
    got = smol.client.chat_complete(messages, max_tokens=n, temperature=0)
    assert got.prompt_tokens == len(prompt)
    assert got.tokens == answer
    assert got.text == text
    if conversation == "one-question":  # the command line too, one option away from its sampled default
        done = subprocess.run([sys.executable, "-m", "swarm.cli", "chat", "-p", ASK["content"], "-n", str(n),
                               "--temperature", "0", "--coordinator", smol.address, "--key", KEY],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout == text + "\n"
    assert smol.client.status()["chat_template"] == "gguf (jinja)"


def test_default_model_is_the_instruct_model_and_its_chat_answers_the_question(smol):
    """`default` is SmolLM2-135M-Instruct, and chat with the default sampling (Ollama's) answers a simple
    question sensibly: most seeds name Everest (greedy, the model loops; sampled, it rarely misses)."""
    assert resolve_model("default") == smollm2_path()
    answers = []
    for seed in range(6):
        done = subprocess.run([sys.executable, "-m", "swarm.cli", "chat", "-p", ASK["content"], "-n", "64",
                               "--seed", str(seed), "--coordinator", smol.address, "--key", KEY],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        answers.append(done.stdout)
    assert sum("Everest" in a for a in answers) >= 3, answers
