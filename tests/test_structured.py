"""Structured output (`response_format`) under exact speculation.

The target being matched is the constrained one: its processed distribution masked to what
the grammar allows after the tokens before each position. Greedy constrained speculative
output equals greedy constrained plain decoding (fixture pairs past 3x the window, k = 1,
3, 6, auto; the default pair under a JSON schema past 3x its window; batched rows with
different constraints and none), sampled output has the exact constrained distribution (a
chi-square test under a grammar whose mask depends on the history), every output of a
suite of JSON schemas parses and validates, and bad formats are clear errors.
"""

import json
import re

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from conftest import WINDOW, eos_tokens
from test_sampling import MIN_EXPECTED, PROMPT, chi_square_p_value, exact_joint_with_processors
from gemma_mtp_mlx import BatchEngine, batch_generate, generate, load, stream_generate
from gemma_mtp_mlx.sampling import Sampling
from gemma_mtp_mlx.structured.grammar import grammar_processor

# letters and digits take turns: the mask at each position depends on the tokens before it
ALTERNATING = {"type": "regex", "regex": "([a-e][0-4])+"}
WORDS = {"type": "regex", "regex": "([a-z]+[ ,.])+"}


def tokens_of(pair, prompt, **options):
    return [r.token for r in stream_generate(pair.target, pair.tokenizer, prompt, **options)]


@pytest.mark.parametrize("name", ["e2b", "dense", "unified"])
def test_greedy_constrained_speculative_equals_constrained_plain_past_3x_window(name, mlx_pairs):
    p = mlx_pairs[name]
    prompt, n = list(range(30, 50)), 3 * WINDOW + 4
    with eos_tokens(p.tokenizer, []):
        plain = tokens_of(p, prompt, max_tokens=n, response_format=WORDS)
        free = tokens_of(p, prompt, max_tokens=n)
        assert plain != free  # the grammar changes the output, so the comparison means something
        text = p.tokenizer.decode(plain)
        assert len(plain) == n and all(c.isalpha() or c in " ,." for c in text) and text[0].isalpha()
        for k in (1, 3, 6, "auto"):
            assert tokens_of(p, prompt, draft_model=p.drafter, num_draft_tokens=k, max_tokens=n,
                             response_format=WORDS) == plain, f"k={k}"


@pytest.fixture(scope="module")
def default_pair():
    return load()


LIST_SCHEMA = {"type": "json_schema", "json_schema": {"name": "lines", "schema": {
    "type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 40, "maxItems": 60}}}


def test_default_pair_json_schema_past_3x_window_equals_plain(default_pair):
    """The trained pair accepts many drafts a round; the schema's masks follow them, past
    3x its 128-token window; the result is valid JSON under the schema."""
    target, tokenizer, drafter = default_pair
    window = target.args.sliding_window
    prompt = "def main():\n    names = "
    plain = list(stream_generate(target, tokenizer, prompt, max_tokens=3 * window + 40, response_format=LIST_SCHEMA))
    assert len(plain) > 3 * window
    for k in (3, "auto"):
        speculative = list(stream_generate(target, tokenizer, prompt, draft_model=drafter, num_draft_tokens=k,
                                           max_tokens=3 * window + 40, response_format=LIST_SCHEMA))
        assert [r.token for r in speculative] == [r.token for r in plain], f"k={k}"
        assert speculative[-1].stats.mean_accepted_length > 1.5
    if plain[-1].finish_reason == "stop":
        jsonschema.validate(json.loads("".join(r.text for r in plain)), LIST_SCHEMA["json_schema"]["schema"])


SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 99}},
     "required": ["ok", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                               "maxItems": 2}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}, "label": {"type": "string", "maxLength": 10}},
     "required": ["point", "label"], "additionalProperties": False},
    {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
    {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1,
                                                                          "maximum": 9}},
                                  "required": ["id"], "additionalProperties": False}]},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_every_json_schema_output_parses_and_validates(schema, default_pair):
    target, tokenizer, drafter = default_pair
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    for prompt in ("def main():", "import json\n"):
        out = list(stream_generate(target, tokenizer, prompt, draft_model=drafter, max_tokens=60,
                                   response_format=fmt))
        text = "".join(r.text for r in out)
        assert out[-1].finish_reason == "stop", text  # EOS once the structure is complete
        assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)), text  # compact: outside strings
        jsonschema.validate(json.loads(text), schema)


def test_json_object_and_eos_only_where_the_grammar_accepts(default_pair):
    target, tokenizer, drafter = default_pair
    text = generate(target, tokenizer, "x = ", draft_model=drafter, max_tokens=80,
                    response_format={"type": "json_object"})
    assert text.startswith("{")
    five = list(stream_generate(target, tokenizer, "x = ", draft_model=drafter, max_tokens=20,
                                response_format={"type": "regex", "regex": "[a-z]{5}"}))
    assert [r.finish_reason for r in five][-1] == "stop" and len(five) == 6  # 5 letters, then EOS
    assert five[-1].token in tokenizer.eos_token_ids
    cut = list(stream_generate(target, tokenizer, "x = ", draft_model=drafter, max_tokens=3,
                               response_format={"type": "regex", "regex": "[a-z]{5}"}))
    assert cut[-1].finish_reason == "length" and len(cut) == 3  # max_tokens inside the structure


def test_batched_rows_with_different_constraints_and_none_equal_single_stream(mlx_pairs):
    p = mlx_pairs["e2b"]
    prompts = [list(range(30, 50)), list(range(60, 65)), list(range(40, 80))]
    formats = [WORDS, None, ALTERNATING]
    with eos_tokens(p.tokenizer, []):
        for k in (None, 3):
            draft = p.drafter if k else None
            out = batch_generate(p.target, p.tokenizer, prompts, draft_model=draft, num_draft_tokens=k,
                                 max_tokens=2 * WINDOW, response_format=formats, return_token_ids=True)
            for prompt, fmt, got in zip(prompts, formats, out.token_ids):
                assert got == tokens_of(p, prompt, max_tokens=2 * WINDOW, response_format=fmt), (k, fmt)


SAMPLES = 1200


@pytest.mark.parametrize("draft_mode", ["sampled", "greedy"])
def test_sampled_output_follows_the_constrained_distribution(draft_mode, mlx_pairs):
    """Sampled drafts are drawn from the drafter's masked distribution and judged with that
    q; greedy drafts are unconstrained (an invalid one has p = 0). Both must give the
    constrained target's joint distribution of the first three tokens."""
    p = mlx_pairs["e2b"]
    grammar = grammar_processor(p.tokenizer, ALTERNATING, p.target.vocab_size)
    joint = exact_joint_with_processors(p.target, Sampling(temp=1.0, logits_processors=[grammar]),
                                        MIN_EXPECTED / SAMPLES)
    assert all(p.tokenizer.decode(list(o))[0] in "abcde" for o in joint)
    samples = np.array([tokens_of(p, PROMPT, draft_model=p.drafter, num_draft_tokens=2, max_tokens=3, temp=1.0,
                                  draft_mode=draft_mode, seed=i, response_format=ALTERNATING)
                        for i in range(SAMPLES)])
    assert chi_square_p_value(samples, joint) > 1e-3


BAD_FORMATS = [
    ({"type": "regex", "regex": "("}, "response_format.regex does not compile"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema must be"),
    ({"type": "grammar", "grammar": "start: nowhere"}, "response_format.grammar does not compile"),
    ({"type": "xml"}, "response_format.type must be one of"),
    ("json", "response_format must be an object"),
]


@pytest.mark.parametrize("fmt, message", BAD_FORMATS)
def test_bad_formats_are_clear_errors_in_the_api_and_the_engine(fmt, message, mlx_pairs):
    p = mlx_pairs["e2b"]
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        generate(p.target, p.tokenizer, [5, 6], max_tokens=2, response_format=fmt)
    engine = BatchEngine(p.target, p.tokenizer, p.drafter)
    with pytest.raises(ValueError, match="response_format"):
        engine.insert([5, 6], max_tokens=2, response_format=fmt)
    assert not engine.has_work


def test_a_grammar_processor_rolls_back_with_the_drafts():
    """The matcher follows whatever history it is given: a draft it rejected leaves the
    next position unmasked, and a shorter history rolls it back."""
    _, tokenizer, _ = load()
    grammar = grammar_processor(tokenizer, {"type": "regex", "regex": "ab+"}, 4096)
    a, b, c = (tokenizer.encode(x, add_special_tokens=False)[-1] for x in "abc")
    prompt = [2, 7, 9]
    logits = mx.zeros((1, 4096))

    def allowed(history):
        return set(np.flatnonzero(np.array(grammar(mx.array(prompt + history), logits))[0] > -np.inf).tolist())

    assert a in allowed([])
    assert b in allowed([a]) and a not in allowed([a])
    assert len(allowed([a, c])) == 4096  # after a rejected draft: never emitted, left unmasked
    assert b in allowed([a, b]) and tokenizer.eos_token_id in allowed([a, b])
    assert allowed([a]) == allowed([a])  # rolled back from [a, b]
    assert tokenizer.eos_token_id not in allowed([a])
