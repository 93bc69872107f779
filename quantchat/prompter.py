"""Prompt formats: h2oGPT's prompt_type names, custom prompt_dict formats, and Jinja chat templates.

A conversation is a list of {"role": "system"|"user"|"assistant", "content": str}; a Prompter turns it
into the text the model continues. The model's own chat template wins unless the user names a format.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from datetime import datetime

from .errors import UsageError, UserError
from .loaders.base import Prompt
from .tools import ToolFormat, template_messages, tool_format

Message = dict  # {"role": ..., "content": ...}


@dataclass(frozen=True)
class PromptFormat:
    """One chat format as plain strings; {content} and {system} mark where the text goes."""
    name: str
    user: str = "{content}"
    assistant: str = "{content}"
    generation: str = ""                  # opens the answer the model writes next
    system: str = "{system}"
    start: str = ""                       # written once, first (e.g. the BOS token)
    default_system: str = ""              # used for system_prompt='auto'
    fold_system: str = ""                 # non-empty: no system turn; the system text joins the first user turn
    stop: tuple[str, ...] = ()

    def render(self, messages: list[Message]) -> str:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        out = [self.start]
        if system and self.fold_system:
            first = next((i for i, m in enumerate(turns) if m["role"] == "user"), None)
            if first is not None:
                turns[first] = {**turns[first], "content": self.fold_system.format(
                    system=system, content=turns[first]["content"])}
        elif system:
            out.append(self.system.format(system=system))
        for m in turns:
            out.append((self.user if m["role"] == "user" else self.assistant).format(content=m["content"]))
        if not turns or turns[-1]["role"] == "user":
            out.append(self.generation)
        return "".join(out)


_ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAMA2_SYSTEM = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
                  "being safe.")

FORMATS: dict[str, PromptFormat] = {f.name: f for f in [
    PromptFormat("plain", user="{content}", assistant="\n{content}\n", system="{system}\n"),
    PromptFormat("instruct", user="### Instruction:\n{content}\n\n", assistant="### Response:\n{content}\n\n",
                 generation="### Response:\n", system="{system}\n\n", default_system=_ALPACA_SYSTEM,
                 stop=("### Instruction:",)),
    PromptFormat("human_bot", system="{system}\n", user="<human>: {content}\n", assistant="<bot>: {content}\n", generation="<bot>:",
                 stop=("<human>:", "<bot>:")),
    PromptFormat("prompt_answer", user="<|prompt|>{content}</s>", assistant="<|answer|>{content}</s>",
                 generation="<|answer|>", stop=("<|prompt|>", "<|answer|>", "</s>")),
    PromptFormat("llama2", start="<s>", user="[INST] {content} [/INST]", assistant=" {content} </s><s>",
                 fold_system="<<SYS>>\n{system}\n<</SYS>>\n\n{content}", default_system=_LLAMA2_SYSTEM,
                 stop=("[INST]", "</s>")),
    PromptFormat("mistral", start="<s>", user="[INST] {content} [/INST]", assistant=" {content}</s>",
                 fold_system="{system}\n\n{content}", stop=("[INST]", "</s>")),
    PromptFormat("llama3", start="<|begin_of_text|>",
                 system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                 user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
                 assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
                 generation="<|start_header_id|>assistant<|end_header_id|>\n\n", stop=("<|eot_id|>",)),
    PromptFormat("zephyr", system="<|system|>\n{system}</s>\n", user="<|user|>\n{content}</s>\n",
                 assistant="<|assistant|>\n{content}</s>\n", generation="<|assistant|>\n", stop=("</s>", "<|user|>")),
    PromptFormat("chatml", system="<|im_start|>system\n{system}<|im_end|>\n",
                 user="<|im_start|>user\n{content}<|im_end|>\n", assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
                 generation="<|im_start|>assistant\n", stop=("<|im_end|>", "<|im_start|>")),
    PromptFormat("vicuna11", system="{system} ", user="USER: {content} ", assistant="ASSISTANT: {content}</s>",
                 generation="ASSISTANT:", default_system=_VICUNA_SYSTEM, stop=("USER:",)),
    PromptFormat("wizard2", system="{system}\n", user="### Instruction:\n{content}\n",
                 assistant="### Response:\n{content}\n", generation="### Response:\n",
                 default_system=_ALPACA_SYSTEM, stop=("### Instruction:",)),
    PromptFormat("gemma", start="<bos>", user="<start_of_turn>user\n{content}<end_of_turn>\n",
                 assistant="<start_of_turn>model\n{content}<end_of_turn>\n", generation="<start_of_turn>model\n",
                 fold_system="{system}\n\n{content}", stop=("<end_of_turn>", "<start_of_turn>")),
]}
ALIASES = {"llama-2": "llama2", "llama_2": "llama2", "mistralai": "mistral", "llama-3": "llama3", "vicuna": "vicuna11",
           "instruct_simple": "instruct", "gemma2": "gemma", "gemma3": "gemma", "qwen": "chatml"}
# prompt_types that mean "use the model's own chat template"
TEMPLATE_TYPES = {"openai_chat", "template", "auto"}

# h2oGPT's prompt_dict keys, mapped onto PromptFormat's
_H2OGPT_KEYS = {"promptA": "system", "PreInstruct": "user", "PreResponse": "generation", "terminate_response": "stop"}


def format_from_dict(d: dict) -> PromptFormat:
    """A custom format from --prompt_dict: PromptFormat's own keys, or h2oGPT's (promptA, PreInstruct ...)."""
    if any(k in d for k in _H2OGPT_KEYS):
        pre_instruct, pre_response = d.get("PreInstruct") or "", d.get("PreResponse") or ""
        sep = d.get("chat_turn_sep", d.get("chat_sep", "\n"))
        d = {"system": (d.get("promptA") or "") + "{system}" if d.get("promptA") is not None else "{system}",
             "user": pre_instruct + "{content}", "assistant": pre_response + "{content}" + (sep or ""),
             "generation": pre_response, "stop": d.get("terminate_response") or ()}
    known = set(PromptFormat.__dataclass_fields__) - {"name"}
    unknown = set(d) - known - {"chat_sep", "chat_turn_sep", "humanstr", "botstr", "PreInput", "promptB"}
    if unknown:
        raise UsageError(f"--prompt_dict: unknown keys {sorted(unknown)}; use {sorted(known)} or h2oGPT's "
                         "promptA, PreInstruct, PreResponse, terminate_response, chat_turn_sep")
    stop = d.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise UsageError(f"--prompt_dict: the stop strings (terminate_response) must be text, not {stop!r}")
    d = {**{k: v for k, v in d.items() if k in known}, "stop": tuple(stop)}
    for key, value in d.items():
        if key != "stop":
            _check_placeholders(key, value)
    try:
        fmt = PromptFormat("custom", **{k: (v if k == "stop" else str(v)) for k, v in d.items()})
        fmt.render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}])
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--prompt_dict: a template uses an unknown placeholder ({e}); "
                         "only {content} and {system} exist") from None
    return fmt


def _check_placeholders(key: str, value) -> None:
    """Only the bare {content} and {system}: str.format would otherwise pad to any width ({content:>999999999})
    or reach into Python objects ({content.__class__})."""
    import string
    if not isinstance(value, str):
        raise UsageError(f"--prompt_dict: {key} must be text, not {value!r}")
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(value)
                  if name is not None]
    except ValueError as e:
        raise UsageError(f"--prompt_dict: {key} is not a valid template ({e}); write literal braces as {{{{ }}}}") \
            from None
    for name, spec, conversion in fields:
        if name not in ("content", "system") or spec or conversion:
            raise UsageError(f"--prompt_dict: {key} uses {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}}; only {{content}} and {{system}} exist")


MAX_RENDERED_CHARS = 8 * 2**20   # a chat template that writes more than this is broken (or hostile)
MAX_RENDER_SECONDS = 10.0


class TemplatePrompter:
    """A Jinja chat template, rendered the way transformers renders it (sandboxed, same variables)."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False,
                                                                                         indent=indent)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = template
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise UsageError(f"the chat template does not parse: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[Message], tools: list[dict] | None = None) -> str:
        try:
            return self._render(messages, tools)
        except _TemplateRefused:
            # many templates refuse a system turn: fold it into the first user message instead
            system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
            rest = [dict(m) for m in messages if m["role"] != "system"]
            if not system or not rest:
                raise
            rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
            return self._render(rest, tools)

    def _render(self, messages: list[Message], tools: list[dict] | None) -> str:
        """Rendered piece by piece, so that a template that writes without end is stopped, with one line."""
        import time
        deadline = time.monotonic() + MAX_RENDER_SECONDS + len(messages) * 0.01
        out, size = [], 0
        try:
            for piece in self.template.generate(messages=messages, tools=tools, add_generation_prompt=True,
                                                bos_token=self.bos_token, eos_token=self.eos_token):
                out.append(piece)
                size += len(piece)
                if size > MAX_RENDERED_CHARS or time.monotonic() > deadline:
                    raise UserError("the chat template writes without end (more than "
                                    f"{MAX_RENDERED_CHARS // 2**20} MiB or {MAX_RENDER_SECONDS:.0f} s for this "
                                    "conversation): fix it, or choose a --prompt_type")
        except (_TemplateRefused, UserError):
            raise
        except Exception as e:
            raise UserError(f"the chat template failed: {e}") from None
        return "".join(out)


class _TemplateRefused(UserError):
    pass


def _raise_template_error(message: str):
    raise _TemplateRefused(f"the chat template refused the conversation: {message}")


@dataclass
class Prompter:
    """What the engine needs: render(messages), stop strings, the system prompt to use, and where it came from."""
    source: str
    renderer: PromptFormat | TemplatePrompter
    system_prompt: str = ""
    stop: list[str] = field(default_factory=list)
    warning: str = ""
    on_server: bool = False  # a remote engine formats the conversation itself: render() only sizes it

    def render(self, messages: list[Message], tools: list[dict] | None = None) -> Prompt:
        """The prompt, with the messages' own text marked as not markup (see loaders.base.Prompt). `tools` (OpenAI's
        function specs) go to a chat template's `tools` variable, which only templates with a known tool format get."""
        if self.on_server:
            calls = [m.get("tool_calls") for m in messages if m.get("tool_calls")]
            return Prompt(self.renderer.render(messages) + (json.dumps([tools, calls]) if tools or calls else ""))
        if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            if self.tool_format is None:
                raise UserError(f"tools and tool messages need a chat template that renders them, and {self.source} "
                                "does not (give one with --chat_template, or use the model's own)")
            text = self.renderer.render(template_messages(messages), tools)
        else:
            text = self.renderer.render(messages)
        return Prompt.marking(text, [str(m["content"] or "") for m in messages])

    @functools.cached_property
    def tool_format(self) -> ToolFormat | None:
        """How the model writes tool calls, from its chat template's text (tools.tool_format)."""
        return tool_format(self.renderer.source) if isinstance(self.renderer, TemplatePrompter) else None


def prompt_format_name(prompt_type: str | None) -> str | None:
    """The format --prompt_type names (aliases resolved), or one line listing the known ones: checked before the
    model loads, and again where the prompter is made."""
    name = ALIASES.get(prompt_type, prompt_type) if prompt_type else None
    if name and name not in TEMPLATE_TYPES and name not in FORMATS:
        import difflib
        close = difflib.get_close_matches(name, FORMATS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"--prompt_type={prompt_type!r} is not known; {hint}known: {', '.join(FORMATS)}, "
                         "openai_chat (the model's chat template)")
    return name


def make_prompter(prompt_type: str | None, prompt_dict: dict | None, chat_template: str | None,
                  system_prompt: str, model_template: str | None, bos: str = "", eos: str = "") -> Prompter:
    """Choose the format: --chat_template, --prompt_dict, --prompt_type, the model's template, else plain."""
    if chat_template:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        return Prompter("--chat_template", TemplatePrompter(chat_template, bos, eos), system_prompt_for(system_prompt, ""))
    if prompt_dict:
        fmt = format_from_dict(prompt_dict)
        return Prompter("--prompt_dict", fmt, system_prompt_for(system_prompt, fmt.default_system), list(fmt.stop))
    name = prompt_format_name(prompt_type)
    if name and name not in TEMPLATE_TYPES:
        fmt = FORMATS[name]
        return Prompter(f"prompt_type={name}", fmt, system_prompt_for(system_prompt, fmt.default_system), list(fmt.stop))
    if model_template:
        return Prompter("the model's chat template", TemplatePrompter(model_template, bos, eos),
                        system_prompt_for(system_prompt, ""))
    warning = ("the model has no chat template and no --prompt_type was given: using the plain format "
               "(name one with --prompt_type, e.g. llama2, chatml, gemma)")
    fmt = FORMATS["plain"]
    return Prompter("plain (fallback)", fmt, system_prompt_for(system_prompt, ""), [], warning)


def system_prompt_for(flag_value: str, default: str) -> str:
    """--system_prompt: 'auto' means the format's default, '' or 'None' none, anything else itself."""
    if flag_value in ("auto", "None") or flag_value is None:
        return default if flag_value == "auto" else ""
    return flag_value
