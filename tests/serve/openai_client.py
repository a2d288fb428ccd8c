"""Drives `kvtuner serve` with the official `openai` client (run by tests/serve.rs).

usage: openai_client.py BASE_URL MODEL_ID CTX_PER_SLOT
Prints one line per check and `ALL OK` at the end; any failure raises (non-zero exit).
"""

import sys
import threading

import openai

base_url, model, ctx_per_slot = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def check(name, ok, detail=""):
    if not ok:
        raise SystemExit(f"FAIL {name}: {detail}")
    print(f"ok {name}", flush=True)


# /v1/models names the model and the applied profile
models = client.models.list()
ids = [m.id for m in models.data]
check("models", ids == [model], ids)
profile = models.data[0].model_extra["kvtuner"]["profile"]
check("models.profile", profile["name"] and len(profile["type_k"]) == len(profile["layers"]), profile)

# chat, not streamed
r = client.chat.completions.create(model=model, messages=FRANCE, max_tokens=16, temperature=0)
answer = r.choices[0].message.content
check("chat", "Paris" in answer and r.choices[0].finish_reason == "stop", answer)
check("chat.usage", r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, r.usage)

# chat, streamed, with the usage chunk
chunks = list(
    client.chat.completions.create(
        model=model,
        messages=FRANCE,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("chat.stream", text == answer, (text, answer))
finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check("chat.stream.finish", finish == ["stop"], finish)
check("chat.stream.usage", chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, chunks[-1])

# a follow-up turn reuses the cached conversation (prefix reuse per slot)
follow = FRANCE + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the capital of Italy?"}]
r = client.chat.completions.create(model=model, messages=follow, max_tokens=16, temperature=0)
cached = r.usage.prompt_tokens_details.cached_tokens
check("chat.followup", "Rome" in r.choices[0].message.content, r.choices[0].message.content)
check("chat.followup.cached", cached >= r.usage.prompt_tokens // 2, (cached, r.usage.prompt_tokens))

# completions, plain and streamed; max_tokens ends with `length`
r = client.completions.create(model=model, prompt="The Eiffel Tower is in the city of", max_tokens=4, temperature=0)
check("completions", "Paris" in r.choices[0].text and r.choices[0].finish_reason == "length", r.choices[0])
stream = client.completions.create(model=model, prompt="The Eiffel Tower is in the city of", max_tokens=4, temperature=0, stream=True)
check("completions.stream", "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text)

# stop strings end the reply and are not part of it
r = client.completions.create(model=model, prompt="The Eiffel Tower is in the city of", max_tokens=8, temperature=0, stop=["aris"])
check("completions.stop", r.choices[0].text.endswith(" P") and r.choices[0].finish_reason == "stop", r.choices[0])

# seeded sampling repeats (the first run decodes the whole prompt, later ones reuse its cache and
# decode only the last prompt token: batch shapes change the logits' last bits, so compare those)
seeded = [
    client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=1.0, top_p=1.0, seed=42, extra_body={"top_k": 0, "min_p": 0.0})
    .choices[0]
    .text
    for _ in range(3)
]
check("completions.seed", seeded[1] == seeded[2], seeded)


# errors in OpenAI's shape, as the client's exception classes
def expect(name, exc, call, code=None, param=None):
    try:
        call()
    except exc as e:
        body = e.body or {}
        check(name, (code is None or body.get("code") == code) and (param is None or body.get("param") == param), body)
        return
    raise SystemExit(f"FAIL {name}: no {exc.__name__}")


# any model name is served by the one model (as llama-server does), and the reply names it
r = client.chat.completions.create(model="gpt-4o", messages=FRANCE, max_tokens=4, temperature=0)
check("any model name", r.model == model, r.model)
expect(
    "error.max_tokens",
    openai.BadRequestError,
    lambda: client.chat.completions.create(model=model, messages=FRANCE, max_tokens=0),
    param="max_tokens",
)
expect(
    "error.too_long",
    openai.BadRequestError,
    lambda: client.completions.create(model=model, prompt="hello " * (ctx_per_slot + 10), max_tokens=4),
    "context_length_exceeded",
    "prompt",
)
expect(
    "error.temperature",
    openai.BadRequestError,
    lambda: client.chat.completions.create(model=model, messages=FRANCE, temperature=7),
    param="temperature",
)

# 8 concurrent streaming requests all complete with the right answers
questions = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin")] * 2
results = [None] * len(questions)


def ask(i, country):
    s = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"What is the capital of {country}?"}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    results[i] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)


threads = [threading.Thread(target=ask, args=(i, q[0])) for i, q in enumerate(questions)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for (country, capital), text in zip(questions, results):
    check(f"concurrent.{country}", text is not None and capital in text, text)

print("ALL OK", flush=True)
