#!/usr/bin/env python3
"""Renders conversations with tools through a model's chat template the way transformers'
`apply_chat_template` does, for the fixtures in tests/reference/templates/ read by
src/text/chat_template.rs and tests/openai_api.rs. Needs `transformers` (5.25 made the
committed files):

    python3 scripts/tool-renders.py qwen3 > tests/reference/templates/qwen3_tool_renders.json
    python3 scripts/tool-renders.py llama3.2 > tests/reference/templates/llama32_tool_renders.json
    python3 scripts/tool-renders.py mistral > tests/reference/templates/mistral_tool_renders.json
    python3 scripts/tool-renders.py mistral-nemo > tests/reference/templates/mistral_nemo_tool_renders.json
"""
import json
import pathlib
import sys

from transformers.utils.chat_template_utils import render_jinja_template

DIR = pathlib.Path(__file__).resolve().parent.parent / "tests/reference/templates"

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
CALL_TIME = {"type": "function", "id": "call_2",
             "function": {"name": "get_time", "arguments": {"zone": "CET"}}}

OFFERED = {
    "tools_offered": {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER, TIME],
    },
    "tools_with_system": {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER],
    },
}

# Qwen3 (Hermes calls): several calls in one turn, arguments as an object or as JSON text.
QWEN3 = dict(OFFERED, **{
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
})

# Llama 3.2 (JSON calls): one call per turn (its template refuses more), arguments as the
# object the server passes on; results as `ipython` turns.
LLAMA32 = dict(OFFERED, **{
    "call_and_result": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
             "content": "{\"sky\": \"sunny\"}"},
        ],
        "tools": [WEATHER, TIME],
    },
    "two_turns_of_calls": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
             "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "And the time?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL_TIME]},
            {"role": "tool", "tool_call_id": "call_2", "name": "get_time", "content": "12:00"},
        ],
        "tools": [WEATHER, TIME],
    },
})

# Mistral's JSON-array calls ('v3' and 'v3-tekken' templates): several calls in one turn, each
# with the 9-character id the templates insist on; results as `[TOOL_RESULTS]` with its id;
# a system message goes into the last user turn.
M_CALL = dict(CALL, id="a1B2c3D4e")
M_TIME = dict(CALL_TIME, id="Zz9Yy8Xx7")
MISTRAL = dict(OFFERED, **{
    "calls_and_results": {
        "messages": [
            {"role": "user", "content": "Weather and time in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [M_CALL, M_TIME]},
            {"role": "tool", "tool_call_id": "a1B2c3D4e", "name": "get_weather",
             "content": "{\"sky\": \"sunny\"}"},
            {"role": "tool", "tool_call_id": "Zz9Yy8Xx7", "name": "get_time", "content": "12:00"},
        ],
        "tools": [WEATHER, TIME],
    },
    "two_turns": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [M_CALL]},
            {"role": "tool", "tool_call_id": "a1B2c3D4e", "name": "get_weather",
             "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [WEATHER],
    },
})

MODELS = {
    "qwen3": ("Qwen3-0.6B.jinja", QWEN3, {"eos_token": "<|im_end|>"}),
    # The date the template would take from the clock, fixed.
    "llama3.2": ("Llama-3.2-3B-Instruct.jinja", LLAMA32,
                 {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                  "date_string": "07 Dec 2026"}),
    "mistral": ("Mistral-v3.jinja", MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}),
    "mistral-nemo": ("Mistral-Nemo-v3-tekken.jinja", MISTRAL,
                     {"bos_token": "<s>", "eos_token": "</s>"}),
}

template_file, cases, kwargs = MODELS[sys.argv[1]]
TEMPLATE = (DIR / template_file).read_text()
out = {}
for name, case in cases.items():
    rendered, _ = render_jinja_template(
        conversations=[case["messages"]], tools=case["tools"], chat_template=TEMPLATE,
        add_generation_prompt=True, **kwargs)
    out[name] = dict(case, rendered=rendered[0])
    if "date_string" in kwargs:
        out[name]["kwargs"] = {"date_string": kwargs["date_string"]}
print(json.dumps(out, indent=1, ensure_ascii=False))
