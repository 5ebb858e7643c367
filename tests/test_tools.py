"""Gemma 4 function calling and thinking, under exact speculation.

On a fixture pair whose tokenizer carries Gemma 4's special tokens and a chat template in
its layout (gemma4_chat.py): replies parse into reasoning, content and calls (also
streamed, piece by piece); `tool_choice` required / named / none constrain the reply by a
grammar, and greedy constrained speculative output equals constrained plain decoding; the
server answers the `openai` client with `tool_calls` (whole and streamed, one complete call
per chunk), renders tool results through the template, keeps special tokens out of
`content`, and answers malformed tool requests with a 400 and goes on.
"""

import json

import pytest

from conftest import WINDOW
from gemma4_chat import make_chat_pair
from test_server import Server, streamed
from gemma_mtp_mlx import load, stream_generate
from gemma_mtp_mlx.server.chat import template_messages
from gemma_mtp_mlx.server.protocol import Message
from gemma_mtp_mlx.structured.tool_grammar import tool_constraint
from gemma_mtp_mlx.structured.tools import ReplyStream, ToolCall, parse_reply

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time",
                                          "parameters": {"type": "object", "properties": {
                                              "zone": {"enum": ["utc", "local"]}}, "required": ["zone"]}}}
TOOLS = [WEATHER, CLOCK]
SPECIALS = ("<|tool_call>", "<tool_call|>", '<|"|>', "<|channel>", "<channel|>", "<turn|>", "<|tool_response>")


@pytest.fixture(scope="module")
def chat_dir(pairs, tmp_path_factory):
    return make_chat_pair(pairs["e2b"][0], tmp_path_factory.mktemp("gemma4_chat") / "target")


@pytest.fixture(scope="module")
def chat_pair(chat_dir, pairs):
    return load(chat_dir, draft_model=pairs["e2b"][1])


REPLIES = [
    ('<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:2}<tool_call|>',
     (None, "", [ToolCall("get_weather", {"city": "Paris, FR", "days": 2})])),
    ('<|channel>thought\nlet me see<channel|><|tool_call>call:now{zone:<|"|>utc<|"|>}<tool_call|>'
     '<|tool_call>call:get_weather{"city": "Oslo", "unit": "c"}<tool_call|>',
     ("let me see", "", [ToolCall("now", {"zone": "utc"}), ToolCall("get_weather", {"city": "Oslo", "unit": "c"})])),
    ('Sure. <|tool_call>call:now{zone:<|"|>local<|"|>,nested:{a:[1,true,null]}}',  # no end token: lenient
     (None, "Sure. ", [ToolCall("now", {"zone": "local", "nested": {"a": [1, True, None]}})])),
    ("<|channel>thought\nhmm<channel|>It is sunny.", ("hmm", "It is sunny.", [])),
    ("<|tool_call>not a call<tool_call|> text", (None, "not a call text", [])),
    ('<|tool_call>call:now{zone:<|"|>ut', (None, "call:now{zone:ut", [])),  # cut by max_tokens
]


@pytest.mark.parametrize("text, expected", REPLIES)
def test_replies_parse_into_reasoning_content_and_calls_whole_or_streamed(text, expected):
    assert parse_reply(text) == expected
    for size in (1, 3, 7):
        stream, reasoning, content = ReplyStream(), "", ""
        for start in range(0, len(text), size):
            r, c = stream.feed(text[start : start + size])
            assert not any(s in c for s in SPECIALS), (size, c)
            reasoning, content = reasoning + r, content + c
        r, c, calls = stream.finish()
        assert (reasoning + r, content + c, calls) == (expected[0] or "", expected[1], expected[2]), size


def chat_ids(tokenizer, messages, tools=TOOLS):
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, enable_thinking=False)


@pytest.mark.parametrize("choice, parallel", [("required", False), ({"type": "function", "function": {"name": "now"}},
                                                                      True), ("none", True)],
                         ids=["required-one", "named-parallel", "none"])
def test_tool_choice_grammars_are_exact_under_speculation(choice, parallel, chat_pair):
    target, tokenizer, drafter = chat_pair
    prompt = chat_ids(tokenizer, [{"role": "user", "content": "What is the weather like in Paris today?"}])
    fmt = tool_constraint(tokenizer, TOOLS, choice, parallel)
    plain = list(stream_generate(target, tokenizer, prompt, max_tokens=3 * WINDOW, response_format=fmt))
    text = "".join(r.text for r in plain)
    reasoning, content, calls = parse_reply(text)
    if choice == "none":
        assert not calls and "<|tool_call>" not in text
    else:
        assert calls and (plain[-1].finish_reason == "stop" or parallel), text
        assert len(calls) == 1 or parallel
        names = {"now"} if isinstance(choice, dict) else {"now", "get_weather"}
        for call in calls:
            assert call.name in names and (call.arguments.get("unit", "c") in "cf")
    for k in (1, 3, 6, "auto"):
        speculative = stream_generate(target, tokenizer, prompt, draft_model=drafter, num_draft_tokens=k,
                                      max_tokens=3 * WINDOW, response_format=fmt)
        assert [r.token for r in speculative] == [r.token for r in plain], f"k={k}"


def test_tool_messages_render_as_the_template_expects():
    messages = [Message(role="user", content="Weather in Paris?"),
                Message(role="assistant", tool_calls=[{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]),
                Message(role="tool", tool_call_id="c1", content='{"temp": 21}')]
    rendered = template_messages(messages)
    assert rendered[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "c"}
    assert rendered[1]["tool_responses"] == [{"name": "get_weather", "response": {"temp": 21}}]
    assert len(rendered) == 2  # the tool message lives in the assistant's turn


@pytest.fixture(scope="module")
def tool_server(chat_dir, pairs, tmp_path_factory):
    s = Server("--model", chat_dir, "--draft-model", pairs["e2b"][1], "--num-draft-tokens", 3,
               log=tmp_path_factory.mktemp("serve") / "tools.log")
    yield s
    s.close()


def test_a_tool_round_trip_through_the_openai_client(tool_server, chat_pair):
    _, tokenizer, _ = chat_pair
    client = tool_server.client
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    first = client.chat.completions.create(model="any", messages=messages, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=3 * WINDOW)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls and not choice.message.content
    call = choice.message.tool_calls[0]
    assert call.function.name in ("get_weather", "now") and isinstance(json.loads(call.function.arguments), dict)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    final = client.chat.completions.create(model="any", messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=12)
    rendered = template_messages([Message(**m) for m in messages])
    assert final.usage.prompt_tokens == len(chat_ids(tokenizer, rendered))  # the result went through the template
    assert "<|tool_response>response:" + call.function.name in tokenizer.decode(chat_ids(tokenizer, rendered))
    answer = final.choices[0]
    assert not answer.message.tool_calls and not any(s in (answer.message.content or "") for s in SPECIALS)


def test_streamed_tool_calls_arrive_whole_one_per_chunk(tool_server):
    client = tool_server.client
    messages = [{"role": "user", "content": "Time and weather, please"}]
    options = dict(model="any", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=6 * WINDOW)
    whole = client.chat.completions.create(**options).choices[0]
    _, chunks = streamed(client.chat.completions.create(stream=True, **options))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert all(len(d.tool_calls) == 1 for d in deltas)
    got = [(d.tool_calls[0].function.name, json.loads(d.tool_calls[0].function.arguments)) for d in deltas]
    assert got == [(t.function.name, json.loads(t.function.arguments)) for t in whole.message.tool_calls]
    assert len(got) >= 1 and chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert not any(s in (c.choices[0].delta.content or "") for c in chunks if c.choices for s in SPECIALS)


def test_named_and_none_choices_are_honoured(tool_server):
    client = tool_server.client
    messages = [{"role": "user", "content": "weather?"}]
    named = client.chat.completions.create(model="any", messages=messages, tools=TOOLS, max_tokens=3 * WINDOW,
                                           tool_choice={"type": "function", "function": {"name": "now"}},
                                           parallel_tool_calls=False)
    assert [t.function.name for t in named.choices[0].message.tool_calls] and all(
        t.function.name == "now" for t in named.choices[0].message.tool_calls)
    none = client.chat.completions.create(model="any", messages=messages, tools=TOOLS, tool_choice="none",
                                          max_tokens=16)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"


def test_thought_channel_comes_back_as_reasoning_content(tool_server, chat_pair):
    """A grammar makes the random-weight model think first: the thought is reasoning_content,
    whole and streamed, and never content."""
    _, tokenizer, _ = chat_pair
    vocab = tokenizer._tokenizer.get_vocab()
    grammar = f'start: <[{vocab["<|channel>"]}]> "thought\\n" /[a-z]{{3}}/ <[{vocab["<channel|>"]}]> /[a-z]{{4}}/'
    options = dict(model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=20,
                   extra_body=dict(response_format={"type": "grammar", "grammar": grammar},
                                   chat_template_kwargs={"enable_thinking": True}))
    message = tool_server.client.chat.completions.create(**options).choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert len(reasoning) == 3 and reasoning.isalpha() and len(message.content) == 4 and message.content.isalpha()
    _, chunks = streamed(tool_server.client.chat.completions.create(stream=True, **options))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == message.content


BAD = [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nowhere"}}), "nowhere"),
    (dict(tools=[{"type": "function"}]), "tools[0]"),
    (dict(tool_choice="required"), "tools is empty"),
    (dict(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "1"}]),
     "messages[1].tool_call_id"),
    (dict(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "now", "arguments": "{not json"}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
]


@pytest.mark.parametrize("body, message", BAD)
def test_bad_tool_requests_answer_400_and_the_server_goes_on(body, message, tool_server):
    request = dict(dict(messages=[{"role": "user", "content": "hi"}], max_tokens=2), **body)
    status, answer = tool_server.post("/v1/chat/completions", request)
    assert status == 400 and message in answer["error"]["message"], answer
    good = tool_server.client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=2)
    assert good.usage.completion_tokens == 2


@pytest.mark.parametrize("fmt, body", [
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}, '{"a":12}'),
    ({"type": "regex", "regex": "[a-c]+/x"}, "abca/x"),
])
def test_a_format_with_thinking_starts_after_an_optional_thought(fmt, body, chat_pair):
    """One grammar holds the thought and the format: a reply may think first or not, and
    the format holds from the thought's end (never inside it)."""
    from gemma_mtp_mlx.structured.grammar import grammar_processor
    from gemma_mtp_mlx.structured.tool_grammar import after_thought

    _, tokenizer, _ = chat_pair
    wrapped = after_thought(tokenizer, fmt)
    assert wrapped["type"] == "grammar"
    for text in (body, "<|channel>thought\n{not json yet<channel|>" + body):
        matcher = grammar_processor(tokenizer, wrapped, 256).matcher
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert matcher.validate_tokens(ids) == len(ids) and matcher.consume_tokens(ids) and matcher.is_accepting()
    matcher = grammar_processor(tokenizer, wrapped, 256).matcher
    bad = tokenizer.encode("<|channel>thought\nok<channel|>zzz", add_special_tokens=False)
    assert matcher.validate_tokens(bad) < len(bad)


def test_generate_with_thinking_keeps_the_thought_apart(chat_dir, pairs, chat_pair, tmp_path):
    """`gemma-mtp generate --thinking`: the template is asked for the thought channel, and
    the JSON output holds the thought as `reasoning`, apart from the text (a grammar makes
    the random-weight model think first)."""
    import subprocess
    import sys

    _, tokenizer, _ = chat_pair
    vocab = tokenizer._tokenizer.get_vocab()
    grammar = tmp_path / "think.lark"
    grammar.write_text(f'start: <[{vocab["<|channel>"]}]> "thought\\n" /[a-z]{{3}}/ <[{vocab["<channel|>"]}]> /[a-z]{{4}}/')
    run = subprocess.run([sys.executable, "-m", "gemma_mtp_mlx", "generate", "--model", str(chat_dir), "--draft-model",
                          str(pairs["e2b"][1]), "--prompt", "hi", "--thinking", "--grammar", str(grammar),
                          "--max-tokens", "20", "--output", "json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out["reasoning"]) == 3 and len(out["text"]) == 4 and "<" not in out["text"]
    prompt = tokenizer.decode(chat_ids(tokenizer, [{"role": "user", "content": "hi"}], tools=None))
    thinking = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             tokenize=False, enable_thinking=True)
    assert "<|think|>" in thinking and "<|think|>" not in prompt


def test_auto_without_parallel_calls_allows_text_or_one_call(chat_pair):
    from gemma_mtp_mlx.structured.grammar import grammar_processor

    _, tokenizer, _ = chat_pair
    fmt = tool_constraint(tokenizer, TOOLS, "auto", parallel=False)
    call = '<|tool_call>call:now{zone:<|"|>utc<|"|>}<tool_call|>'
    for text, whole in (("plain words", True), (call, True), (call + call, False)):
        matcher = grammar_processor(tokenizer, fmt, 256).matcher
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert (matcher.validate_tokens(ids) == len(ids)) == whole, text
