"""Gemma 4 function calling and the thought channel: parsing replies, and grammars that
make a reply a call (`tool_choice` required or named) or keep it from being one (none).

Gemma 4's syntax (its chat template renders the declarations; the model writes calls):

    <|tool>declaration:NAME{description:<|"|>...<|"|>,parameters:{...}}<tool|>   system turn
    <|tool_call>call:NAME{key:<|"|>text<|"|>,n:42,flag:true}<tool_call|>         a call
    <|channel>thought\\n ... <channel|>                                          thinking

Keys are bare, strings are delimited by the special token `<|"|>`, calls are concatenated.
`parse_reply` splits a whole reply into (reasoning, content, tool calls), leniently: JSON
arguments, a missing `<tool_call|>` at the end, quoted keys. `ReplyStream` does the same
for a reply that arrives in pieces: reasoning and content go out as they come, text from a
call's start is held back and each call is handed out whole at the end. The grammars are
Lark for llguidance, with the special tokens by id (`<[id]>`), so a reply can start with
an optional thought and every boundary sits inside one grammar.
"""

import json
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..validate import InvalidInput

CALL_START, CALL_END, STRING = "<|tool_call>", "<tool_call|>", '<|"|>'
THOUGHT_START, THOUGHT_END = "<|channel>", "<channel|>"
THOUGHT_PREFIX = "thought\n"
REQUIRED_TOKENS = (CALL_START, CALL_END, STRING, THOUGHT_START, THOUGHT_END)


@dataclass
class ToolCall:
    name: str
    arguments: dict

    def openai(self, index: int, call_id: str) -> dict:
        return dict(index=index, id=call_id, type="function",
                    function=dict(name=self.name, arguments=json.dumps(self.arguments)))


def gemma_to_json(text: str) -> str:
    """Gemma 4 argument syntax as JSON: `<|"|>`-delimited strings quoted, bare keys quoted."""
    parts = text.split(STRING)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # inside a string
            out.append(json.dumps(part))
        else:
            out.append(re.sub(r'(?<=[{,])\s*([A-Za-z_][\w.-]*)\s*:', r'"\1":', part))
    return "".join(out)


def parse_call(body: str) -> ToolCall:
    """`call:NAME{...}` (the text between the call tokens) as a ToolCall; ValueError when
    it is not one."""
    match = re.match(r"\s*(?:call:)?\s*([\w.-]+)\s*(\{.*\})\s*$", body, re.DOTALL)
    if not match:
        raise ValueError(f"not a tool call: {body[:80]!r}")
    name, arguments = match.groups()
    try:
        parsed = json.loads(arguments)  # a model that wrote JSON
    except json.JSONDecodeError:
        parsed = json.loads(gemma_to_json(arguments))
    if not isinstance(parsed, dict):
        raise ValueError(f"tool call arguments must be an object: {arguments[:80]!r}")
    return ToolCall(name, parsed)


def split_thought(text: str) -> Tuple[Optional[str], str]:
    """(the thought channel's text or None, the rest)."""
    start = text.find(THOUGHT_START)
    if start < 0:
        return None, text
    end = text.find(THOUGHT_END, start)
    inner = text[start + len(THOUGHT_START): len(text) if end < 0 else end]
    inner = inner[len(THOUGHT_PREFIX):] if inner.startswith(THOUGHT_PREFIX) else inner
    rest = text[:start] + ("" if end < 0 else text[end + len(THOUGHT_END):])
    return inner.strip("\n"), rest


def parse_reply(text: str) -> Tuple[Optional[str], str, List[ToolCall]]:
    """A whole reply as (reasoning, content, tool calls). A call that does not parse (cut
    by max_tokens, say) stays in the content as text, its special tokens removed."""
    reasoning, rest = split_thought(text)
    calls, content = [], []
    pieces = rest.split(CALL_START)
    content.append(pieces[0])
    for piece in pieces[1:]:
        body, _, after = piece.partition(CALL_END)
        try:
            calls.append(parse_call(body))
        except (ValueError, json.JSONDecodeError):
            content.append(_plain(piece))
            continue
        content.append(after)
    return reasoning, "".join(content), calls


def _plain(text: str) -> str:
    for marker in (CALL_END, STRING, CALL_START):
        text = text.replace(marker, "")
    return text


class ReplyStream:
    """A reply arriving in pieces: `feed` returns the (reasoning, content) text that may go
    out now; `finish` parses what was held back and returns the remaining (reasoning,
    content, tool calls)."""

    def __init__(self):
        self.text = ""
        self.sent_reasoning = 0  # characters of the thought's text handed out
        self.sent_content = 0  # characters of the content handed out

    def feed(self, piece: str) -> Tuple[str, str]:
        self.text += piece
        reasoning, rest = split_thought(self.text)
        if THOUGHT_START in self.text and THOUGHT_END not in self.text:
            return self._take_reasoning(reasoning or "", hold=len(THOUGHT_END)), ""
        held = rest.find(CALL_START)
        visible = rest if held < 0 else rest[:held]
        visible = visible[: len(visible) - _partial_marker(visible)]
        return self._take_reasoning(reasoning or ""), self._take_content(visible)

    def finish(self) -> Tuple[str, str, List[ToolCall]]:
        reasoning, content, calls = parse_reply(self.text)
        return self._take_reasoning(reasoning or ""), self._take_content(content), calls

    def _take_reasoning(self, reasoning: str, hold: int = 0) -> str:
        end = max(self.sent_reasoning, len(reasoning) - hold)
        out, self.sent_reasoning = reasoning[self.sent_reasoning: end], end
        return out

    def _take_content(self, content: str) -> str:
        out = content[self.sent_content:]
        self.sent_content = max(self.sent_content, len(content))
        return out


def _partial_marker(text: str) -> int:
    """Characters at the end of `text` that could start a call or a thought marker."""
    for n in range(min(len(text), len(CALL_START) - 1), 0, -1):
        if CALL_START.startswith(text[-n:]) or THOUGHT_START.startswith(text[-n:]):
            return n
    return 0


def check_tools(tools, tool_choice, parallel: bool = True) -> None:
    """Clear errors (naming the field) for malformed `tools` and `tool_choice`."""
    names = []
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidInput(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                               "\"parameters\": {...}}}")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidInput(f"tools[{i}].function.parameters must be a JSON schema object")
        names.append(function["name"])
    name = chosen_name(tool_choice)
    if tool_choice not in (None, "none", "auto", "required") and name is None:
        raise InvalidInput("tool_choice must be none, auto, required or "
                           "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if (tool_choice == "required" or name is not None) and not names:
        raise InvalidInput("tool_choice asks for a tool call but tools is empty: declare the tools")
    if name is not None and name not in names:
        raise InvalidInput(f"tool_choice.function.name {name!r} is not among the tools ({', '.join(names)})")


def chosen_name(tool_choice) -> Optional[str]:
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    return None
