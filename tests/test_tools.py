"""Tool-call formats (read from chat templates, parsed from streamed answers) and constrained output on the Hugging
Face backend's two decode paths, with a tiny random Llama: a random model's answers validate only if the grammar
holds them."""
import json

import jsonschema
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from test_settings import settings

from quantchat import loaders
from quantchat.assembly import build_engine
from quantchat.constraints import json_schema
from quantchat.errors import UserError
from quantchat.tools import Hermes, Llama3, Mistral, ToolCall, ToolCallStream, Tools, tool_format

HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>
Answer with <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}{%- for m in messages %}{%- if m.role == "tool" %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.tool_calls %}<|im_start|>assistant{% for c in m.tool_calls %}
<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{%- endfor %}<|im_start|>assistant
"""
LLAMA3_TEMPLATE = ('{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>'
                   '{% endfor %}{% if tools %}Respond as {"name": function name, "parameters": dictionary}{% endif %}')
MISTRAL_TEMPLATE = "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"
PARAMETERS = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["unit", "days"], "additionalProperties": False}
FORECAST = {"name": "forecast", "description": "The weather forecast", "parameters": PARAMETERS}
ALARM = {"name": "set_alarm", "parameters": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0,
                                                                                      "maximum": 9}},
                                             "required": ["hour"], "additionalProperties": False}}


def stream_all(fmt, pieces, names=None):
    parser = ToolCallStream(fmt, names)
    out = [x for piece in pieces for x in parser.feed(piece)] + parser.close()
    text = "".join(x for x in out if isinstance(x, str))
    return text, [(c.name, json.loads(c.arguments)) for c in out if isinstance(c, ToolCall)]


def test_formats_come_from_the_template_text():
    assert isinstance(tool_format(HERMES_TEMPLATE), Hermes)
    assert isinstance(tool_format(LLAMA3_TEMPLATE), Llama3)
    assert isinstance(tool_format(MISTRAL_TEMPLATE), Mistral)
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None   # renders no tools
    assert tool_format(None) is None


HERMES_ANSWER = ('Let me check.\n<tool_call>\n{"name": "forecast", "arguments": {"unit": "celsius", "days": 2}}\n'
                 '</tool_call>\n<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 7}}\n</tool_call>')


@given(st.lists(st.integers(min_value=1, max_value=len(HERMES_ANSWER) - 1), max_size=12))
@hsettings(max_examples=200, deadline=None)
def test_hermes_calls_are_read_wherever_the_stream_splits(cuts):
    cuts = sorted(set(cuts))
    pieces = [HERMES_ANSWER[a:b] for a, b in zip([0, *cuts], [*cuts, len(HERMES_ANSWER)], strict=True)]
    text, calls = stream_all(Hermes(), pieces)
    assert text == "Let me check."
    assert calls == [("forecast", {"unit": "celsius", "days": 2}), ("set_alarm", {"hour": 7})]


def test_text_that_is_not_a_call_is_handed_out_as_text():
    assert stream_all(Hermes(), ["a <tool_call>not json</tool_call> b"]) == \
        ("a <tool_call>not json</tool_call> b", [])
    assert stream_all(Hermes(), ["ends with <tool_"]) == ("ends with <tool_", [])
    assert stream_all(Hermes(), ['{"name": "forecast", "arguments": {}}']) == \
        ('{"name": "forecast", "arguments": {}}', [])        # bare JSON counts only for a function offered


def test_a_bare_json_call_of_an_offered_function_is_a_call():
    answer = '```json\n{"name": "forecast", "arguments": {"unit": "celsius", "days": 1}}\n```'
    assert stream_all(Hermes(), [answer[:5], answer[5:]], {"forecast"}) == \
        ("", [("forecast", {"unit": "celsius", "days": 1})])
    assert stream_all(Hermes(), ['{"name": "other", "arguments": {}}'], {"forecast"})[1] == []
    text, calls = stream_all(Hermes(), ["Sure", ", here it is."], {"forecast"})
    assert (text, calls) == ("Sure, here it is.", [])


def test_llama3_and_mistral_answers():
    assert stream_all(Llama3(), ['{"name": "forecast", ', '"parameters": {"days": 3}}']) == \
        ("", [("forecast", {"days": 3})])
    assert stream_all(Llama3(), ["The answer", " is 4."]) == ("The answer is 4.", [])
    assert stream_all(Mistral(), ['[TOOL_CALLS][{"name": "a", "arguments": {}}, ', '{"name": "b", "arguments": {}}]']) \
        == ("", [("a", {}), ("b", {})])


def test_tool_choice_and_parallel_shape_the_grammar():
    auto = Hermes().constraint(Tools((FORECAST, ALARM)))
    assert "TEXT" in auto.lark and auto.markers == ("<tool_call>", "</tool_call>")
    named = Hermes().constraint(Tools((FORECAST, ALARM), "set_alarm"))
    assert '"forecast"' not in named.lark and '("\\n" call)*' not in named.lark    # one call of that function
    assert Llama3().constraint(Tools((FORECAST,), "auto")) is None                  # no marker: read, not enforced
    with pytest.raises(UserError, match="not among the tools"):
        Hermes().constraint(Tools((FORECAST,), "nothing"))


# --- on the Hugging Face backend: a random model writes only what the grammar allows


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "hermes.jinja"
    template.write_text(HERMES_TEMPLATE)
    model = loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", "--fast_decode=True")))
    yield build_engine(settings(f"--chat_template={template}", "--max_new_tokens=120"), model)
    model.close()


@pytest.mark.parametrize("path", ["fast", "generate"])
def test_a_random_model_answers_valid_json_and_tool_calls(tiny_engine, path, monkeypatch):
    model = tiny_engine.model
    assert model.fast is not None
    if path == "generate":
        monkeypatch.setattr(model, "fast", None)
    asked = [{"role": "user", "content": "weather?"}]
    for seed in range(3):
        params = tiny_engine.params(do_sample=True, temperature=1.5, seed=seed)
        reply = tiny_engine.chat(asked, params, answer_format=json_schema(PARAMETERS, "response_format"))
        jsonschema.validate(json.loads(reply.finish()), PARAMETERS)
        assert reply.stats.finish_reason == "eos"   # the grammar ended the answer
        reply = tiny_engine.chat(asked, params, tools=Tools((ALARM,), "required", parallel=False))
        reply.finish()
        assert [c.name for c in reply.tool_calls] == ["set_alarm"] and reply.text == ""
        jsonschema.validate(json.loads(reply.tool_calls[0].arguments), ALARM["parameters"])


def test_the_conversation_goes_back_with_its_calls_and_results(tiny_engine):
    call = {"id": "call_1", "type": "function", "function": {"name": "forecast", "arguments": '{"days": 2}'}}
    messages = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    fitted = tiny_engine.fit(messages, tiny_engine.params(max_new_tokens=16), [{"type": "function", "function": FORECAST}])
    prompt = fitted.prompt
    assert fitted.dropped == 0
    assert '{"name": "forecast", "arguments": {"days": 2}}' in prompt and "<tool_response>\nsunny" in prompt
    assert '"description": "The weather forecast"' in prompt
    with_room = tiny_engine.fit(messages, tiny_engine.params(max_new_tokens=400), [{"type": "function", "function": FORECAST}])
    assert with_room.dropped == 0   # a tool's result is never kept without the call it answers


def test_the_oldest_exchange_goes_whole_with_its_calls_and_results(tiny_engine):
    call = {"id": "c", "type": "function", "function": {"name": "forecast", "arguments": "{}"}}
    old = [{"role": "user", "content": "weather? " * 60}, {"role": "assistant", "content": "", "tool_calls": [call]},
           {"role": "tool", "tool_call_id": "c", "content": "sunny " * 60}, {"role": "assistant", "content": "ok"}]
    fitted = tiny_engine.fit([*old, {"role": "user", "content": "and tomorrow?"}], tiny_engine.params(max_new_tokens=300))
    assert fitted.dropped == 4 and [m["role"] for m in fitted.messages] == ["user"]


def test_what_cannot_be_enforced_is_refused_in_one_line(tiny_engine, tiny_llama):
    asked = [{"role": "user", "content": "x"}]
    with pytest.raises(UserError, match="num_beams=1"):
        tiny_engine.chat(asked, tiny_engine.params(num_beams=2), answer_format=json_schema({"type": "object"}, "r"))
    with pytest.raises(UserError, match="cannot be enforced"):
        tiny_engine.chat(asked, answer_format=json_schema({"type": "object", "properties": {"a": {"type": "nope"}}}, "r"))
    plain = build_engine(settings("--prompt_type=chatml"), tiny_engine.model)
    with pytest.raises(UserError, match="need a chat template that renders them"):
        plain.chat(asked, tools=Tools((FORECAST,)))


def test_a_backend_without_token_masks_refuses_constraints():
    from conftest import FakeModel

    from quantchat.engine import ChatEngine
    from quantchat.prompter import make_prompter
    engine = ChatEngine(FakeModel(["{}"]), make_prompter("chatml", None, None, "", None))
    with pytest.raises(UserError, match="backend cannot constrain its output"):
        engine.chat([{"role": "user", "content": "x"}], answer_format=json_schema({"type": "object"}, "response_format"))


@pytest.mark.parametrize("fmt", [Hermes(), Llama3(), Mistral()], ids=lambda f: f.name)
def test_every_formats_grammar_compiles_for_every_choice(tiny_llama, fmt):
    from llguidance.hf import from_tokenizer
    from transformers import AutoTokenizer

    from quantchat.constraints import check
    tokenizer = from_tokenizer(AutoTokenizer.from_pretrained(tiny_llama))
    for choice in ("auto", "required", "forecast"):
        for parallel in (True, False):
            constraint = fmt.constraint(Tools((FORECAST, ALARM), choice, parallel))
            assert constraint is not None or (fmt.name == "llama3" and choice == "auto")
            if constraint:
                check(constraint, tokenizer)  # raises where llguidance cannot compile it
