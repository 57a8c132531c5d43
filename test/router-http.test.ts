// The router's HTTP app in process (no shards, no coordinator): shutdown with open dashboard streams,
// request accounting of early refusals, the routing metrics of a model whose first layer is dense, and
// the completions API's sampling fields (400s, and what reaches the engine).
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { Agent, request, type IncomingMessage } from 'node:http';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { parseModelConfig, preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { metricsText } from '../services/core/metrics/registry.js';
import { routeTokens } from '../services/core/gating/index.js';
import type { MoeStats } from '../services/core/model/moe.js';
import type { SamplingOptions } from '../services/core/sampling.js';
import { RouterEngine } from '../services/router/engine.js';
import { buildHttpApp, BODY_LIMIT_BYTES } from '../services/router/http.js';
import { RoutingStats } from '../services/router/routing-stats.js';
import { until } from './support/until.js';

await initBackend();
// DeepSeek-MoE with one dense layer first: layers 1 and 2 route, layer 0 has no experts.
const config = parseModelConfig({
  ...preset('tiny').model, model_type: 'deepseek', n_routed_experts: 6, n_shared_experts: 1, moe_intermediate_size: 16,
  first_k_dense_replace: 1, moe_layer_freq: 1, norm_topk_prob: false, scoring_func: 'softmax', num_hidden_layers: 3,
});
const E = 6;
let root: string;
let engine: RouterEngine;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-router-http-'));
  const model = MixtralModel.initialize(config, 5);
  await saveModel(join(root, 'ds'), model);
  model.dispose();
  engine = await RouterEngine.load(join(root, 'ds'), 'ds');
});

after(async () => {
  engine?.close();
  await rm(root, { recursive: true, force: true });
});

/** Sample values of one metric family in this process, keyed by its label text. */
async function samples(name: string): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for (const line of (await metricsText()).body.split('\n')) {
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$/);
    if (m && m[1] === name) out.set(m[2] ?? '', Number(m[3]));
  }
  return out;
}

/** Opens the dashboard's event stream and resolves once the first event arrived; `ended` settles when the server ends it. */
function openEvents(base: string): Promise<{ ended: Promise<void>; abort: () => void }> {
  return new Promise((resolve, reject) => {
    const req = request(`${base}/dashboard/events`, (res) => {
      const ended = new Promise<void>((r) => res.once('end', () => r()).once('close', () => r()));
      res.once('data', () => resolve({ ended, abort: () => req.destroy() }));
      res.resume();
    });
    req.once('error', reject).end();
  });
}

test('closing the app ends open /dashboard/events streams (an open tab does not hold up shutdown)', { timeout: 30_000 }, async () => {
  const app = buildHttpApp(engine);
  const base = await app.listen({ host: '127.0.0.1', port: 0 });
  const streams = await Promise.all([openEvents(base), openEvents(base)]);
  // Without the close hook app.close() waits for the clients, and this test times out.
  await app.close();
  await Promise.all(streams.map((s) => s.ended));
});

test('an answer given while the app closes ends its keep-alive connection (a busy connection does not hold up shutdown)', { timeout: 30_000 }, async () => {
  const app = buildHttpApp(engine);
  const base = await app.listen({ host: '127.0.0.1', port: 0 });
  const agent = new Agent({ keepAlive: true });
  try {
    const body = '{"prompt": 12}'; // refused with 400: the answer's headers are what matter
    const received = new Promise<void>((r) => app.server.once('request', () => r()));
    const answered = new Promise<IncomingMessage>((resolve, reject) => {
      const req = request(`${base}/v1/completions`, { method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': body.length } }, resolve);
      req.on('error', reject);
      // Half the body now, so the connection is busy when close() starts; the rest once it has.
      req.write(body.slice(0, 5));
      void received.then(async () => {
        closing = app.close();
        // The server stops listening after the preClose hooks ran: from then on the app is closing.
        await until('the server to stop listening', async () => (app.server.listening ? undefined : true), 5_000);
        req.end(body.slice(5));
      }).catch(reject);
    });
    let closing: Promise<undefined> | undefined;
    const res = await answered;
    res.resume();
    assert.equal(res.statusCode, 400);
    assert.equal(res.headers.connection, 'close');
    await closing;
  } finally {
    agent.destroy();
  }
});

test('401, a bad deadline\'s 400 and 413 are counted by route and status; the dashboard stream has no latency sample', { timeout: 60_000 }, async () => {
  const app = buildHttpApp(engine, { apiToken: 'secret' });
  const base = await app.listen({ host: '127.0.0.1', port: 0 });
  try {
    const count = async (route: string, status: number) => (await samples('switchyard_http_requests_total')).get(`{route="${route}",status="${status}"}`) ?? 0;
    const before = { 401: await count('/v1/completions', 401), 400: await count('/v1/completions', 400), 413: await count('/v1/completions', 413) };
    const post = (headers: Record<string, string>, body: string) => fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body });
    assert.equal((await post({}, '{}')).status, 401);
    assert.equal((await post({ authorization: 'Bearer secret', 'x-request-timeout-ms': 'soon' }, '{}')).status, 400);
    assert.equal((await post({ authorization: 'Bearer secret' }, ' '.repeat(BODY_LIMIT_BYTES + 1))).status, 413);
    for (const status of [401, 400, 413] as const)
      await until(`a ${status} counted`, async () => (await count('/v1/completions', status)) === before[status] + 1 || undefined, 5_000);

    const stream = await openEvents(base);
    stream.abort();
    await until('the closed stream counted', async () => (await count('/dashboard/events', 200)) > 0 || undefined, 5_000);
    const latency = await samples('switchyard_http_request_duration_seconds_count');
    assert.equal(latency.get('{route="/dashboard/events"}'), undefined, 'a stream\'s connection time is not a request latency');
  } finally {
    await app.close();
  }
});

test('routing metrics cover the MoE layers only, every (layer, expert) series from zero', async () => {
  const app = buildHttpApp(engine);
  try {
    const data = (await app.inject({ method: 'GET', url: '/dashboard/data' })).json() as { layers: Array<{ layer: number; load: number[] }> };
    assert.deepEqual(data.layers.map((l) => l.layer), [1, 2], 'the dense layer 0 has no box');
    const tokens = await samples('switchyard_expert_tokens_total');
    const dropped = await samples('switchyard_expert_dropped_tokens_total');
    for (const layer of [1, 2])
      for (let e = 0; e < E; e++) {
        const key = `layer="${layer}",expert="${e}"`;
        for (const stage of ['routed', 'kept']) assert.equal(tokens.get(`{${key},stage="${stage}"}`), 0, `${key} ${stage}`);
        for (const reason of ['capacity', 'unserved']) assert.equal(dropped.get(`{${key},reason="${reason}"}`), 0, `${key} ${reason}`);
      }
    assert.ok(![...tokens.keys(), ...dropped.keys()].some((k) => k.includes('layer="0"')), 'no series for the dense layer');
  } finally {
    await app.close();
  }
});

test('capacity utilisation is kept over slots for a capacity-limited gate, and absent for a dropless one', async () => {
  const S = 16;
  const logits = Float32Array.from({ length: S * 4 }, (_, i) => (i % 4 === 0 ? 3 : (i * 7) % 5 / 10));
  const statsOf = (kind: 'gshard' | 'mixtral'): MoeStats => {
    const plan = routeTokens(logits, S, 4, { kind, k: 2, capacityFactor: 1, minCapacity: 1 });
    return { countsBeforeDrop: plan.countsBeforeDrop, countsAfterDrop: plan.countsAfterDrop, auxLoss: 0, zLoss: 0, droppedChoices: 0, capacity: plan.capacity, plans: [plan] };
  };
  // Layers no engine in this process has.
  const stats = new RoutingStats([7, 8], 4);
  const limited = statsOf('gshard');
  stats.record(7, limited);
  stats.record(8, statsOf('mixtral'));
  const [seven, eight] = stats.view();
  const kept = limited.countsAfterDrop.reduce((a, b) => a + b, 0);
  assert.ok(Math.abs(seven.utilization! - kept / (limited.capacity * 4)) < 1e-9, `layer 7: ${seven.utilization}`);
  assert.equal(eight.utilization, null, 'a dropless gate has no capacity to use up');
  const gauge = await samples('switchyard_layer_capacity_utilization');
  assert.ok(gauge.has('{layer="7"}'));
  assert.ok(!gauge.has('{layer="8"}'), 'no gauge for a dropless layer (it would read mean/max load)');
});

test('completions sampling fields: out of range or outside the vocabulary is a 400 naming the field, whatever the cluster state', async () => {
  const app = buildHttpApp(engine);
  try {
    const post = (body: object) => app.inject({ method: 'POST', url: '/v1/completions', payload: { prompt: 'x', ...body } });
    const cases: Array<[object, RegExp]> = [
      [{ top_k: 1.5 }, /top_k/],
      [{ top_k: -2 }, /top_k/],
      [{ min_p: 2 }, /min_p/],
      [{ repetition_penalty: 0 }, /repetition_penalty/],
      [{ presence_penalty: 3 }, /presence_penalty/],
      [{ frequency_penalty: -2.5 }, /frequency_penalty/],
      [{ logit_bias: { 5: 101 } }, /logit_bias/],
      [{ logit_bias: { 5: 'up' } }, /logit_bias/],
      [{ logit_bias: { x: 1 } }, /logit_bias/],
      [{ logit_bias: { '-3': 1 } }, /logit_bias/],
      [{ logit_bias: { 259: 1 } }, /logit_bias token id '259' is outside the vocabulary \[0, 259\)/],
      [{ logit_bias: [1] }, /logit_bias/],
      [{ stop_token_ids: [1.5] }, /stop_token_ids/],
      [{ stop_token_ids: [300] }, /stop_token_ids: 300 is outside the vocabulary/],
      [{ seed: 1.5 }, /seed/],
      [{ seed: '7' }, /seed/],
      [{ seed: 2 ** 60 }, /seed/],
      [{ temperature: -1 }, /temperature/],
      [{ top_p: 0 }, /top_p/],
      [{ max_tokens: -1 }, /max_tokens/],
    ];
    for (const [body, message] of cases) {
      const res = await post(body);
      assert.equal(res.statusCode, 400, JSON.stringify(body));
      const error = (res.json() as { error: { message: string; type: string } }).error;
      assert.match(error.message, message, JSON.stringify(body));
      assert.equal(error.type, 'invalid_request_error');
    }
    // Valid values of every field pass validation: this engine has no shards, so the answer is its 503.
    const valid = await post({ top_k: -1, min_p: 1, repetition_penalty: 1.2, presence_penalty: -2, frequency_penalty: 2, logit_bias: { 0: -100, 258: 100 }, stop_token_ids: [0, 258], seed: -4 });
    assert.equal(valid.statusCode, 503, valid.body);
  } finally {
    await app.close();
  }
});

test('completions sampling fields reach the engine; a request without a seed leaves it to the sampler (engine.test.ts checks it draws a fresh one)', async () => {
  const seen: SamplingOptions[] = [];
  // The engine of this file, ready, recording what it is asked to generate with.
  const recording = Object.assign(Object.create(engine) as RouterEngine, {
    ready: () => true,
    complete: async (_prompt: Int32Array, sampling: SamplingOptions) => {
      seen.push(sampling);
      return { ids: [], finishReason: 'length' as const };
    },
  });
  const app = buildHttpApp(recording);
  try {
    const post = async (body: object) => {
      const res = await app.inject({ method: 'POST', url: '/v1/completions', payload: { prompt: 'x', ...body } });
      assert.equal(res.statusCode, 200, res.body);
      return seen.at(-1)!;
    };
    const full = await post({ max_tokens: 3, temperature: 0.5, top_p: 0.9, top_k: 40, min_p: 0.05, repetition_penalty: 1.1, presence_penalty: 0.5, frequency_penalty: -0.5, logit_bias: { 7: 3, 12: -100 }, stop_token_ids: [10, 257], seed: 42 });
    assert.deepEqual({ ...full, logitBias: { ...full.logitBias } }, {
      maxTokens: 3, temperature: 0.5, topP: 0.9, topK: 40, minP: 0.05, repetitionPenalty: 1.1, presencePenalty: 0.5, frequencyPenalty: -0.5,
      logitBias: { 7: 3, 12: -100 }, seed: 42, stopIds: [...engine.stopIds, 10],
    });
    const defaults = await post({});
    assert.equal(defaults.topK, undefined);
    assert.equal(defaults.logitBias, undefined);
    assert.deepEqual([defaults.minP, defaults.repetitionPenalty, defaults.presencePenalty, defaults.frequencyPenalty], [0, 1, 0, 0]);
    assert.deepEqual(defaults.stopIds, [...engine.stopIds]);
    assert.equal(defaults.seed, undefined);
    assert.equal((await post({ seed: 0 })).seed, 0);
  } finally {
    await app.close();
  }
});
