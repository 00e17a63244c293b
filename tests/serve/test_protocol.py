"""The wire format without a server: request parsing and checks, the text assembler (stop
sequences, partial UTF-8, public-only suffix), chat prompts."""

from __future__ import annotations

import json

import pytest

from pmixed.serve.app import TextAssembler, chat_prompt
from pmixed.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Limits,
    check_chat,
    check_completion,
    parse_body,
)
from pmixed.serve.stream import Token


class ByteTok:
    """Token id = one byte; decoding replaces a partial UTF-8 character by U+FFFD."""

    chat_template = None

    def decode(self, ids, **kw):
        return bytes(ids).decode("utf-8", errors="replace")


def feed(asm, data: bytes, public: bool = False):
    out = []
    for b in data:
        out += asm.add(Token(b, public_only=public))
    return out


def joined(pieces):
    return "".join(t for t, _ in pieces)


def test_stop_sequences_are_held_back_then_cut():
    asm = TextAssembler(ByteTok(), ["END"])
    assert joined(feed(asm, b"abcE")) == "abc"  # "E" could begin "END"
    assert feed(asm, b"N") == []
    assert feed(asm, b"D") == [] and asm.stopped and asm.text == "abc"
    assert feed(asm, b"more") == [] and asm.flush() == []
    asm = TextAssembler(ByteTok(), ["END", "xy"])
    assert joined(feed(asm, b"abEX")) == "abEX"  # a false start is released
    assert joined(feed(asm, b"x")) == "" and joined(asm.flush()) == "x"  # the end releases the rest
    asm = TextAssembler(ByteTok(), ["b"])
    assert joined(feed(asm, b"abc")) == "a" and asm.text == "a"  # stop found inside one delta


def test_partial_utf8_waits_for_its_character():
    asm = TextAssembler(ByteTok(), [])
    e_acute = "é".encode()
    assert feed(asm, e_acute[:1]) == []
    assert feed(asm, e_acute[1:]) == [("é", False)]


def test_public_only_tokens_are_a_marked_suffix():
    asm = TextAssembler(ByteTok(), [])
    assert feed(asm, b"ab") == [("a", False), ("b", False)]
    assert feed(asm, b"cd", public=True) == [("c", True), ("d", True)]
    assert asm.public_from == 2 and asm.public_offset == 2
    asm = TextAssembler(ByteTok(), ["bx"])  # a held-back piece crosses the boundary: split in two
    assert feed(asm, b"ab") == [("a", False)]
    assert feed(asm, b"c", public=True) == [("b", False), ("c", True)]


def test_chat_prompt_plain_join_and_template():
    msgs = [ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", content=[{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}])]
    assert chat_prompt(ByteTok(), msgs) == ("system: be brief\nuser: hi there\nassistant:", False)

    class Templated(ByteTok):
        chat_template = "{{ messages }}"

        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "<s>" + "|".join(f"{m['role']}={m['content']}" for m in msgs) + "|assistant="

    assert chat_prompt(Templated(), msgs) == ("<s>system=be brief|user=hi there|assistant=", True)


@pytest.mark.parametrize("raw, message", [
    (b"", "body is empty"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"model": "m", "prompt": "x"', "not valid JSON"),
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', "NaN is not valid JSON"),
    (b'["a list"]', "must be a JSON object"),
    (b'{"model": "m", "prompt": "x", "max_tokens": "5"}', "max_tokens: Input should be a valid integer"),
    (b'{"model": "m", "prompt": "x", "stream": 1}', "stream: Input should be a valid boolean"),
    (b'{"model": "m"}', "prompt: Field required"),
])
def test_parse_body_errors(raw, message):
    with pytest.raises(ApiError) as ex:
        parse_body(raw, CompletionRequest)
    assert ex.value.status == 400 and message in ex.value.message
    body = ex.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"


def completion(**kw):
    return CompletionRequest.model_validate({"model": "m", "prompt": "x", **kw})


def chat(**kw):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], **kw})


@pytest.mark.parametrize("kw, param, message", [
    ({"logprobs": 1}, "logprobs", "not the released distribution"),
    ({"logprobs": 0, "echo": True}, "logprobs", "not the released distribution"),
    ({"best_of": 2}, "best_of", "log-probabilities"),
    ({"seed": 7}, "seed", "CSPRNG"),
    ({"max_tokens": 300}, "max_tokens", "at most 256"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"n": 5}, "n", "at most 4"),
    ({"n": 0}, "n", ">= 1"),
    ({"prompt": ["a", "b", "c"], "n": 2}, "n", "exceed"),
    ({"temperature": 2.5}, "temperature", "[0, 2]"),
    ({"temperature": -0.1}, "temperature", "[0, 2]"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"top_k": -3}, "top_k", ">= 0"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "empty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": [""]}, "stop", "1 to 200"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not implemented"),
    ({"suffix": "tail"}, "suffix", "not implemented"),
])
def test_completion_checks(kw, param, message):
    with pytest.raises(ApiError) as ex:
        check_completion(completion(**kw), Limits())
    assert ex.value.status == 400 and ex.value.param == param and message in ex.value.message


@pytest.mark.parametrize("kw, param, message", [
    ({"logprobs": True}, "logprobs", "not the released distribution"),
    ({"top_logprobs": 2}, "top_logprobs", "not the released distribution"),
    ({"seed": 1}, "seed", "CSPRNG"),
    ({"tools": [{"type": "function"}]}, "tools", "not implemented"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not implemented"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_tokens", "disagree"),
    ({"messages": []}, "messages", "empty"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages", "empty"),
])
def test_chat_checks(kw, param, message):
    with pytest.raises(ApiError) as ex:
        check_chat(chat(**kw), Limits())
    assert ex.value.param == param and message in ex.value.message


def test_accepted_requests_map_to_sampling_params():
    out = check_completion(completion(temperature=1, max_tokens=5, stop="\n", n=2, echo=True), Limits())
    assert out["params"] == {"max_tokens": 5, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "stop_at_eos": True}
    assert out["n"] == 2 and out["stop"] == ["\n"] and out["echo"] and out["prompts"] == ["x"]
    out = check_completion(completion(prompt=[1, 2, 3], top_k=-1, ignore_eos=True), Limits())
    assert out["prompts"] == [[1, 2, 3]] and out["params"]["top_k"] == 0 and not out["params"]["stop_at_eos"]
    assert out["params"]["max_tokens"] == 16  # OpenAI's default for completions
    out = check_chat(chat(max_completion_tokens=7, stream=True, stream_options={"include_usage": True},
                          logprobs=False, response_format={"type": "text"}), Limits())
    assert out["params"]["max_tokens"] == 7 and out["stream"] and out["stream_usage"]
    assert check_chat(chat(), Limits(max_tokens=32))["params"]["max_tokens"] == 32  # chat: the cap
    assert json.loads(json.dumps(ApiError(429, "x").body()))["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("field,value", [("temperature", 0), ("temperature", 0.7), ("temperature", 1.5),
                                         ("top_p", 0.9), ("top_k", 1), ("top_k", 50)])
def test_sampling_transforms_the_guarantee_does_not_cover_are_refused(field, value):
    """Temperature, top_p, top_k and greedy act on each draw's mixture, not on the mechanism's
    distribution: the proof does not cover them (tests/exact/test_exact_sampling.py), so a 400."""
    with pytest.raises(ApiError) as e:
        check_completion(completion(**{field: value}), Limits())
    assert e.value.status == 400 and e.value.param == field and e.value.code == "not_covered_by_guarantee"
    assert "not covered by the privacy guarantee" in str(e.value)


@pytest.mark.parametrize("raw,code,says", [
    (b'{"model": "m", "prompt": "a\\ud800b"}', "invalid_encoding", "surrogate"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}]}', "invalid_encoding", "surrogate"),
    (b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}", "invalid_json", "nested too deeply"),
])
def test_bodies_that_used_to_give_a_500_are_refused_with_400(raw, code, says):
    """Found in review: a lone surrogate reached the tokenizer (TypeError) and deep nesting raised
    RecursionError; both were 500s, which the openai client retries."""
    with pytest.raises(ApiError) as e:
        parse_body(raw, CompletionRequest)
    assert e.value.status == 400 and e.value.code == code and says in e.value.message


def test_a_max_tokens_cap_below_the_completions_default_is_the_default():
    out = check_completion(completion(), Limits(max_tokens=8))  # no max_tokens: 16 would exceed the cap
    assert out["params"]["max_tokens"] == 8
