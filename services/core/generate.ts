// Autoregressive generation with the attention KV cache, one request or many batched continuously:
// greedy (temperature 0) or sampled with temperature and nucleus (top_p), seeded per request.
import { Rng } from './data/random.js';

export interface SamplingOptions {
  maxTokens: number;
  /** 0 = greedy. */
  temperature: number;
  topP: number;
  seed: number;
  /** Token ids that end generation (besides the context limit). */
  stopIds?: number[];
}

export class SamplingError extends RangeError {
  override name = 'SamplingError';
}

export function checkSampling(o: SamplingOptions): void {
  if (!Number.isInteger(o.maxTokens) || o.maxTokens < 0) throw new SamplingError(`max_tokens must be a non-negative integer, got ${o.maxTokens}`);
  if (!(o.temperature >= 0) || !Number.isFinite(o.temperature)) throw new SamplingError(`temperature must be ≥ 0, got ${o.temperature}`);
  if (!(o.topP > 0 && o.topP <= 1)) throw new SamplingError(`top_p must be in (0, 1], got ${o.topP}`);
}

/** Picks the next id from one row of logits. */
export function sampleNext(logits: Float32Array, o: Pick<SamplingOptions, 'temperature' | 'topP'>, rng: Rng): number {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  if (o.temperature === 0) return best;
  const probs = new Float64Array(logits.length);
  let sum = 0;
  for (let i = 0; i < logits.length; i++) {
    probs[i] = Math.exp((logits[i] - logits[best]) / o.temperature);
    sum += probs[i];
  }
  const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a]);
  // Smallest set of most likely ids whose mass reaches top_p.
  let kept = 0;
  let mass = 0;
  while (kept < order.length && mass < o.topP * sum) mass += probs[order[kept++]];
  let r = rng.next() * mass;
  for (let i = 0; i < kept; i++) {
    r -= probs[order[i]];
    if (r <= 0) return order[i];
  }
  return order[kept - 1];
}

