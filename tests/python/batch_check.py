"""The Batch API with the official `openai` client.

Usage: python batch_check.py BASE_URL API_KEY
  files.create(purpose="batch") -> batches.create -> polling batches.retrieve ->
  files.content(output_file_id): every answer equals the same request sent live; the batch is
  listed; cancelling a completed batch is a ConflictError (409).
Usage: python batch_check.py BASE_URL API_KEY start N
  uploads N long completions requests, starts their batch and prints its id (the caller kills
  and restarts the server meanwhile).
"""
import io
import json
import sys
import time

import openai

base, key = sys.argv[1], sys.argv[2]
mode = sys.argv[3] if len(sys.argv) > 3 else "run"
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def upload(lines):
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    f = client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(data), f
    return f


if mode == "start":
    n = int(sys.argv[4])
    lines = [
        {
            "custom_id": f"long-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "smollm2", "prompt": f"Chapter {i}.", "max_tokens": 64,
                     "ignore_eos": True, "temperature": 0},
        }
        for i in range(n)
    ]
    batch = client.batches.create(
        input_file_id=upload(lines).id, endpoint="/v1/completions", completion_window="24h"
    )
    print(batch.id)
    sys.exit(0)

questions = ["What is the capital of France?", "Name a colour.", "Say hello.", "What is 3 + 4?"]
bodies = [
    {"model": "smollm2", "messages": [{"role": "user", "content": q}], "max_tokens": 16,
     "temperature": 0}
    for q in questions
]
f = upload(
    [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
     for i, b in enumerate(bodies)]
)
batch = client.batches.create(
    input_file_id=f.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    metadata={"job": "nightly"},
)
assert batch.status == "validating" and batch.metadata == {"job": "nightly"}, batch
deadline = time.time() + 120
while batch.status not in ("completed", "failed", "expired", "cancelled"):
    assert time.time() < deadline, batch
    time.sleep(0.2)
    batch = client.batches.retrieve(batch.id)
assert batch.status == "completed", batch
assert batch.request_counts.total == 4 and batch.request_counts.completed == 4, batch
assert batch.error_file_id is None, batch
out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
assert [o["custom_id"] for o in out] == ["q0", "q1", "q2", "q3"], out
for o, body in zip(out, bodies):
    assert o["response"]["status_code"] == 200, o
    live = client.chat.completions.create(**body)
    got = o["response"]["body"]["choices"][0]["message"]["content"]
    assert got == live.choices[0].message.content, (got, live)
assert batch.id in [b.id for b in client.batches.list(limit=10).data]
assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
try:
    client.batches.cancel(batch.id)
    raise AssertionError("a completed batch was cancelled")
except openai.ConflictError as e:
    assert "completed" in str(e), e
print("batch ok:", batch.id)
