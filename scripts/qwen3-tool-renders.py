#!/usr/bin/env python3
"""Renders conversations with tools through Qwen3's chat template the way transformers'
`apply_chat_template` does, for tests/reference/templates/qwen3_tool_renders.json (read by
src/text/chat_template.rs). Needs `transformers` (5.25 made the committed file):

    python3 scripts/qwen3-tool-renders.py > tests/reference/templates/qwen3_tool_renders.json
"""
import json
import pathlib

from transformers.utils.chat_template_utils import render_jinja_template

DIR = pathlib.Path(__file__).resolve().parent.parent / "tests/reference/templates"
TEMPLATE = (DIR / "Qwen3-0.6B.jinja").read_text()

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                   "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
CALL = {"type": "function", "id": "call_1",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CALL_TEXT = {"type": "function", "id": "call_2",
             "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}

CASES = {
    "tools_offered": {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER, TIME],
    },
    "tools_with_system": {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER],
    },
    "call_and_result": {
        "messages": [
            {"role": "user", "content": "Weather and time in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL, CALL_TEXT]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
             "content": "{\"sky\": \"sunny\"}"},
            {"role": "tool", "tool_call_id": "call_2", "name": "get_time", "content": "12:00"},
        ],
        "tools": [WEATHER, TIME],
    },
    "call_after_text": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
             "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [WEATHER],
    },
}

out = {}
for name, case in CASES.items():
    rendered, _ = render_jinja_template(
        conversations=[case["messages"]], tools=case["tools"], chat_template=TEMPLATE,
        add_generation_prompt=True, eos_token="<|im_end|>")
    out[name] = dict(case, rendered=rendered[0])
print(json.dumps(out, indent=1, ensure_ascii=False))
