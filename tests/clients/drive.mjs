// One call through a Node client, as its README set-up line writes it; prints JSON.
//
//   node drive.mjs '{"client": "openai", "proxy": "http://127.0.0.1:8787", "key": "mp-...",
//                    "stream": true, "prompt": "...", "headers": {"X-Meter-Customer": "acme"}}'
//
// Output: {"text", "input_tokens", "output_tokens"} or {"error": {"name", "status", "message"}}.
// Clients keep their default retry settings: what they do on a refusal is part of the test.

import Anthropic from "@anthropic-ai/sdk";
import { createAnthropic } from "@ai-sdk/anthropic";
import { createGoogleGenerativeAI } from "@ai-sdk/google";
import { createOpenAI } from "@ai-sdk/openai";
import { GoogleGenAI } from "@google/genai";
import { generateText, streamText } from "ai";
import OpenAI from "openai";

const MODELS = { openai: "gpt-4o-mini", anthropic: "claude-haiku-4-5", gemini: "gemini-2.5-flash" };

async function openaiSdk({ proxy, key, stream, prompt, headers }) {
  const client = new OpenAI({ baseURL: `${proxy}/openai/v1`, apiKey: key, defaultHeaders: headers });
  const request = { model: MODELS.openai, messages: [{ role: "user", content: prompt }] };
  if (!stream) {
    const r = await client.chat.completions.create(request);
    return done(r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens);
  }
  const events = await client.chat.completions.create({
    ...request, stream: true, stream_options: { include_usage: true } });
  let text = "";
  let usage;
  for await (const chunk of events) {
    text += chunk.choices[0]?.delta?.content ?? "";
    usage = chunk.usage ?? usage;
  }
  return done(text, usage.prompt_tokens, usage.completion_tokens);
}

async function anthropicSdk({ proxy, key, stream, prompt, headers }) {
  const client = new Anthropic({ baseURL: `${proxy}/anthropic`, apiKey: key, defaultHeaders: headers });
  const request = { model: MODELS.anthropic, max_tokens: 256,
                    messages: [{ role: "user", content: prompt }] };
  const message = stream
    ? await client.messages.stream(request).finalMessage()
    : await client.messages.create(request);
  const text = message.content.filter((b) => b.type === "text").map((b) => b.text).join("");
  return done(text, message.usage.input_tokens, message.usage.output_tokens);
}

async function googleGenai({ proxy, key, stream, prompt, headers }) {
  const client = new GoogleGenAI({ apiKey: key, httpOptions: { baseUrl: `${proxy}/gemini`, headers } });
  const request = { model: MODELS.gemini, contents: prompt };
  if (!stream) {
    const r = await client.models.generateContent(request);
    return done(r.text, r.usageMetadata.promptTokenCount, r.usageMetadata.candidatesTokenCount);
  }
  let text = "";
  let usage;
  for await (const chunk of await client.models.generateContentStream(request)) {
    text += chunk.text ?? "";
    usage = chunk.usageMetadata ?? usage;
  }
  return done(text, usage.promptTokenCount, usage.candidatesTokenCount);
}

// The Vercel AI SDK: one function, three providers.
const AI_SDK = {
  "ai-sdk-openai": ({ proxy, key }) => createOpenAI({ baseURL: `${proxy}/openai/v1`, apiKey: key })(MODELS.openai),
  "ai-sdk-anthropic": ({ proxy, key }) =>
    createAnthropic({ baseURL: `${proxy}/anthropic/v1`, apiKey: key })(MODELS.anthropic),
  "ai-sdk-google": ({ proxy, key }) =>
    createGoogleGenerativeAI({ baseURL: `${proxy}/gemini/v1beta`, apiKey: key })(MODELS.gemini),
};

async function aiSdk(args) {
  const options = { model: AI_SDK[args.client](args), prompt: args.prompt, headers: args.headers,
                    maxOutputTokens: 256 };
  if (!args.stream) {
    const r = await generateText(options);
    return done(r.text, r.usage.inputTokens, r.usage.outputTokens);
  }
  let failure;
  const r = streamText({ ...options, onError: ({ error }) => { failure = error; } });
  let text = "";
  for await (const piece of r.textStream) text += piece;
  if (failure) throw failure;
  const usage = await r.usage;
  return done(text, usage.inputTokens, usage.outputTokens);
}

function done(text, input, output) {
  return { text, input_tokens: input, output_tokens: output };
}

const CLIENTS = { openai: openaiSdk, anthropic: anthropicSdk, "google-genai": googleGenai,
                  "ai-sdk-openai": aiSdk, "ai-sdk-anthropic": aiSdk, "ai-sdk-google": aiSdk };

const args = JSON.parse(process.argv[2]);
let result;
try {
  result = await CLIENTS[args.client](args);
} catch (error) {
  // The AI SDK wraps the last of its attempts in a RetryError.
  const last = error?.lastError ?? error;
  result = { error: { name: error?.constructor?.name ?? "Error", status: last?.status ?? last?.statusCode ?? null,
                      message: String(last?.message ?? error) } };
}
process.stdout.write(JSON.stringify(result));
