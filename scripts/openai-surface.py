"""The official openai Python SDK on Relay's stateful surface, as its users write it.

Usage: openai-surface.py <relay-url> <relay-key> <model>

Against one Relay model: a conversation carried across two Responses turns; a file upload (the SDK's own
multipart encoding), a batch over it that Relay runs, its output file read back; the file and batch lists.
Prints one `ok:` line per check and exits non-zero on the first failure.
"""

import io
import json
import sys
import time

from openai import OpenAI


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def main():
    base, key, model = sys.argv[1:4]
    client = OpenAI(base_url=f"{base}/v1", api_key=key)

    conv = client.conversations.create(metadata={"topic": "relay"}, items=[{"type": "message", "role": "user", "content": "my name is Ada"}])
    check(conv.id.startswith("conv_"), f"conversation created ({conv.id})")
    r1 = client.responses.create(model=model, conversation=conv.id, input="what is my name?")
    check(r1.output_text, "a turn in the conversation")
    r2 = client.responses.create(model=model, conversation=conv.id, input="say it again")
    check(r2.output_text, "a second turn in the conversation")
    for _ in range(50):
        items = client.conversations.items.list(conv.id, order="asc")
        if len(items.data) >= 5:
            break
        time.sleep(0.1)
    check(len(items.data) == 5, f"the conversation holds both turns ({len(items.data)} items)")
    client.conversations.delete(conv.id)

    lines = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "messages": [{"role": "user", "content": f"batch line {i}"}], "max_tokens": 64}}
        for i in range(3)
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    f = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    check(f.id.startswith("file-") and f.bytes == len(data), f"file uploaded ({f.id}, {f.bytes} bytes)")
    check(client.files.content(f.id).read() == data, "the file reads back byte for byte")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    check(batch.status in ("validating", "in_progress"), f"batch created ({batch.id})")
    for _ in range(300):
        batch = client.batches.retrieve(batch.id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            break
        time.sleep(0.2)
    check(batch.status == "completed" and batch.request_counts.completed == 3, f"batch completed: {batch.status} {batch.request_counts}")
    out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    check(sorted(o["custom_id"] for o in out) == ["req-0", "req-1", "req-2"], "the output file answers every line")
    check(all(o["response"]["status_code"] == 200 for o in out), "every line answered 200")
    check(any(b.id == batch.id for b in client.batches.list()), "the batch is listed")
    check(any(x.id == f.id for x in client.files.list()), "the file is listed")
    client.files.delete(f.id)
    print("SURFACE_OK")


if __name__ == "__main__":
    main()
