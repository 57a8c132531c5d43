// Autoregressive generation with the attention KV cache: greedy (temperature 0) or sampled with
// temperature and nucleus (top_p), seeded so a given seed reproduces its text.
import { EOS_ID } from './config.js';
import { Rng } from './data/random.js';
import type { KvCache } from './model/attention.js';
import type { MixtralModel } from './model/model.js';
import { disposeAll } from './model/tensors.js';

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

export interface Generation {
  ids: number[];
  finishReason: 'stop' | 'length';
}

/**
 * Continues one prompt; returns only the new ids. `onToken` sees each new id as it is chosen and may
 * return true to stop there (stop sequences, cancelled streams).
 */
export async function generate(model: MixtralModel, prompt: Int32Array, o: SamplingOptions, onToken?: (id: number) => boolean | void): Promise<Generation> {
  checkSampling(o);
  if (prompt.length === 0) throw new SamplingError('prompt must contain at least one token');
  const limit = model.config.max_position_embeddings;
  if (prompt.length > limit) throw new SamplingError(`prompt of ${prompt.length} tokens exceeds the context of ${limit}`);
  const rng = new Rng(o.seed);
  const stop = new Set(o.stopIds ?? [EOS_ID]);
  const vocab = model.config.vocab_size;
  const out: number[] = [];
  let kv: KvCache[] | undefined;
  let past = 0;
  let input = prompt;
  let finishReason: Generation['finishReason'] = 'length';
  try {
    while (out.length < o.maxTokens && past + input.length <= limit) {
      const step = await model.forward(input, 1, input.length, { passId: 'generate', train: false }, kv, past);
      const logits = step.logits.dataSync() as Float32Array;
      disposeAll([step.logits, step.hidden, kv]);
      kv = step.kv;
      past += input.length;
      const next = sampleNext(logits.subarray(logits.length - vocab), o, rng);
      if (stop.has(next)) {
        finishReason = 'stop';
        break;
      }
      out.push(next);
      if (onToken?.(next) === true) {
        finishReason = 'stop';
        break;
      }
      input = Int32Array.of(next);
    }
  } finally {
    disposeAll(kv);
  }
  return { ids: out, finishReason };
}
