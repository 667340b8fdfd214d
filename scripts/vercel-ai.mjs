// The Vercel AI SDK in its default configuration (Responses API, `store` on) through Relay: a two-step tool
// loop, then a follow-up turn on the same conversation. The SDK sends the earlier assistant message back
// as an `item_reference` (it assumes the server kept it), which only works when the relay keeps Responses
// state. Prints what it sent and the answers.
//   node vercel-ai.mjs <relay url> <key> <model>
import { generateText, stepCountIs, tool } from 'ai';
import { createOpenAI } from '@ai-sdk/openai';
import { z } from 'zod';

const [base, apiKey, model] = process.argv.slice(2);
const sent = [];
const openai = createOpenAI({
  baseURL: `${base}/v1`,
  apiKey,
  fetch: async (url, init) => {
    sent.push(String(init?.body ?? ''));
    return fetch(url, init);
  },
});
const prompt = { role: 'user', content: 'hello via relay' };
const first = await generateText({
  model: openai.responses(model),
  messages: [prompt],
  tools: {
    get_weather: tool({
      description: 'The weather of a city',
      inputSchema: z.object({ city: z.string().optional() }),
      execute: async () => 'sunny and 21C',
    }),
  },
  stopWhen: stepCountIs(3),
});
console.log(`tool loop: ${first.steps.length} steps, text: ${first.text}`);
const followUp = await generateText({
  model: openai.responses(model),
  messages: [prompt, ...first.response.messages, { role: 'user', content: 'thanks, and tomorrow?' }],
});
console.log(`follow-up text: ${followUp.text}`);
console.log(`item_reference sent: ${sent.some((b) => b.includes('"item_reference"'))}`);
