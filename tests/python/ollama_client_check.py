"""The official `ollama` Python client against a running nextoken (argv: base URL, API key):
model listing, chat (whole and streamed), a JSON schema as `format`, generate, embeddings."""
import sys

import ollama
import pydantic

HOST, KEY = sys.argv[1], sys.argv[2]
client = ollama.Client(host=HOST, headers={"Authorization": f"Bearer {KEY}"})

names = [m.model for m in client.list().models]
assert names, names
model = names[0]
assert [m.model for m in client.ps().models][0] == model
info = client.show(model)
assert info.modelinfo["llama.context_length"] == 8192, info
assert "tools" in info.capabilities, info

ask = [{"role": "user", "content": "Name three colours."}]
options = {"temperature": 0, "num_predict": 24}
r = client.chat(model=model, messages=ask, options=options)
assert r.message.role == "assistant" and r.message.content, r
assert r.done and r.done_reason == "length" and r.eval_count == 24, r
pieces = [c.message.content for c in client.chat(model=model, messages=ask, options=options,
                                                  stream=True)]
assert "".join(pieces) == r.message.content, pieces


class Review(pydantic.BaseModel):
    rating: int = pydantic.Field(ge=1, le=5)
    summary: str = pydantic.Field(max_length=60)


r = client.chat(model=model, format=Review.model_json_schema(),
                messages=[{"role": "user", "content": "Review the movie Titanic."}],
                options={"temperature": 0, "num_predict": 150})
review = Review.model_validate_json(r.message.content)
print("review:", review)

g = client.generate(model=model, prompt="def add(a, b):\n", options=options)
assert g.response and g.done, g

# Embeddings: unit vectors of the model's width, the same one alone and in a list.
texts = ["The cat sat on the mat.", "Stock markets fell sharply today."]
e = client.embed(model=model, input=texts)
assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 576, e
assert abs(sum(x * x for x in e.embeddings[0]) - 1) < 1e-4
assert client.embed(model=model, input=texts[0]).embeddings[0] == e.embeddings[0]
legacy = client.embeddings(model=model, prompt=texts[0]).embedding
norm = sum(x * x for x in legacy) ** 0.5
assert all(abs(a / norm - b) < 1e-6 for a, b in zip(legacy, e.embeddings[0]))
print("ollama client: ok")
