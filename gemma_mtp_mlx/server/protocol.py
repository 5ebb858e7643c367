"""Request bodies (OpenAI's field names) and the JSON shapes of responses and errors."""

import time
import uuid
from typing import Annotated, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..validate import MAX_NUM_DRAFT_TOKENS

MAX_TOP_LOGPROBS = 20


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationFields(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored, as OpenAI clients send
    some this server has no use for."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 is greedy (the default, like `gemma-mtp generate`)")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    repetition_penalty: Optional[float] = Field(None, gt=0)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    num_draft_tokens: Union[Literal["auto"], Annotated[int, Field(ge=1, le=MAX_NUM_DRAFT_TOKENS)], None] = Field(
        None, description="drafts per round, or auto: chosen each round from what the server measures")
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    response_format: Optional[dict] = Field(
        None, description="json_object, json_schema (OpenAI's shapes), regex or grammar (Lark): the reply "
                          "is constrained to it, exactly, with the drafter running")

    def stop_strings(self) -> List[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ValueError("stop: stop strings must not be empty")
        return stops

    def token_limit(self, default: int) -> int:
        return self.max_tokens or default


class CompletionRequest(GenerationFields):
    prompt: Union[str, List[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[TextPart], None] = None
    tool_calls: Optional[List[dict]] = None  # an assistant's calls, as OpenAI returns them
    tool_call_id: Optional[str] = None  # a tool message: the call it answers
    name: Optional[str] = None
    reasoning_content: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(GenerationFields):
    messages: List[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[List[dict]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: Optional[dict] = Field(None, description="e.g. {\"enable_thinking\": true}")

    @property
    def thinking(self) -> bool:
        return bool((self.chat_template_kwargs or {}).get("enable_thinking", False))

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class BadRequest(Exception):
    """A request the server answers with `status` (400 unless said), naming `param`."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
