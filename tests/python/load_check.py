"""Load: 64 concurrent streaming clients, a third of them disconnecting mid-stream.

Usage: python load_check.py BASE_URL API_KEY
Every client that stays gets exactly its requested tokens; afterwards the server reports no
running or waiting requests and no KV blocks in use.
"""
import asyncio
import json
import sys
import time

import httpx

base, key = sys.argv[1], sys.argv[2]
CLIENTS, NEW_TOKENS = 64, 16
HEADERS = {"Authorization": f"Bearer {key}"}


async def one(client, i):
    leaves = i % 3 == 0
    body = {
        "model": "smollm2", "prompt": f"Story number {i}: once upon a time", "max_tokens": NEW_TOKENS,
        "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", "/v1/completions", json=body, headers=HEADERS) as r:
        assert r.status_code == 200, (r.status_code, await r.aread())
        chunks, usage, finish, done = 0, None, None, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                chunks += 1
                if c["finish_reason"]:
                    finish = c["finish_reason"]
            if leaves and chunks >= 3:
                return "left"  # closing the stream disconnects mid-generation
        assert done and finish == "length", (i, finish, done)
        assert usage["completion_tokens"] == NEW_TOKENS, (i, usage)
        return "done"


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def main():
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(CLIENTS)))
        assert results.count("done") == CLIENTS - len(range(0, CLIENTS, 3)), results
        deadline = time.time() + 60
        while True:
            text = (await client.get("/metrics")).text
            running = metric(text, "nextoken:num_requests_running")
            waiting = metric(text, "nextoken:num_requests_waiting")
            used = metric(text, "nextoken:kv_cache_blocks_used")
            if running == 0 and waiting == 0 and used == 0:
                break
            assert time.time() < deadline, (running, waiting, used)
            await asyncio.sleep(0.1)
        assert metric(text, "nextoken:num_cancelled_total") >= 1
    print(f"load: {results.count('done')} completed, {results.count('left')} left mid-stream; engine idle, no KV blocks in use")


asyncio.run(main())
