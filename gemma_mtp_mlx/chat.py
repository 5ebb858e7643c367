"""`gemma-mtp chat`: a multi-turn conversation on the terminal that keeps the K/V cache
between turns, so each turn prefills only its new tokens."""

import signal
import sys
from typing import List, Optional

from .generate import draft_length, make_prompt_cache, stream_generate

KV_OPTIONS = ("kv_bits", "kv_group_size", "quantized_kv_start")

CHAT_HELP = "/reset clears the conversation, /stats shows the last reply's statistics, /exit quits (or Ctrl-D)"


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


class Conversation:
    """Messages plus the K/V cache that holds them: each turn prefills only its new tokens.

    After a reply the cache holds the rendered conversation up to the reply (all but its
    newest token). The next turn renders the whole conversation again; when that text
    extends what the cache holds, only the extension (plus the reply's newest token, unless
    it was EOS) is prefilled. Otherwise the cache starts over.

    `options` are `stream_generate`'s keyword arguments (max_tokens, num_draft_tokens,
    sampling, seed).
    """

    def __init__(self, model, tokenizer, drafter, options: dict, system: Optional[str] = None,
                 max_context: Optional[int] = None, ctrl_c: Optional[CtrlC] = None, thinking: bool = False):
        self.model, self.tokenizer, self.drafter, self.options = model, tokenizer, drafter, options
        self.system, self.ctrl_c, self.thinking = system, ctrl_c, thinking
        self.limit = max_context or model.args.max_position_embeddings
        self.num_draft_tokens = draft_length(model, drafter, options.get("num_draft_tokens"))
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.stats = None
        self.forget_cache()

    def forget_cache(self):
        kv = {name: self.options[name] for name in KV_OPTIONS if name in self.options}
        self.cache = make_prompt_cache(self.model, self.num_draft_tokens, **kv)
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
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                      enable_thinking=self.thinking)
        new_text = self.new_text(rendered)
        if new_text is not None:
            return rendered, self.carry + self.tokenizer.encode(new_text, add_special_tokens=False)
        self.forget_cache()
        return rendered, self.tokenizer.encode(rendered, add_special_tokens=False)

    def reply(self, text: str, out):
        messages = self.messages + [{"role": "user", "content": text}]
        rendered, prompt = self.prompt_for(messages)
        if self.cache[0].offset + len(prompt) + self.options["max_tokens"] > self.limit:
            raise ValueError(f"the conversation would pass the context limit of {self.limit} tokens: "
                             "/reset to start over")
        pieces, generated = [], []
        stream = stream_generate(self.model, self.tokenizer, prompt, draft_model=self.drafter,
                                 prompt_cache=self.cache, **self.options)
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


def chat(model, tokenizer, drafter, options: dict, *, name: str, system: Optional[str] = None,
         max_context: Optional[int] = None, thinking: bool = False) -> None:
    """Chat on the terminal until /exit or Ctrl-D. `name` names the model in messages."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{name} has no chat template, so it cannot chat: use `gemma-mtp generate --prompt ...` "
                         "(the default model completes Python code), or --model an instruction-tuned Gemma 4")
    print(f"chat with {name} ({'speculative' if drafter else 'plain'} decoding). {CHAT_HELP}")
    with CtrlC() as ctrl_c:
        chat_loop(Conversation(model, tokenizer, drafter, options, system, max_context, ctrl_c, thinking), ctrl_c)


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
            print(conversation.stats.summary() if conversation.stats else "[no reply yet]")
        elif command:
            try:
                conversation.reply(text, sys.stdout)
            except ValueError as e:
                print(f"[{e}]")
