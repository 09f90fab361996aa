"""The official `openai` client against a running nextoken server.

Usage: python openai_client_check.py BASE_URL API_KEY
Exits non-zero (assertion) on any mismatch.
"""
import datetime
import sys
import uuid

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
MODEL = "smollm2"

models = client.models.list()
assert [m.id for m in models.data] == [MODEL], models
assert client.models.retrieve(MODEL).id == MODEL

# Completions, then the same streamed: identical text.
r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
assert r.object == "text_completion", r
assert r.choices[0].text.startswith(" Paris."), r
assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 8, r.usage
streamed = client.completions.create(
    model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
)
text = "".join(c.choices[0].text for c in streamed if c.choices)
assert text == r.choices[0].text, (text, r.choices[0].text)

# Logprobs (completions format).
lp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2)
assert lp.choices[0].logprobs.tokens[0] == " Paris", lp.choices[0].logprobs
# " Paris": -0.258 in float32, -0.259 in llama.cpp; the quantized path is within 0.1 of both.
assert abs(lp.choices[0].logprobs.token_logprobs[0] + 0.258) < 0.1, lp.choices[0].logprobs
assert len(lp.choices[0].logprobs.top_logprobs[0]) == 2

# Scoring, as lm-evaluation-harness's `local-completions` does it: echo + logprobs, no tokens.
s = client.completions.create(
    model=MODEL, prompt="The capital of France is Paris", max_tokens=0, echo=True, logprobs=1, temperature=0
)
slp = s.choices[0].logprobs
assert s.choices[0].text == "The capital of France is Paris", s
assert slp.tokens[-1] == " Paris" and len(slp.tokens) == s.usage.prompt_tokens == 6, slp
assert slp.token_logprobs[0] is None and slp.top_logprobs[0] is None, slp
assert abs(slp.token_logprobs[-1] - lp.choices[0].logprobs.token_logprobs[0]) < 1e-6, slp
assert s.usage.completion_tokens == 0, s.usage

# Chat, then streaming chat with include_usage: same content, usage in the last chunk.
messages = [{"role": "user", "content": "What is 2+2?"}]
c = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
assert c.choices[0].message.role == "assistant"
assert "4" in c.choices[0].message.content, c
stream = client.chat.completions.create(
    model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
parts, usage, roles = [], None, []
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.role:
            roles.append(choice.delta.role)
        if choice.delta.content:
            parts.append(choice.delta.content)
assert roles == ["assistant"], roles
assert "".join(parts) == c.choices[0].message.content
assert usage is not None and usage.completion_tokens == c.usage.completion_tokens, usage

# Chat logprobs.
clp = client.chat.completions.create(
    model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
)
content = clp.choices[0].logprobs.content
assert len(content) == clp.usage.completion_tokens and len(content[0].top_logprobs) == 3

# JSON mode.
import json
j = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Name and age of a person, as JSON."}],
    max_tokens=200, temperature=0, response_format={"type": "json_object"},
)
assert j.choices[0].finish_reason == "stop", j
assert isinstance(json.loads(j.choices[0].message.content), dict), j

# Structured outputs: the client turns a pydantic model into a strict `json_schema` (with
# `$defs`, `$ref`, enums and `anyOf` null) and parses the answer back into the model.
import enum
from typing import Annotated, Literal, Optional, Union

import pydantic


class Language(str, enum.Enum):
    english = "English"
    french = "French"
    german = "German"


class Person(pydantic.BaseModel):
    name: str
    age: int
    languages: list[Language]
    employer: Optional[str]


parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
p = parse(
    model=MODEL,
    messages=[{"role": "user", "content": "Marie is a 34-year-old engineer from Lyon who speaks "
               "French and English. Give her details."}],
    max_tokens=200, temperature=0, response_format=Person,
)
person = p.choices[0].message.parsed
assert isinstance(person, Person), p
assert person.name == "Marie" and person.age == 34, person
assert p.choices[0].message.content.startswith('{"name": '), p  # the schema's key order


# Bounded fields (`ge`/`le`/`gt`/`lt` become `minimum`/`maximum`/..., `multiple_of`
# `multipleOf`): parsing validates them, so an answer that broke one would raise here, even
# sampled hot.
class Review(pydantic.BaseModel):
    rating: int = pydantic.Field(ge=1, le=5)
    confidence: float = pydantic.Field(ge=0, le=1)
    year: int = pydantic.Field(gt=1899, lt=2031)
    stars: float = pydantic.Field(multiple_of=0.5, ge=0, le=5)
    box_office_millions: int = pydantic.Field(multiple_of=100)


for seed in range(3):
    r = parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Rate the movie Titanic (1997) out of ten, say "
                   "how sure you are, and give its year."}],
        max_tokens=200, temperature=1.3, seed=seed, response_format=Review,
    )
    assert isinstance(r.choices[0].message.parsed, Review), r


# String patterns and formats (`Field(pattern=...)`, dates, times, UUIDs): pydantic parses and
# validates each one, so an answer that broke one would raise here.
class Customer(pydantic.BaseModel):
    name: str = pydantic.Field(pattern=r"^[A-Z][a-z]+ [A-Z][a-z]+$")
    phone: str = pydantic.Field(pattern=r"^\+1-\d{3}-\d{3}-\d{4}$")
    birthday: datetime.date
    signed_up: datetime.datetime
    id: uuid.UUID


for seed in range(3):
    c = parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a customer: full name, phone number, "
                   "birthday, sign-up time and customer id."}],
        max_tokens=400, temperature=1.3 if seed else 0, seed=seed, response_format=Customer,
    )
    assert isinstance(c.choices[0].message.parsed, Customer), c
    print("customer:", c.choices[0].message.content)

# Unions whose alternatives start alike: a discriminated `Cat | Dog` (the client sends
# `oneOf` + `discriminator`) and `int | float`; pydantic picks and validates the alternative.
class Cat(pydantic.BaseModel):
    kind: Literal["cat"]
    name: str = pydantic.Field(max_length=20)
    lives: int = pydantic.Field(ge=1, le=9)


class Dog(pydantic.BaseModel):
    kind: Literal["dog"]
    name: str = pydantic.Field(max_length=20)
    good_boy: bool


class Household(pydantic.BaseModel):
    pets: list[Annotated[Union[Cat, Dog], pydantic.Field(discriminator="kind")]] = \
        pydantic.Field(min_length=2, max_length=3)
    weight_kg: Union[int, float]
    # A tuple (`prefixItems`): each place its own type.
    city_and_year: tuple[str, int]


kinds = set()
for seed in range(3):
    h = parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Our family has a cat called Tom and a dog called "
                   "Rex. List our pets, give their total weight in kilograms, and say where and "
                   "when we got them: Paris, 2019."}],
        max_tokens=300, temperature=1.3 if seed else 0, seed=seed, response_format=Household,
    )
    household = h.choices[0].message.parsed
    assert isinstance(household, Household), h
    kinds |= {type(p) for p in household.pets}
    print("household:", h.choices[0].message.content)
assert kinds == {Cat, Dog}, kinds

# Tool calling: a required call comes back as `tool_calls`, streamed or not.
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ask = [{"role": "user", "content": "What is the weather like in Paris?"}]
t = client.chat.completions.create(model=MODEL, messages=ask, tools=tools, tool_choice="required",
                                   max_tokens=60, temperature=0)
assert t.choices[0].finish_reason == "tool_calls", t
call = t.choices[0].message.tool_calls[0]
assert call.type == "function" and call.function.name == "get_weather", t
assert json.loads(call.function.arguments) == {"city": "Paris"}, t
deltas = [c.choices[0].delta.tool_calls for c in client.chat.completions.create(
    model=MODEL, messages=ask, tools=tools, tool_choice="required", max_tokens=60,
    temperature=0, stream=True) if c.choices and c.choices[0].delta.tool_calls]
assert deltas[0][0].function.name == "get_weather" and len(deltas) > 1, deltas
assert "".join(d[0].function.arguments or "" for d in deltas) == call.function.arguments, deltas
# The result goes back as a `tool` message; the answer uses it.
final = client.chat.completions.create(model=MODEL, messages=ask + [
    t.choices[0].message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 31, "sky": "sunny"}'},
], tools=tools, max_tokens=40, temperature=0)
assert final.choices[0].finish_reason == "stop", final
assert "sunny" in final.choices[0].message.content.lower(), final

# The Responses API: text, streamed events, a structured answer, a function call round trip.
r = client.responses.create(model=MODEL, instructions="Answer briefly.",
                            input="Which planet is known as the red planet?",
                            max_output_tokens=24, temperature=0)
assert r.status in ("completed", "incomplete") and r.output_text, r
kinds = [e.type for e in client.responses.create(
    model=MODEL, instructions="Answer briefly.", input="Which planet is known as the red planet?",
    max_output_tokens=24, temperature=0, stream=True)]
assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"], kinds
assert kinds[-1] == "response." + r.status, kinds
streamed_text = None
with client.responses.stream(model=MODEL, instructions="Answer briefly.",
                             input="Which planet is known as the red planet?",
                             max_output_tokens=24, temperature=0) as s:
    streamed_text = s.get_final_response().output_text
assert streamed_text == r.output_text, (streamed_text, r.output_text)


class City(pydantic.BaseModel):
    name: str
    country: str


parsed = client.responses.parse(model=MODEL, input="Name the capital of France.", text_format=City,
                                temperature=0, max_output_tokens=60).output_parsed
assert isinstance(parsed, City) and parsed.name == "Paris", parsed
rtools = [{"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": tools[0]["function"]["parameters"]}]
rc = client.responses.create(model=MODEL, input="What is the weather like in Paris?", tools=rtools,
                             tool_choice="required", temperature=0)
fc = rc.output[0]
assert fc.type == "function_call" and fc.name == "get_weather", rc
assert json.loads(fc.arguments) == {"city": "Paris"}, rc
with client.responses.stream(model=MODEL, input="What is the weather like in Paris?", tools=rtools,
                             tool_choice="required", temperature=0) as s:
    arg_deltas = [e.delta for e in s if e.type == "response.function_call_arguments.delta"]
    streamed_call = s.get_final_response().output[0]
assert len(arg_deltas) > 1 and "".join(arg_deltas) == fc.arguments, arg_deltas
assert streamed_call.name == "get_weather" and streamed_call.arguments == fc.arguments, streamed_call
after = client.responses.create(model=MODEL, tools=rtools, temperature=0, max_output_tokens=40, input=[
    {"role": "user", "content": "What is the weather like in Paris?"}, fc.model_dump(exclude_none=True),
    {"type": "function_call_output", "call_id": fc.call_id, "output": '{"temperature": 31, "sky": "sunny"}'}])
assert "sunny" in after.output_text.lower(), after
# The same round trip continued from the stored call (`previous_response_id`): same answer.
chained = client.responses.create(model=MODEL, tools=rtools, temperature=0, max_output_tokens=40,
                                  previous_response_id=rc.id, input=[
    {"type": "function_call_output", "call_id": fc.call_id, "output": '{"temperature": 31, "sky": "sunny"}'}])
assert chained.output_text == after.output_text, (chained, after)
assert chained.previous_response_id == rc.id and chained.store, chained
assert client.responses.retrieve(rc.id).output[0].call_id == fc.call_id
items = client.responses.input_items.list(chained.id, order="asc").data
assert [i.type for i in items] == ["message", "function_call", "function_call_output"], items
assert client.responses.delete(rc.id) is None
try:
    client.responses.retrieve(rc.id)
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError:
    pass

# Errors surface as the right exception classes with our messages.
try:
    client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    raise AssertionError("expected BadRequestError")
except openai.BadRequestError as e:
    assert "temperature" in str(e), e
    assert e.body["param"] == "temperature", e.body
# Embeddings (the client asks for base64 and decodes it): unit vectors of the model's width,
# a text's the same alone and among others.
texts = ["The cat sat on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today."]
emb = client.embeddings.create(model=MODEL, input=texts)
vecs = [d.embedding for d in emb.data]
assert [d.index for d in emb.data] == [0, 1, 2] and len(vecs[0]) == 576, emb
assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vecs)
assert emb.usage.prompt_tokens > 0 and emb.usage.total_tokens == emb.usage.prompt_tokens
assert client.embeddings.create(model=MODEL, input=texts[1]).data[0].embedding == vecs[1]
assert client.embeddings.create(model=MODEL, input=texts[1],
                                encoding_format="float").data[0].embedding == vecs[1]
cos = lambda a, b: sum(x * y for x, y in zip(a, b))
assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]), emb
try:
    client.embeddings.create(model=MODEL, input="")
    raise AssertionError("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.body["param"] == "input", e.body

try:
    client.completions.create(model="no-such-model", prompt="hi")
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert "no-such-model" in str(e)
bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong-key", max_retries=0)
try:
    bad.models.list()
    raise AssertionError("expected AuthenticationError")
except openai.AuthenticationError as e:
    assert "invalid API key" in str(e), e

print("openai client: all checks passed")
