"""Drives `kvtuner serve` on Qwen2.5-Coder-0.5B-Instruct with what agent users run: OpenAI's
client (tool-call round trip, streamed tool calls, `.parse()` with pydantic, logprobs, seeds),
LangChain (`bind_tools`, `with_structured_output`) and the `ollama` client (chat, streamed
chat, tools, list, show). Run by tests/serve_clients.rs.

usage: agent_clients.py BASE_URL (the server's root, e.g. http://127.0.0.1:8080)
Prints one line per check and `ALL OK` at the end; any failure raises (non-zero exit).
"""

import json
import math
import sys

import ollama
import openai
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

root = sys.argv[1]
client = openai.OpenAI(base_url=root + "/v1", api_key="unused", max_retries=0, timeout=300)
MODEL = "qwen2.5-coder"  # any name: the server serves its one model
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def check(name, ok, detail=""):
    if not ok:
        raise SystemExit(f"FAIL {name}: {detail}")
    print(f"ok {name}", flush=True)


# --- OpenAI: a tool-call round trip (call -> tool result -> final answer) ---
forced = {"type": "function", "function": {"name": "get_weather"}}
r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL], tool_choice=forced, temperature=0)
choice = r.choices[0]
calls = choice.message.tool_calls or []
check("openai.tool_call", len(calls) == 1 and calls[0].function.name == "get_weather", choice.message)
args = json.loads(calls[0].function.arguments)
check("openai.tool_call.arguments", args.get("city", "").lower() == "paris", args)
check("openai.tool_call.finish", choice.finish_reason == "tool_calls", choice.finish_reason)
check("openai.tool_call.id", calls[0].id.startswith("call_"), calls[0].id)

history = ASK + [
    choice.message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"city": "Paris", "temperature_c": 31, "sky": "sunny"})},
]
# a seed decodes the whole prompt (no cached prefix): the greedy answer does not depend on what
# earlier requests left in the cache
r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL], temperature=0, max_tokens=80, seed=0)
final = r.choices[0].message
check("openai.round_trip.answer", not final.tool_calls and "31" in (final.content or ""), final)
check("openai.round_trip.seed_decodes_all", r.usage.prompt_tokens_details.cached_tokens == 0, r.usage)

# the same call streamed: deltas add up to the same call
chunks = list(
    client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL], tool_choice=forced, temperature=0, stream=True)
)
name, arguments, ids = "", "", set()
for c in chunks:
    for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
        name += d.function.name or "" if d.function else ""
        arguments += d.function.arguments or "" if d.function else ""
        if d.id:
            ids.add(d.id)
finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check("openai.stream.tool_call", name == "get_weather" and json.loads(arguments) == args and len(ids) == 1, (name, arguments, ids))
check("openai.stream.finish", finish == ["tool_calls"], finish)

# tool_choice none: no call, prose
r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL], tool_choice="none", temperature=0, max_tokens=30)
check("openai.tool_choice_none", not r.choices[0].message.tool_calls and r.choices[0].message.content, r.choices[0].message)


# --- OpenAI: structured output with a pydantic model ---
class Capital(BaseModel):
    country: str
    capital: str


r = client.chat.completions.parse(
    model=MODEL,
    messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
    response_format=Capital,
    temperature=0,
)
parsed = r.choices[0].message.parsed
check("openai.parse", isinstance(parsed, Capital) and "paris" in parsed.capital.lower(), r.choices[0].message)

# json_object: the reply is JSON
r = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Give me a JSON object with the keys name and age for a person."}],
    response_format={"type": "json_object"},
    temperature=0,
    max_tokens=60,
)
check("openai.json_object", isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message.content)

# --- OpenAI: logprobs ---
r = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
)
content = r.choices[0].logprobs.content
check("openai.logprobs.count", len(content) == r.usage.completion_tokens, (len(content), r.usage))
text = "".join(t.token for t in content)
check("openai.logprobs.tokens", text.startswith(r.choices[0].message.content[:5]), (text, r.choices[0].message.content))
for t in content:
    top = [a.logprob for a in t.top_logprobs]
    mass = sum(math.exp(x) for x in top)
    ok = (
        len(top) == 3
        and all(x <= 1e-6 for x in top)
        and top == sorted(top, reverse=True)
        and mass <= 1.0 + 1e-4
        # greedy: the chosen token is the most likely one
        and abs(t.logprob - top[0]) < 1e-4
        and bytes(t.bytes).decode("utf-8", "replace") == t.token
    )
    check(f"openai.logprobs.token {t.token!r}", ok, (t.logprob, top, mass))
r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
lp = r.choices[0].logprobs
check("openai.completions.logprobs", len(lp.tokens) == len(lp.token_logprobs) == 4 and all(len(t) == 2 for t in lp.top_logprobs), lp)

# --- seeds: one seed, one text, whatever the cache holds; -1 is random ---
story = [{"role": "user", "content": "Write one sentence about a cat."}]
a = client.chat.completions.create(model=MODEL, messages=story, temperature=1.0, seed=1234, max_tokens=24).choices[0].message.content
b = client.chat.completions.create(model=MODEL, messages=story, temperature=1.0, seed=1234, max_tokens=24).choices[0].message.content
check("seed.same", a == b, (a, b))
outs = {
    client.chat.completions.create(model=MODEL, messages=story, temperature=1.0, seed=-1, max_tokens=24).choices[0].message.content
    for _ in range(3)
}
check("seed.random", len(outs) > 1, outs)

# --- LangChain ---
@tool
def get_weather(city: str) -> str:
    """Get the current weather of a city."""
    return "sunny"


llm = ChatOpenAI(base_url=root + "/v1", api_key="unused", model=MODEL, temperature=0, max_retries=0)
msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
check(
    "langchain.bind_tools",
    len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "get_weather" and msg.tool_calls[0]["args"].get("city", "").lower() == "paris",
    msg,
)
out = llm.with_structured_output(Capital).invoke("What is the capital of France?")
check("langchain.with_structured_output", isinstance(out, Capital) and "paris" in out.capital.lower(), out)

# --- the ollama client ---
oc = ollama.Client(host=root)
names = [m.model for m in oc.list().models]
check("ollama.list", len(names) == 1 and names[0], names)
r = oc.chat(model=names[0], messages=[{"role": "user", "content": "What is the capital of France?"}], options={"temperature": 0, "num_ctx": 4096})
check("ollama.chat", "Paris" in r.message.content and r.done and r.eval_count > 0, r)
pieces = list(oc.chat(model=names[0], messages=[{"role": "user", "content": "What is the capital of France?"}], options={"temperature": 0}, stream=True))
streamed = "".join(p.message.content for p in pieces)
check("ollama.chat.stream", streamed == r.message.content and pieces[-1].done and len(pieces) > 2, (streamed, r.message.content))
r = oc.chat(model=names[0], messages=ASK, tools=[get_weather_ollama := {"type": "function", "function": WEATHER_TOOL["function"]}], options={"temperature": 0})
calls = r.message.tool_calls or []
check("ollama.chat.tools", all(c.function.name == "get_weather" for c in calls), r.message)
r = oc.generate(model=names[0], prompt="What is 2+3? Reply with the number only.", options={"temperature": 0})
check("ollama.generate", "5" in r.response and r.done, r)
show = oc.show(names[0])
check("ollama.show", show.details.family == "qwen2" and "tools" in (show.capabilities or []), show)
r = oc.chat(model=names[0], messages=[{"role": "user", "content": "Name a colour as JSON with key colour."}], format="json", options={"temperature": 0})
check("ollama.format_json", isinstance(json.loads(r.message.content), dict), r.message.content)
try:
    oc.chat(model=names[0], messages=ASK, options={"mirostat_eta": 0.1})
    raise SystemExit("FAIL ollama.unknown_option: accepted")
except ollama.ResponseError as e:
    check("ollama.unknown_option", e.status_code == 400 and "mirostat_eta" in e.error, e.error)

try:
    oc.generate(model=names[0], prompt="def add(a, b):", suffix="    return c")
    raise SystemExit("FAIL ollama.suffix: accepted")
except ollama.ResponseError as e:
    check("ollama.suffix_refused", e.status_code == 400 and "suffix" in e.error, e.error)
r = oc.chat(model=names[0], messages=[{"role": "user", "content": "Say yes."}], think=False, options={"temperature": 0, "num_predict": 4})
check("ollama.think_false", r.done and r.message.content, r)

print("ALL OK")
