"""`response_format` -> an llguidance grammar -> a logits processor that follows drafts.

Accepted formats (OpenAI's names, plus two of llguidance's):

    {"type": "text"}                                   no constraint
    {"type": "json_object"}                            any JSON object
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}
    {"type": "regex", "regex": "..."}
    {"type": "grammar", "grammar": "<Lark>"}

JSON comes out compact (no whitespace between tokens, "," and ":" as separators): a
grammar that allows unlimited whitespace lets a small or weak model emit whitespace until
max_tokens. The end-of-sequence tokens are allowed only where the grammar accepts; once it
is complete they are the only tokens allowed.

`GrammarProcessor` has mlx-lm's logits-processor signature (`(tokens, logits) -> logits`)
and keeps its matcher in step with the history it is given: the common prefix with what it
consumed stays, the rest is rolled back and the new tokens consumed. So it serves the
verify's k + 1 positions (each history holds the drafts before it), the drafter's sampled
drafts and the next round alike. A position after a draft the grammar rejects is never
emitted (that draft has probability 0 at its own position); there the logits stay as they
are, so no row is ever all-masked.
"""

import json
import time
import weakref
from typing import Callable, List, Optional

import mlx.core as mx
import numpy as np

from ..validate import InvalidInput

# A compact JSON grammar: no whitespace between tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

_tokenizers = weakref.WeakKeyDictionary()  # HF tokenizer -> its llguidance tokenizer


def _llguidance():
    import llguidance  # loaded only when a request asks for structured output

    return llguidance


def ll_tokenizer(tokenizer):
    """The llguidance tokenizer of a TokenizerWrapper (built once per tokenizer), whose
    end-of-sequence tokens are the wrapper's."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    cached = _tokenizers.get(hf)
    eos = sorted(tokenizer.eos_token_ids) or None  # none: the tokenizer's own
    if cached is None or cached[0] != eos:
        import llguidance.hf

        try:
            built = llguidance.hf.from_tokenizer(hf, eos_token=eos)
        except ValueError:  # a decoder llguidance does not read (e.g. Metaspace): give it the bytes
            built = _llguidance().LLTokenizer(_llguidance().TokenizerWrapper(_TokenBytes(hf)), eos_token=eos)
        cached = _tokenizers[hf] = (eos, built)
    return cached[1]


class _TokenBytes:
    """A SentencePiece-style tokenizer as llguidance's generic tokenizer protocol: each
    token's bytes ("▁" is a space, "<0xNN>" the byte NN), its special tokens, and encoding."""

    def __init__(self, hf):
        self.hf = hf
        self.eos_token_id = hf.eos_token_id
        self.bos_token_id = hf.bos_token_id
        special = set(hf.all_special_ids) | {i for i, t in hf.added_tokens_decoder.items() if t.special}
        self.special_token_ids = sorted(special)
        pieces = hf.convert_ids_to_tokens(list(range(len(hf))))
        self.tokens = [_piece_bytes(piece, i in special) for i, piece in enumerate(pieces)]

    def __call__(self, text):
        if isinstance(text, bytes):
            raise TypeError("encodes text")
        return self.hf.encode(text, add_special_tokens=False)


def _piece_bytes(piece: Optional[str], special: bool) -> bytes:
    if piece is None:
        return b""
    if special:
        return piece.encode()
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


def grammar_text(response_format) -> Optional[str]:
    """The llguidance grammar of a `response_format` (None: no constraint). Raises
    InvalidInput naming the field that is wrong."""
    if response_format is None:  # every unconstrained generation passes here: no llguidance import
        return None
    llguidance = _llguidance()
    if not isinstance(response_format, dict):
        raise InvalidInput(f"response_format must be an object with a \"type\", got {response_format!r}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidInput("response_format.json_schema.schema must be a JSON schema object "
                               "({\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}})")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise InvalidInput(f"response_format.json_schema.schema: {e}") from None
    if kind == "regex":
        regex = response_format.get("regex")
        if not isinstance(regex, str) or not regex:
            raise InvalidInput("response_format.regex must be a non-empty regular expression string")
        return llguidance.LLMatcher.grammar_from_regex(regex)
    if kind == "grammar":
        lark = response_format.get("grammar")
        if not isinstance(lark, str) or not lark.strip():
            raise InvalidInput("response_format.grammar must be a non-empty Lark grammar string")
        return llguidance.LLMatcher.grammar_from_lark(lark)
    raise InvalidInput(f"response_format.type must be one of text, json_object, json_schema, regex, grammar; "
                       f"got {kind!r}")


def _field(response_format: dict) -> str:
    return {"json_schema": "response_format.json_schema.schema", "regex": "response_format.regex",
            "grammar": "response_format.grammar"}.get(response_format.get("type"), "response_format")


class GrammarProcessor:
    """Masks logits [1, V] to what the grammar allows after the tokens it is given."""

    def __init__(self, matcher, vocab_size: int, eos: List[int]):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos = eos
        self.start: Optional[int] = None  # prompt length: the first call's history
        self.consumed: List[int] = []  # generated tokens the matcher holds
        self.seconds = 0.0  # host time spent following histories and computing masks

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.start is None:
            self.start = tokens.size
        generated = tokens[self.start:].tolist()  # waits for the drafts: not counted as mask time
        tic = time.perf_counter()
        try:
            if not self._follow(generated):
                return logits  # after a draft the grammar rejects: never emitted
            return mx.where(self._allowed(), logits, mx.array(-mx.inf, logits.dtype))
        finally:
            self.seconds += time.perf_counter() - tic

    def _follow(self, generated: List[int]) -> bool:
        """Bring the matcher to `generated`; whether the grammar allows all of it."""
        same = 0
        for a, b in zip(self.consumed, generated):
            if a != b:
                break
            same += 1
        if same < len(self.consumed):
            self.matcher.rollback(len(self.consumed) - same)
            del self.consumed[same:]
        new = generated[same:]
        if not new:
            return True
        valid = self.matcher.validate_tokens(new)
        if valid and not self.matcher.consume_tokens(new[:valid]):
            raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()}")
        self.consumed += new[:valid]
        return valid == len(new)

    def _allowed(self) -> mx.array:
        """[V] bool: the tokens the grammar allows next (cut or padded to the logits' width)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), np.uint8), bitorder="little")
        allowed = np.zeros(self.vocab_size, bool)
        n = min(self.vocab_size, bits.size)
        allowed[:n] = bits[:n]
        if not allowed.any():  # the matcher has nothing left (an error state): end the sequence
            allowed[[e for e in self.eos if e < self.vocab_size]] = True
        return mx.array(allowed)


def grammar_processor(tokenizer, response_format, vocab_size: int) -> Optional[Callable]:
    """A fresh `GrammarProcessor` for one generation (None for no constraint). Raises
    InvalidInput naming the field when the format is malformed or does not compile."""
    grammar = grammar_text(response_format)
    if grammar is None:
        return None
    llguidance = _llguidance()
    matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
    if matcher.is_error():
        raise InvalidInput(f"{_field(response_format)} does not compile: {matcher.get_error().strip().splitlines()[0]}")
    return GrammarProcessor(matcher, vocab_size, sorted(tokenizer.eos_token_ids))


def with_grammar(logits_processors, tokenizer, response_format, vocab_size: int) -> List[Callable]:
    """`logits_processors` (a list, copied) with the `response_format`'s processor last."""
    processors = list(logits_processors or [])
    grammar = grammar_processor(tokenizer, response_format, vocab_size)
    return processors + ([grammar] if grammar is not None else [])


def parse_format_argument(text: str, kind: str) -> dict:
    """A CLI value as a `response_format`: `kind` json_schema (a file or inline JSON),
    regex (the expression) or grammar (a Lark file)."""
    if kind == "regex":
        return {"type": "regex", "regex": text}
    if kind == "grammar":
        return {"type": "grammar", "grammar": _read(text, "--grammar")}
    source = text if text.lstrip().startswith("{") else _read(text, "--json-schema")
    try:
        schema = json.loads(source)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"--json-schema is not valid JSON ({e}): give a file or inline JSON schema") from None
    return {"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}}


def _read(path: str, option: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise InvalidInput(f"{option}: cannot read {path}: {e.strerror}") from None
