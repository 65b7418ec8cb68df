"""qdaemon's OpenAI endpoint, driven by the real `openai` package (from PyPI).

    python openai_client.py BASE_URL MODEL

BASE_URL is http://HOST:PORT/v1; MODEL a loaded SmolLM2 (ChatML template).
Exits non-zero with the failing check on stderr.
"""
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)


def check(cond, what):
    if not cond:
        sys.exit(f"openai_client: FAIL: {what}")
    print(f"openai_client: ok: {what.split(':')[0]}")


# The model list.
ids = [m.id for m in client.models.list()]
check(model in ids, f"models.list names {model}: {ids}")

# A streamed chat completion, usage in the last chunk.
chunks = list(
    client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check(len(chunks) >= 3, f"chat stream: {len(chunks)} chunks")
check(chunks[0].choices[0].delta.role == "assistant", f"chat stream: first delta has the role: {chunks[0]}")
check("Paris" in text, f"chat stream: the answer names Paris: {text!r}")
check("<|im_end|>" not in text, f"chat stream: no control token in the text: {text!r}")
check(reasons in (["stop"], ["length"]), f"chat stream: one finish reason: {reasons}")
usage = chunks[-1].usage
check(usage is not None and chunks[-1].choices == [], f"chat stream: usage in the last chunk: {chunks[-1]}")
check(usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 24, f"chat stream: usage: {usage}")
check(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, f"chat stream: total: {usage}")
check(all(c.usage is None for c in chunks[:-1]), "chat stream: usage only in the last chunk")
print(f"openai_client: chat says {text!r}")

# The same question without streaming: the same greedy text.
r = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    max_tokens=24,
    temperature=0,
)
check(r.choices[0].message.content == text, f"chat whole: same text as the stream: {r.choices[0].message.content!r}")
check(r.usage.completion_tokens == usage.completion_tokens, f"chat whole: same usage: {r.usage}")

# A streamed completion with a stop string: cut before it, finish "stop".
chunks = list(
    client.completions.create(
        model=model,
        prompt="The capital of France is",
        max_tokens=16,
        temperature=0,
        stop=["."],
        stream=True,
    )
)
text = "".join(c.choices[0].text for c in chunks if c.choices)
check("Paris" in text and "." not in text, f"completion stream: stopped before '.': {text!r}")
check(chunks[-1].choices[0].finish_reason == "stop", f"completion stream: finish stop: {chunks[-1]}")
print(f"openai_client: completion says {text!r}")

# Seeded sampling repeats itself.
a, b = (
    client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0.9, seed=42)
    .choices[0]
    .text
    for _ in range(2)
)
check(a == b, f"seeded sampling repeats: {a!r} vs {b!r}")
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8)
check(c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8, f"max_tokens: {c}")

# Errors come back as the client's exceptions, with OpenAI's shape.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    check(False, "an unknown model is refused")
except openai.NotFoundError as e:
    check(e.status_code == 404 and "no-such-model" in e.message, f"unknown model: 404: {e}")
try:
    client.completions.create(model=model, prompt="hi", n=2)
    check(False, "n=2 is refused")
except openai.BadRequestError as e:
    check(e.status_code == 400 and "'n'" in e.message, f"n=2: 400: {e}")
print("openai_client: all ok")
