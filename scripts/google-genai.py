"""The google-genai Python SDK through Relay's Gemini-native inbound, as its users write it.

Usage: google-genai.py <relay-url> <relay-key> <model>

Runs, against one Relay model: a streamed generation, a whole generation, token counting, and a
function-calling turn (the SDK's automatic function calling: the model calls the tool, the SDK runs it,
sends the result back through Relay, and the model answers). Prints one `ok:` line per check and exits
non-zero on the first failure.
"""

import sys

from google import genai
from google.genai import types


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def main():
    base, key, model = sys.argv[1:4]
    client = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=base))

    chunks = list(client.models.generate_content_stream(model=model, contents="Say hello via relay."))
    text = "".join(c.text or "" for c in chunks)
    check(len(chunks) > 1 and text, f"streamed generation ({len(chunks)} chunks)")
    last = chunks[-1]
    check(last.candidates[0].finish_reason == types.FinishReason.STOP, "the stream ends with finishReason STOP")
    check(last.usage_metadata and last.usage_metadata.prompt_token_count > 0, "the stream reports usage")

    whole = client.models.generate_content(
        model=model,
        contents="Say hello again.",
        config=types.GenerateContentConfig(system_instruction="Be brief.", max_output_tokens=256),
    )
    check(whole.text and whole.usage_metadata.candidates_token_count > 0, "whole generation with usage")

    n = client.models.count_tokens(model=model, contents="How many tokens is this?")
    check(n.total_tokens > 0, f"countTokens ({n.total_tokens})")

    calls = []

    def get_weather(city: str) -> str:
        """Returns the weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    answer = client.models.generate_content(
        model=model,
        contents="What is the weather in Paris? Use the tool.",
        config=types.GenerateContentConfig(tools=[get_weather]),
    )
    check(calls, "the model called the tool and the SDK ran it")
    history = answer.automatic_function_calling_history or []
    check(any(p.function_response for c in history for p in (c.parts or [])), "the tool result went back through Relay")
    check("TOOL_RESULT:" in (answer.text or ""), f"function-calling turn completed: {answer.text!r}")

    models = [m.name for m in client.models.list()]
    check(f"models/{model}" in models, "the model is listed")


if __name__ == "__main__":
    main()
