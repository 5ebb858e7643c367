"""Command-line options shared by the commands (cli.py, server/, bench/): argument types
and the options that name a target/drafter pair. They import this module; it imports none
of them."""

import argparse

from .adaptive import AUTO


def draft_tokens(text: str):
    """`--num-draft-tokens`: a whole number, or auto."""
    if text == AUTO:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or {AUTO}, got {text!r}")


def add_pair_options(parser: argparse.ArgumentParser, no_draft: bool = True) -> None:
    """--model, --draft-model and (unless `no_draft` is False) --no-draft."""
    parser.add_argument("--model", default=None,
                        help="target: local directory (a converted pair brings its drafter) or Hub repo id; "
                             "unset: the tiny Python-code pair that ships with the package")
    parser.add_argument("--draft-model", default=None,
                        help="gemma4_assistant drafter: directory or Hub repo id; unset: the pair's own")
    if no_draft:
        parser.add_argument("--no-draft", action="store_true", help="plain target decoding, for comparison")


def add_format_options(parser: argparse.ArgumentParser) -> None:
    """--json-schema, --regex and --grammar: structured output (one of them)."""
    constraint = parser.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", default=None, metavar="FILE|JSON",
                            help="constrain the reply to JSON valid under this schema (a file, or inline JSON)")
    constraint.add_argument("--regex", default=None, help="constrain the reply to match this regular expression")
    constraint.add_argument("--grammar", default=None, metavar="FILE", help="constrain the reply to a Lark grammar")


def response_format(args):
    """The `response_format` that --json-schema, --regex or --grammar asks for (None: none)."""
    from .structured.grammar import parse_format_argument

    for kind, value in (("json_schema", args.json_schema), ("regex", args.regex), ("grammar", args.grammar)):
        if value is not None:
            return parse_format_argument(value, kind)
    return None
