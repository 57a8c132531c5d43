// Autoregressive generation with the attention KV cache, one request or many batched continuously:
// greedy (temperature 0) or sampled with temperature and nucleus (top_p), seeded per request.
import { EOS_ID } from './config.js';
import { Rng } from './data/random.js';
import type { KvCache } from './model/attention.js';
import type { MixtralModel } from './model/model.js';
import { disposeAll } from './model/tensors.js';
import { OverloadError } from './overload.js';

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
  /** Why some of its tokens could not reach their experts (overflow policy drop/reroute), if any did. */
  degraded?: string[];
}

/**
 * Continues one prompt; returns only the new ids. `onToken` sees each new id as it is chosen and may
 * return true to stop there (stop sequences, cancelled streams). The same loop as a batch of one.
 */
export function generate(model: MixtralModel, prompt: Int32Array, o: SamplingOptions, onToken?: (id: number) => boolean | void): Promise<Generation> {
  return new ContinuousBatcher(model, { maxSequences: 1 }).submit(prompt, o, onToken);
}

/*
 * Continuous batching: every running generation contributes its next token (a new one its whole prompt)
 * to one model step, so each MoE layer sends every expert holder one message per step whatever the
 * number of requests. A request joins at the next step and leaves when it finishes; its results are
 * exactly those of generating it alone (own sampler and seed, same stopping rule).
 */
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
  deadline?: number;
  timer?: NodeJS.Timeout;
  queuedAt: number;
  /** Settled already (finished, failed or past its deadline): drop it at the next step boundary. */
  done: boolean;
  degraded?: Set<string>;
  resolve: (g: Generation) => void;
  reject: (err: Error) => void;
}

export interface BatcherOptions {
  /** Sequences in one model step (the rest wait). */
  maxSequences?: number;
  /** Requests allowed to wait for a place; beyond it submit() refuses with OverloadError (503). */
  maxWaiting?: number;
  /** Called with the seconds a request waited when it joins the running batch. */
  onAdmit?: (seconds: number) => void;
}

export class ContinuousBatcher {
  private waiting: Running[] = [];
  private running: Running[] = [];
  private looping = false;
  private steps = 0;
  private closing = false;
  private idle?: () => void;
  /** Steps run and the largest number of sequences in one step, for tests and metrics. */
  readonly stats = { steps: 0, maxSequencesPerStep: 0 };
  readonly maxSequences: number;
  readonly maxWaiting: number;
  private readonly onAdmit?: (seconds: number) => void;

  constructor(private readonly model: MixtralModel, options: BatcherOptions = {}) {
    this.maxSequences = options.maxSequences ?? 64;
    this.maxWaiting = options.maxWaiting ?? Number.POSITIVE_INFINITY;
    this.onAdmit = options.onAdmit;
  }

  /** Requests waiting for a place and running now (for metrics and admission). */
  get depth(): { waiting: number; running: number } {
    return { waiting: this.waiting.length, running: this.running.length };
  }

  /**
   * Queues a generation. `deadline` (epoch ms): if it has not finished by then it is rejected with
   * OverloadError('deadline') at that moment, and leaves the batch at the next step.
   */
  submit(prompt: Int32Array, sampling: SamplingOptions, onToken?: (id: number) => boolean | void, requestId?: string, deadline?: number): Promise<Generation> {
    try {
      checkSampling(sampling);
    } catch (err) {
      return Promise.reject(err);
    }
    if (this.closing) return Promise.reject(new OverloadError('the router is shutting down', 'shutting_down'));
    if (this.waiting.length >= this.maxWaiting)
      return Promise.reject(new OverloadError(`the admission queue is full (${this.maxWaiting} requests waiting)`, 'queue_full'));
    if (deadline !== undefined && deadline <= Date.now()) return Promise.reject(new OverloadError('the request deadline passed before it was queued', 'deadline'));
    if (prompt.length === 0) return Promise.reject(new SamplingError('prompt must contain at least one token'));
    const limit = this.model.config.max_position_embeddings;
    if (prompt.length > limit) return Promise.reject(new SamplingError(`prompt of ${prompt.length} tokens exceeds the context of ${limit}`));
    return new Promise<Generation>((resolve, reject) => {
      const s: Running = {
        sampling, rng: new Rng(sampling.seed), stop: new Set(sampling.stopIds ?? [EOS_ID]), out: [],
        pending: prompt, past: 0, onToken, requestId, deadline, done: false, resolve, reject, queuedAt: performance.now(),
      };
      if (deadline !== undefined)
        s.timer = setTimeout(() => {
          if (s.done) return;
          const queued = this.waiting.includes(s);
          this.waiting = this.waiting.filter((w) => w !== s);
          this.fail(s, new OverloadError(queued ? 'the request deadline passed while it waited for a place' : 'the request deadline passed during generation', 'deadline'));
        }, deadline - Date.now());
      this.waiting.push(s);
      if (!this.looping) void this.loop();
    });
  }

  // Settling never frees the KV cache: a deadline can fire while a step still reads it. The loop
  // frees it when the sequence leaves the running set (release).
  private settle(s: Running): void {
    s.done = true;
    clearTimeout(s.timer);
  }

  private release(s: Running): void {
    disposeAll(s.kv);
    s.kv = undefined;
  }

  private finish(s: Running, finishReason: Generation['finishReason']): void {
    if (s.done) return;
    this.settle(s);
    s.resolve({ ids: s.out, finishReason, ...(s.degraded ? { degraded: [...s.degraded] } : {}) });
  }

  private fail(s: Running, err: Error): void {
    if (s.done) return;
    this.settle(s);
    s.reject(err);
  }

  /** Refuses new requests and resolves once every queued and running one has finished. */
  drain(): Promise<void> {
    this.closing = true;
    if (!this.looping && this.running.length === 0 && this.waiting.length === 0) return Promise.resolve();
    return new Promise((resolve) => { this.idle = resolve; });
  }

  private async loop(): Promise<void> {
    this.looping = true;
    const limit = this.model.config.max_position_embeddings;
    try {
      while (this.running.length || this.waiting.length) {
        this.running = this.running.filter((s) => {
          if (s.done) this.release(s);
          return !s.done;
        });
        while (this.waiting.length && this.running.length < this.maxSequences) {
          const s = this.waiting.shift()!;
          this.onAdmit?.((performance.now() - s.queuedAt) / 1000);
          this.running.push(s);
        }
        // Same stopping rule as generate(): room for the pending ids and tokens still wanted.
        this.running = this.running.filter((s) => {
          if (s.done) return false;
          if (s.out.length < s.sampling.maxTokens && s.past + s.pending.length <= limit) return true;
          this.finish(s, 'length');
          this.release(s);
          return false;
        });
        if (!this.running.length) continue;
        const batch = this.running;
        this.stats.steps = ++this.steps;
        this.stats.maxSequencesPerStep = Math.max(this.stats.maxSequencesPerStep, batch.length);
        let results: Awaited<ReturnType<MixtralModel['decodeBatch']>>;
        // Messages to the experts may wait as long as the most patient request of the step.
        const deadline = batch.every((s) => s.deadline !== undefined) ? Math.max(...batch.map((s) => s.deadline!)) : undefined;
        try {
          results = await this.model.decodeBatch(batch.map((s) => ({ ids: s.pending, kv: s.kv, past: s.past })), `gen${this.steps}`,
            { requestIds: batch.flatMap((s) => (s.requestId ? [s.requestId] : [])), deadline });
        } catch (err) {
          for (const s of batch) {
            this.fail(s, err as Error);
            this.release(s);
          }
          this.running = [];
          continue;
        }
        const still: Running[] = [];
        batch.forEach((s, i) => {
          disposeAll(s.kv);
          s.kv = results[i].kv;
          if (s.done) return this.release(s); // left during the step (deadline)
          try {
            for (const reason of results[i].degraded ?? []) (s.degraded ??= new Set()).add(reason);
            s.past += s.pending.length;
            const next = sampleNext(results[i].logits, s.sampling, s.rng);
            if (s.stop.has(next)) this.finish(s, 'stop');
            else {
              s.out.push(next);
              if (s.onToken?.(next) === true) this.finish(s, 'stop');
            }
          } catch (err) {
            // A failing callback (e.g. a client's stream) ends its own request, not the batch.
            this.fail(s, err as Error);
          }
          if (s.done) return this.release(s);
          s.pending = Int32Array.of(s.out[s.out.length - 1]);
          still.push(s);
        });
        // Requests that joined during the step run from the next one.
        this.running = still;
      }
    } catch (err) {
      // Nothing may stay unanswered (or crash the process) if the loop itself fails.
      for (const s of [...this.running, ...this.waiting]) {
        this.fail(s, err as Error);
        this.release(s);
      }
      this.running = [];
      this.waiting = [];
    } finally {
      this.looping = false;
      if (this.closing) this.idle?.();
    }
  }
}
