"""The OpenAI API's request bodies as pydantic models: each field's type and range is declared once, and what a
request asks that quantchat does not do is refused by name (the API turns a validation error into an
OpenAI-shaped 400 naming the field)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

Number = StrictInt | StrictFloat
MAX_STOP_STRINGS = 16
MAX_MESSAGES = 1024   # a conversation's turns; fitting it into the context grows faster than its length


class Unsupported(ValueError):
    """A field quantchat accepts by name but not with this value (e.g. n=2): refused with its own message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# Fields a client may send, and what quantchat answers when one asks for something it does not do
REFUSED_WHEN_SET = {
    "frequency_penalty": "frequency_penalty is not supported; use repetition_penalty",
    "presence_penalty": "presence_penalty is not supported; use repetition_penalty",
    "logprobs": "logprobs is not supported", "tools": "tools is not supported",
    "functions": "functions is not supported", "echo": "echo is not supported", "suffix": "suffix is not supported",
}
ONLY_ONE = ("n", "best_of")  # several choices per request are not generated


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send name, tool_call_id ... along
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        """{"role", "content"} with text parts joined and OpenAI's developer role as system."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class Request(BaseModel):
    """The fields chat and text completions share."""
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    repetition_penalty: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: dict[str, Any] | None = None
    user: StrictStr | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logprobs: StrictBool | StrictInt | None = None

    @model_validator(mode="after")
    def _refuse_what_is_not_done(self):
        for name, message in REFUSED_WHEN_SET.items():
            if getattr(self, name, None):
                raise Unsupported(message, name)
        for name in ONLY_ONE:
            if getattr(self, name, None) not in (None, 1):
                raise Unsupported(f"only {name}=1 is supported", name)
        if (getattr(self, "response_format", None) or {}).get("type", "text") != "text":
            raise Unsupported("only response_format type 'text' is supported", "response_format")
        return self




    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def length(self) -> int | None:
        return self.max_tokens

    def generation(self) -> dict[str, Any]:
        """The engine's generation settings this request asks for (None: the server's default)."""
        return {"max_new_tokens": self.length(), "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "repetition_penalty": self.repetition_penalty, "seed": self.seed,
                "stop": self.stop_strings(),
                "do_sample": None if self.temperature is None else self.temperature > 0}


class ChatRequest(Request):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    top_logprobs: StrictInt | None = None
    parallel_tool_calls: StrictBool | None = None
    langchain_mode: StrictStr | None = None     # documents Q&A: UserData, LLM (h2oGPT's name)



    def length(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(Request):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if not (value if isinstance(value, str) else value[0]):
            raise Unsupported("prompt must be a non-empty string", "prompt")
        return value



    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
