"""The OpenAI API's request bodies as pydantic models: each field's type and range is declared once, and what a
request asks that quantchat does not do is refused by name (the API turns a validation error into an
OpenAI-shaped 400 naming the field)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

from .constraints import Constraint, json_schema
from .tools import Tools

Number = StrictInt | StrictFloat
MAX_STOP_STRINGS = 16
MAX_MESSAGES = 1024   # a conversation's turns; fitting it into the context grows faster than its length
MAX_TOOLS = 128       # functions offered in one request (OpenAI's own limit)
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"   # OpenAI's rule for function names


class Unsupported(ValueError):
    """A field quantchat accepts by name but not with this value (e.g. n=2): refused with its own message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# Fields a client may send, and what quantchat answers when one asks for something it does not do
REFUSED_WHEN_SET = {
    "frequency_penalty": "frequency_penalty is not supported; use repetition_penalty",
    "presence_penalty": "presence_penalty is not supported; use repetition_penalty",
    "logprobs": "logprobs is not supported",
    "functions": "functions is deprecated by OpenAI and not supported: use tools",
    "function_call": "function_call is deprecated by OpenAI and not supported: use tools and tool_choice",
    "echo": "echo is not supported", "suffix": "suffix is not supported",
}
ONLY_ONE = ("n", "best_of")  # several choices per request are not generated


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr = ""


class FunctionCall(BaseModel):
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME)]
    arguments: StrictStr = "{}"


class ToolCallIn(BaseModel):
    """A tool call the assistant made earlier in the conversation, sent back by the client."""
    model_config = ConfigDict(extra="ignore")
    id: StrictStr = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send name ... along
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[TextPart] | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: StrictStr | None = None

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise Unsupported("a message needs content (only an assistant's tool calls may stand without)", "messages")
        return self

    def as_dict(self) -> dict[str, Any]:
        """{"role", "content"} with text parts joined and OpenAI's developer role as system; tool calls and the id
        a tool's result answers go along."""
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None   # always enforced where the backend constrains its output

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"strict"})


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = "response"
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = Field(default_factory=dict)
    strict: StrictBool | None = None   # always enforced where the backend constrains its output
    description: StrictStr | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise Unsupported("response_format type json_schema needs a json_schema: {name, schema}", "response_format")
        return self


class Request(BaseModel):
    """The fields chat and text completions share."""
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    repetition_penalty: Number | None = None
    repeat_penalty: Number | None = None    # llama.cpp server's name for it
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
        return self

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def length(self) -> int | None:
        return self.max_tokens

    def generation(self) -> dict[str, Any]:
        """The engine's generation settings this request asks for (None: the server's default)."""
        penalty = self.repeat_penalty if self.repetition_penalty is None else self.repetition_penalty
        return {"max_new_tokens": self.length(), "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "repetition_penalty": penalty, "seed": self.seed, "stop": self.stop_strings(),
                "do_sample": None if self.temperature is None else self.temperature > 0}


class ChatRequest(Request):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: StrictInt | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolSpec], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    top_logprobs: StrictInt | None = None
    parallel_tool_calls: StrictBool | None = None
    langchain_mode: StrictStr | None = None     # documents Q&A: UserData, LLM (h2oGPT's name)

    @model_validator(mode="after")
    def _tools_consistent(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise Unsupported("two tools have the same name", "tools")
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise Unsupported("tool_choice asks for a tool call, but no tools were given", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise Unsupported(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools",
                              "tool_choice")
        if self.tools and self.response_format and self.response_format.type != "text" and \
                self.tool_choice != "none":
            raise Unsupported("tools and a JSON response_format at once are not supported: send tool_choice 'none' "
                              "for a JSON answer, or leave response_format out", "response_format")
        return self

    def offered_tools(self) -> Tools | None:
        if not self.tools:
            return None
        choice = self.tool_choice or "auto"
        return Tools(tuple(t.function.as_dict() for t in self.tools),
                     choice if isinstance(choice, str) else choice.function.name,
                     self.parallel_tool_calls is not False)

    def answer_format(self) -> Constraint | None:
        """response_format as a grammar (json_object: any JSON object)."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        request = {"response_format": fmt.model_dump(by_alias=True, exclude_none=True)}
        if fmt.type == "json_object":
            return json_schema({"type": "object"}, "response_format json_object", request)
        return json_schema(fmt.json_schema.schema_, f"response_format json_schema {fmt.json_schema.name!r}", request)

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
