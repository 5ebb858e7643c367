"""`gemma-mtp`: the command line. Parses arguments, calls the API, prints.

Errors are one line on stderr and a non-zero exit; `--debug` shows the traceback.
"""

import argparse
import json
import sys
from typing import List, Optional

from .checkpoint import CheckpointError
from .generate import load, stream_generate



def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="target: local directory or Hub repo id")
    parser.add_argument("--draft-model", default=None, help="gemma4_assistant drafter (default: none)")
    parser.add_argument("--no-draft", action="store_true", help="plain target decoding, for comparison")
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help="tokens drafted per round (default: the drafter's num_assistant_tokens, else 4)")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-mtp",
        description="Gemma 4 with its MTP drafter on MLX: faster generation, identical output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text from one prompt",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(gen)
    gen.add_argument("--prompt", required=True, help="the prompt text, or - to read it from stdin")
    gen.add_argument("--system", default=None, help="a system message for the chat template")
    gen.add_argument("--no-chat-template", action="store_true", help="use the prompt text as is")
    gen.add_argument("--output", choices=("text", "json"), default="text",
                     help="text: stream the reply; json: print one JSON object at the end")
    gen.add_argument("--verbose", action="store_true", help="also print per-round details")
    gen.set_defaults(run=run_generate)
    return parser


def prompt_tokens(tokenizer, text: str, system: Optional[str], use_template: bool) -> List[int]:
    if not use_template or getattr(tokenizer, "chat_template", None) is None:
        return tokenizer.encode(text)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def format_stats(stats) -> str:
    by_position = " ".join(f"{a:.2f}" for a in stats.acceptance_by_position) or "-"
    return (
        f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tokens/s\n"
        f"generation: {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tokens/s\n"
        f"speculation: k={stats.num_draft_tokens}, {stats.rounds} rounds, "
        f"mean accepted length {stats.mean_accepted_length:.2f}, "
        f"acceptance by position [{by_position}]\n"
        f"peak memory: {stats.peak_memory_gb:.3f} GB"
    )


def run_generate(args) -> None:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer, drafter = load(args.model, None if args.no_draft else args.draft_model)
    prompt = prompt_tokens(tokenizer, text, args.system, not args.no_chat_template)
    pieces, tokens, last = [], [], None
    for response in stream_generate(model, tokenizer, prompt, draft_model=drafter,
                                    max_tokens=args.max_tokens, num_draft_tokens=args.num_draft_tokens):
        pieces.append(response.text)
        tokens.append(response.token)
        last = response
        if args.output == "text":
            print(response.text, end="", flush=True)
    stats = last.stats
    if args.output == "json":
        print(json.dumps(dict(text="".join(pieces), tokens=tokens, finish_reason=last.finish_reason,
                              stats=stats.to_dict())))
    else:
        print()
        print(format_stats(stats), file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CheckpointError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"gemma-mtp: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
