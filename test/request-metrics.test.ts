// The router's per-request metrics (services/router/request-metrics.ts) against a real cluster: after
// completions, streamed and not, the time-to-first-token, time-per-output-token and end-to-end histograms
// and the token and finish-reason counters of the served model move by exactly what the answers'
// usage and finish_reason say; a stop id sampled first, max_tokens 0 and a client that goes away mid-stream
// are counted as documented; refusals on arrival are not generations. Counts and sums only: no durations.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { EOS_ID, parseModelConfig, preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { FINISH_REASONS } from '../services/router/request-metrics.js';
import { DEADLINE_HEADER } from '../services/router/http.js';
import { startCluster, type TestCluster } from './support/cluster.js';
import { until } from './support/until.js';

const MODEL = 'tiny-served';
const REFUSING = 'tiny-refusing';
const A = 65; // the byte 'A': logit_bias +100 makes every output token one, so text and token counts agree
// A context long enough that a stream of 2 000 ids is still running when its client goes away.
const config = parseModelConfig({ ...preset('tiny').model, max_position_embeddings: 2048 });
let root: string;
let cluster: TestCluster;
let base: string;
let refusingBase: string;

before(async () => {
  await initBackend();
  root = await mkdtemp(join(tmpdir(), 'switchyard-request-metrics-'));
  const checkpoint = join(root, 'tiny-moe');
  const model = MixtralModel.initialize(config, 11);
  await saveModel(checkpoint, model);
  model.dispose();
  // The second router lets nothing wait (--max-queue 0): every generation is refused with 503 queue_full.
  cluster = await startCluster(checkpoint, ['all'], [['--model-name', MODEL], ['--model-name', REFUSING, '--max-queue', '0']]);
  base = cluster.routers[0].base;
  refusingBase = cluster.routers[1].base;
});

after(async () => {
  await cluster?.stop();
  if (root) await rm(root, { recursive: true, force: true });
});

/** Every sample of one /metrics page: name, labels, value. */
async function scrape(url: string): Promise<Array<{ name: string; labels: Record<string, string>; value: number }>> {
  const res = await fetch(`${url}/metrics`);
  assert.equal(res.status, 200);
  const out = [];
  for (const line of (await res.text()).split('\n')) {
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)$/);
    if (!m) continue;
    const labels = Object.fromEntries([...(m[2] ?? '').matchAll(/([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"/g)].map((l) => [l[1], l[2]]));
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

interface Figures {
  ttft: number; tpot: number; e2e: number; e2eSum: number; queue: number; preemptions: number;
  prompt: number; generation: number; running: number; waiting: number; finished: Record<string, number>;
}

/** The request metrics of `model` on the router at `url` (a missing series fails: they exist from the start). */
async function figures(url: string, model: string): Promise<Figures> {
  const samples = await scrape(url);
  const one = (name: string, labels: Record<string, string> = {}) => {
    const want = { model, ...labels };
    const found = samples.filter((s) => s.name === name && Object.keys(want).every((k) => s.labels[k] === want[k as keyof typeof want])
      && Object.keys(s.labels).every((k) => k in want || k === 'le'));
    assert.equal(found.length, 1, `${name}${JSON.stringify(want)} is exported once (found ${found.length})`);
    return found[0].value;
  };
  const preemptions = samples.find((s) => s.name === 'switchyard_router_preemptions_total');
  return {
    ttft: one('switchyard_router_time_to_first_token_seconds_count'),
    tpot: one('switchyard_router_time_per_output_token_seconds_count'),
    e2e: one('switchyard_router_e2e_request_latency_seconds_count'),
    e2eSum: one('switchyard_router_e2e_request_latency_seconds_sum'),
    queue: one('switchyard_router_queue_seconds_count'),
    preemptions: preemptions?.value ?? NaN,
    prompt: one('switchyard_router_prompt_tokens_total'),
    generation: one('switchyard_router_generation_tokens_total'),
    running: one('switchyard_router_sequences_running'),
    waiting: one('switchyard_router_sequences_waiting'),
    finished: Object.fromEntries(FINISH_REASONS.map((r) => [r, one('switchyard_router_requests_finished_total', { finish_reason: r })])),
  };
}

function delta(after: Figures, before: Figures): Omit<Figures, 'running' | 'waiting'> {
  return {
    ttft: after.ttft - before.ttft, tpot: after.tpot - before.tpot, e2e: after.e2e - before.e2e, e2eSum: after.e2eSum - before.e2eSum,
    queue: after.queue - before.queue, preemptions: after.preemptions - before.preemptions,
    prompt: after.prompt - before.prompt, generation: after.generation - before.generation,
    finished: Object.fromEntries(FINISH_REASONS.map((r) => [r, after.finished[r] - before.finished[r]])),
  };
}

interface Answer { text: string; finish: string; promptTokens: number; completionTokens: number }

async function complete(url: string, body: Record<string, unknown>): Promise<Answer> {
  const res = await fetch(`${url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: MODEL, ...body }) });
  const json = (await res.json()) as { choices: Array<{ text: string; finish_reason: string }>; usage: { prompt_tokens: number; completion_tokens: number } };
  assert.equal(res.status, 200, JSON.stringify(json));
  return { text: json.choices[0].text, finish: json.choices[0].finish_reason, promptTokens: json.usage.prompt_tokens, completionTokens: json.usage.completion_tokens };
}

/** A streamed completion read to its end: its text and final finish_reason. */
async function stream(body: Record<string, unknown>): Promise<{ text: string; finish: string }> {
  const res = await fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: MODEL, ...body, stream: true }) });
  assert.equal(res.status, 200);
  const events = (await res.text()).split('\n\n').filter((e) => e.startsWith('data: ')).map((e) => e.slice(6));
  assert.equal(events.at(-1), '[DONE]');
  const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as { choices: Array<{ text: string; finish_reason: string | null }> });
  return { text: chunks.map((c) => c.choices[0]?.text ?? '').join(''), finish: chunks.at(-1)!.choices[0].finish_reason! };
}

/** What the answers imply, per the definitions in request-metrics.ts (no stop sequences in these requests). */
function expected(answers: Answer[]): Omit<Figures, 'running' | 'waiting' | 'e2eSum' | 'queue' | 'preemptions'> {
  const finished = Object.fromEntries(FINISH_REASONS.map((r) => [r, answers.filter((a) => a.finish === r).length]));
  return {
    ttft: answers.filter((a) => a.completionTokens > 0).length,
    tpot: answers.reduce((n, a) => n + Math.max(0, a.completionTokens - 1), 0),
    e2e: answers.length,
    // The prefill ran for every answer that has an output token or ended at a sampled stop id.
    prompt: answers.filter((a) => a.completionTokens > 0 || a.finish === 'stop').reduce((n, a) => n + a.promptTokens, 0),
    generation: answers.reduce((n, a) => n + a.completionTokens, 0),
    finished,
  };
}

/** `d` matches `want` exactly; every generation except `neverAdmitted` (max_tokens 0) took a place once, and once more per preemption. */
function assertMoved(d: ReturnType<typeof delta>, want: ReturnType<typeof expected>, what: string, neverAdmitted = 0): void {
  const { e2eSum, queue, preemptions, ...counts } = d;
  assert.deepEqual(counts, want, what);
  assert.ok(e2eSum > 0, `${what}: the e2e sum moved`);
  assert.equal(queue, want.e2e - neverAdmitted + preemptions, `${what}: queue time observations`);
}

test('the series exist from the start, labelled with the served model only', async () => {
  const samples = await scrape(base);
  const ours = samples.filter((s) => /^switchyard_router_(time_to_first_token|time_per_output_token|e2e_request_latency|queue_seconds|prompt_tokens|generation_tokens|requests_finished|sequences_)/.test(s.name));
  assert.ok(ours.length > 0);
  assert.deepEqual([...new Set(ours.map((s) => s.labels.model))], [MODEL]);
  const f = await figures(base, MODEL);
  assert.equal(f.running, 0);
  assert.equal(f.waiting, 0);
  // The unlabelled gauges stay (tests and dashboards use them).
  assert.ok(samples.some((s) => s.name === 'switchyard_router_queue_depth' && Object.keys(s.labels).length === 0));
  assert.ok(samples.some((s) => s.name === 'switchyard_router_running_sequences' && Object.keys(s.labels).length === 0));
});

test('non-streamed completions: the histograms and counters move by exactly the answers\' usage and finish reasons', { timeout: 120_000 }, async () => {
  const before = await figures(base, MODEL);
  // Sampled freely (an EOS may end one early: finish "stop"), concurrently, with different prompt lengths.
  const prompts = ['The whale', 'Call me Ishmael. Some years ago', 'x', 'It is a way I have of driving off the spleen'];
  const answers = await Promise.all(prompts.map((prompt, i) => complete(base, { prompt, max_tokens: 3 + 4 * i, temperature: 1, seed: 100 + i })));
  const after = await figures(base, MODEL);
  assert.ok(answers.every((a) => a.completionTokens > 0 || a.finish === 'stop'));
  assertMoved(delta(after, before), expected(answers), 'four completions');
  assert.deepEqual([after.running, after.waiting], [0, 0], 'nothing runs or waits afterwards');
});

test('streamed completions count as the same completions answered whole', { timeout: 120_000 }, async () => {
  // Every output id forced to 'A' and EOS banned: a stream of n tokens is n 'A's, finish "length".
  const body = (max_tokens: number) => ({ prompt: 'Streams of A', max_tokens, logit_bias: { [A]: 100, [EOS_ID]: -100 }, seed: 5 });
  const whole = await complete(base, body(1)); // the prompt's token count, before the measured window
  const before = await figures(base, MODEL);
  const streamed = await Promise.all([stream(body(5)), stream(body(9)), stream(body(1))]);
  const after = await figures(base, MODEL);
  assert.deepEqual(streamed, [{ text: 'AAAAA', finish: 'length' }, { text: 'AAAAAAAAA', finish: 'length' }, { text: 'A', finish: 'length' }]);
  const answers = streamed.map((s) => ({ ...s, promptTokens: whole.promptTokens, completionTokens: s.text.length }));
  assertMoved(delta(after, before), expected(answers), 'three streams');
});

test('a stop id sampled first, and max_tokens 0: finished without an output token', { timeout: 120_000 }, async () => {
  const before = await figures(base, MODEL);
  const eosFirst = await complete(base, { prompt: 'Stop at once', max_tokens: 8, logit_bias: { [EOS_ID]: 100 } });
  const none = await complete(base, { prompt: 'Nothing wanted', max_tokens: 0 });
  const after = await figures(base, MODEL);
  assert.deepEqual([eosFirst.finish, eosFirst.completionTokens, none.finish, none.completionTokens], ['stop', 0, 'length', 0]);
  const d = delta(after, before);
  // No first token for either; the EOS-first prompt was prefilled (its tokens count), max_tokens 0 never ran.
  assert.equal(d.prompt, eosFirst.promptTokens);
  assertMoved(d, expected([eosFirst, none]), 'EOS first and max_tokens 0', 1);
});

test('a client that goes away mid-stream: finished "abort", its tokens and intervals counted', { timeout: 120_000 }, async () => {
  const before = await figures(base, MODEL);
  const gone = new AbortController();
  const res = await fetch(`${base}/v1/completions`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, signal: gone.signal,
    body: JSON.stringify({ model: MODEL, prompt: 'A long one', max_tokens: 2000, logit_bias: { [A]: 100, [EOS_ID]: -100 }, stream: true }),
  });
  assert.equal(res.status, 200);
  const reader = res.body!.getReader();
  const first = await reader.read(); // the first token's chunk
  assert.match(new TextDecoder().decode(first.value), /"text":"A+"/);
  gone.abort();
  await reader.cancel().catch(() => undefined);
  const after = await until('the aborted generation to finish', async () => {
    const f = await figures(base, MODEL);
    return f.finished.abort > before.finished.abort ? f : undefined;
  }, 60_000);
  const d = delta(after, before);
  assert.deepEqual(d.finished, { stop: 0, length: 0, abort: 1, error: 0 });
  assert.equal(d.e2e, 1);
  assert.equal(d.ttft, 1);
  // Its n output tokens are the first one plus n − 1 intervals; it stopped well before 2 000.
  assert.equal(d.generation, d.tpot + 1);
  assert.ok(d.generation >= 1 && d.generation < 2000, `${d.generation} tokens`);
  assert.ok(d.prompt > 0);
  assert.equal(d.queue, 1 + d.preemptions);
  await until('the aborted sequence to leave the batch', async () => ((await figures(base, MODEL)).running === 0 ? true : undefined), 60_000);
});

test('a deadline that passes mid-stream: finished "error"', { timeout: 120_000 }, async () => {
  const before = await figures(base, MODEL);
  // 2 000 ids take seconds here; the deadline is a fraction of that (the outcome, not a duration, is asserted).
  const res = await fetch(`${base}/v1/completions`, {
    method: 'POST', headers: { 'content-type': 'application/json', [DEADLINE_HEADER]: '300' },
    body: JSON.stringify({ model: MODEL, prompt: 'Too slow', max_tokens: 2000, logit_bias: { [A]: 100, [EOS_ID]: -100 }, stream: true }),
  });
  assert.equal(res.status, 200);
  const text = await res.text();
  assert.match(text, /"reason":"deadline"/);
  const after = await figures(base, MODEL);
  const d = delta(after, before);
  assert.deepEqual(d.finished, { stop: 0, length: 0, abort: 0, error: 1 });
  assert.equal(d.e2e, 1);
  // Each token reached the client as one 'A' before the deadline ended the stream.
  const streamed = text.split('\n\n').filter((e) => e.startsWith('data: {"id"'))
    .map((e) => (JSON.parse(e.slice(6)) as { choices: Array<{ text: string }> }).choices[0]?.text ?? '').join('');
  assert.equal(d.generation, streamed.length);
  assert.equal(d.generation, d.tpot + d.ttft);
  assert.ok(d.generation < 2000, `${d.generation} tokens before the deadline`);
  assert.equal(d.queue, 1 + d.preemptions);
});

test('refused on arrival (503 queue_full) is not a generation', { timeout: 60_000 }, async () => {
  const before = await figures(refusingBase, REFUSING);
  const rejections = async () => (await scrape(refusingBase)).find((s) => s.name === 'switchyard_router_rejections_total' && s.labels.reason === 'queue_full')!.value;
  const refusedBefore = await rejections();
  for (const stream of [false, true]) {
    const res = await fetch(`${refusingBase}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'hello', max_tokens: 4, stream }) });
    const text = await res.text();
    if (stream) assert.match(text, /queue_full/);
    else assert.equal(res.status, 503, text);
  }
  const after = await figures(refusingBase, REFUSING);
  assert.equal(await rejections(), refusedBefore + 2);
  const d = delta(after, before);
  assert.deepEqual(d, { ttft: 0, tpot: 0, e2e: 0, e2eSum: 0, queue: 0, preemptions: 0, prompt: 0, generation: 0, finished: { stop: 0, length: 0, abort: 0, error: 0 } });
});
