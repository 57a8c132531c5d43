// Per-request sampling: one owner for validating the options and choosing the next id from a row of logits.
// Order as vLLM: logit_bias, repetition/frequency/presence penalties, then argmax (temperature 0) or
// temperature, top-k, top-p, min-p and a draw from the request's own seeded generator.
//
// Cost per token: a few O(vocab) passes (copy, max, exp) and never a sort of the whole vocabulary.
// top-k finds its k-th largest logit with a heap (small k) or quickselect; top-p buckets the weights by
// log-probability in the exp pass, takes the fewest most-likely buckets holding top_p of the mass and
// sorts only their ids by logit (ties by id) (a flat distribution puts many ids in those buckets and so sorts more). Penalties
// touch only the ids seen so far, from counts the Sampler updates once per token.
import { randomInt } from 'node:crypto';
import { Rng } from './data/random.js';

export interface SamplingOptions {
  /** Non-negative integer. */
  maxTokens: number;
  /** 0 = greedy (argmax after bias and penalties). */
  temperature: number;
  /** (0, 1]. */
  topP: number;
  /** undefined, 0 or -1 = off; else keep the k most likely (ids tied with the k-th are kept too, as vLLM). */
  topK?: number;
  /** [0, 1]: drop ids whose probability < minP · max probability. */
  minP?: number;
  /** > 0, 1 = off; HF/vLLM semantics over prompt AND generated ids: positive logits divided, negative multiplied. */
  repetitionPenalty?: number;
  /** [-2, 2] OpenAI semantics, over generated ids. */
  presencePenalty?: number;
  /** [-2, 2] OpenAI semantics, over generated ids (count-weighted). */
  frequencyPenalty?: number;
  /** token id -> bias added to its logit, each in [-100, 100]. */
  logitBias?: Record<number, number>;
  /** undefined = a fresh random seed per request; same seed = same output. */
  seed?: number;
  /** Ids that end generation (the caller handles stopping). */
  stopIds?: number[];
}

export class SamplingError extends RangeError {
  override name = 'SamplingError';
}

/** A fresh seed for a request that did not ask for one (any safe integer is a valid seed). */
export function randomSeed(): number {
  return randomInt(0, 2 ** 48 - 1);
}

const inRange = (x: unknown, lo: number, hi: number): x is number => typeof x === 'number' && x >= lo && x <= hi;

/** Throws SamplingError naming the (snake_case API) field that is out of range. */
export function checkSampling(o: SamplingOptions, vocabSize: number): void {
  if (!Number.isInteger(vocabSize) || vocabSize < 1) throw new RangeError(`vocabSize must be a positive integer, got ${vocabSize}`);
  if (!Number.isInteger(o.maxTokens) || o.maxTokens < 0) throw new SamplingError(`max_tokens must be a non-negative integer, got ${o.maxTokens}`);
  if (!(inRange(o.temperature, 0, Infinity) && Number.isFinite(o.temperature))) throw new SamplingError(`temperature must be a finite number ≥ 0, got ${o.temperature}`);
  if (!(typeof o.topP === 'number' && o.topP > 0 && o.topP <= 1)) throw new SamplingError(`top_p must be in (0, 1], got ${o.topP}`);
  if (o.topK !== undefined && !(Number.isInteger(o.topK) && o.topK >= -1))
    throw new SamplingError(`top_k must be an integer, -1 or 0 for off or a positive count, got ${o.topK}`);
  if (o.minP !== undefined && !inRange(o.minP, 0, 1)) throw new SamplingError(`min_p must be in [0, 1], got ${o.minP}`);
  if (o.repetitionPenalty !== undefined && !(typeof o.repetitionPenalty === 'number' && o.repetitionPenalty > 0 && Number.isFinite(o.repetitionPenalty)))
    throw new SamplingError(`repetition_penalty must be a finite number > 0, got ${o.repetitionPenalty}`);
  if (o.presencePenalty !== undefined && !inRange(o.presencePenalty, -2, 2)) throw new SamplingError(`presence_penalty must be in [-2, 2], got ${o.presencePenalty}`);
  if (o.frequencyPenalty !== undefined && !inRange(o.frequencyPenalty, -2, 2)) throw new SamplingError(`frequency_penalty must be in [-2, 2], got ${o.frequencyPenalty}`);
  if (o.logitBias !== undefined) {
    if (typeof o.logitBias !== 'object' || o.logitBias === null) throw new SamplingError('logit_bias must be an object of token id to bias');
    for (const [key, bias] of Object.entries(o.logitBias)) {
      const id = Number(key);
      if (!(/^\d+$/.test(key) && id < vocabSize)) throw new SamplingError(`logit_bias token id '${key}' is outside the vocabulary [0, ${vocabSize})`);
      if (!inRange(bias, -100, 100)) throw new SamplingError(`logit_bias of token ${key} must be in [-100, 100], got ${bias}`);
    }
  }
  if (o.seed !== undefined && !Number.isSafeInteger(o.seed)) throw new SamplingError(`seed must be a safe integer, got ${o.seed}`);
  if (o.stopIds !== undefined) {
    if (!Array.isArray(o.stopIds)) throw new SamplingError('stop_token_ids must be an array of token ids');
    const bad = o.stopIds.find((id) => !(Number.isInteger(id) && id >= 0 && id < vocabSize));
    if (bad !== undefined) throw new SamplingError(`stop_token_ids: ${bad} is outside the vocabulary [0, ${vocabSize})`);
  }
}

// Scratch shared by every Sampler: next() is synchronous, so one set per thread suffices and a request
// costs no vocabulary-sized allocation per token (nor per request).
let work = new Float32Array(0); // logits after bias and penalties
let weights = new Float64Array(0); // exp((x - max) / T), 0 for ids filtered out
let buckets = new Uint8Array(0); // top-p histogram bucket of each id
let select = new Float32Array(0); // quickselect copy
let candidates = new Int32Array(0);
let keys = new Float64Array(0); // candidate sort keys

function scratch(n: number): void {
  if (work.length >= n) return;
  work = new Float32Array(n);
  weights = new Float64Array(n);
  buckets = new Uint8Array(n);
  select = new Float32Array(n);
  candidates = new Int32Array(n);
  keys = new Float64Array(n);
}

/**
 * The ids x[i] of `count` candidates (in `candidates`) ordered by logit, highest first, ties by id: the
 * order of decreasing probability. Each (logit, id) pair is packed into one double (the float32's bits
 * mapped to an order-preserving uint32, times 2^idBits, plus the id) so the native numeric sort does it.
 */
function sortCandidates(x: Float32Array, n: number, count: number): Int32Array {
  const ids = candidates.subarray(0, count);
  const idBits = Math.max(1, Math.ceil(Math.log2(n)));
  if (idBits > 21) return ids.sort((a, b) => x[b] - x[a] || a - b); // 32 + 21 bits: exact in a double
  const scale = 2 ** idBits;
  const bits = new Uint32Array(x.buffer, x.byteOffset, n);
  const k = keys.subarray(0, count);
  for (let j = 0; j < count; j++) {
    const i = ids[j];
    let u = bits[i];
    if (u === 0x80000000) u = 0; // -0 sorts as 0
    const ordered = u >= 0x80000000 ? ~u >>> 0 : u + 0x80000000;
    k[j] = (0xffffffff - ordered) * scale + i;
  }
  k.sort();
  for (let j = 0; j < count; j++) ids[j] = k[j] % scale;
  return ids;
}

/** Top-p histogram: BUCKETS_PER_NAT buckets per unit of log-probability below the maximum; the last takes the rest. */
const BUCKETS_PER_NAT = 4;
const BUCKETS = 4 * 24 + 1;
/** Up to this k, top-k keeps a min-heap of the k best; beyond, quickselect on a copy. */
const HEAP_K = 256;

/** The k-th largest value of x (NaN counts as -Infinity); 1 <= k < x.length. */
function kthLargest(x: Float32Array, n: number, k: number): number {
  if (k <= HEAP_K) {
    const heap = new Float64Array(k); // min-heap of the k largest so far
    for (let i = 0; i < k; i++) heap[i] = x[i] === x[i] ? x[i] : -Infinity;
    for (let i = (k >> 1) - 1; i >= 0; i--) siftDown(heap, i, k);
    for (let i = k; i < n; i++) {
      const v = x[i];
      if (v > heap[0]) {
        heap[0] = v;
        siftDown(heap, 0, k);
      }
    }
    return heap[0];
  }
  const a = select;
  for (let i = 0; i < n; i++) a[i] = x[i] === x[i] ? x[i] : -Infinity;
  // Index n - k in ascending order (Hoare partition, median-of-three pivot).
  const target = n - k;
  let lo = 0;
  let hi = n - 1;
  while (hi > lo) {
    const mid = (lo + hi) >>> 1;
    const p = median3(a[lo], a[mid], a[hi]);
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (a[i] < p) i++;
      while (a[j] > p) j--;
      if (i <= j) {
        const t = a[i];
        a[i] = a[j];
        a[j] = t;
        i++;
        j--;
      }
    }
    if (target <= j) hi = j;
    else if (target >= i) lo = i;
    else return a[target];
  }
  return a[target];
}

function median3(a: number, b: number, c: number): number {
  return a < b ? (b < c ? b : a < c ? c : a) : (a < c ? a : b < c ? c : b);
}

function siftDown(h: Float64Array, i: number, n: number): void {
  for (;;) {
    const l = 2 * i + 1;
    if (l >= n) return;
    const c = l + 1 < n && h[l + 1] < h[l] ? l + 1 : l;
    if (!(h[c] < h[i])) return;
    const t = h[c];
    h[c] = h[i];
    h[i] = t;
    i = c;
  }
}

export class Sampler {
  /** The seed in use (drawn with node:crypto when the options have none). */
  readonly seed: number;
  private readonly rng: Rng;
  private readonly temperature: number;
  private readonly topP: number;
  /** 0 = off. */
  private readonly topK: number;
  private readonly minP: number;
  private readonly repetition: number;
  private readonly presence: number;
  private readonly frequency: number;
  private readonly biasIds: Int32Array;
  private readonly biasValues: Float64Array;
  /** Distinct prompt and generated ids (repetition penalty only): membership and a list to iterate. */
  private readonly seen?: Set<number>;
  private readonly seenList: number[] = [];
  /** Generated id -> times generated (presence/frequency penalties only). */
  private readonly counts?: Map<number, number>;

  constructor(o: SamplingOptions, prompt: Int32Array, readonly vocabSize: number) {
    checkSampling(o, vocabSize);
    this.seed = o.seed ?? randomSeed();
    this.rng = new Rng(this.seed);
    this.temperature = o.temperature;
    this.topP = o.topP;
    this.topK = o.topK !== undefined && o.topK > 0 && o.topK < vocabSize ? o.topK : 0;
    this.minP = o.minP ?? 0;
    this.repetition = o.repetitionPenalty ?? 1;
    this.presence = o.presencePenalty ?? 0;
    this.frequency = o.frequencyPenalty ?? 0;
    const bias = Object.entries(o.logitBias ?? {}).filter(([, b]) => b !== 0);
    this.biasIds = Int32Array.from(bias, ([id]) => Number(id));
    this.biasValues = Float64Array.from(bias, ([, b]) => b);
    if (this.repetition !== 1) {
      this.seen = new Set();
      for (const id of prompt) this.remember(id);
    }
    if (this.presence !== 0 || this.frequency !== 0) this.counts = new Map();
  }

  private remember(id: number): void {
    if (this.seen!.has(id)) return;
    this.seen!.add(id);
    this.seenList.push(id);
  }

  /** Picks the next id from one row of logits (never mutates the input) and records it as generated for the penalties. */
  next(logits: Float32Array): number {
    const id = this.choose(logits);
    if (this.seen) this.remember(id);
    if (this.counts) this.counts.set(id, (this.counts.get(id) ?? 0) + 1);
    return id;
  }

  /** The row after logit_bias and the penalties as next() would see it now (a copy; for tests and logprobs). */
  adjust(logits: Float32Array): Float32Array {
    if (logits.length !== this.vocabSize) throw new RangeError(`logits row of ${logits.length} values for a vocabulary of ${this.vocabSize}`);
    return this.adjusted(logits).slice();
  }

  /** The logits after logit_bias and the penalties: the input itself when none applies, else shared scratch. */
  private adjusted(logits: Float32Array): Float32Array {
    if (this.biasIds.length === 0 && !this.seenList.length && !this.counts?.size) return logits;
    const n = this.vocabSize;
    scratch(n);
    const x = work.subarray(0, n);
    x.set(logits);
    for (let i = 0; i < this.biasIds.length; i++) x[this.biasIds[i]] += this.biasValues[i];
    const r = this.repetition;
    for (const id of this.seenList) x[id] = x[id] > 0 ? x[id] / r : x[id] * r;
    if (this.counts)
      for (const [id, count] of this.counts) x[id] -= this.frequency * count + this.presence;
    return x;
  }

  private choose(logits: Float32Array): number {
    const n = this.vocabSize;
    if (logits.length !== n) throw new RangeError(`logits row of ${logits.length} values for a vocabulary of ${n}`);
    const x = this.adjusted(logits);
    let best = -1;
    let max = -Infinity;
    for (let i = 0; i < n; i++) if (x[i] > max) { max = x[i]; best = i; }
    if (best < 0) throw new RangeError('no finite logit to sample from');
    if (this.temperature === 0) return best;
    scratch(n);
    const w = weights;
    const T = this.temperature;
    const cut = this.topK ? kthLargest(x, n, this.topK) : -Infinity;
    const nucleus = this.topP < 1;
    // Without top-p, min-p filters right here (it only compares with the maximum weight, which is 1).
    const floor = nucleus ? 0 : this.minP;
    const hist = new Float64Array(BUCKETS);
    let mass = 0;
    for (let i = 0; i < n; i++) {
      const v = x[i];
      let p = v >= cut ? Math.exp((v - max) / T) : 0;
      if (!(p > 0 && p >= floor)) p = 0; // also NaN
      w[i] = p;
      mass += p;
      if (nucleus && p > 0) {
        const d = ((max - v) / T) * BUCKETS_PER_NAT;
        const b = d < BUCKETS - 1 ? Math.floor(d) : BUCKETS - 1;
        buckets[i] = b;
        hist[b] += p;
      }
    }
    if (!nucleus) {
      // Walk in id order: any fixed order draws with the right probabilities.
      let r = this.rng.next() * mass;
      let last = best;
      for (let i = 0; i < n; i++) {
        if (!(w[i] > 0)) continue;
        last = i;
        r -= w[i];
        if (r <= 0) return i;
      }
      return last;
    }
    // Smallest set of most likely ids whose mass reaches top_p of the (top-k) mass: it lies within the
    // fewest best buckets holding that much. Rounding can leave those a hair short: then widen by a bucket.
    const goal = this.topP * mass;
    let upTo = 0;
    for (let acc = hist[0]; acc < goal && upTo < BUCKETS - 1; ) acc += hist[++upTo];
    for (;;) {
      let count = 0;
      for (let i = 0; i < n; i++) if (w[i] > 0 && buckets[i] <= upTo) candidates[count++] = i;
      const ids = sortCandidates(x, n, count);
      let kept = 0;
      let nucleusMass = 0;
      while (kept < count && nucleusMass < goal) nucleusMass += w[ids[kept++]];
      if (nucleusMass < goal && upTo < BUCKETS - 1) {
        upTo++;
        continue;
      }
      // min-p after top-p: the sorted prefix ends at the first id below it.
      let total = 0;
      let m = 0;
      while (m < kept && w[ids[m]] >= this.minP) total += w[ids[m++]];
      let r = this.rng.next() * total;
      for (let i = 0; i < m; i++) {
        r -= w[ids[i]];
        if (r <= 0) return ids[i];
      }
      return ids[m - 1];
    }
  }
}
