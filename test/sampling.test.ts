// Per-request sampling (services/core/sampling.ts): each filter and penalty against its definition, the
// fast top-k/top-p selection against a brute-force sort of the whole row, seeds, and option validation.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Rng } from '../services/core/data/random.js';
import { Sampler, SamplingError, checkSampling, type SamplingOptions } from '../services/core/sampling.js';

const base: SamplingOptions = { maxTokens: 16, temperature: 1, topP: 1 };
const none = new Int32Array(0);

function normalRow(rng: Rng, n: number, scale = 1): Float32Array {
  return Float32Array.from({ length: n }, () => rng.normal() * scale);
}

function argmax(x: Float32Array): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

/** The id the definitions pick for draw u: sort the whole row, cut by top-k, top-p, then min-p, walk in sorted order. */
function reference(logits: Float32Array, o: SamplingOptions, u: number): { id: number; kept: number[] } {
  const n = logits.length;
  let max = -Infinity;
  for (const v of logits) max = Math.max(max, v);
  const k = o.topK && o.topK > 0 && o.topK < n ? o.topK : 0;
  const cut = k ? [...logits].sort((a, b) => b - a)[k - 1] : -Infinity; // ids tied with the k-th stay
  const w = Array.from(logits, (v) => (v >= cut ? Math.exp((v - max) / o.temperature) : 0));
  let mass = 0;
  for (const p of w) mass += p; // id order, as the sampler sums it
  const order = [...w.keys()].filter((i) => w[i] > 0).sort((a, b) => logits[b] - logits[a] || a - b);
  let kept = 0;
  let nucleus = 0;
  while (kept < order.length && nucleus < o.topP * mass) nucleus += w[order[kept++]];
  const ids = order.slice(0, kept).filter((i) => w[i] >= (o.minP ?? 0));
  let total = 0;
  for (const i of ids) total += w[i];
  let r = u * total;
  for (const i of ids) {
    r -= w[i];
    if (r <= 0) return { id: i, kept: ids };
  }
  return { id: ids[ids.length - 1], kept: ids };
}

test('temperature 0 is the argmax of the row, and the input row is never modified', () => {
  const rng = new Rng(1);
  const s = new Sampler({ ...base, temperature: 0, logitBias: { 3: 0.5 }, repetitionPenalty: 1.3, frequencyPenalty: 0.1 }, Int32Array.of(1, 2), 300);
  const plain = new Sampler({ ...base, temperature: 0, topK: 5, topP: 0.5, minP: 0.3 }, none, 300);
  for (let t = 0; t < 50; t++) {
    const row = normalRow(rng, 300, 3);
    const copy = row.slice();
    assert.equal(plain.next(row), argmax(row));
    const want = argmax(s.adjust(row)); // before next(): it penalises what it picks
    assert.equal(s.next(row), want);
    assert.deepEqual(row, copy, 'the input row is unchanged');
  }
});

test('top_k = 1 equals greedy', () => {
  const rng = new Rng(2);
  const s = new Sampler({ ...base, temperature: 1.5, topK: 1, seed: 5 }, none, 1000);
  for (let t = 0; t < 100; t++) {
    const row = normalRow(rng, 1000);
    assert.equal(s.next(row), argmax(row));
  }
});

test('top_k = k draws only from the k best, and from each of them', () => {
  const rng = new Rng(3);
  for (const [n, k] of [[100, 5], [2000, 300]]) { // heap and quickselect paths
    const row = normalRow(rng, n, 0.3);
    const best = new Set([...row.keys()].sort((a, b) => row[b] - row[a]).slice(0, k));
    const s = new Sampler({ ...base, topK: k, seed: 9 }, none, n);
    const seen = new Set<number>();
    for (let i = 0; i < 20 * k; i++) seen.add(s.next(row));
    assert.ok([...seen].every((id) => best.has(id)), `every draw among the ${k} best of ${n}`);
    assert.ok(seen.size > k * 0.9, `${seen.size} of the ${k} best drawn`);
  }
});

test('top_p (with top_k and min_p) picks what a full sort of the row picks, draw for draw', () => {
  const rng = new Rng(4);
  // Seeds whose first draw is near 0 or near 1 pick the first and last id of the nucleus: its exact edge.
  const extreme: number[] = [];
  for (let seed = 0; extreme.length < 6 && seed < 1e6; seed++) {
    const u = new Rng(seed).next();
    if (u > 0.9995 || u < 0.0005) extreme.push(seed);
  }
  assert.equal(extreme.length, 6);
  let cases = 0;
  let distinctKept = 0;
  for (let c = 0; c < 60; c++) {
    const n = [40, 1000, 5000][c % 3];
    const scale = [0.2, 1, 4, 12][c % 4];
    const ties = c % 5 === 0;
    const o: SamplingOptions = {
      ...base,
      temperature: 0.3 + rng.next() * 1.7,
      topP: c % 7 === 0 ? 0.999 : 0.05 + rng.next() * 0.9,
      topK: c % 4 === 1 ? 1 + rng.nextInt(Math.min(n - 1, 400)) : undefined,
      minP: c % 6 === 2 ? rng.next() * 0.3 : undefined,
      seed: c % 2 ? extreme[c % extreme.length] : rng.nextInt(1e9),
    };
    const s = new Sampler(o, none, n);
    const draws = new Rng(o.seed!);
    for (let t = 0; t < 8; t++) {
      const row = normalRow(rng, n, scale);
      if (ties) for (let i = 0; i < n; i++) row[i] = Math.round(row[i] * 2) / 2;
      const want = reference(row, o, draws.next());
      assert.equal(s.next(row), want.id, `case ${c} token ${t}: ${JSON.stringify({ ...o, n, scale, ties })}`);
      cases++;
      if (want.kept.length > 1 && want.kept.length < n) distinctKept++;
    }
  }
  assert.ok(distinctKept > cases / 2, 'most cases cut the row to a real nucleus');
});

test('top_p keeps exactly the smallest set reaching the mass', () => {
  // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps {0, 1} (0.5 + 0.3 reaches it), 0.81 keeps {0, 1, 2}.
  const row = Float32Array.from([0.15, 0.5, 0.05, 0.3], Math.log);
  for (const [topP, want] of [[0.45, [1]], [0.79, [1, 3]], [0.81, [0, 1, 3]], [1, [0, 1, 2, 3]]] as const) {
    const s = new Sampler({ ...base, topP, seed: 1 }, none, 4);
    const seen = new Set<number>();
    for (let i = 0; i < 400; i++) seen.add(s.next(row));
    assert.deepEqual([...seen].sort(), want, `top_p ${topP}`);
  }
  // Exactly on the edge: four equal ids, top_p 0.5 is reached by two of them (ties go to the lower ids).
  for (const [topP, want] of [[0.5, [0, 1]], [0.75, [0, 1, 2]], [0.76, [0, 1, 2, 3]]] as const) {
    const s = new Sampler({ ...base, topP, seed: 3 }, none, 4);
    const seen = new Set<number>();
    for (let i = 0; i < 400; i++) seen.add(s.next(new Float32Array(4)));
    assert.deepEqual([...seen].sort(), want, `equal ids, top_p ${topP}`);
  }
});

test('min_p drops ids below min_p times the most likely', () => {
  const row = Float32Array.from([0.05, 0.5, 0.15, 0.3], Math.log); // min_p 0.2: below 0.1 goes
  for (const [minP, want] of [[0.2, [1, 2, 3]], [0.5, [1, 3]], [1, [1]], [0, [0, 1, 2, 3]]] as const) {
    for (const topP of [1, 0.99]) { // filtered in the exp pass, or after the nucleus
      const s = new Sampler({ ...base, minP, topP, seed: 2 }, none, 4);
      const seen = new Set<number>();
      for (let i = 0; i < 400; i++) seen.add(s.next(row));
      assert.deepEqual([...seen].sort(), want, `min_p ${minP} top_p ${topP}`);
    }
  }
  // Ids exactly at min_p times the maximum stay.
  for (const topP of [1, 0.99]) {
    const s = new Sampler({ ...base, minP: 1, topP, seed: 2 }, none, 4);
    const seen = new Set<number>();
    for (let i = 0; i < 400; i++) seen.add(s.next(Float32Array.of(0, 0, 0, -5)));
    assert.deepEqual([...seen].sort(), [0, 1, 2], `min_p 1 top_p ${topP}`);
  }
});

test('logit_bias +100 forces an id and -100 bans it', () => {
  const rng = new Rng(6);
  const row = normalRow(rng, 500, 2);
  const worst = [...row.keys()].reduce((a, b) => (row[b] < row[a] ? b : a));
  const best = argmax(row);
  const forced = new Sampler({ ...base, temperature: 1.2, logitBias: { [worst]: 100 }, seed: 3 }, none, 500);
  for (let i = 0; i < 200; i++) assert.equal(forced.next(row), worst);
  const greedy = new Sampler({ ...base, temperature: 0, logitBias: { [best]: -100 } }, none, 500);
  assert.notEqual(greedy.next(row), best);
  // A dominant id, banned: never drawn.
  const peaked = row.slice();
  peaked[7] = 30;
  const banned = new Sampler({ ...base, logitBias: { 7: -100 }, seed: 4 }, none, 500);
  for (let i = 0; i < 500; i++) assert.notEqual(banned.next(peaked), 7);
  const unbanned = new Sampler({ ...base, seed: 4 }, none, 500);
  assert.equal(unbanned.next(peaked), 7, 'the row does pick it without the bias');
});

test('repetition_penalty divides positive and multiplies negative logits of prompt and generated ids', () => {
  const row = Float32Array.from([3, -2, 1.5, -0.5, 0, 2]);
  const s = new Sampler({ ...base, temperature: 0, repetitionPenalty: 2 }, Int32Array.of(0, 1, 1, 4), 6);
  assert.deepEqual([...s.adjust(row)], [1.5, -4, 1.5, -0.5, 0, 2]);
  assert.equal(s.next(row), 5, 'id 0 (3 → 1.5) loses to id 5');
  // id 5 is generated now: penalised too, once however often it repeats.
  assert.deepEqual([...s.adjust(row)], [1.5, -4, 1.5, -0.5, 0, 1]);
  assert.equal(s.next(row), 0, 'the first of the ties at 1.5');
  assert.deepEqual([...s.adjust(row)], [1.5, -4, 1.5, -0.5, 0, 1]);
  // Below 1 it rewards repeats; negatives move towards 0.
  const boost = new Sampler({ ...base, temperature: 0, repetitionPenalty: 0.5 }, Int32Array.of(1, 2), 6);
  assert.deepEqual([...boost.adjust(row)], [3, -1, 3, -0.5, 0, 2]);
  // Negative logits only: the penalty must make id 0 worse, not better.
  const negative = Float32Array.from([-1, -1.5, -9, -9, -9, -9]);
  assert.equal(new Sampler({ ...base, temperature: 0, repetitionPenalty: 2 }, Int32Array.of(0), 6).next(negative), 1);
});

test('presence and frequency penalties grow with the generated counts, not the prompt', () => {
  const n = 8;
  const onehot = (id: number) => Float32Array.from({ length: n }, (_, i) => (i === id ? 50 : 0));
  const s = new Sampler({ ...base, temperature: 0, presencePenalty: 0.5, frequencyPenalty: 0.25 }, Int32Array.of(3, 3, 3), n);
  const flat = new Float32Array(n).fill(1);
  assert.deepEqual([...s.adjust(flat)], Array(n).fill(1), 'prompt ids are not penalised');
  assert.equal(s.next(onehot(2)), 2);
  assert.equal(s.next(onehot(2)), 2);
  assert.equal(s.next(onehot(5)), 5);
  const want = Array(n).fill(1);
  want[2] = 1 - (0.5 + 2 * 0.25);
  want[5] = 1 - (0.5 + 1 * 0.25);
  assert.deepEqual([...s.adjust(flat)], want);
  assert.equal(s.next(flat), 0, 'greedy avoids the penalised ids');
  // Negative values encourage repeats.
  const repeat = new Sampler({ ...base, temperature: 0, presencePenalty: -2 }, none, n);
  assert.equal(repeat.next(onehot(6)), 6);
  assert.equal(repeat.next(flat), 6);
  // Bias, then repetition, then frequency and presence (vLLM's order): (2 + 1) / 1.5 - 0.5 - 0.25.
  const all = new Sampler({ ...base, temperature: 0, logitBias: { 4: 1 }, repetitionPenalty: 1.5, presencePenalty: 0.5, frequencyPenalty: 0.25 }, none, n);
  assert.equal(all.next(onehot(4)), 4);
  assert.ok(Math.abs(all.adjust(new Float32Array(n).fill(2))[4] - ((2 + 1) / 1.5 - 0.75)) < 1e-6);
});

test('same seed, same sequence; another or no seed, another sequence', () => {
  const rng = new Rng(7);
  const rows = Array.from({ length: 40 }, () => normalRow(rng, 64, 0.5));
  const run = (s: Sampler) => rows.map((r) => s.next(r));
  const o = { ...base, topP: 0.9, topK: 40, seed: 1234 };
  const a = new Sampler(o, none, 64);
  assert.equal(a.seed, 1234);
  const first = run(a);
  assert.deepEqual(run(new Sampler(o, none, 64)), first);
  assert.notDeepEqual(run(new Sampler({ ...o, seed: 1235 }, none, 64)), first);
  const x = new Sampler({ ...o, seed: undefined }, none, 64);
  const y = new Sampler({ ...o, seed: undefined }, none, 64);
  assert.ok(Number.isSafeInteger(x.seed));
  assert.notEqual(x.seed, y.seed, 'unseeded requests draw their own seeds');
  assert.notDeepEqual(run(x), run(y));
  // The drawn seed reproduces the unseeded run.
  const again = new Sampler({ ...o, seed: x.seed }, none, 64);
  const z = new Sampler({ ...o, seed: undefined }, none, 64);
  assert.deepEqual(run(again), run(new Sampler({ ...o, seed: x.seed }, none, 64)));
  assert.notEqual(z.seed, x.seed);
});

test('checkSampling refuses each bad field, naming it', () => {
  const cases: Array<[Partial<SamplingOptions>, RegExp]> = [
    [{ maxTokens: -1 }, /^max_tokens/],
    [{ maxTokens: 1.5 }, /^max_tokens/],
    [{ temperature: -1 }, /^temperature/],
    [{ temperature: Infinity }, /^temperature/],
    [{ topP: 0 }, /^top_p/],
    [{ topP: 1.1 }, /^top_p/],
    [{ topK: 1.5 }, /^top_k/],
    [{ topK: -2 }, /^top_k/],
    [{ minP: 2 }, /^min_p/],
    [{ minP: -0.1 }, /^min_p/],
    [{ repetitionPenalty: 0 }, /^repetition_penalty/],
    [{ repetitionPenalty: -1 }, /^repetition_penalty/],
    [{ presencePenalty: 3 }, /^presence_penalty/],
    [{ frequencyPenalty: -2.5 }, /^frequency_penalty/],
    [{ logitBias: { 100: 1 } }, /^logit_bias token id '100' is outside the vocabulary \[0, 100\)/],
    [{ logitBias: { 3: 101 } }, /^logit_bias of token 3/],
    [{ logitBias: { 3: NaN } }, /^logit_bias of token 3/],
    [{ logitBias: { '-1': 1 } as Record<number, number> }, /^logit_bias token id '-1'/],
    [{ seed: 1.5 }, /^seed/],
    [{ seed: 2 ** 60 }, /^seed/],
    [{ stopIds: [100] }, /^stop_token_ids/],
  ];
  for (const [bad, message] of cases) {
    assert.throws(() => checkSampling({ ...base, ...bad }, 100), (err: Error) => err instanceof SamplingError && err instanceof RangeError && message.test(err.message), JSON.stringify(bad));
    assert.throws(() => new Sampler({ ...base, ...bad }, none, 100), SamplingError, 'the Sampler checks its options too');
  }
  checkSampling({ ...base, topK: -1, minP: 0, repetitionPenalty: 1, presencePenalty: -2, frequencyPenalty: 2, logitBias: { 0: -100, 99: 100 }, seed: -5, stopIds: [0, 99] }, 100);
  checkSampling({ ...base, topK: 0, maxTokens: 0, temperature: 0 }, 100);
  assert.equal(new SamplingError('x').name, 'SamplingError');
});

test('a 256k vocabulary over many tokens (speed sanity, no timing asserted)', () => {
  const n = 256_000;
  const rng = new Rng(8);
  const row = normalRow(rng, n, 2);
  const peaked = row.slice();
  for (let i = 0; i < 20; i++) peaked[rng.nextInt(n)] += 12;
  const o: SamplingOptions = { ...base, temperature: 0.8, topP: 0.9, minP: 0.01, repetitionPenalty: 1.1, presencePenalty: 0.3, frequencyPenalty: 0.2, logitBias: { 17: 5 }, seed: 9 };
  const prompt = Int32Array.from({ length: 2000 }, () => rng.nextInt(n));
  const started = performance.now();
  for (const options of [o, { ...o, topK: 50 }, { ...o, topK: 5000 }, { ...o, topP: 1 }]) {
    const s = new Sampler(options, prompt, n);
    for (let t = 0; t < 30; t++) {
      const id = s.next(t % 2 ? row : peaked);
      assert.ok(Number.isInteger(id) && id >= 0 && id < n);
    }
  }
  // Thousands of tokens over a smaller row: penalty bookkeeping must not rescan what was generated.
  const s = new Sampler({ ...o, topK: 40 }, prompt.map((id) => id % 1000), 1000);
  const small = normalRow(rng, 1000, 3);
  const counts = new Map<number, number>();
  for (let t = 0; t < 5000; t++) {
    const id = s.next(small);
    counts.set(id, (counts.get(id) ?? 0) + 1);
  }
  assert.ok(counts.size > 40, 'the penalties spread a long generation beyond the first top-k');
  console.log(`# 256k-vocabulary and 5000-token runs took ${Math.round(performance.now() - started)} ms`);
});
