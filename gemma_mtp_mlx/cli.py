"""`gemma-mtp`: the command line. Parses arguments, calls the API, prints.

Errors are one line on stderr and a non-zero exit; `--debug` shows the traceback.
"""

import argparse
import json
import sys
import time
from typing import Callable, List, Optional

from mlx_lm.sample_utils import make_logits_processors

from . import chat, convert, distributed, server
from .arguments import add_format_options, add_pair_options, draft_tokens, response_format
from .bench import benchmark, selfcheck
from .train import trainer
from .checkpoint import CheckpointError
from .generate import chat_prompt, stream_generate
from .sampling import DRAFT_MODES
from .structured.tools import split_thought
from .validate import check_penalties, check_text, decode_text

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter  # every command's --help shows the defaults


def add_model_options(parser: argparse.ArgumentParser) -> None:
    add_pair_options(parser)
    parser.add_argument("--num-draft-tokens", type=draft_tokens, default=None,
                        help="tokens drafted per round, or auto: chosen each round from the acceptance and "
                             "round times measured so far (0 = plain decoding when drafting loses); "
                             "unset: the drafter's num_assistant_tokens, else 4")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per reply")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 disables")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 disables")
    parser.add_argument("--min-p", type=float, default=0.0, help="min-p filter; 0 disables")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="penalise repeated tokens, e.g. 1.1; unset: no penalty")
    parser.add_argument("--draft-mode", choices=DRAFT_MODES, default="sampled",
                        help="how the drafter proposes tokens when sampling (temp > 0)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    parser.add_argument("--system", default=None, help="a system message for the chat template")
    parser.add_argument("--kv-bits", type=int, default=None, choices=(4, 8),
                        help="hold the full-attention layers' K/V cache quantized to 4 or 8 bits; unset: float")
    parser.add_argument("--kv-group-size", type=int, default=64, help="quantization group size of --kv-bits")
    parser.add_argument("--quantized-kv-start", type=int, default=0,
                        help="with --kv-bits: keep the first N positions' K/V in float")
    parser.add_argument("--thinking", action="store_true",
                        help="ask the chat template for the model's thought channel (Gemma 4: <|think|>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-mtp",
        description="Gemma 4 with its MTP drafter on MLX: faster generation, identical output.",
        formatter_class=HELP_FORMAT,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_command(commands, "generate", "generate text from one prompt", add_generate_arguments, run_generate)
    add_command(commands, "chat", "multi-turn chat that keeps the KV cache between turns",
                add_chat_arguments, run_chat)
    add_command(commands, "convert", "convert (and quantize) a Hugging Face pair to MLX",
                convert.add_arguments, convert.run)
    add_command(commands, "bench", "measure speculative vs plain decoding on this machine",
                benchmark.add_arguments, benchmark.run)
    add_command(commands, "serve", "an OpenAI-compatible HTTP server", server.add_arguments, server.run)
    add_command(commands, "doctor", "check in seconds that speculative output equals plain output here",
                selfcheck.add_arguments, selfcheck.run)
    add_command(commands, "train-drafter", "train the MTP drafter for a (fine-tuned) target, on MLX",
                trainer.add_arguments, trainer.run)
    return parser


def add_command(commands, name: str, help: str, add_arguments: Callable, run: Callable) -> None:
    """A subcommand with its own options, the shared help style and --debug."""
    parser = commands.add_parser(name, help=help, formatter_class=HELP_FORMAT)
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.set_defaults(run=run)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--prompt", required=True, help="the prompt text, or - to read it from stdin")
    parser.add_argument("--no-chat-template", action="store_true", help="use the prompt text as is")
    parser.add_argument("--image", action="append", default=None, metavar="PATH",
                        help="an image file for a model that reads images (repeatable); each fills one image "
                             "token in the prompt, or goes before the text when the prompt has none")
    parser.add_argument("--output", choices=("text", "json"), default="text",
                        help="text: stream the reply; json: print one JSON object at the end")
    parser.add_argument("--verbose", action="store_true", help="also print a per-round view of the drafts")
    parser.add_argument("--stats-json", default=None, metavar="FILE",
                        help="write the statistics, with the per-round log, to FILE")
    add_format_options(parser)


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--max-context", type=int, default=None,
                        help="most tokens the conversation may hold; unset: the model's maximum")


def generation_options(args) -> dict:
    """`stream_generate`'s keyword arguments from the shared model options."""
    check_penalties(repetition_penalty=args.repetition_penalty)
    return dict(
        max_tokens=args.max_tokens,
        num_draft_tokens=args.num_draft_tokens,
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        draft_mode=args.draft_mode,
        seed=args.seed,
        logits_processors=make_logits_processors(repetition_penalty=args.repetition_penalty),
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
    )


def format_rounds(rounds_log: List[dict], tokenizer) -> str:
    """One line per round: its k (chosen per round with `auto`), accepted/drafted, accepted
    drafts in [brackets], rejected ones ~struck~, and the target's own token after `->`."""
    lines = []
    for r in rounds_log:
        shown = [f"[{tokenizer.decode([t])!r}]" for t in r["drafted"][: r["accepted"]]]
        shown += [f"~{tokenizer.decode([t])!r}~" for t in r["drafted"][r["accepted"]:]]
        own = r["emitted"][r["accepted"]:]
        target = f" -> {tokenizer.decode(own)!r}" if own else ""
        label = "prefill" if r["prefill"] else f"k={r['k']} {r['accepted']}/{len(r['drafted'])}"
        lines.append(f"@{r['position']:>5} {label:>9} {' '.join(shown)}{target}")
    return "\n".join(lines)


def run_generate(args) -> None:
    text = decode_text(sys.stdin.buffer.read()) if args.prompt == "-" else check_text(args.prompt)
    if args.system is not None:
        check_text(args.system, "--system")
    model, tokenizer, drafter = load_pair(args)
    text = with_image_tokens(model, tokenizer, text, args.image)
    prompt = text if args.no_chat_template else chat_prompt(tokenizer, text, args.system, args.thinking)
    warm_up(model, tokenizer, drafter, args)
    pieces, tokens, last = [], [], None
    record = args.verbose or args.stats_json is not None
    for response in stream_generate(model, tokenizer, prompt, draft_model=drafter, record_rounds=record,
                                    response_format=response_format(args), images=args.image,
                                    **generation_options(args)):
        pieces.append(response.text)
        tokens.append(response.token)
        last = response
        if args.output == "text":
            print(response.text, end="", flush=True)
    stats = last.stats
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(stats.to_dict(), f, indent=1)
    if args.output == "json":
        summary = stats.to_dict()
        summary.pop("rounds_log", None)
        reasoning, text = split_thought("".join(pieces))
        print(json.dumps(dict(text=text, reasoning=reasoning, tokens=tokens, finish_reason=last.finish_reason,
                              stats=summary)))
    else:
        print()
    if args.verbose:
        print(format_rounds(stats.rounds_log, tokenizer), file=sys.stderr)
    print(stats.summary(), file=sys.stderr)


WARM_UP_NOTICE_SECONDS = 2.0


def warm_up(model, tokenizer, drafter, args) -> None:
    """Generate a few greedy tokens from a short prompt before the timed reply, so that its
    speeds do not include MLX's first use of its kernels (on a fresh machine MLX's CPU
    backend compiles them, tens of seconds once; then they are cached). Says so when it
    was slow."""
    k = args.num_draft_tokens if isinstance(args.num_draft_tokens, int) else None  # auto's controller learns nothing here
    tic = time.perf_counter()
    for _ in stream_generate(model, tokenizer, [tokenizer.bos_token_id or 0, 1 % model.vocab_size], draft_model=drafter,
                             num_draft_tokens=k, max_tokens=3, seed=0):
        pass
    seconds = time.perf_counter() - tic
    if seconds > WARM_UP_NOTICE_SECONDS and distributed.is_rank_zero():
        print(f"first use on this machine: MLX prepared its kernels in {seconds:.1f} s (once; the speeds below "
              "leave it out)", file=sys.stderr)


def with_image_tokens(model, tokenizer, text: str, images: Optional[List[str]]) -> str:
    """`text` with one image token per image before it, as a chat template writes image
    parts, unless it holds image tokens already (or the model reads no images)."""
    if not images or model.vision is None:
        return text
    token = tokenizer.convert_ids_to_tokens(model.vision.image_token_id)
    return text if token in text else token * len(images) + "\n" + text



def load_pair(args):
    """The model and drafter `args` name; split over the ranks when started by `mlx.launch`
    (then only rank 0 prints, and every rank samples with the same seed)."""
    distributed.refuse_adaptive_k([args.num_draft_tokens], "--num-draft-tokens")
    pair = distributed.load_pair(args.model, args.draft_model, no_draft=args.no_draft)
    args.seed = distributed.shared_seed(args.seed, distributed.world())
    return pair


def run_chat(args) -> None:
    if distributed.world().size() > 1:
        raise ValueError("chat reads the terminal on one process: under mlx.launch use generate")
    model, tokenizer, drafter = load_pair(args)
    warm_up(model, tokenizer, drafter, args)
    chat.chat(model, tokenizer, drafter, generation_options(args), name=args.model or "the default model",
              system=args.system, max_context=args.max_context, thinking=args.thinking)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CheckpointError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"gemma-mtp{distributed.rank_label()}: error: {e}", file=distributed.error_stream())
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug: still one line, unless --debug
        if args.debug:
            raise
        print(f"gemma-mtp: error: unexpected {type(e).__name__}: {e} "
              "(run again with --debug for the traceback, and report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
