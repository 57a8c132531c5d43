// Log-probabilities: the top-k selection and log-softmax (core/logprobs.ts) against brute force, and the
// scheduler's prompt and generated logprobs against a whole-sequence forward in float64, with prompts
// chunked over several steps, a warm prefix cache, max_tokens 0 and preemption.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { logSumExp, tokenLogprob, topIds } from '../services/core/logprobs.js';
import { Rng } from '../services/core/data/random.js';
import { Scheduler, type Generation } from '../services/router/scheduler.js';

await initBackend();
const tiny = preset('tiny').model;

/** log-softmax of one row, in float64. */
function logSoftmax64(row: ArrayLike<number>): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) max = Math.max(max, row[i]);
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i] - max);
  const lse = max + Math.log(sum);
  return Float64Array.from(row, (x) => x - lse);
}

test('topIds and tokenLogprob agree with a full sort and a float64 log-softmax (ties keep the lower id)', () => {
  const rng = new Rng(3);
  for (let trial = 0; trial < 50; trial++) {
    const n = 1 + Math.floor(rng.next() * 300);
    // Coarse values, so ties are common.
    const row = Float32Array.from({ length: n }, () => Math.round((rng.next() - 0.5) * 20) / 2);
    const k = Math.floor(rng.next() * 25);
    const sorted = Array.from(row.keys()).sort((a, b) => row[b] - row[a] || a - b);
    assert.deepEqual(topIds(row, k), sorted.slice(0, k));
    const id = Math.floor(rng.next() * n);
    const lp = tokenLogprob(row, id, k);
    const ref = logSoftmax64(row);
    assert.ok(Math.abs(lp.logprob - ref[id]) < 1e-9);
    lp.top.forEach((alt, i) => {
      assert.equal(alt.id, sorted[i]);
      assert.ok(Math.abs(alt.logprob - ref[alt.id]) < 1e-9);
    });
  }
  assert.equal(logSumExp([-Infinity, -Infinity]), -Infinity);
});

/** The float64 log-softmax of every position of one sequence, from the model's whole-sequence forward. */
async function forwardLogprobs(model: MixtralModel, ids: Int32Array): Promise<Float64Array[]> {
  const V = model.config.vocab_size;
  const logits = await model.logits(ids, 1, ids.length);
  return Array.from({ length: ids.length }, (_, t) => logSoftmax64(logits.subarray(t * V, (t + 1) * V)));
}

function assertPromptLogprobs(g: Generation, prompt: Int32Array, reference: Float64Array[], k: number): void {
  const lps = g.promptLogprobs!;
  assert.equal(lps.length, prompt.length);
  assert.equal(lps[0], null, 'nothing predicts the first prompt id');
  let worst = 0;
  for (let t = 1; t < prompt.length; t++) {
    const lp = lps[t]!;
    assert.equal(lp.id, prompt[t]);
    worst = Math.max(worst, Math.abs(lp.logprob - reference[t - 1][prompt[t]]));
    assert.equal(lp.top.length, k);
    for (const alt of lp.top) worst = Math.max(worst, Math.abs(alt.logprob - reference[t - 1][alt.id]));
  }
  assert.ok(worst < 1e-4, `largest difference ${worst}`);
}

test('prompt logprobs over a prompt chunked across steps, with max_tokens 0 and a warm prefix cache, equal the whole-sequence forward', async () => {
  const model = MixtralModel.initialize(tiny, 41);
  try {
    const prompt = Int32Array.from({ length: 40 }, (_, i) => 32 + ((i * 11) % 90));
    const reference = await forwardLogprobs(model, prompt);
    // 7-token steps: the prompt's rows come back in six chunks.
    const scheduler = new Scheduler(model, { maxBatchedTokens: 7, blockTokens: 4, kvCacheTokens: 512 });
    const greedy = { maxTokens: 0, temperature: 0, topP: 1, seed: 0, stopIds: [] as number[] };
    // A first request puts the prompt's blocks in the prefix cache; the scoring request must still compute them.
    await scheduler.submit(prompt, { ...greedy, maxTokens: 1 });
    const scored = await scheduler.submit(prompt, greedy, undefined, undefined, undefined, undefined, { promptLogprobs: 3 });
    assert.deepEqual(scored.ids, []);
    assert.equal(scored.finishReason, 'length');
    assert.equal(scored.cachedPromptTokens, 0, 'a scoring request bypasses the prefix cache');
    assertPromptLogprobs(scored, prompt, reference, 3);
    // max_tokens 0 without prompt logprobs computes nothing at all.
    const steps = scheduler.stats.steps;
    assert.deepEqual((await scheduler.submit(prompt, greedy)).ids, []);
    assert.equal(scheduler.stats.steps, steps);
  } finally {
    model.dispose();
  }
});

test('generated logprobs are the log-softmax of each step\'s raw logits (before temperature), with the prompt\'s reported before the first id', async () => {
  const model = MixtralModel.initialize(tiny, 42);
  try {
    const prompt = Int32Array.from({ length: 12 }, (_, i) => 40 + i);
    const scheduler = new Scheduler(model, { blockTokens: 4, kvCacheTokens: 512 });
    const order: string[] = [];
    const streamed: number[] = [];
    const g = await scheduler.submit(prompt, { maxTokens: 6, temperature: 1.7, topP: 0.9, seed: 5, stopIds: [] }, (id, lp) => {
      order.push('token');
      assert.equal(lp?.id, id);
      streamed.push(lp!.logprob);
    }, undefined, undefined, undefined, { logprobs: 2, promptLogprobs: 1, onPromptLogprobs: () => order.push('prompt') });
    assert.deepEqual(order, ['prompt', ...g.ids.map(() => 'token')]);
    const reference = await forwardLogprobs(model, Int32Array.from([...prompt, ...g.ids]));
    assertPromptLogprobs(g, prompt, reference, 1);
    assert.equal(g.logprobs!.length, g.ids.length);
    g.logprobs!.forEach((lp, i) => {
      const row = reference[prompt.length - 1 + i];
      assert.equal(lp.id, g.ids[i]);
      assert.ok(Math.abs(lp.logprob - row[g.ids[i]]) < 1e-4, `token ${i}: ${lp.logprob} vs ${row[g.ids[i]]}`);
      assert.equal(lp.logprob, streamed[i]);
      assert.deepEqual(lp.top.map((a) => a.id), topIds(row, 2));
    });
  } finally {
    model.dispose();
  }
});

test('prompt logprobs survive preemption: a sequence recomputed after giving its blocks back reports the same values', async () => {
  const model = MixtralModel.initialize(tiny, 43);
  try {
    const prompts = Array.from({ length: 3 }, (_, s) => Int32Array.from({ length: 20 }, (_, i) => 33 + ((s * 17 + i * 7) % 90)));
    // Room for about two sequences at a time: the newest is preempted while the others decode.
    const scheduler = new Scheduler(model, { blockTokens: 4, kvCacheTokens: 64 });
    const sampling = { maxTokens: 24, temperature: 0, topP: 1, seed: 0, stopIds: [] as number[] };
    const results = await Promise.all(prompts.map((p) => scheduler.submit(p, sampling, undefined, undefined, undefined, undefined, { promptLogprobs: 2, logprobs: 0 })));
    assert.ok(scheduler.stats.preemptions > 0, 'the cache was too small for all three: some sequence was preempted');
    for (const [s, g] of results.entries()) {
      const reference = await forwardLogprobs(model, Int32Array.from([...prompts[s], ...g.ids]));
      assertPromptLogprobs(g, prompts[s], reference, 2);
      g.logprobs!.forEach((lp, i) => assert.ok(Math.abs(lp.logprob - reference[prompts[s].length - 1 + i][g.ids[i]]) < 1e-4));
    }
  } finally {
    model.dispose();
  }
});

test('logprob counts outside [0, 20] are refused', async () => {
  const model = MixtralModel.initialize(tiny, 44);
  try {
    const scheduler = new Scheduler(model, { blockTokens: 4, kvCacheTokens: 128 });
    const sampling = { maxTokens: 1, temperature: 0, topP: 1, seed: 0, stopIds: [] as number[] };
    await assert.rejects(scheduler.submit(Int32Array.of(1, 2), sampling, undefined, undefined, undefined, undefined, { logprobs: 21 }), /logprobs must be an integer in \[0, 20\]/);
    await assert.rejects(scheduler.submit(Int32Array.of(1, 2), sampling, undefined, undefined, undefined, undefined, { promptLogprobs: -1 }), /prompt logprobs/);
  } finally {
    model.dispose();
  }
});
