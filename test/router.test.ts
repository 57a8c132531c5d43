import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'node:http';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { decodeIds, encodeText } from '../services/core/data/bytes.js';
import { generate } from '../services/router/scheduler.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { assignmentSpec, spreadExperts } from '../services/core/placement.js';
import { startService, type RunningService } from './support/services.js';
import { metricValue } from './support/cluster.js';
import { until } from './support/until.js';
import { RouterEngine } from '../services/router/engine.js';
import { CoordinatorLink } from '../services/core/wire/coordinator-link.js';

await initBackend();
const tiny = preset('tiny');
let root: string;
let reference: MixtralModel;
let base: string;
let coordinatorAddress: string;
let checkpointDir: string;
let coordinatorMetrics: string;
const services: RunningService[] = [];

async function start(args: string[], ready: RegExp): Promise<RunningService> {
  const s = await startService(args, ready, { SWITCHYARD_LOG: 'debug' });
  services.push(s);
  return s;
}

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-router-'));
  const checkpoint = join(root, 'tiny-moe');
  reference = MixtralModel.initialize(tiny.model, 21);
  await saveModel(checkpoint, reference);
  const coordinator = await start(['serve', 'coordinator', '--port', '0', '--lease-ttl-ms', '2000'], /listening on (\S+) \(metrics (\S+)\)/);
  const address = coordinator.ready[1];
  coordinatorMetrics = coordinator.ready[2];
  coordinatorAddress = address;
  checkpointDir = checkpoint;
  for (const [i, keys] of spreadExperts(tiny.model.num_hidden_layers, tiny.model.num_local_experts, 2).entries())
    await start(['serve', 'expert', '--checkpoint', checkpoint, '--experts', assignmentSpec(keys), '--port', '0', '--coordinator', address, '--shard-id', `shard-${i}`], /listening on/);
  const router = await start(['serve', 'router', '--checkpoint', checkpoint, '--port', '0', '--coordinator', address], /listening on (\S+)/);
  base = `http://${router.ready[1]}`;
  for (let i = 0; i < 200; i++) {
    if ((await fetch(`${base}/v2/health/ready`)).status === 200) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error('router never became ready');
});

after(async () => {
  await Promise.all(services.map((s) => s.stop()));
  reference?.dispose();
  await rm(root, { recursive: true, force: true });
});

function postIgnoringEarlyClose(path: string, body: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    let answered = false;
    const req = request(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
      answered = true;
      let text = '';
      res.on('data', (chunk: Buffer) => { text += chunk.toString(); });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
    });
    req.on('error', (err) => { if (!answered) reject(err); });
    req.end(body);
  });
}

const post = (path: string, body: unknown, headers: Record<string, string> = {}) =>
  fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: typeof body === 'string' ? body : JSON.stringify(body) });

test('Open Inference infer over two shards returns the single-process logits', async () => {
  const ids = Array.from({ length: 2 * 9 }, (_, i) => (i * 37 + 11) % 256);
  const res = await post('/v2/models/tiny-moe/infer', { id: 'r1', inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [2, 9], data: ids }] }, { 'x-request-id': 'abc-123' });
  assert.equal(res.status, 200);
  assert.equal(res.headers.get('x-request-id'), 'abc-123');
  // The request id travels with the rows to the shards and into their logs.
  assert.ok(services.some((svc) => svc.stderr().includes('"request_ids":["abc-123"]')), 'a shard logged the request id');
  const body = (await res.json()) as { id: string; outputs: Array<{ name: string; shape: number[]; data: number[] }> };
  assert.equal(body.id, 'r1');
  assert.deepEqual(body.outputs[0].shape, [2, 9, tiny.model.vocab_size]);
  const want = await reference.logits(Int32Array.from(ids), 2, 9);
  let maxDiff = 0;
  for (let i = 0; i < want.length; i++) maxDiff = Math.max(maxDiff, Math.abs(want[i] - body.outputs[0].data[i]));
  assert.ok(maxDiff <= 1e-5, `max |Δlogit| = ${maxDiff}`);
});

test('the binary tensor extension and routing decisions per layer', async () => {
  const ids = Array.from({ length: 2 * 5 }, (_, i) => (i * 13 + 7) % 256);
  const header = Buffer.from(JSON.stringify({
    inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [2, 5], parameters: { binary_data_size: ids.length * 8 } }],
    outputs: [{ name: 'logits', parameters: { binary_data: true } }, { name: 'routing_experts' }, { name: 'routing_weights', parameters: { binary_data: true } }],
  }));
  const data = Buffer.alloc(ids.length * 8);
  ids.forEach((id, i) => data.writeBigInt64LE(BigInt(id), i * 8));
  const res = await fetch(`${base}/v2/models/tiny-moe/infer`, {
    method: 'POST', headers: { 'content-type': 'application/octet-stream', 'inference-header-content-length': String(header.length) },
    body: Buffer.concat([header, data]),
  });
  assert.equal(res.status, 200);
  const bytes = Buffer.from(await res.arrayBuffer());
  const headLength = Number(res.headers.get('inference-header-content-length'));
  const head = JSON.parse(bytes.subarray(0, headLength).toString()) as { outputs: Array<{ name: string; shape: number[]; data?: number[]; parameters?: { binary_data_size: number } }> };
  const [logitsOut, expertsOut, weightsOut] = head.outputs;
  const V = tiny.model.vocab_size;
  const k = tiny.model.num_experts_per_tok;
  const layers = tiny.model.num_hidden_layers;
  assert.deepEqual(logitsOut.shape, [2, 5, V]);
  const logits = new Float32Array(bytes.buffer.slice(bytes.byteOffset + headLength, bytes.byteOffset + headLength + logitsOut.parameters!.binary_data_size));
  const want = await reference.logits(Int32Array.from(ids), 2, 5);
  let maxDiff = 0;
  for (let i = 0; i < want.length; i++) maxDiff = Math.max(maxDiff, Math.abs(want[i] - logits[i]));
  assert.ok(maxDiff <= 1e-5, `binary logits: max |Δ| = ${maxDiff}`);
  assert.deepEqual(expertsOut.shape, [layers, 2, 5, k]);
  assert.ok(expertsOut.data!.every((e) => e >= 0 && e < tiny.model.num_local_experts));
  const start = headLength + logitsOut.parameters!.binary_data_size;
  const weights = new Float32Array(bytes.buffer.slice(bytes.byteOffset + start, bytes.byteOffset + start + weightsOut.parameters!.binary_data_size));
  assert.equal(weights.length, layers * 10 * k);
  for (let t = 0; t < layers * 10; t++) assert.ok(Math.abs(weights[t * k] + weights[t * k + 1] - 1) < 1e-5, 'mixtral weights sum to 1');
  const broken = await fetch(`${base}/v2/models/tiny-moe/infer`, {
    method: 'POST', headers: { 'content-type': 'application/octet-stream', 'inference-header-content-length': String(header.length + 999) }, body: Buffer.concat([header, data]),
  });
  assert.equal(broken.status, 400);
  assert.match(((await broken.json()) as { error: string }).error, /inference-header-content-length/);
});

test('greedy completions equal single-process generation, streamed or not', async () => {
  const prompt = 'Call me';
  const local = await generate(reference, encodeText(prompt), { maxTokens: 12, temperature: 0, topP: 1, seed: 0 });
  const expected = decodeIds(local.ids);
  const res = await post('/v1/completions', { model: 'tiny-moe', prompt, max_tokens: 12, temperature: 0 });
  assert.equal(res.status, 200);
  const body = (await res.json()) as { choices: Array<{ text: string; finish_reason: string }>; usage: { completion_tokens: number } };
  assert.equal(body.choices[0].text, expected);
  const streamed = await post('/v1/completions', { prompt, max_tokens: 12, temperature: 0, stream: true });
  assert.equal(streamed.headers.get('content-type'), 'text/event-stream');
  const events = (await streamed.text()).split('\n\n').filter(Boolean);
  assert.equal(events.at(-1), 'data: [DONE]');
  const text = events.slice(0, -1).map((e) => (JSON.parse(e.slice('data: '.length)) as { choices: Array<{ text: string }> }).choices[0].text).join('');
  assert.equal(text, expected);
  // A stop sequence ends the text before it, streamed or not.
  const stop = expected.slice(3, 5);
  const cut = expected.slice(0, expected.indexOf(stop));
  const stopped = (await (await post('/v1/completions', { prompt, max_tokens: 12, temperature: 0, stop })).json()) as { choices: Array<{ text: string; finish_reason: string }> };
  assert.deepEqual([stopped.choices[0].text, stopped.choices[0].finish_reason], [cut, 'stop']);
  const streamedStop = (await (await post('/v1/completions', { prompt, max_tokens: 12, temperature: 0, stop, stream: true })).text()).split('\n\n').filter((e) => e && e !== 'data: [DONE]');
  assert.equal(streamedStop.map((e) => (JSON.parse(e.slice(6)) as { choices: Array<{ text: string }> }).choices[0].text).join(''), cut);
  const models = (await (await fetch(`${base}/v1/models`)).json()) as { data: Array<{ id: string }> };
  assert.deepEqual(models.data.map((m) => m.id), ['tiny-moe']);
});

test('through the cluster: a prompt sharing full blocks with an earlier one hits the prefix cache (metrics) and gives the in-process text; sampling controls apply', async () => {
  const metric = (series: string) => metricValue(`${base}/metrics`, series);
  const hitsBefore = (await metric('switchyard_router_prefix_cache_tokens_total{result="hit"}')) ?? 0;
  const shared = 'It is a way I have of driving off the spleen';
  const greedy = { max_tokens: 6, temperature: 0 };
  assert.equal((await post('/v1/completions', { prompt: shared, ...greedy })).status, 200);
  const prompt = `${shared}, and regulating`;
  const body = (await (await post('/v1/completions', { prompt, ...greedy })).json()) as { choices: Array<{ text: string }>; usage: { prompt_tokens_details: { cached_tokens: number } } };
  assert.equal(body.usage.prompt_tokens_details.cached_tokens, 32, 'usage reports the prompt tokens served from the cache');
  const local = await generate(reference, encodeText(prompt), { maxTokens: 6, temperature: 0, topP: 1, seed: 0 });
  assert.equal(body.choices[0].text, decodeIds(local.ids));
  const hits = (await metric('switchyard_router_prefix_cache_tokens_total{result="hit"}'))! - hitsBefore;
  assert.ok(hits >= 32, `${hits} prompt tokens came from the prefix cache (the shared text fills two 16-token blocks)`);
  assert.equal(await metric('switchyard_router_kv_blocks{state="used"}'), 0, 'finished requests hold no blocks');
  assert.ok((await metric('switchyard_router_kv_blocks{state="cached"}'))! >= 2);
  // logit_bias forces a byte; without a seed two sampled answers differ.
  const forced = (await (await post('/v1/completions', { prompt: 'x', max_tokens: 4, temperature: 1, logit_bias: { 65: 100 } })).json()) as { choices: Array<{ text: string }> };
  assert.equal(forced.choices[0].text, 'AAAA');
  const sampled = await Promise.all([0, 1].map(async () => ((await (await post('/v1/completions', { prompt: 'x', max_tokens: 24, temperature: 1 })).json()) as { choices: Array<{ text: string }> }).choices[0].text));
  assert.notEqual(sampled[0], sampled[1]);
});

test('bad input gets a 4xx JSON error (Open Inference\'s object on /v2, OpenAI\'s on /v1) and the router keeps serving', async () => {
  const infer = (inputs: unknown) => post('/v2/models/tiny-moe/infer', { inputs });
  const cases: Array<[Promise<Response>, number, RegExp]> = [
    [post('/v1/completions', '{"prompt": "x",'), 400, /JSON/i],
    [infer([{ name: 'input_ids', datatype: 'FP32', shape: [1, 2], data: [1, 2] }]), 400, /datatype/],
    [infer([{ name: 'input_ids', datatype: 'INT64', shape: [1, 3], data: [1, 2] }]), 400, /2 values for shape \[1, 3\]/],
    [infer([{ name: 'input_ids', datatype: 'INT64', shape: [1, 2], data: [1, 999] }]), 400, /outside the vocabulary/],
    [post('/v2/models/nope/infer', { inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [1, 1], data: [1] }] }), 404, /not served here/],
    [post('/v1/completions', { prompt: '' }), 400, /prompt/],
    [post('/v1/completions', { prompt: 'x', max_tokens: 2 ** 21 }), 400, /max_tokens/],
    [post('/v1/completions', { prompt: 'x', model: 'other' }), 404, /not served here/],
  ];
  for (const [response, status, message] of cases) {
    const res = await response;
    assert.equal(res.status, status);
    const body = (await res.json()) as { error: string | { message: string } };
    // Open Inference paths answer {"error": "<message>"}, OpenAI paths {"error": {"message", "type"}}.
    const oip = new URL(res.url).pathname.startsWith('/v2/');
    assert.equal(typeof body.error, oip ? 'string' : 'object', res.url);
    assert.match(typeof body.error === 'string' ? body.error : body.error.message, message);
  }
  // An oversized body is refused as soon as its length is known; the server may close the connection
  // while the client is still sending, so read the answer with a client that tolerates that.
  const tooLarge = await postIgnoringEarlyClose('/v1/completions', JSON.stringify({ prompt: 'x'.repeat(9 * 1024 * 1024) }));
  assert.equal(tooLarge.status, 413);
  assert.match((JSON.parse(tooLarge.body) as { error: { message: string } }).error.message, /too large|limit/i);
  assert.equal((await fetch(`${base}/v2/health/live`)).status, 200);
  const ok = await post('/v1/completions', { prompt: 'x', max_tokens: 2, temperature: 0 });
  assert.equal(ok.status, 200, 'still serving');
});

test('16 concurrent completions share expert messages and each equals generating it alone', async () => {
  const engine = await RouterEngine.load(checkpointDir, 'tiny-moe');
  const link = new CoordinatorLink(coordinatorAddress, { memberId: 'batching-test', role: 'ROLE_ROUTER' });
  link.watch((table) => engine.setPlacement(table));
  try {
    for (let i = 0; i < 200 && !engine.ready(); i++) await new Promise((r) => setTimeout(r, 25));
    assert.ok(engine.ready());
    const prompts = Array.from({ length: 16 }, (_, i) => `prompt ${i}: ${'abcdefgh'.slice(0, 1 + (i % 8))}`);
    const sampling = (i: number) => ({ maxTokens: 6 + (i % 5), temperature: i % 2 ? 0.9 : 0, topP: 0.95, seed: 100 + i });
    const results = await Promise.all(prompts.map((p, i) => engine.complete(encodeText(p), sampling(i))));
    for (const [i, p] of prompts.entries()) {
      const alone = await generate(reference, encodeText(p), sampling(i));
      assert.deepEqual(results[i].ids, alone.ids, `request ${i}`);
      assert.equal(results[i].finishReason, alone.finishReason);
    }
    const { steps, maxSequencesPerStep } = engine.scheduler.stats;
    assert.equal(maxSequencesPerStep, 16, 'all requests ran in the same steps');
    const messages = [...engine.transport.messagesSent.values()].reduce((a, b) => a + b, 0);
    const layers = tiny.model.num_hidden_layers;
    const lanes = engine.model.microBatches;
    assert.ok(messages <= steps * layers * 2 * lanes, `${messages} messages for ${steps} steps: at most one per shard per layer per micro-batch (${lanes}) per step`);
    const tokens = results.reduce((n, r) => n + r.ids.length, 0);
    assert.ok(messages < tokens * layers, 'far fewer messages than one per request per token');
  } finally {
    link.close();
    engine.close();
  }
});

test('a shard that dies mid-service: answers go on, flagged degraded (drop policy), streamed or not', async () => {
  const shard = services.find((s) => s.child.spawnargs.includes('shard-1'))!;
  shard.child.kill('SIGKILL');
  await new Promise((r) => shard.child.once('exit', r));
  const res = await post('/v1/completions', { prompt: 'The sea', max_tokens: 20, temperature: 0, stream: true });
  assert.equal(res.status, 200);
  const events = (await res.text()).split('\n\n').filter(Boolean);
  assert.equal(events.at(-1), 'data: [DONE]');
  assert.ok(events.some((e) => /"degraded":\{"reasons":\[".*no live shard holds expert/.test(e)), 'a degraded event names the lost experts');
  // The router remembers the shard's experts after its lease ran out (the coordinator lists one shard), and keeps answering, degraded.
  await until('shard-1\'s lease to run out', async () => (
    (await metricValue(`${coordinatorMetrics}`, 'switchyard_coordinator_members{role="expert-shard"}')) === 1 ? true : undefined), 30_000, 100);
  const plain = await post('/v1/completions', { prompt: 'x', max_tokens: 2 });
  assert.equal(plain.status, 200);
  assert.equal(plain.headers.get('x-switchyard-degraded'), 'true');
  const body = (await plain.json()) as { degraded?: { reasons: string[] } };
  assert.match(body.degraded!.reasons.join(), /no live shard holds expert/);
});
