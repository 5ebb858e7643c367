"""Response bodies in OpenAI's shapes, whole and as server-sent chunks.

Chat replies are split into `reasoning_content` (the thought channel), `content` and
`tool_calls` (structured/tools.py): streamed, reasoning and content go out as they come,
text from a call's start is held back, and each call goes out whole, one chunk each, at
the end with `finish_reason: "tool_calls"`. Special tokens never reach `content`.
"""

from typing import List, Optional

from ..structured.tools import ReplyStream, parse_reply, split_thought
from .protocol import new_id, now
from .worker import Delta, TokenInfo


class CompletionShape:
    """/v1/completions bodies; logprobs in the legacy form (tokens, token_logprobs, top_logprobs)."""

    object_name = "text_completion"

    def __init__(self, model_name: str, want_logprobs: bool):
        self.model_name, self.want_logprobs = model_name, want_logprobs
        self.id, self.created = new_id("cmpl"), now()

    def envelope(self, choices: list, **extra) -> dict:
        return dict(id=self.id, object=self.object_name, created=self.created, model=self.model_name,
                    choices=choices, **extra)

    def logprobs(self, tokens: List[TokenInfo], offset: int = 0) -> Optional[dict]:
        if not self.want_logprobs:
            return None
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t.text)
        return dict(tokens=[t.text for t in tokens], token_logprobs=[t.logprob for t in tokens],
                    top_logprobs=[dict(t.top) for t in tokens], text_offset=offsets)

    def whole(self, deltas: List[Delta]) -> dict:
        tokens = [t for d in deltas for t in d.tokens]
        choice = dict(index=0, text="".join(d.text for d in deltas), finish_reason=deltas[-1].finish_reason,
                      logprobs=self.logprobs(tokens))
        return self.envelope([choice], usage=deltas[-1].usage)

    def chunks(self, delta: Optional[Delta], include_usage: bool) -> List[dict]:
        return [self.chunk(delta, include_usage)]

    def chunk(self, delta: Optional[Delta], include_usage: bool) -> dict:
        extra = dict(usage=None) if include_usage else {}
        if delta is None:  # completions have no role chunk: an empty first text
            return self.envelope([dict(index=0, text="", logprobs=None, finish_reason=None)], **extra)
        choice = dict(index=0, text=delta.text, finish_reason=delta.finish_reason,
                      logprobs=self.logprobs(delta.tokens, delta.offset))
        return self.envelope([choice], **extra)

    def usage_chunk(self, usage: dict) -> dict:
        return self.envelope([], usage=usage)


class ChatShape(CompletionShape):
    """/v1/chat/completions bodies; logprobs as {"content": [{token, logprob, bytes, top_logprobs}]}."""

    object_name = "chat.completion"

    def __init__(self, model_name: str, want_logprobs: bool, tools: bool = False):
        super().__init__(model_name, want_logprobs)
        self.id = new_id("chatcmpl")
        self.tools = tools  # calls are parsed from the reply only when tools were declared
        self.stream = ReplyStream()

    def logprobs(self, tokens: List[TokenInfo], offset: int = 0) -> Optional[dict]:
        if not self.want_logprobs:
            return None
        entry = lambda text, lp: dict(token=text, logprob=lp, bytes=list(text.encode()))
        return dict(content=[dict(entry(t.text, t.logprob), top_logprobs=[entry(s, lp) for s, lp in t.top])
                             for t in tokens])

    def whole(self, deltas: List[Delta]) -> dict:
        tokens = [t for d in deltas for t in d.tokens]
        text = "".join(d.text for d in deltas)
        if self.tools:
            reasoning, content, calls = parse_reply(text)
        else:
            (reasoning, content), calls = split_thought(text), []
        message = dict(role="assistant", content=content or (None if calls else ""))
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        finish = deltas[-1].finish_reason
        if calls:
            message["tool_calls"] = [call.openai(i, new_id("call")) for i, call in enumerate(calls)]
            for call in message["tool_calls"]:
                del call["index"]
            finish = "tool_calls" if finish == "stop" else finish
        choice = dict(index=0, message=message, finish_reason=finish, logprobs=self.logprobs(tokens))
        return self.envelope([choice], usage=deltas[-1].usage)

    def chunks(self, delta: Optional[Delta], include_usage: bool) -> List[dict]:
        extra = dict(usage=None) if include_usage else {}
        out = dict(id=self.id, object="chat.completion.chunk", created=self.created, model=self.model_name, **extra)
        if delta is None:
            return [dict(out, choices=[dict(index=0, delta=dict(role="assistant", content=""), logprobs=None,
                                            finish_reason=None)])]
        reasoning, content = self.stream.feed(delta.text)
        calls, finish = [], delta.finish_reason
        if finish:
            more_reasoning, more_content, calls = self.stream.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
            calls = calls if self.tools else []
            finish = "tool_calls" if calls and finish == "stop" else finish
        text = dict(content=content, **(dict(reasoning_content=reasoning) if reasoning else {}))
        logprobs = self.logprobs(delta.tokens)
        chunks = [dict(out, choices=[dict(index=0, delta=text, finish_reason=None if calls else finish,
                                          logprobs=logprobs)])]
        for i, call in enumerate(calls):  # one complete call per chunk
            last = i == len(calls) - 1
            chunks.append(dict(out, choices=[dict(index=0, delta=dict(tool_calls=[call.openai(i, new_id("call"))]),
                                                  finish_reason=finish if last else None, logprobs=None)]))
        return chunks

    def usage_chunk(self, usage: dict) -> dict:
        return dict(id=self.id, object="chat.completion.chunk", created=self.created, model=self.model_name,
                    choices=[], usage=usage)
