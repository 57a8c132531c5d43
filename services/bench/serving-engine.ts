// The only place the serving bench touches the inference engine (issue 15): the engine rewrite changes
// this file and nothing else in the bench, so the same suite measures the engine before and after.
// Before the rewrite it wrapped ContinuousBatcher (services/core/generate.ts, commit c1d01d9);
// now the router's Scheduler with its defaults (paged KV cache, 2 048-token budget, prefix caching).
import type { MixtralModel } from '../core/model/model.js';
import { Scheduler } from '../router/scheduler.js';

/** What one request asks for. The bench always sends temperature 0 and `stopIds: []`. */
export interface EngineSampling {
  maxTokens: number;
  /** 0 = greedy. */
  temperature: number;
  topP: number;
  seed: number;
  /** Ids that end generation early; [] = always generate maxTokens (within the context limit). */
  stopIds: number[];
  /** Token id → logit bias (the cluster comparison keeps output ids below 128, so text carries them exactly). */
  logitBias?: Record<number, number>;
}

export interface ServingEngine {
  /** Queues a generation; `onToken` is called with each new id as soon as it is chosen. */
  submit(prompt: Int32Array, sampling: EngineSampling, onToken: (id: number) => void): Promise<{ ids: number[] }>;
  /** Resolves once every submitted request has finished; the engine takes no more requests. */
  close(): Promise<void>;
}

/** Names the engine in the bench's JSON, so results before and after the rewrite tell which they measured. */
export const ENGINE_NAME = 'Scheduler (services/router/scheduler.ts: paged KV cache, batched step, chunked prefill, prefix caching)';

/** The KV cache the bench's engines get, here and on the cluster's routers (--kv-cache-tokens). */
export const benchKvCacheTokens = (model: MixtralModel, maxSequences: number): number => Math.max(model.config.max_position_embeddings, maxSequences * 256);

/**
 * An engine serving `model` in this process, running at most `maxSequences` sequences per step;
 * `prefixCaching: false` as a router's --no-prefix-caching.
 */
export async function startEngine(model: MixtralModel, options: { maxSequences: number; prefixCaching?: boolean }): Promise<ServingEngine> {
  // The KV cache the bench's requests need (the longest is the 1 520-id prefix request), not the default
  // of every sequence at full context: a fresh engine per round would otherwise leave gigabytes of touched
  // blocks to the garbage collector between rounds.
  const kvCacheTokens = benchKvCacheTokens(model, options.maxSequences);
  const batcher = new Scheduler(model, { maxSequences: options.maxSequences, kvCacheTokens, prefixCaching: options.prefixCaching });
  return {
    submit: async (prompt, sampling, onToken) => {
      const g = await batcher.submit(prompt, sampling, (id) => { onToken(id); });
      return { ids: g.ids };
    },
    close: () => batcher.drain(),
  };
}
