// The OpenAI-compatible API as real clients use it: the official `openai` SDK and the Vercel AI SDK
// (`ai` with `@ai-sdk/openai-compatible`) against a real cluster (coordinator, two shards, a router).
// Chat, streamed chat with usage, n, logprobs, echo, token-id prompts, unknown and unsupported fields,
// seeds, /tokenize and /detokenize, --skip-tokenizer; and the prompt log-likelihood of echo + logprobs
// against the log-softmax of the Open Inference logits.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { generateText, streamText } from 'ai';
import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { assignmentSpec, spreadExperts } from '../services/core/placement.js';
import { startCluster, type TestCluster } from './support/cluster.js';
import { runCli } from './support/cli.js';
import { generate } from '../services/router/scheduler.js';

await initBackend();
// A context long enough for chat prompts in the default ChatML template.
const tiny = { ...preset('tiny').model, max_position_embeddings: 256 };
const MODEL = 'tiny-moe';
let root: string;
let cluster: TestCluster;
let base: string;
let client: OpenAI;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-openai-'));
  const checkpoint = join(root, MODEL);
  const model = MixtralModel.initialize(tiny, 17);
  await saveModel(checkpoint, model);
  model.dispose();
  const shards = spreadExperts(tiny.num_hidden_layers, tiny.num_local_experts, 2).map(assignmentSpec);
  cluster = await startCluster(checkpoint, shards, [[]]);
  base = cluster.routers[0].base;
  client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0 });
});

after(async () => {
  await cluster?.stop();
  await rm(root, { recursive: true, force: true });
});

async function post(url: string, body: unknown): Promise<{ status: number; json: any }> {
  const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  return { status: res.status, json: await res.json() };
}

test('openai SDK: chat completion with n, seed and logprobs', { timeout: 120_000 }, async () => {
  const res = await client.chat.completions.create({
    model: MODEL, messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: [{ type: 'text', text: 'Hello' }] }],
    n: 2, seed: 7, max_tokens: 6, temperature: 1, logprobs: true, top_logprobs: 3,
  });
  assert.equal(res.object, 'chat.completion');
  assert.equal(res.choices.length, 2);
  assert.deepEqual(res.choices.map((c) => c.index), [0, 1]);
  let generated = 0;
  for (const c of res.choices) {
    assert.equal(c.message.role, 'assistant');
    assert.equal(typeof c.message.content, 'string');
    assert.ok(c.finish_reason === 'length' || c.finish_reason === 'stop');
    const content = c.logprobs!.content!;
    generated += content.length;
    for (const entry of content) {
      assert.ok(entry.logprob <= 0);
      assert.equal(entry.top_logprobs.length, 3);
      // The most likely alternatives, best first; the chosen token is no likelier than the best one.
      for (let i = 1; i < 3; i++) assert.ok(entry.top_logprobs[i - 1].logprob >= entry.top_logprobs[i].logprob);
      assert.ok(entry.logprob <= entry.top_logprobs[0].logprob + 1e-6);
      assert.ok(Array.isArray(entry.bytes));
    }
  }
  assert.equal(res.usage!.completion_tokens, generated);
  // The same seed gives the same choices again; choice j uses seed + j, so the two differ.
  const again = await client.chat.completions.create({
    model: MODEL, messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hello' }], n: 2, seed: 7, max_tokens: 6, temperature: 1,
  });
  assert.deepEqual(again.choices.map((c) => c.message.content), res.choices.map((c) => c.message.content));
  // /tokenize with the same messages counts the prompt the completion reported.
  const tokenized = await post(`${base}/tokenize`, { model: MODEL, messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hello' }] });
  assert.equal(tokenized.status, 200);
  assert.equal(tokenized.json.count, res.usage!.prompt_tokens);
});

test('openai SDK: streamed chat with include_usage adds up to the non-streamed answer', { timeout: 120_000 }, async () => {
  const request = { model: MODEL, messages: [{ role: 'user' as const, content: 'Tell me a story' }], seed: 3, max_tokens: 12, temperature: 0.8 };
  const whole = await client.chat.completions.create(request);
  const stream = await client.chat.completions.create({ ...request, stream: true, stream_options: { include_usage: true } });
  let text = '';
  let role: string | undefined;
  let finish: string | null = null;
  let usage: OpenAI.CompletionUsage | null | undefined;
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) {
      assert.equal(chunk.choices.length, 0, 'the usage chunk has no choices');
      usage = chunk.usage;
      continue;
    }
    const c = chunk.choices[0];
    role ??= c.delta.role;
    text += c.delta.content ?? '';
    finish = c.finish_reason ?? finish;
  }
  assert.equal(role, 'assistant');
  assert.equal(text, whole.choices[0].message.content);
  assert.equal(finish, whole.choices[0].finish_reason);
  // Equal counts (the second request may find its prompt in the prefix cache).
  assert.deepEqual([usage?.prompt_tokens, usage?.completion_tokens, usage?.total_tokens], [whole.usage!.prompt_tokens, whole.usage!.completion_tokens, whole.usage!.total_tokens]);
});

test('openai SDK: completions take text, texts, token ids and token-id lists, with n choices each in order', { timeout: 120_000 }, async () => {
  const ids = Array.from(Buffer.from('The cat'));
  const byText = await client.completions.create({ model: MODEL, prompt: 'The cat', max_tokens: 5, temperature: 0, return_token_ids: true } as OpenAI.CompletionCreateParamsNonStreaming);
  const byIds = await client.completions.create({ model: MODEL, prompt: ids, max_tokens: 5, temperature: 0 });
  // The byte vocabulary adds no BOS: the same ids, the same greedy text.
  assert.equal(byIds.choices[0].text, byText.choices[0].text);
  assert.deepEqual((byText.choices[0] as unknown as { prompt_token_ids: number[] }).prompt_token_ids, ids);
  const many = await client.completions.create({ model: MODEL, prompt: [ids, Array.from(Buffer.from('A dog'))], n: 2, max_tokens: 4, temperature: 0 });
  assert.equal(many.choices.length, 4);
  assert.deepEqual(many.choices.map((c) => c.index), [0, 1, 2, 3]);
  assert.equal(many.choices[0].text, many.choices[1].text, 'greedy: both choices of a prompt agree');
  assert.equal(many.usage!.prompt_tokens, ids.length + 5);
  const texts = await client.completions.create({ model: MODEL, prompt: ['The cat', 'A dog'], max_tokens: 4, temperature: 0 });
  assert.equal(texts.choices[0].text, many.choices[0].text);
  assert.equal(texts.choices[1].text, many.choices[2].text);
  // Echo puts the prompt in front.
  const echoed = await client.completions.create({ model: MODEL, prompt: 'The cat', max_tokens: 5, temperature: 0, echo: true });
  assert.equal(echoed.choices[0].text, `The cat${byText.choices[0].text}`);
  // Streamed completions add up to the same text.
  let streamed = '';
  for await (const chunk of await client.completions.create({ model: MODEL, prompt: 'The cat', max_tokens: 5, temperature: 0, stream: true })) streamed += chunk.choices[0]?.text ?? '';
  assert.equal(streamed, byText.choices[0].text);
});

test('openai SDK: completion logprobs as OpenAI returns them (tokens, token_logprobs, top_logprobs with the chosen one, text_offset)', { timeout: 120_000 }, async () => {
  const res = await client.completions.create({ model: MODEL, prompt: 'Hi', max_tokens: 4, temperature: 1, seed: 5, logprobs: 2, echo: true });
  const lp = res.choices[0].logprobs!;
  assert.equal(lp.tokens!.length, 2 + res.usage!.completion_tokens);
  assert.equal(lp.token_logprobs![0], null, 'nothing predicts the first prompt token');
  assert.equal(lp.top_logprobs![0], null);
  for (let i = 1; i < lp.tokens!.length; i++) {
    const top = lp.top_logprobs![i]!;
    assert.ok(Object.keys(top).length >= 2 && Object.keys(top).length <= 3, JSON.stringify(top));
    assert.equal(top[lp.tokens![i]], lp.token_logprobs![i], 'the chosen token is among top_logprobs');
  }
  assert.deepEqual(lp.text_offset, lp.tokens!.map((_, i) => lp.tokens!.slice(0, i).join('').length));
});

test('echo + logprobs with max_tokens 0: the prompt log-likelihood equals the log-softmax of the Open Inference logits', { timeout: 120_000 }, async () => {
  const ids = Array.from(Buffer.from('Mixture of experts, one service each.'));
  const res = await post(`${base}/v1/completions`, { model: MODEL, prompt: ids, max_tokens: 0, echo: true, logprobs: 1 });
  assert.equal(res.status, 200, JSON.stringify(res.json));
  const choice = res.json.choices[0];
  assert.equal(choice.finish_reason, 'length');
  assert.equal(res.json.usage.completion_tokens, 0);
  const served: Array<number | null> = choice.logprobs.token_logprobs;
  assert.equal(served.length, ids.length);
  const infer = await post(`${base}/v2/models/${MODEL}/infer`, { inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [1, ids.length], data: ids }] });
  assert.equal(infer.status, 200, JSON.stringify(infer.json));
  const logits: number[] = infer.json.outputs[0].data;
  const V = tiny.vocab_size;
  let worst = 0;
  for (let t = 1; t < ids.length; t++) {
    const row = logits.slice((t - 1) * V, t * V);
    const max = Math.max(...row);
    const lse = max + Math.log(row.reduce((s, x) => s + Math.exp(x - max), 0));
    worst = Math.max(worst, Math.abs(served[t]! - (row[ids[t]] - lse)));
  }
  assert.ok(worst < 1e-4, `largest difference ${worst}`);
});

test('unknown fields answer 400 naming them; unsupported ones too, unless they ask for nothing', { timeout: 60_000 }, async () => {
  await assert.rejects(
    client.completions.create({ model: MODEL, prompt: 'x', max_tokens: 1, frobnicate: 1 } as OpenAI.CompletionCreateParamsNonStreaming),
    (err: unknown) => err instanceof OpenAI.BadRequestError && /unknown field 'frobnicate'/.test(err.message),
  );
  await assert.rejects(
    client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'x' }], tools: [{ type: 'function', function: { name: 'f', parameters: {} } }] }),
    (err: unknown) => err instanceof OpenAI.BadRequestError && /'tools' is not supported/.test(err.message),
  );
  await assert.rejects(
    client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'x' }], response_format: { type: 'json_object' } }),
    (err: unknown) => err instanceof OpenAI.BadRequestError && /'response_format' is not supported/.test(err.message),
  );
  await assert.rejects(
    client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'http://127.0.0.1/x.png' } }] }] }),
    (err: unknown) => err instanceof OpenAI.BadRequestError && /image_url/.test(err.message),
  );
  const nested = await post(`${base}/v1/completions`, { prompt: 'x', stream: true, stream_options: { include_usage: true, frob: 1 } });
  assert.equal(nested.status, 400);
  assert.match(nested.json.error.message, /unknown field 'stream_options.frob'/);
  // The "off" values of unsupported fields and nulls are accepted.
  const ok = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'x' }], max_tokens: 1, tool_choice: 'none', response_format: { type: 'text' }, stop: null, user: 'u1' });
  assert.equal(ok.choices.length, 1);
});

test('without a seed two identical requests differ; with one they repeat', { timeout: 60_000 }, async () => {
  const body = { model: MODEL, prompt: 'Once', max_tokens: 16, temperature: 1 };
  const [a, b] = await Promise.all([client.completions.create(body), client.completions.create(body)]);
  assert.notEqual(a.choices[0].text, b.choices[0].text);
  const [c, d] = await Promise.all([client.completions.create({ ...body, seed: 11 }), client.completions.create({ ...body, seed: 11 })]);
  assert.equal(c.choices[0].text, d.choices[0].text);
});

test('Vercel AI SDK (openai-compatible): generateText and streamText with usage', { timeout: 120_000 }, async () => {
  const provider = createOpenAICompatible({ name: 'switchyard', baseURL: `${base}/v1`, includeUsage: true });
  const model = provider.chatModel(MODEL);
  const one = await generateText({ model, prompt: 'Hello there', maxOutputTokens: 8, temperature: 0.7, seed: 9 });
  assert.equal(typeof one.text, 'string');
  assert.ok(one.usage.outputTokens! > 0 && one.usage.outputTokens! <= 8, JSON.stringify(one.usage));
  assert.ok(one.usage.inputTokens! > 0);
  const streamed = streamText({ model, prompt: 'Hello there', maxOutputTokens: 8, temperature: 0.7, seed: 9 });
  let text = '';
  for await (const piece of streamed.textStream) text += piece;
  assert.equal(text, one.text);
  assert.deepEqual([(await streamed.usage).inputTokens, (await streamed.usage).outputTokens], [one.usage.inputTokens, one.usage.outputTokens]);
  // The completions model of the same provider (it writes the prompt as a "user:/assistant:" exchange).
  const completion = await generateText({ model: provider.completionModel(MODEL), prompt: 'The cat', maxOutputTokens: 5, temperature: 0 });
  const direct = await client.completions.create({ model: MODEL, prompt: 'user:\nThe cat\n\nassistant:\n', stop: ['\nuser:'], max_tokens: 5, temperature: 0 });
  assert.equal(completion.text, direct.choices[0].text);
});

test('/tokenize and /detokenize round-trip a text', { timeout: 60_000 }, async () => {
  const tokenized = await post(`${base}/tokenize`, { prompt: 'héllo', return_token_strs: true });
  assert.equal(tokenized.status, 200);
  assert.deepEqual(tokenized.json.tokens, Array.from(Buffer.from('héllo')));
  assert.equal(tokenized.json.count, 6);
  assert.equal(tokenized.json.max_model_len, tiny.max_position_embeddings);
  assert.equal(tokenized.json.token_strs[0], 'h');
  const back = await post(`${base}/detokenize`, { tokens: tokenized.json.tokens });
  assert.deepEqual(back, { status: 200, json: { prompt: 'héllo' } });
  const bad = await post(`${base}/detokenize`, { tokens: [1, 9999] });
  assert.equal(bad.status, 400);
  assert.match(bad.json.error.message, /tokens\[1\] = 9999/);
});

test('--skip-tokenizer: a checkpoint without a tokenizer serves token-id prompts with their ids; text endpoints answer 400 saying why', { timeout: 180_000 }, async () => {
  // A vocabulary of 300 ids and no tokenizer.json: not the byte vocabulary, so a router needs the flag.
  const config = { ...tiny, vocab_size: 300 };
  const checkpoint = join(root, 'no-tokenizer');
  const model = MixtralModel.initialize(config, 23);
  await saveModel(checkpoint, model);
  const ids = [5, 280, 17, 299, 42];
  const expected = await generate(model, Int32Array.from(ids), { maxTokens: 5, temperature: 0, topP: 1, seed: 0, stopIds: [config.eos_token_id!] });
  model.dispose();
  const shards = spreadExperts(config.num_hidden_layers, config.num_local_experts, 2).map(assignmentSpec);
  const refused = await runCli(['serve', 'router', '--checkpoint', checkpoint, '--port', '0', '--coordinator', '127.0.0.1:1']);
  assert.equal(refused.code, 2);
  assert.match(refused.stderr, /has no tokenizer\.json/);
  const bareCluster = await startCluster(checkpoint, shards, [['--skip-tokenizer']]);
  try {
    const bare = bareCluster.routers[0].base;
    const res = await post(`${bare}/v1/completions`, { prompt: ids, max_tokens: 5, temperature: 0, logprobs: 1 });
    assert.equal(res.status, 200, JSON.stringify(res.json));
    const choice = res.json.choices[0];
    assert.deepEqual(choice.token_ids, expected.ids);
    assert.deepEqual(choice.prompt_token_ids, ids);
    assert.equal(choice.text, '');
    assert.deepEqual(choice.logprobs.tokens, expected.ids.map((id) => `token_id:${id}`));
    // Streamed, every id is its own chunk with its token_ids.
    const streamed = await fetch(`${bare}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: ids, max_tokens: 5, temperature: 0, stream: true }) });
    const events = (await streamed.text()).split('\n\n').filter((e) => e.startsWith('data: {'));
    assert.deepEqual(events.flatMap((e) => JSON.parse(e.slice(6)).choices[0]?.token_ids ?? []), expected.ids);
    for (const [path, body] of [
      ['/v1/completions', { prompt: 'The cat' }],
      ['/v1/completions', { prompt: ids, stop: ['x'] }],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }] }],
      ['/tokenize', { prompt: 'x' }],
      ['/detokenize', { tokens: [1] }],
      ['/v2/models/no-tokenizer/generate', { text_input: 'x' }],
    ] as const) {
      const answer = await post(`${bare}${path}`, body);
      assert.equal(answer.status, 400, path);
      const message = typeof answer.json.error === 'string' ? answer.json.error : answer.json.error.message;
      assert.match(message, /skip-tokenizer|tokenizer/, path);
    }
    // Open Inference infer needs no tokenizer.
    const infer = await post(`${bare}/v2/models/no-tokenizer/infer`, { inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [1, ids.length], data: ids }] });
    assert.equal(infer.status, 200);
  } finally {
    await bareCluster.stop();
  }
});
