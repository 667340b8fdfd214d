#!/usr/bin/env bash
# The agentic CLIs people point at relays, through Relay, on every upstream: Claude Code (`claude -p`,
# Anthropic Messages in), Codex CLI (`codex exec`, OpenAI Responses in) and the Vercel AI SDK
# (`generateText` on the Responses API with its default `store`, so step 2 sends an `item_reference`),
# each against the OpenAI,
# Anthropic and Gemini routes of the conformance mock. The mock answers the first turn with a call to the
# first tool offered; a turn counts when the CLI ran the tool, sent its result back through Relay and printed
# the mock's `TOOL_RESULT:` answer. CLIs are installed from npm into .cache/clis. The google-genai Python
# SDK (Gemini's native API inbound: streamed and whole generation, countTokens, automatic function
# calling, model listing) runs on the same three routes, from a pinned PyPI install in .cache/genai-venv,
# and so does the official openai Python SDK (the suite's) on conversations, file uploads and batches.
set -euo pipefail
source "$(dirname "$0")/relay-for-mock.sh"
SUITE="${SUITE:-$ROOT/../shared/conformance}"
CLIS="$ROOT/.cache/clis"
if [ ! -x "$CLIS/node_modules/.bin/claude" ] || [ ! -x "$CLIS/node_modules/.bin/codex" ] || [ ! -d "$CLIS/node_modules/@ai-sdk/openai" ]; then
  mkdir -p "$CLIS"
  (cd "$CLIS" && { [ -f package.json ] || npm init -y >/dev/null; } && npm install --no-audit --no-fund @anthropic-ai/claude-code@2.1.197 @openai/codex@0.169.0 \
    ai@7.0.173 @ai-sdk/openai@4.0.118 zod@4.6.7 >/dev/null)
  (cd "$CLIS/node_modules/@anthropic-ai/claude-code" && node install.cjs >/dev/null)
fi
GENAI="$ROOT/.cache/genai-venv"
if ! "$GENAI/bin/python" -c "import google.genai" 2>/dev/null; then
  python3 -m venv "$GENAI" && "$GENAI/bin/pip" install -q google-genai==3.6.1
fi
# ESM resolves packages next to the script: run it from the install.
cp "$ROOT/scripts/vercel-ai.mjs" "$CLIS/vercel-ai.mjs"
(cd "$SUITE" && [ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt; })
"$SUITE/.venv/bin/python" "$SUITE/mock_upstream.py" --host 127.0.0.1 --port "$MOCK_PORT" >/dev/null 2>&1 &
MOCK_PID=$!
relay_on_exit() { kill $MOCK_PID 2>/dev/null || true; }
relay_start

WORK="$(mktemp -d /tmp/relay-clis.XXXXXX)"
mkdir -p "$WORK/codex-home"
cat >"$WORK/codex-home/config.toml" <<TOML
model_provider = "relay"
[model_providers.relay]
name = "Relay"
base_url = "$RELAY_URL/v1"
env_key = "RELAY_KEY"
wire_api = "responses"
TOML
export RELAY_KEY ANTHROPIC_BASE_URL="$RELAY_URL" ANTHROPIC_API_KEY="$RELAY_KEY" CODEX_HOME="$WORK/codex-home"
export DISABLE_TELEMETRY=1 DISABLE_AUTOUPDATER=1 CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1
cd "$WORK"
failed=0
for route in openai anthropic gemini; do
  for cli in claude codex vercel-ai google-genai openai-surface; do
    case $cli in
      openai-surface) out=$(timeout 180 "$SUITE/.venv/bin/python" "$ROOT/scripts/openai-surface.py" "$RELAY_URL" "$RELAY_KEY" "relay-$route" 2>&1 || true) ;;
      google-genai) out=$(timeout 180 "$GENAI/bin/python" "$ROOT/scripts/google-genai.py" "$RELAY_URL" "$RELAY_KEY" "relay-$route" 2>&1 || true) ;;
      claude) out=$(timeout 180 "$CLIS/node_modules/.bin/claude" -p "hello via relay" --model "relay-$route" 2>&1 || true) ;;
      codex) out=$(timeout 180 "$CLIS/node_modules/.bin/codex" exec --skip-git-repo-check -m "relay-$route" "hello via relay" </dev/null 2>&1 || true) ;;
      vercel-ai) out=$(timeout 180 node "$CLIS/vercel-ai.mjs" "$RELAY_URL" "$RELAY_KEY" "relay-$route" 2>&1 || true) ;;
    esac
    ok=0
    grep -q "TOOL_RESULT:" <<<"$out" && ok=1
    # The openai SDK on conversations, files and batches: every check passed.
    if [ $cli = openai-surface ]; then ok=0; grep -q "^SURFACE_OK" <<<"$out" && ok=1; fi
    # Every google-genai check prints `ok:`; the first failure stops it.
    if [ $cli = google-genai ] && grep -q "^FAILED" <<<"$out"; then ok=0; fi
    # The SDK's headline case: the stored tool call came back as a reference, and Relay resolved it.
    if [ $cli = vercel-ai ] && ! grep -q "item_reference sent: true" <<<"$out"; then ok=0; fi
    if [ $ok = 1 ]; then
      echo "real-clients: $cli via relay-$route: passed"
    else
      echo "real-clients: $cli via relay-$route: FAILED"; tail -20 <<<"$out"; failed=1
    fi
  done
done
exit $failed
