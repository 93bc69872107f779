"""JSON-schema answers and tool calls through the API, on the built-in instruct model (llama.cpp), driven by the
official openai client and by an agent framework: every answer must parse and validate."""
import json

import jsonschema
import openai
import pytest
from test_api import start
from test_settings import settings

from quantchat import loaders
from quantchat.assembly import build_engine

STR, INT, NUM, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(required: list[str] | None = None, **properties) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required}


SCHEMAS = {  # name: (what to ask for, the schema)
    "person": ("a fictional person", obj(name=STR, age={"type": "integer", "minimum": 0, "maximum": 120})),
    "city": ("a European capital city", obj(name=STR, country=STR, population=INT)),
    "book": ("a classic novel", obj(title=STR, author=STR, year={"type": "integer", "minimum": 1500, "maximum": 2025})),
    "color": ("a color", obj(name=STR, rgb={"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255},
                                          "minItems": 3, "maxItems": 3})),
    "enum_only": ("today's weather", obj(sky={"enum": ["sunny", "cloudy", "rainy", "snowy"]})),
    "enum_and_number": ("a thermometer reading", obj(unit={"enum": ["C", "F"]},
                                                    value={"type": "number", "minimum": -50, "maximum": 60})),
    "boolean": ("whether Paris is in France", obj(answer=BOOL, reason=STR)),
    "optional": ("a user profile (email is optional)", obj(["username"], username=STR, email=STR)),
    "nested": ("an employee with an address", obj(name=STR, address=obj(street=STR, city=STR, zip=STR))),
    "deep": ("a company with a CEO who has a contact", obj(company=STR, ceo=obj(name=STR, contact=obj(phone=STR, email=STR)))),
    "list_min_max": ("two to four fruits", obj(fruits={"type": "array", "items": STR, "minItems": 2, "maxItems": 4})),
    "list_of_objects": ("three planets", obj(planets={"type": "array", "minItems": 3, "maxItems": 3,
                                                      "items": obj(name=STR, moons={"type": "integer", "minimum": 0})})),
    "pattern_date": ("a date in YYYY-MM-DD form", obj(date={"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"})),
    "pattern_code": ("a product code like AB-1234", obj(code={"type": "string", "pattern": r"^[A-Z]{2}-\d{4}$"})),
    "pattern_hex": ("a hex color like #a1b2c3", obj(hex={"type": "string", "pattern": r"^#[0-9a-f]{6}$"})),
    "string_length": ("a three-letter airport code", obj(iata={"type": "string", "minLength": 3, "maxLength": 3})),
    "range_float": ("a probability", obj(p={"type": "number", "minimum": 0, "maximum": 1})),
    "exclusive": ("a positive price", obj(price={"type": "number", "exclusiveMinimum": 0, "maximum": 1000})),
    "integer_range": ("a dice roll", obj(roll={"type": "integer", "minimum": 1, "maximum": 6})),
    "array_of_enums": ("two weekdays", obj(days={"type": "array", "minItems": 2, "maxItems": 2,
                                                "items": {"enum": ["Mon", "Tue", "Wed", "Thu", "Fri"]}})),
    "const": ("a version record", obj(schema_version={"const": 2}, name=STR)),
    "any_of": ("an id that is a number or a string", obj(id={"anyOf": [INT, STR]})),
    "nullable": ("a middle name, or null if none", obj(first=STR, middle={"type": ["string", "null"]})),
    "no_extra": ("a point", {**obj(x=NUM, y=NUM), "additionalProperties": False}),
    "top_array": ("a list of three numbers", {"type": "array", "items": NUM, "minItems": 3, "maxItems": 3}),
    "recipe": ("a simple recipe", obj(name=STR, servings={"type": "integer", "minimum": 1, "maximum": 12},
                                      ingredients={"type": "array", "items": STR, "minItems": 2, "maxItems": 5})),
    "event": ("a meeting", obj(title=STR, start={"type": "string", "pattern": r"^\d{2}:\d{2}$"},
                               attendees={"type": "array", "items": STR, "minItems": 1, "maxItems": 3})),
    "movie": ("a movie review", obj(movie=STR, stars={"type": "integer", "minimum": 1, "maximum": 5}, liked=BOOL)),
    "inventory": ("an inventory item", obj(sku={"type": "string", "pattern": r"^SKU\d{3}$"},
                                           quantity={"type": "integer", "minimum": 0, "maximum": 999},
                                           tags={"type": "array", "items": STR, "maxItems": 2})),
    "matrix": ("a 2x2 matrix", obj(rows={"type": "array", "minItems": 2, "maxItems": 2,
                                         "items": {"type": "array", "items": INT, "minItems": 2, "maxItems": 2}})),
    "ref": ("two people", {"$defs": {"person": obj(name=STR, age={"type": "integer", "minimum": 0, "maximum": 120})},
                           **obj(first={"$ref": "#/$defs/person"}, second={"$ref": "#/$defs/person"})}),
    "translation": ("the French for 'thank you'", obj(english=STR, french=STR, language={"enum": ["fr"]})),
}
WEATHER = {"name": "get_weather", "description": "The current weather in a city",
           "parameters": obj(["city"], city=STR, unit={"enum": ["celsius", "fahrenheit"]})}
CONVERT = {"name": "convert_currency", "description": "Convert an amount of money from one currency to another",
           "parameters": obj(amount={"type": "number", "minimum": 0}, source={"type": "string", "pattern": "^[A-Z]{3}$"},
                             target={"type": "string", "pattern": "^[A-Z]{3}$"})}
SEARCH = {"name": "search_files", "description": "Find files whose name matches a pattern",
          "parameters": obj(["pattern"], pattern=STR, max_results={"type": "integer", "minimum": 1, "maximum": 50})}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, CONVERT, SEARCH)]
PARAMETERS = {f["name"]: f["parameters"] for f in (WEATHER, CONVERT, SEARCH)}
ASKS = ["What's the weather like in Paris?", "How much is 100 US dollars in euros?",
        "Find the Python files in this project.", "Is it raining in Tokyo right now?"]


@pytest.fixture(scope="module")
def client():
    model = loaders.load(loaders.plan(settings("--max_seq_len=4096")))
    server, url = start(build_engine(settings("--max_new_tokens=300", "--temperature=0"), model))
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    server.uvicorn.should_exit = True
    model.close()


def ask(what: str) -> list[dict]:
    return [{"role": "user", "content": f"Give me {what} as JSON."}]


def streamed_text(chunks) -> tuple[str, str]:
    chunks = list(chunks)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_answer_validates_against_its_schema(client, name):
    what, schema = SCHEMAS[name]
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    whole = client.chat.completions.create(model="m", messages=ask(what), response_format=response_format)
    assert whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
    text, finish = streamed_text(client.chat.completions.create(model="m", messages=ask(what), stream=True,
                                                                response_format=response_format))
    assert finish == "stop" and text == whole.choices[0].message.content  # (greedy: the same answer)


def test_json_object_mode_answers_an_object(client):
    answer = client.chat.completions.create(model="m", messages=ask("the name and age of a fictional person"),
                                            response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.parametrize("ask_for", ASKS)
def test_required_tool_calls_parse_and_validate(client, ask_for):
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": ask_for}], tools=TOOLS,
                                            tool_choice="required", parallel_tool_calls=False)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("function", [WEATHER, CONVERT, SEARCH])
def test_a_named_function_is_called_streamed_as_openai_does(client, function):
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": ASKS[0]}], tools=TOOLS, stream=True,
        tool_choice={"type": "function", "function": {"name": function["name"]}}))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == function["name"]
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert {d.index for d in deltas} == {0}
    jsonschema.validate(json.loads(arguments), function["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_answers_in_words(client):
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": ASKS[0]}], tools=TOOLS,
                                            tool_choice="none", max_tokens=40)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content


def test_an_agent_loop_with_the_openai_sdk(client):
    """Call, run the tool, send its result back, get the final answer in words. (One call: every call sent back needs
    its result; with parallel calls allowed the built-in model repeated the same call until max_tokens on one machine.)"""
    messages = [{"role": "user", "content": "What's the weather in Paris? Answer in one sentence."}]
    first = client.chat.completions.create(model="m", messages=messages, tools=[TOOLS[0]], tool_choice="required",
                                           parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "Paris" in json.loads(call.function.arguments)["city"]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "sky": "cloudy"})}]
    final = client.chat.completions.create(model="m", messages=messages, tools=[TOOLS[0]], max_tokens=60)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content
    assert "18" in final.choices[0].message.content


def test_an_agent_framework_runs_its_tool_loop(client):
    """pydantic-ai, speaking OpenAI's chat completions API: it calls the tool and ends with an answer."""
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    model = OpenAIChatModel("quantchat", provider=OpenAIProvider(base_url=str(client.base_url), api_key="unused"))
    agent = Agent(model, instructions="Use the tools to answer.")
    asked: list[str] = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked.append(city)
        return f"18 degrees and cloudy in {city}"

    result = agent.run_sync("What's the weather in Paris?", model_settings={"temperature": 0, "max_tokens": 120})
    assert asked and "Paris" in asked[0]
    assert isinstance(result.output, str) and result.output.strip()


def test_hostile_or_impossible_requests_are_400s(client):
    bad = [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "string", "pattern": "(?=lookahead)"}}}},
        {"response_format": {"type": "json_schema"}},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "not_there"}}},
        {"tool_choice": "required"},
        {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
        {"tools": TOOLS + TOOLS[:1]},
        {"functions": [WEATHER]},
    ]
    for extra in bad:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", messages=ask("a person"), **extra)
    answer = client.chat.completions.create(model="m", messages=ask("a person"), max_tokens=4)
    assert answer.choices[0].message.content  # still serving


def test_a_remote_engine_is_sent_the_fields_and_its_calls_come_back(client):
    """--inference_server: the tools and response format go on to the server (here quantchat's own API, serving the
    built-in model), and the calls it streams back come out of the engine as calls."""
    from quantchat.api_models import ChatRequest
    host = str(client.base_url).split("//")[1].split("/")[0]
    remote = loaders.load(loaders.plan(settings(f"--inference_server=vllm_chat:{host}")))
    engine = build_engine(settings("--max_new_tokens=200", "--temperature=0"), remote)
    body = ChatRequest.model_validate({"messages": [{"role": "user", "content": ASKS[1]}], "tools": TOOLS,
                                       "tool_choice": {"type": "function", "function": {"name": "convert_currency"}}})
    reply = engine.chat([m.as_dict() for m in body.messages], tools=body.offered_tools())
    reply.finish()
    assert [c.name for c in reply.tool_calls] == ["convert_currency"] and reply.tool_calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(reply.tool_calls[0].arguments), CONVERT["parameters"])
    what, schema = SCHEMAS["recipe"]
    body = ChatRequest.model_validate({"messages": ask(what), "response_format": {
        "type": "json_schema", "json_schema": {"name": "recipe", "schema": schema}}})
    jsonschema.validate(json.loads(engine.chat(ask(what), answer_format=body.answer_format()).finish()), schema)
    remote.close()


def test_usage_says_how_many_prompt_tokens_were_reused(client):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: the history a follow-up did not evaluate again."""
    system = {"role": "system", "content": "Reference: " + "The quick brown fox jumps over the lazy dog. " * 40}
    asked = [system, {"role": "user", "content": "What jumps?"}]
    first = client.chat.completions.create(model="m", messages=asked, max_tokens=8)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    follow_up = asked + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="m", messages=follow_up, max_tokens=8)
    assert second.usage.prompt_tokens_details.cached_tokens > 0.8 * first.usage.prompt_tokens
