"""Lark grammars (llguidance) of Gemma 4's reply syntax: a reply that must be tool calls
(`tool_choice` required or a named function), a reply that may not call (none), and a
`response_format` that starts after an optional thought.

Each function's arguments follow its JSON schema in Gemma 4's argument syntax (bare keys
in sorted order, as the chat template writes them; `<|"|>`-delimited strings; required keys
always, optional ones allowed). Special tokens are referred to by id (`<[id]>`); free text
never matches a special token, so no call can start inside text or a thought.
"""

import json
from typing import Dict, List

from ..validate import InvalidInput
from .grammar import JSON_OPTIONS, _llguidance, grammar_text
from .tools import CALL_END, CALL_START, STRING, THOUGHT_END, THOUGHT_START, check_tools, chosen_name

INTEGER = r"/-?(0|[1-9][0-9]{0,17})/"
NUMBER = r"/-?(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?([eE][-+]?[0-9]{1,3})?/"
KEY = r"/[A-Za-z_][A-Za-z0-9_]*/"


def special_ids(tokenizer) -> Dict[str, int]:
    """Gemma 4's call and thought tokens -> their ids; a clear error without them."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    vocab = hf.get_vocab()
    missing = [t for t in (CALL_START, CALL_END, STRING, THOUGHT_START, THOUGHT_END) if t not in vocab]
    if missing:
        raise InvalidInput(f"this model's tokenizer lacks Gemma 4's tool-call tokens ({' '.join(missing)}): "
                           "tool_choice required/none/named needs an instruction-tuned Gemma 4")
    return {t: vocab[t] for t in (CALL_START, CALL_END, STRING, THOUGHT_START, THOUGHT_END)}


class _Rules:
    """Lark rules for values in Gemma 4's argument syntax, one per schema node."""

    def __init__(self, ids: Dict[str, int]):
        self.q = f"<[{ids[STRING]}]>"
        self.lines: List[str] = []
        self.any = None

    def rule(self, body: str) -> str:
        name = f"v{len(self.lines)}"
        self.lines.append(f"{name}: {body}")
        return name

    def literal(self, value) -> str:
        if isinstance(value, str):
            return f"{self.q} {json.dumps(value)} {self.q}"
        return json.dumps(json.dumps(value))  # numbers, true, false, null as their JSON text

    def value(self, schema) -> str:
        if not isinstance(schema, dict) or not schema:
            return self.any_value()
        if "enum" in schema:
            return self.rule(" | ".join(self.literal(v) for v in schema["enum"]))
        if "const" in schema:
            return self.rule(self.literal(schema["const"]))
        kind = schema.get("type")
        if isinstance(kind, list):
            return self.rule(" | ".join(self.value(dict(schema, type=k)) for k in kind))
        if kind == "string":
            n = schema.get("maxLength")
            text = f"/(?s:.{{0,{int(n)}}})/" if isinstance(n, int) else "/(?s:.*)/"
            return self.rule(f"{self.q} {text} {self.q}")
        simple = {"integer": INTEGER, "number": NUMBER, "boolean": '"true" | "false"', "null": '"null"'}
        if kind in simple:
            return self.rule(simple[kind])
        if kind == "array":
            item = self.value(schema.get("items", {}))
            return self.rule(f'"[" ({item} ("," {item})*)? "]"')
        if kind == "object" and schema.get("properties"):
            return self.obj(schema["properties"], set(schema.get("required", [])))
        if kind == "object":
            self.any_value()
            return "anyobj"
        return self.any_value()

    def obj(self, properties: dict, required: set) -> str:
        """`{k:v,...}`: keys in sorted order, the required ones always."""
        keys = sorted(properties)
        items = [self.rule(f'"{k}:" {self.value(properties[k])}') for k in keys]
        tail = '""'  # the sequence from position i on, as a rule per (i, comma needed)
        tails = {}
        for i in range(len(keys) - 1, -1, -1):
            for comma in (True, False):
                sep = '"," ' if comma else ""
                after = tails.get((i + 1, True), '""')
                with_item = f"{sep}{items[i]} {after}"
                if keys[i] in required:
                    tails[(i, comma)] = self.rule(with_item)
                else:
                    tails[(i, comma)] = self.rule(f"({with_item}) | {tails.get((i + 1, comma), tail)}")
        return self.rule(f'"{{" {tails[(0, False)] if keys else tail} "}}"')

    def any_value(self) -> str:
        if self.any is None:
            self.any = "anyv"
            pair = f'{KEY} ":" anyv'
            self.lines.append(f'anyv: {self.q} /(?s:.*)/ {self.q} | {NUMBER} | "true" | "false" | "null" '
                              f'| "[" (anyv ("," anyv)*)? "]" | anyobj')
            self.lines.append(f'anyobj: "{{" ({pair} ("," {pair})*)? "}}"')
        return self.any


def _thought(ids: Dict[str, int], thinking: bool) -> str:
    """The optional thought before a reply: the channel with thinking on, nothing without."""
    if not thinking:
        return 'thought: ""'
    return f"thought: <[{ids[THOUGHT_START]}]> /(?s:.*)/ <[{ids[THOUGHT_END]}]>"


def call_grammar(tools: List[dict], tool_choice, parallel: bool, ids: Dict[str, int], thinking: bool,
                 or_text: bool = False) -> str:
    """A reply that is one or more calls (one without `parallel`) of the tools
    (`tool_choice` required) or of the one named, after an optional thought; with
    `or_text`, text instead of the calls is allowed too."""
    name = chosen_name(tool_choice)
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    rules = _Rules(ids)
    alternatives = [f'"{f["name"]}" {rules.value(dict(f.get("parameters") or {}, type="object"))}'
                    for f in functions]
    body = "(call)" + ("+" if parallel else "")
    return "\n".join([
        f"start: thought? ({body} | /(?s:.*)/)" if or_text else f"start: thought? {body}",
        _thought(ids, thinking),
        f'call: <[{ids[CALL_START]}]> "call:" fn <[{ids[CALL_END]}]>',
        "fn: " + " | ".join(alternatives),
        *rules.lines,
    ])


def no_call_grammar(ids: Dict[str, int], thinking: bool) -> str:
    """A reply of text (after an optional thought) that never starts a call."""
    return "\n".join(["start: thought? /(?s:.*)/", _thought(ids, thinking)])


def tool_constraint(tokenizer, tools, tool_choice="auto", parallel: bool = True, thinking: bool = False):
    """The `response_format` that enforces `tool_choice` on a Gemma 4 reply (None: no
    constraint). required / a named function: the reply is calls; none: it never calls;
    auto without `parallel`: text or one call. With `thinking` (the template was asked to
    think) a thought may come first. Raises InvalidInput naming the field."""
    check_tools(tools, tool_choice, parallel)
    if tool_choice == "none":
        return {"type": "grammar", "grammar": no_call_grammar(special_ids(tokenizer), thinking)}
    if not tools or (tool_choice in (None, "auto") and parallel):
        return None
    ids = special_ids(tokenizer)
    if tool_choice in (None, "auto"):  # one call at most
        return {"type": "grammar", "grammar": call_grammar(tools, "required", False, ids, thinking, or_text=True)}
    return {"type": "grammar", "grammar": call_grammar(tools, tool_choice, parallel, ids, thinking)}


def after_thought(tokenizer, response_format):
    """A JSON or regex `response_format` that lets a thought come first (thinking on): one
    grammar holds both, so the boundary never falls between two rounds' constraints. A Lark
    grammar is the caller's whole reply and is left as it is."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in ("json_object", "json_schema", "regex"):
        return response_format
    grammar_text(response_format)  # the format's own checks, naming its fields
    ids = special_ids(tokenizer)
    if kind == "regex":
        body = "/" + _llguidance().regex_to_lark(response_format["regex"]) + "/"
    else:
        schema = {"type": "object"} if kind == "json_object" else response_format["json_schema"]["schema"]
        body = "%json " + json.dumps(dict(schema, **{"x-guidance": JSON_OPTIONS}))
    return {"type": "grammar", "grammar": "\n".join(["start: thought? body", _thought(ids, True), f"body: {body}"])}
