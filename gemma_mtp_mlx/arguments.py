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
