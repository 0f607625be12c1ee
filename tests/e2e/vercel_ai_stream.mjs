// The Vercel AI SDK's default OpenAI provider (`openai(model)`, the Responses API) streaming
// `streamText` through trioproxy. Usage: node vercel_ai_stream.mjs NODE_DIR BASE_URL MODEL PROMPT
// Prints one JSON line per text delta as it arrives, then {"text", "finishReason"}.
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const [nodeDir, baseURL, model, prompt] = process.argv.slice(2);
const require = createRequire(nodeDir + "/");
const { streamText } = await import(pathToFileURL(require.resolve("ai")).href);
const { createOpenAI } = await import(pathToFileURL(require.resolve("@ai-sdk/openai")).href);

const openai = createOpenAI({ baseURL, apiKey: "client-key" });
const result = streamText({ model: openai(model), prompt });
for await (const delta of result.textStream) {
  console.log(JSON.stringify({ delta }));
}
console.log(JSON.stringify({ text: await result.text, finishReason: await result.finishReason }));
