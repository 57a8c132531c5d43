// The serving engine (paged KV cache, batched step, scheduler): logits of the engine it replaced (a fixture
// recorded before the change), chunked prefill, prefix caching, preemption, block accounting and batch
// invariance for every gate policy.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { initBackend } from '../services/core/backend.js';
import { parseModelConfig, preset, type ModelConfig } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { pagedAttentionSettings } from '../services/core/model/paged-attention.js';
import { generate, Scheduler, type Generation } from '../services/router/scheduler.js';
import { PagedDecoder } from './support/paged.js';

await initBackend();

interface FixtureCase { preset: string; seed: number; overrides: Record<string, unknown>; prompts: number[][]; greedy: number[][]; stepLogits: number[][][] }
const fixture = JSON.parse(readFileSync(new URL('../../test/fixtures/engine-baseline.json', import.meta.url), 'utf8')) as { cases: FixtureCase[] };

const configOf = (c: FixtureCase): ModelConfig => parseModelConfig({ ...preset(c.preset).model, ...c.overrides }, c.preset);
const argmax = (l: ArrayLike<number>): number => {
  let best = 0;
  for (let i = 1; i < l.length; i++) if (l[i] > l[best]) best = i;
  return best;
};
const greedy = (maxTokens: number) => ({ maxTokens, temperature: 0, topP: 1, seed: 0, stopIds: [] as number[] });
const tiny = preset('tiny').model;
const textIds = (i: number, length: number) => Int32Array.from({ length }, (_, j) => 32 + ((i * 7 + j * 13) % 90));

for (const c of fixture.cases)
  for (const path of ['JS kernel', 'matMul'] as const)
  test(`the batched paged step gives the logits of the engine it replaced (${c.preset}${Object.keys(c.overrides).length ? ', ' + JSON.stringify(c.overrides) : ''}, prompts by the ${path} path): within 1e-5, greedy ids identical`, async (t) => {
    const defaultMacs = pagedAttentionSettings.matMulChunkMacs;
    // Every prompt chunk through the matMul path, or none: both attention paths must match.
    pagedAttentionSettings.matMulChunkMacs = path === 'matMul' ? 0 : Number.POSITIVE_INFINITY;
    t.after(() => { pagedAttentionSettings.matMulChunkMacs = defaultMacs; });
    const model = MixtralModel.initialize(configOf(c), c.seed);
    const paged = new PagedDecoder(model, 4);
    let feed = c.prompts.map((p) => Int32Array.from(p));
    let worst = 0;
    const ids: number[][] = c.prompts.map(() => []);
    for (const [step, want] of c.stepLogits.entries()) {
      const got = await paged.step(feed.map((f, seq) => ({ seq, ids: f })), `fixture${step}`);
      got.forEach((l, s) => {
        for (let v = 0; v < l.length; v++) worst = Math.max(worst, Math.abs(l[v] - want[s][v]));
        ids[s].push(argmax(l));
      });
      feed = ids.map((x) => Int32Array.of(x[x.length - 1]));
    }
    assert.ok(worst <= 1e-5, `max |Δ logit| ${worst}`);
    assert.deepEqual(ids, c.greedy);
    // Through the scheduler with prompts chunked over several steps and 4-token blocks: the same texts.
    const scheduler = new Scheduler(model, { maxBatchedTokens: 9, blockTokens: 4, kvCacheTokens: 4096 });
    const served = await Promise.all(c.prompts.map((p) => scheduler.submit(Int32Array.from(p), greedy(c.greedy[0].length))));
    assert.deepEqual(served.map((g) => g.ids), c.greedy);
    assert.ok(scheduler.stats.maxTokensPerStep <= 9);
    await scheduler.drain();
    assert.equal(scheduler.blocks.used, 0, 'every block is given back');
    model.dispose();
  });

test('a short request behind a 2 000-token prompt gets its first token within a few steps, not after the whole prefill', async () => {
  const config = parseModelConfig({ ...tiny, max_position_embeddings: 2100 }, 'tiny-long');
  const model = MixtralModel.initialize(config, 5);
  const scheduler = new Scheduler(model, { maxBatchedTokens: 128 });
  const steps: Record<string, number> = {};
  const long = scheduler.submit(textIds(1, 2000), greedy(2), () => { steps.long ??= scheduler.stats.steps; });
  // Arrives once the long prefill is under way.
  while (scheduler.stats.steps < 2) await new Promise((r) => setImmediate(r));
  const arrived = scheduler.stats.steps;
  const short = scheduler.submit(textIds(2, 5), greedy(2), () => { steps.short ??= scheduler.stats.steps; });
  const [, shortResult] = await Promise.all([long, short]);
  assert.equal(shortResult.ids.length, 2);
  assert.ok(steps.short - arrived <= 2, `the short request's first token came ${steps.short - arrived} steps after it arrived`);
  assert.ok(steps.short < steps.long, `it did not wait for the long prefill (${JSON.stringify(steps)}, arrived at step ${arrived})`);
  assert.ok(steps.long >= Math.ceil(2000 / 128), 'the long prompt was chunked');
  assert.equal(scheduler.stats.maxTokensPerStep <= 128, true);
  await scheduler.drain();
  model.dispose();
});

test('prefix caching: a prompt sharing full blocks with an earlier one skips their prefill and generates the same text', async () => {
  const model = MixtralModel.initialize(tiny, 6);
  const shared = textIds(3, 40);
  const second = Int32Array.from([...shared, 70, 71, 72]);
  const scheduler = new Scheduler(model, { blockTokens: 8 });
  const hits: number[] = [];
  const counting = new Scheduler(model, { blockTokens: 8, onPrefix: (hit) => hits.push(hit) });
  await counting.submit(shared, greedy(3));
  const cached = await counting.submit(second, greedy(6));
  assert.equal(cached.cachedPromptTokens, 40, 'all 5 full blocks of the shared prefix came from the cache');
  assert.deepEqual(hits, [0, 40]);
  const uncached = await new Scheduler(model, { blockTokens: 8, prefixCaching: false }).submit(second, greedy(6));
  assert.equal(uncached.cachedPromptTokens, 0);
  assert.deepEqual(cached.ids, uncached.ids);
  // A prompt that is all cached blocks still computes its last id (the logits start the generation).
  const again = await counting.submit(shared, greedy(3));
  assert.equal(again.cachedPromptTokens, 32);
  assert.equal(counting.blocks.used, 0);
  assert.ok(counting.blocks.cached >= 5);
  await scheduler.drain();
  model.dispose();
});

test('when blocks run out, the newest sequence is preempted and recomputed: every request completes with its text alone', async () => {
  const model = MixtralModel.initialize(tiny, 7);
  // 64 tokens of cache (the tiny context) for 6 sequences of up to 10 + 20 tokens.
  const preemptions: number[] = [];
  const scheduler = new Scheduler(model, { kvCacheTokens: 64, blockTokens: 4, onPreempt: () => preemptions.push(1) });
  const prompts = Array.from({ length: 6 }, (_, i) => textIds(10 + i, 6 + i));
  const results = await Promise.all(prompts.map((p) => scheduler.submit(p, greedy(20))));
  assert.ok(scheduler.stats.preemptions > 0 && preemptions.length === scheduler.stats.preemptions, 'the cache was too small: some sequence was preempted');
  for (const [i, p] of prompts.entries()) {
    const alone = await generate(model, p, greedy(20));
    assert.deepEqual(results[i].ids, alone.ids, `request ${i}`);
  }
  assert.equal(scheduler.blocks.used, 0);
  model.dispose();
});

test('blocks come back when a request finishes, stops early, fails, passes its deadline or its client goes away; the window trims what it no longer sees', async () => {
  const model = MixtralModel.initialize(tiny, 8);
  const scheduler = new Scheduler(model, { blockTokens: 4, maxBatchedTokens: 8 });
  await scheduler.submit(textIds(1, 9), greedy(5));
  await scheduler.submit(textIds(2, 9), greedy(50), (id) => id >= 0); // stops at its first token
  await assert.rejects(scheduler.submit(textIds(3, 9), greedy(5), () => { throw new Error('client went away'); }), /client went away/);
  await assert.rejects(scheduler.submit(textIds(4, 9), greedy(50), undefined, undefined, Date.now() + 1), /deadline/);
  // A client that goes away during a chunked prefill: the request ends there, its blocks come back.
  const gone = new AbortController();
  const stepsBefore = scheduler.stats.steps;
  const long = scheduler.submit(textIds(6, 60), greedy(5), undefined, undefined, undefined, gone.signal);
  while (scheduler.stats.steps === stepsBefore) await new Promise((r) => setImmediate(r));
  gone.abort();
  assert.deepEqual((await long).ids, []);
  await scheduler.drain();
  assert.equal(scheduler.blocks.used, 0);
  model.dispose();

  const windowed = MixtralModel.initialize(parseModelConfig({ ...tiny, sliding_window: 6 }, 'tiny-window'), 9);
  const trimmed = new Scheduler(windowed, { blockTokens: 4, prefixCaching: false });
  let most = 0;
  const result: Generation = await trimmed.submit(textIds(5, 10), greedy(40), () => { most = Math.max(most, trimmed.blocks.used); });
  assert.equal(result.ids.length, 40);
  // Window 6 plus the next id spans at most 3 blocks of 4 (and one being filled).
  assert.ok(most <= 3, `a windowed sequence held ${most} blocks`);
  windowed.dispose();
});

for (const policy of ['mixtral', 'switch', 'gshard', 'topk'] as const)
  test(`batch invariance, gate policy ${policy}: 16 concurrent mixed-length greedy requests equal each alone, also with prompts chunked`, async () => {
    const k = policy === 'switch' ? 1 : 2;
    const config = parseModelConfig({ ...tiny, num_experts_per_tok: k, switchyard_gate: { policy, capacity_factor: 1, eval_capacity_factor: 1, min_capacity: 0 } }, `tiny-${policy}`);
    const model = MixtralModel.initialize(config, 10);
    const prompts = Array.from({ length: 16 }, (_, i) => textIds(20 + i, 3 + ((i * 5) % 17)));
    const together = new Scheduler(model, { maxBatchedTokens: 24, blockTokens: 4 });
    const results = await Promise.all(prompts.map((p, i) => together.submit(p, greedy(4 + (i % 5)))));
    assert.ok(together.stats.maxSequencesPerStep >= 8, 'requests shared steps');
    for (const [i, p] of prompts.entries()) {
      const alone = await generate(model, p, greedy(4 + (i % 5)));
      assert.deepEqual(results[i].ids, alone.ids, `request ${i}`);
    }
    model.dispose();
  });

test('sampling through the engine: unseeded requests draw fresh seeds, the reported seed reproduces the text; penalties and bias apply per request', async () => {
  const model = MixtralModel.initialize(tiny, 11);
  const scheduler = new Scheduler(model);
  const prompt = textIds(40, 6);
  const sampled = { maxTokens: 12, temperature: 1, topP: 1, stopIds: [] as number[] };
  const [a, b] = await Promise.all([scheduler.submit(prompt, sampled), scheduler.submit(prompt, sampled)]);
  assert.notEqual(a.seed, b.seed);
  assert.notDeepEqual(a.ids, b.ids, 'two identical unseeded requests sample differently');
  const again = await scheduler.submit(prompt, { ...sampled, seed: a.seed });
  assert.deepEqual(again.ids, a.ids);
  // Batch-mates with other controls do not disturb each other: a banned id never appears, a forced one always.
  const [banned, forced, plain] = await Promise.all([
    scheduler.submit(prompt, { ...greedy(8), logitBias: { [a.ids[0]]: -100 } }),
    scheduler.submit(prompt, { ...sampled, seed: 3, logitBias: { 77: 100 } }),
    scheduler.submit(prompt, greedy(8)),
  ]);
  assert.ok(!banned.ids.includes(a.ids[0]));
  assert.deepEqual(forced.ids, new Array(12).fill(77));
  assert.deepEqual(plain.ids, (await generate(model, prompt, greedy(8))).ids);
  const repeated = await scheduler.submit(prompt, { ...greedy(12), repetitionPenalty: 1e6 });
  assert.equal(new Set(repeated.ids).size, repeated.ids.length, 'a huge repetition penalty never repeats an id');
  model.dispose();
});
