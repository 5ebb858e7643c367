"""Chat requests: OpenAI messages (tool calls and tool results included) rendered by the
model's chat template, and the constraint a request's `tool_choice` asks for.

OpenAI's `role: "tool"` messages become the `tool_responses` of the assistant message whose
call they answer (named after that call, as Gemma 4's template expects), and an
assistant's `tool_calls` carry their arguments as objects. Thinking is off unless the
request turns it on (`chat_template_kwargs: {"enable_thinking": true}`).
"""

import json
from typing import List, Optional

from ..structured.tool_grammar import after_thought, tool_constraint
from ..structured.tools import check_tools
from .protocol import BadRequest, ChatRequest, Message


def chat_prompt(s, body: ChatRequest, model_name: str) -> List[int]:
    tokenizer = s.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise BadRequest(f"{model_name} has no chat template, so it cannot serve chat completions: use "
                         "/v1/completions with a prompt, or serve an instruction-tuned Gemma 4 (--model)",
                         param="messages")
    try:
        check_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    except ValueError as e:
        raise _tools_error(e)
    options = dict(body.chat_template_kwargs or {}, enable_thinking=body.thinking)
    if body.tools:
        options["tools"] = body.tools
    messages = template_messages(body.messages)
    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **options))
    except Exception as e:  # the template's own checks (e.g. roles must alternate)
        raise BadRequest(f"messages: the chat template refused them: {e}", param="messages")


def template_messages(messages: List[Message]) -> List[dict]:
    """The messages as the chat template takes them; malformed tool messages are a 400
    naming the message."""
    out, calls = [], {}  # calls: id -> (the assistant message's entry, the function's name)
    for i, m in enumerate(messages):
        if m.role == "tool":
            if m.tool_call_id not in calls:
                raise BadRequest(f"messages[{i}].tool_call_id {m.tool_call_id!r} answers no earlier assistant "
                                 "tool call: give the id of the call it answers", param="messages")
            entry, name = calls[m.tool_call_id]
            entry.setdefault("tool_responses", []).append(dict(name=name, response=_result(m.text())))
            continue
        entry = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            entry["tool_calls"] = [_call(i, j, call) for j, call in enumerate(m.tool_calls)]
            for call in entry["tool_calls"]:
                calls[call["id"]] = (entry, call["function"]["name"])
        out.append(entry)
    return out


def _call(i: int, j: int, call) -> dict:
    where = f"messages[{i}].tool_calls[{j}]"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f"{where} must be {{\"id\": ..., \"type\": \"function\", \"function\": {{\"name\": ..., "
                         "\"arguments\": \"{...}\"}}", param="messages")
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise BadRequest(f"{where}.function.arguments is not valid JSON: {arguments[:80]!r}", param="messages")
    if not isinstance(arguments, dict):
        raise BadRequest(f"{where}.function.arguments must be a JSON object", param="messages")
    return dict(id=call.get("id") or f"call_{i}_{j}", type="function",
                function=dict(name=function["name"], arguments=arguments))


def _result(text: str):
    """A tool's result: a JSON object as a mapping (the template writes its fields), else the text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text


def tool_format(s, body) -> Optional[dict]:
    """The `response_format` the request constrains its reply with: its own, or the one its
    `tool_choice` asks for (a 400 naming the field when they clash or are malformed)."""
    if not isinstance(body, ChatRequest):
        return body.response_format
    if not (body.tools or body.tool_choice):
        return _after_thought(s, body) if body.thinking and body.response_format else body.response_format
    try:
        constraint = tool_constraint(s.tokenizer, body.tools, body.tool_choice, body.parallel_tool_calls,
                                     body.thinking)
    except ValueError as e:
        raise _tools_error(e)
    if constraint is not None and body.response_format is not None:
        raise BadRequest("response_format and tool_choice both constrain the reply: give one of them",
                         param="response_format")
    if constraint is None and body.thinking and body.response_format:
        return _after_thought(s, body)
    return constraint or body.response_format


def _tools_error(e: ValueError) -> BadRequest:
    """A malformed `tools` or `tool_choice` as a 400 naming the one at fault."""
    return BadRequest(str(e), param="tool_choice" if "tool_choice" in str(e) else "tools")


def _after_thought(s, body) -> dict:
    try:
        return after_thought(s.tokenizer, body.response_format)
    except ValueError as e:
        raise BadRequest(str(e), param="response_format")
