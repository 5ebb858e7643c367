"""Command-line options shared by `gemma-mtp generate`/`chat` (cli.py) and `gemma-mtp serve`
(server/): argument types and the options that name a target/drafter pair. Both import
this module; it imports neither."""

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


def add_pair_options(parser: argparse.ArgumentParser) -> None:
    """--model, --draft-model and --no-draft."""
    parser.add_argument("--model", default=None,
                        help="target: local directory (a converted pair brings its drafter) or Hub repo id; "
                             "unset: the tiny Python-code pair that ships with the package")
    parser.add_argument("--draft-model", default=None, help="gemma4_assistant drafter: directory or Hub repo id")
    parser.add_argument("--no-draft", action="store_true", help="plain target decoding, for comparison")
