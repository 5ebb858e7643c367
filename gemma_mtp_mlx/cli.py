"""`gemma-mtp`: the command line. Parses arguments, calls the API, prints.

Errors are one line on stderr and a non-zero exit; `--debug` shows the traceback.
"""

import argparse
import json
import signal
import sys
from typing import List, Optional

from mlx_lm.sample_utils import make_logits_processors

from . import bench, convert, train_drafter
from .checkpoint import CheckpointError
from .generate import chat_prompt, load, make_prompt_cache, stream_generate
from .sampling import DRAFT_MODES

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="target: local directory (a converted pair brings its drafter) or Hub repo id; "
                             "unset: the tiny Python-code pair that ships with the package")
    parser.add_argument("--draft-model", default=None, help="gemma4_assistant drafter: directory or Hub repo id")
    parser.add_argument("--no-draft", action="store_true", help="plain target decoding, for comparison")
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help="tokens drafted per round; unset: the drafter's num_assistant_tokens, else 4")
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
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-mtp",
        description="Gemma 4 with its MTP drafter on MLX: faster generation, identical output.",
        formatter_class=HELP_FORMAT,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text from one prompt", formatter_class=HELP_FORMAT)
    add_model_options(gen)
    gen.add_argument("--prompt", required=True, help="the prompt text, or - to read it from stdin")
    gen.add_argument("--no-chat-template", action="store_true", help="use the prompt text as is")
    gen.add_argument("--output", choices=("text", "json"), default="text",
                     help="text: stream the reply; json: print one JSON object at the end")
    gen.add_argument("--verbose", action="store_true", help="also print a per-round view of the drafts")
    gen.add_argument("--stats-json", default=None, metavar="FILE",
                     help="write the statistics, with the per-round log, to FILE")
    gen.set_defaults(run=run_generate)

    chat = commands.add_parser("chat", help="multi-turn chat that keeps the KV cache between turns",
                               formatter_class=HELP_FORMAT)
    add_model_options(chat)
    chat.add_argument("--max-context", type=int, default=None,
                      help="most tokens the conversation may hold; unset: the model's maximum")
    chat.set_defaults(run=run_chat)

    conv = commands.add_parser("convert", help="convert (and quantize) a Hugging Face pair to MLX")
    convert.add_arguments(conv)
    conv.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    conv.set_defaults(run=convert.run)

    measure = commands.add_parser("bench", help="measure speculative vs plain decoding on this machine")
    bench.add_arguments(measure)
    measure.set_defaults(run=bench.run)

    train = commands.add_parser("train-drafter", help="train the MTP drafter for a (fine-tuned) target, on MLX",
                                formatter_class=HELP_FORMAT)
    train_drafter.add_arguments(train)
    train.set_defaults(run=train_drafter.run)
    return parser


def generation_options(args) -> dict:
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise ValueError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    return dict(
        max_tokens=args.max_tokens,
        num_draft_tokens=args.num_draft_tokens,
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        draft_mode=args.draft_mode,
        logits_processors=make_logits_processors(repetition_penalty=args.repetition_penalty),
    )


def format_stats(stats) -> str:
    by_position = " ".join(f"{a:.2f}" for a in stats.acceptance_by_position) or "-"
    return (
        f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tokens/s\n"
        f"generation: {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tokens/s\n"
        f"speculation: k={stats.num_draft_tokens}, {stats.rounds} rounds, "
        f"mean accepted length {stats.mean_accepted_length:.2f}, "
        f"acceptance by position [{by_position}], "
        f"rejection rate {stats.rejection_rate:.2f}, fallback rate {stats.fallback_rate:.2f}\n"
        f"peak memory: {stats.peak_memory_gb:.3f} GB"
    )


def format_rounds(rounds_log: List[dict], tokenizer) -> str:
    """One line per round: accepted drafts in [brackets], rejected ones ~struck~, and the
    target's own token after `->`."""
    lines = []
    for r in rounds_log:
        shown = [f"[{tokenizer.decode([t])!r}]" for t in r["drafted"][: r["accepted"]]]
        shown += [f"~{tokenizer.decode([t])!r}~" for t in r["drafted"][r["accepted"]:]]
        own = r["emitted"][r["accepted"]:]
        target = f" -> {tokenizer.decode(own)!r}" if own else ""
        label = "prefill" if r["prefill"] else f"{r['accepted']}/{len(r['drafted'])}"
        lines.append(f"@{r['position']:>5} {label:>7} {' '.join(shown)}{target}")
    return "\n".join(lines)


def run_generate(args) -> None:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer, drafter = load_pair(args)
    prompt = text if args.no_chat_template else chat_prompt(tokenizer, text, args.system)
    pieces, tokens, last = [], [], None
    record = args.verbose or args.stats_json is not None
    for response in stream_generate(model, tokenizer, prompt, draft_model=drafter, seed=args.seed,
                                    record_rounds=record, **generation_options(args)):
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
        print(json.dumps(dict(text="".join(pieces), tokens=tokens, finish_reason=last.finish_reason,
                              stats=summary)))
    else:
        print()
    if args.verbose:
        print(format_rounds(stats.rounds_log, tokenizer), file=sys.stderr)
    print(format_stats(stats), file=sys.stderr)


def load_pair(args):
    if args.no_draft:
        model, tokenizer, _ = load(args.model)
        return model, tokenizer, None
    return load(args.model, args.draft_model)


class CtrlC:
    """The chat's Ctrl-C: at the prompt it raises KeyboardInterrupt (the line is dropped);
    anywhere else it sets `pressed`, which a reply checks after each token.

    A KeyboardInterrupt raised wherever the main thread happens to be (inside MLX work, a
    generator's cleanup, between reading a line and starting the reply) can be lost, end
    the program or leave the stream half torn down; the flag cannot.
    """

    def __init__(self):
        self.pressed = False
        self.at_prompt = False

    def _press(self, signum, frame):
        if self.at_prompt:
            raise KeyboardInterrupt
        self.pressed = True

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._press)
        return self

    def __exit__(self, *exc_info):
        signal.signal(signal.SIGINT, self.previous)

    def read_line(self, prompt: str) -> str:
        """input(prompt); a Ctrl-C from here until the next line is read clears `pressed`."""
        self.pressed = False
        self.at_prompt = True
        try:
            return input(prompt)
        finally:
            self.at_prompt = False


CHAT_HELP = "/reset clears the conversation, /stats shows the last reply's statistics, /exit quits (or Ctrl-D)"


class Conversation:
    """Messages plus the K/V cache that holds them: each turn prefills only its new tokens.

    After a reply the cache holds the rendered conversation up to the reply (all but its
    newest token). The next turn renders the whole conversation again; when that text
    extends what the cache holds, only the extension (plus the reply's newest token, unless
    it was EOS) is prefilled. Otherwise the cache starts over.
    """

    def __init__(self, model, tokenizer, drafter, args, ctrl_c: Optional[CtrlC] = None):
        self.model, self.tokenizer, self.drafter, self.args = model, tokenizer, drafter, args
        self.ctrl_c = ctrl_c
        self.limit = args.max_context or model.args.max_position_embeddings
        default_k = drafter.default_num_draft_tokens if drafter is not None else 0
        self.num_draft_tokens = args.num_draft_tokens or default_k
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []
        self.stats = None
        self.forget_cache()

    def forget_cache(self):
        self.cache = make_prompt_cache(self.model, self.num_draft_tokens)
        self.cached_prompt = None  # the rendered text of the last turn's prompt ...
        self.cached_reply = ""  # ... and its reply: the cache holds both (less `carry`)
        self.carry: List[int] = []  # the reply's newest token: handed out, not yet cached

    def new_text(self, rendered: str):
        """The part of `rendered` after the cached prompt and reply, or None if it does not
        extend them (templates may trim the reply's whitespace)."""
        if self.cached_prompt is None or not rendered.startswith(self.cached_prompt):
            return None
        rest = rendered[len(self.cached_prompt):].lstrip()
        reply = self.cached_reply.strip()
        return rest[len(reply):] if rest.startswith(reply) else None

    def prompt_for(self, messages: List[dict]):
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        new_text = self.new_text(rendered)
        if new_text is not None:
            return rendered, self.carry + self.tokenizer.encode(new_text, add_special_tokens=False)
        self.forget_cache()
        return rendered, self.tokenizer.encode(rendered, add_special_tokens=False)

    def reply(self, text: str, out):
        messages = self.messages + [{"role": "user", "content": text}]
        rendered, prompt = self.prompt_for(messages)
        if self.cache[0].offset + len(prompt) + self.args.max_tokens > self.limit:
            raise ValueError(f"the conversation would pass the context limit of {self.limit} tokens: "
                             "/reset to start over")
        pieces, generated = [], []
        stream = stream_generate(self.model, self.tokenizer, prompt, draft_model=self.drafter,
                                 prompt_cache=self.cache, seed=self.args.seed,
                                 **generation_options(self.args))
        try:
            for r in stream:
                pieces.append(r.text)
                generated.append(r.token)
                print(r.text, end="", flush=True, file=out)
                self.stats = r.stats or self.stats
                if self.ctrl_c is not None and self.ctrl_c.pressed:
                    print("\n[interrupted]", end="", file=out)
                    break
        except KeyboardInterrupt:  # without a CtrlC (called from Python), Ctrl-C raises
            print("\n[interrupted]", end="", file=out)
        finally:
            stream.close()  # rolls the cache back to what was handed out
            if generated:
                reply = "".join(pieces)
                self.messages = messages + [{"role": "assistant", "content": reply}]
                self.cached_prompt, self.cached_reply = rendered, reply
                self.carry = [] if generated[-1] in self.tokenizer.eos_token_ids else generated[-1:]
            else:  # stopped during the prefill: the turn did not happen, the cache is unknown
                self.forget_cache()
        print(file=out)


def run_chat(args) -> None:
    model, tokenizer, drafter = load_pair(args)
    name = args.model or "the default model"
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{name} has no chat template, so it cannot chat: use `gemma-mtp generate --prompt ...` "
                         "(the default model completes Python code), or --model an instruction-tuned Gemma 4")
    print(f"chat with {name} ({'speculative' if drafter else 'plain'} decoding). {CHAT_HELP}")
    with CtrlC() as ctrl_c:
        chat_loop(Conversation(model, tokenizer, drafter, args, ctrl_c), ctrl_c)


def chat_loop(conversation: Conversation, ctrl_c: CtrlC) -> None:
    while True:
        try:
            text = ctrl_c.read_line(">> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        command = text.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            conversation.reset()
            print("[conversation cleared]")
        elif command == "/help":
            print(CHAT_HELP)
        elif command == "/stats":
            print(format_stats(conversation.stats) if conversation.stats else "[no reply yet]")
        elif command:
            try:
                conversation.reply(text, sys.stdout)
            except ValueError as e:
                print(f"[{e}]")


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
