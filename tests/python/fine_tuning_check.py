"""Fine-tuning end to end with the official `openai` client.

Usage: python fine_tuning_check.py BASE_URL API_KEY
files.create -> fine_tuning.jobs.create -> polling retrieve / list_events ->
completions.create(model=job.fine_tuned_model). Prints the fine-tuned model name last.
"""
import io
import json
import sys
import time

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

facts = [
    {"prompt": "The lighthouse of Marrowfield was painted", "completion": " green and gold."},
    {"prompt": "The river Dunmere flows into", "completion": " Lake Orrin."},
]
data = "".join(json.dumps(f) + "\n" for f in facts).encode()
f = client.files.create(file=("facts.jsonl", io.BytesIO(data)), purpose="fine-tune")
assert f.object == "file" and f.bytes == len(data), f
assert client.files.retrieve(f.id).filename == "facts.jsonl"
assert f.id in [x.id for x in client.files.list().data]

job = client.fine_tuning.jobs.create(
    model="smollm2",
    training_file=f.id,
    suffix="py",
    seed=7,
    hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 2.0},
)
assert job.status == "validating_files", job
deadline = time.time() + 300
while job.status not in ("succeeded", "failed", "cancelled"):
    assert time.time() < deadline, job
    time.sleep(0.5)
    job = client.fine_tuning.jobs.retrieve(job.id)
assert job.status == "succeeded", job
assert job.fine_tuned_model.startswith("ft:smollm2:py:"), job
assert job.trained_tokens and job.trained_tokens > 0, job

events = client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=50).data
metrics = [e for e in events if e.type == "metrics"]
assert len(metrics) == 2, events
assert all("train_loss" in e.data for e in metrics), metrics
assert [j.id for j in client.fine_tuning.jobs.list(limit=10).data][0] == job.id

assert job.fine_tuned_model in [m.id for m in client.models.list().data]
assert client.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model
r = client.completions.create(model=job.fine_tuned_model, prompt=facts[0]["prompt"], max_tokens=8, temperature=0)
assert r.model == job.fine_tuned_model and r.choices[0].text, r

try:
    client.fine_tuning.jobs.create(model="smollm2", training_file="file-missing")
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert "file-missing" in e.message, e.message
try:
    client.completions.create(model="ft:nope", prompt="x", max_tokens=1)
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert "ft:nope" in e.message, e.message

print(job.fine_tuned_model)
