// Continuous batching: every running generation contributes its next token (a new one its whole prompt)
// to one model step, so each MoE layer sends every shard one message per step whatever the number of
// requests. A request joins at the next step and leaves when it finishes; results are exactly those of
// generating it alone (same sampling and seed).
import { EOS_ID } from '../core/config.js';
import { Rng } from '../core/data/random.js';
import { checkSampling, sampleNext, type Generation, type SamplingOptions } from '../core/generate.js';
import type { KvCache } from '../core/model/attention.js';
import type { MixtralModel } from '../core/model/model.js';
import { disposeAll } from '../core/model/tensors.js';

interface Running {
  sampling: SamplingOptions;
  rng: Rng;
  stop: Set<number>;
  out: number[];
  /** Ids to feed at the next step: the prompt first, then the last sampled id. */
  pending: Int32Array;
  past: number;
  kv?: KvCache[];
  onToken?: (id: number) => boolean | void;
  requestId?: string;
  resolve: (g: Generation) => void;
  reject: (err: Error) => void;
}

export class ContinuousBatcher {
  private readonly waiting: Running[] = [];
  private running: Running[] = [];
  private looping = false;
  private steps = 0;
  /** Steps run and the largest number of sequences in one step, for tests and metrics. */
  readonly stats = { steps: 0, maxSequencesPerStep: 0 };

  constructor(private readonly model: MixtralModel, readonly maxSequences = 64) {}

  submit(prompt: Int32Array, sampling: SamplingOptions, onToken?: (id: number) => boolean | void, requestId?: string): Promise<Generation> {
    checkSampling(sampling);
    if (prompt.length === 0) return Promise.reject(new RangeError('prompt must contain at least one token'));
    const limit = this.model.config.max_position_embeddings;
    if (prompt.length > limit) return Promise.reject(new RangeError(`prompt of ${prompt.length} tokens exceeds the context of ${limit}`));
    return new Promise<Generation>((resolve, reject) => {
      this.waiting.push({
        sampling, rng: new Rng(sampling.seed), stop: new Set(sampling.stopIds ?? [EOS_ID]), out: [],
        pending: prompt, past: 0, onToken, requestId, resolve, reject,
      });
      if (!this.looping) void this.loop();
    });
  }

  private finish(s: Running, finishReason: Generation['finishReason']): void {
    disposeAll(s.kv);
    s.kv = undefined;
    s.resolve({ ids: s.out, finishReason });
  }

  private async loop(): Promise<void> {
    this.looping = true;
    const limit = this.model.config.max_position_embeddings;
    try {
      while (this.running.length || this.waiting.length) {
        while (this.waiting.length && this.running.length < this.maxSequences) this.running.push(this.waiting.shift()!);
        // Same stopping rule as generate(): room for the pending ids and tokens still wanted.
        this.running = this.running.filter((s) => {
          if (s.out.length < s.sampling.maxTokens && s.past + s.pending.length <= limit) return true;
          this.finish(s, 'length');
          return false;
        });
        if (!this.running.length) continue;
        const batch = this.running;
        this.stats.steps = ++this.steps;
        this.stats.maxSequencesPerStep = Math.max(this.stats.maxSequencesPerStep, batch.length);
        let results: Awaited<ReturnType<MixtralModel['decodeBatch']>>;
        try {
          results = await this.model.decodeBatch(batch.map((s) => ({ ids: s.pending, kv: s.kv, past: s.past })), `gen${this.steps}`,
            batch.flatMap((s) => (s.requestId ? [s.requestId] : [])));
        } catch (err) {
          for (const s of batch) {
            disposeAll(s.kv);
            s.reject(err as Error);
          }
          this.running = [];
          continue;
        }
        const still: Running[] = [];
        batch.forEach((s, i) => {
          disposeAll(s.kv);
          s.kv = results[i].kv;
          s.past += s.pending.length;
          const next = sampleNext(results[i].logits, s.sampling, s.rng);
          if (s.stop.has(next)) return this.finish(s, 'stop');
          s.out.push(next);
          if (s.onToken?.(next) === true) return this.finish(s, 'stop');
          s.pending = Int32Array.of(next);
          still.push(s);
        });
        // Requests that joined during the step run from the next one.
        this.running = still;
      }
    } finally {
      this.looping = false;
    }
  }
}
