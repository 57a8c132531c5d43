// The serving scheduler (vLLM's, in small): admission, the per-step token budget with chunked prefill,
// the paged KV cache's blocks (with automatic prefix caching) and preemption. Each step it picks every
// running decode (one token each), then prompt chunks of running prefills, then admits waiting requests
// first come first served while tokens, sequences and blocks last; the model runs the step as one
// batched pass (MixtralModel.step). The model code keeps the math; this module keeps the bookkeeping.
import { totalmem } from 'node:os';
import { EOS_ID, headDim, type ModelConfig } from '../core/config.js';
import { familyOf } from '../core/model/family.js';
import { KvStore } from '../core/model/kv-store.js';
import type { MixtralModel, StepSequence } from '../core/model/model.js';
import { OverloadError } from '../core/overload.js';
import { Sampler, SamplingError, type SamplingOptions } from '../core/sampling.js';
import { MAX_TOP_LOGPROBS, tokenLogprob, type TokenLogprob } from '../core/logprobs.js';
import { BlockManager } from './kv-blocks.js';

export interface Generation {
  ids: number[];
  finishReason: 'stop' | 'length';
  /** Why some of its tokens could not reach their experts (overflow policy drop/reroute), if any did. */
  degraded?: string[];
  /** Prompt tokens whose K/V came from the prefix cache (not computed for this request). */
  cachedPromptTokens: number;
  /** The sampling seed in use (drawn at random when the request named none). */
  seed: number;
  /** With LogprobRequest.logprobs: one per id of `ids`. */
  logprobs?: TokenLogprob[];
  /** With LogprobRequest.promptLogprobs: one per prompt id, null for the first (nothing predicts it). */
  promptLogprobs?: Array<TokenLogprob | null>;
}

/** Log-probabilities a generation reports (core/logprobs.ts): how many most likely alternatives with each. */
export interface LogprobRequest {
  /** Of every generated id. */
  logprobs?: number;
  /** Of every prompt id: the prompt is then computed in full (no prefix cache) and max_tokens may be 0. */
  promptLogprobs?: number;
  /** Called once the prompt's log-probabilities are all known, before the first generated id. */
  onPromptLogprobs?: (logprobs: Array<TokenLogprob | null>) => void;
}

/** Called with each generated id (and its log-probability when asked for); true stops the generation. */
export type OnToken = (id: number, logprob?: TokenLogprob) => boolean | void;

export interface SchedulerOptions {
  /** Sequences in one step (the rest wait). */
  maxSequences?: number;
  /** Requests allowed to wait for a place; beyond it submit() refuses with OverloadError (503). */
  maxWaiting?: number;
  /** Tokens (rows) in one step: decodes first, then prompt chunks (vLLM's max_num_batched_tokens). */
  maxBatchedTokens?: number;
  /** Tokens the KV cache holds over all sequences (rounded up to whole blocks). */
  kvCacheTokens?: number;
  /** Tokens per KV block. */
  blockTokens?: number;
  /** Reuse the K/V of full prompt blocks another request computed (on by default). */
  prefixCaching?: boolean;
  /** The seconds a request waited, when it joins the running batch. */
  onAdmit?: (seconds: number) => void;
  /** Prompt tokens found in the prefix cache and computed, per admitted request. */
  onPrefix?: (hitTokens: number, missTokens: number) => void;
  /** A running sequence gave its blocks back to be recomputed later. */
  onPreempt?: () => void;
}

export const DEFAULT_BLOCK_TOKENS = 16;
export const DEFAULT_MAX_BATCHED_TOKENS = 2048;
// The KV cache may take this share of the machine's memory by default (K/V live in host memory).
const KV_MEMORY_SHARE = 0.25;
// A prompt chunk whose every row goes through the LM head (prompt logprobs) holds at most this many logits.
const PROMPT_LOGITS_FLOATS = 16 * 2 ** 20;

/** The default KV cache size: every sequence at full context, within a quarter of the memory the process may use. */
export function defaultKvCacheTokens(model: MixtralModel, maxSequences: number): number {
  const c = model.config;
  const perToken = KvStore.bytesPerToken(c.num_hidden_layers, c.num_key_value_heads, headDim(c));
  // In a container the cgroup's limit, not the node's memory, is what the process may use.
  const limit = process.constrainedMemory?.() || Number.POSITIVE_INFINITY;
  const fits = Math.floor((Math.min(totalmem(), limit) * KV_MEMORY_SHARE) / perToken);
  return Math.max(c.max_position_embeddings, Math.min(maxSequences * c.max_position_embeddings, fits));
}

interface Request {
  /** Arrival order: the oldest runs first, the newest is preempted first. */
  order: number;
  sampling: SamplingOptions;
  sampler: Sampler;
  stop: Set<number>;
  promptLength: number;
  /** Prompt and generated ids so far. */
  tokens: number[];
  /** Ids whose K/V are in this request's blocks. */
  computed: number;
  /** Its block table (−1: released by the sliding window). */
  blocks: number[];
  /** Prefix-cache key of each full block, in order. */
  keys: string[];
  cachedPromptTokens: number;
  want: LogprobRequest;
  logprobs?: TokenLogprob[];
  promptLogprobs?: Array<TokenLogprob | null>;
  /** onPromptLogprobs was called (a recomputed prompt does not call it again). */
  promptLogprobsSent?: boolean;
  onToken?: OnToken;
  requestId?: string;
  deadline?: number;
  timer?: NodeJS.Timeout;
  queuedAt: number;
  /** Settled already (finished, failed or past its deadline): leaves at the next step boundary. */
  done: boolean;
  degraded?: Set<string>;
  resolve: (g: Generation) => void;
  reject: (err: Error) => void;
}

interface Scheduled { r: Request; tokens: number }

/**
 * How far back any layer attends: a block holds every layer's K/V, so it is freed only once the widest
 * window has passed it (GPT-OSS's full layers keep everything; undefined = nothing is ever freed).
 */
function kvWindow(config: ModelConfig): number | undefined {
  const family = familyOf(config);
  let widest = 0;
  for (let l = 0; l < family.layers; l++) {
    const w = family.window(l);
    if (w === undefined) return undefined;
    widest = Math.max(widest, w);
  }
  return widest;
}

export class Scheduler {
  private waiting: Request[] = [];
  private running: Request[] = [];
  private looping = false;
  private arrivals = 0;
  private closing = false;
  private idle?: () => void;
  private cacheVersion: number;
  readonly store: KvStore;
  readonly blocks: BlockManager;
  readonly maxSequences: number;
  readonly maxWaiting: number;
  readonly maxBatchedTokens: number;
  readonly prefixCaching: boolean;
  /** Positions any layer still reads behind a query (kvWindow); undefined: blocks are never freed early. */
  private readonly kvWindow: number | undefined;
  /** Steps run, the most sequences and tokens in one, preemptions: for tests and metrics. */
  readonly stats = { steps: 0, maxSequencesPerStep: 0, maxTokensPerStep: 0, preemptions: 0 };

  constructor(private readonly model: MixtralModel, private readonly options: SchedulerOptions = {}) {
    const c = model.config;
    this.maxSequences = positive(options.maxSequences ?? 64, 'max sequences');
    this.maxWaiting = options.maxWaiting ?? Number.POSITIVE_INFINITY;
    this.maxBatchedTokens = positive(options.maxBatchedTokens ?? DEFAULT_MAX_BATCHED_TOKENS, 'max batched tokens');
    this.prefixCaching = options.prefixCaching ?? true;
    this.kvWindow = kvWindow(c);
    const blockTokens = positive(options.blockTokens ?? DEFAULT_BLOCK_TOKENS, 'KV block tokens');
    const tokens = options.kvCacheTokens ?? defaultKvCacheTokens(model, this.maxSequences);
    const blocks = Math.ceil(tokens / blockTokens);
    // One sequence at full context must always fit, or a long prompt could wait forever.
    const fullContext = Math.ceil(c.max_position_embeddings / blockTokens);
    if (blocks < fullContext)
      throw new RangeError(`the KV cache of ${tokens} tokens cannot hold one sequence at the full context of ${c.max_position_embeddings} tokens`);
    this.store = new KvStore({ layers: c.num_hidden_layers, kvHeads: c.num_key_value_heads, headDim: headDim(c), blockTokens, blocks });
    this.blocks = new BlockManager(blocks, blockTokens);
    this.cacheVersion = model.dense.version;
  }

  /** Requests waiting for a place and running now (for metrics and admission). */
  get depth(): { waiting: number; running: number } {
    return { waiting: this.waiting.length, running: this.running.length };
  }

  /**
   * Queues a generation. `onToken` sees each new id and may return true to stop there (stop sequences,
   * a client that went away). `deadline` (epoch ms): if it has not finished by then it is rejected with
   * OverloadError('deadline') at that moment and leaves at the next step. `signal` (the client went away)
   * ends it as stopped at once, also while it waits or is still in its prefill; its blocks are given back
   * at the next step boundary.
   */
  submit(
    prompt: Int32Array, sampling: SamplingOptions, onToken?: OnToken, requestId?: string, deadline?: number, signal?: AbortSignal, want: LogprobRequest = {},
  ): Promise<Generation> {
    for (const [field, n] of [['logprobs', want.logprobs], ['prompt logprobs', want.promptLogprobs]] as const)
      if (n !== undefined && !(Number.isInteger(n) && n >= 0 && n <= MAX_TOP_LOGPROBS))
        return Promise.reject(new SamplingError(`${field} must be an integer in [0, ${MAX_TOP_LOGPROBS}], got ${n}`));
    const vocab = this.model.config.vocab_size;
    let sampler: Sampler;
    try {
      sampler = new Sampler(sampling, prompt, vocab); // checks the options (SamplingError: 400)
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
    for (let i = 0; i < prompt.length; i++)
      if (!(prompt[i] >= 0 && prompt[i] < vocab)) return Promise.reject(new SamplingError(`token id ${prompt[i]} at position ${i} is outside the vocabulary [0, ${vocab})`));
    return new Promise<Generation>((resolve, reject) => {
      const r: Request = {
        order: this.arrivals++, sampling, sampler, stop: new Set(sampling.stopIds ?? [EOS_ID]),
        promptLength: prompt.length, tokens: Array.from(prompt), computed: 0, blocks: [], keys: [], cachedPromptTokens: 0,
        want, ...(want.logprobs !== undefined ? { logprobs: [] } : {}),
        ...(want.promptLogprobs !== undefined ? { promptLogprobs: Array.from({ length: prompt.length }, () => null) } : {}),
        onToken, requestId, deadline, queuedAt: performance.now(), done: false, resolve, reject,
      };
      if (deadline !== undefined)
        r.timer = setTimeout(() => {
          if (r.done) return;
          const queued = this.waiting.includes(r);
          if (queued) this.waiting = this.waiting.filter((w) => w !== r);
          this.fail(r, new OverloadError(queued ? 'the request deadline passed while it waited for a place' : 'the request deadline passed during generation', 'deadline'));
        }, deadline - Date.now());
      signal?.addEventListener('abort', () => {
        if (r.done) return;
        this.waiting = this.waiting.filter((w) => w !== r);
        this.finish(r, 'stop');
      }, { once: true });
      if (signal?.aborted) return this.finish(r, 'stop');
      this.waiting.push(r);
      if (!this.looping) void this.loop();
    });
  }

  /** Refuses new requests and resolves once every queued and running one has finished. */
  drain(): Promise<void> {
    this.closing = true;
    if (!this.looping && this.running.length === 0 && this.waiting.length === 0) return Promise.resolve();
    return new Promise((resolve) => { this.idle = resolve; });
  }

  private settle(r: Request): void {
    r.done = true;
    clearTimeout(r.timer);
  }

  private finish(r: Request, finishReason: Generation['finishReason']): void {
    if (r.done) return;
    this.settle(r);
    r.resolve({
      ids: r.tokens.slice(r.promptLength), finishReason, cachedPromptTokens: r.cachedPromptTokens, seed: r.sampler.seed,
      ...(r.logprobs ? { logprobs: r.logprobs } : {}), ...(r.promptLogprobs ? { promptLogprobs: r.promptLogprobs } : {}),
      ...(r.degraded ? { degraded: [...r.degraded] } : {}),
    });
  }

  private fail(r: Request, err: Error): void {
    if (r.done) return;
    this.settle(r);
    r.reject(err);
  }

  // Blocks are given back only between steps: a deadline can fire while a step still writes them.
  private releaseBlocks(r: Request): void {
    // The tail first, so the prefix cache evicts a sequence's last blocks before its first ones.
    for (let i = r.blocks.length - 1; i >= 0; i--) this.blocks.release(r.blocks[i]);
    r.blocks = [];
    r.computed = 0;
  }

  /** Gives `r` blocks for its first `upto` ids; false when the pool has none left. */
  private reserve(r: Request, upto: number): boolean {
    const B = this.blocks.blockTokens;
    while (r.blocks.length * B < upto) {
      const b = this.blocks.allocate();
      if (b === undefined) return false;
      r.blocks.push(b);
    }
    return true;
  }

  /** vLLM's recompute preemption: `r` gives back every block and waits at the head of the queue. */
  private preempt(r: Request): void {
    this.releaseBlocks(r);
    this.running = this.running.filter((x) => x !== r);
    this.waiting.unshift(r);
    this.stats.preemptions++;
    this.options.onPreempt?.();
  }

  /** Prompt blocks another request already computed: held by `r`, skipped by its prefill. */
  private adoptCachedPrefix(r: Request): void {
    const B = this.blocks.blockTokens;
    // The last id is always computed: its logits start the generation.
    const full = Math.floor((r.tokens.length - 1) / B);
    this.fillKeys(r, full);
    for (let i = 0; i < full; i++) {
      const b = this.blocks.acquire(r.keys[i]);
      if (b === undefined) break;
      r.blocks.push(b);
    }
    r.computed = r.blocks.length * B;
  }

  /** Computes the prefix keys of r's first `count` full blocks. */
  private fillKeys(r: Request, count: number): void {
    const B = this.blocks.blockTokens;
    for (let i = r.keys.length; i < count; i++)
      r.keys.push(BlockManager.key(i === 0 ? '' : r.keys[i - 1], Int32Array.from(r.tokens.slice(i * B, (i + 1) * B))));
  }

  /** Whether r's next chunk needs every row's logits (prompt ids whose log-probabilities are still to come). */
  private wantsRowLogits(r: Request): boolean {
    return r.promptLogprobs !== undefined && r.computed < r.promptLength;
  }

  /** Longest chunk r may feed: bounded when every row's logits come back (prompt logprobs). */
  private headRowCap(r: Request): number {
    return this.wantsRowLogits(r) ? Math.max(1, Math.floor(PROMPT_LOGITS_FLOATS / this.model.config.vocab_size)) : Number.POSITIVE_INFINITY;
  }

  /** This step's sequences and how many ids each feeds. */
  private schedule(): Scheduled[] {
    const B = this.blocks.blockTokens;
    let budget = this.maxBatchedTokens;
    const picked: Scheduled[] = [];
    const pickedOf = new Map<Request, Scheduled>();
    const byAge = [...this.running].sort((a, b) => a.order - b.order);
    const decoding = byAge.filter((r) => r.tokens.length - r.computed === 1);
    const prefilling = byAge.filter((r) => r.tokens.length - r.computed > 1);
    // A running prefill leaves half the budget to waiting requests, so a long prompt cannot hold back
    // the first token of those behind it for its whole prefill.
    const prefillShare = () => (this.waiting.length > 0 && this.running.length < this.maxSequences ? Math.ceil(this.maxBatchedTokens / 2) : this.maxBatchedTokens);
    for (const r of [...decoding, ...prefilling]) {
      if (!this.running.includes(r) || budget === 0) continue;
      const wanted = r.tokens.length - r.computed;
      const tokens = wanted === 1 ? 1 : Math.min(wanted, budget, Math.max(1, prefillShare() - (this.maxBatchedTokens - budget)), this.headRowCap(r));
      if (tokens <= 0) continue;
      // Out of blocks: the newest running sequence is recomputed later, until r fits or is itself the newest.
      while (!this.reserve(r, r.computed + tokens)) {
        const newest = this.running.reduce((a, b) => (b.order > a.order ? b : a));
        const victimPick = pickedOf.get(newest);
        if (victimPick) {
          budget += victimPick.tokens;
          picked.splice(picked.indexOf(victimPick), 1);
          pickedOf.delete(newest);
        }
        this.preempt(newest);
        if (newest === r) break;
      }
      if (!this.running.includes(r)) continue;
      const s = { r, tokens };
      picked.push(s);
      pickedOf.set(r, s);
      budget -= tokens;
    }
    // Admission, first come first served: a request joins when the blocks for its whole prompt are free.
    while (this.waiting.length && this.running.length < this.maxSequences && budget > 0) {
      const r = this.waiting[0];
      // Cached blocks skip their rows, and with them the rows' logits: prompt logprobs compute the whole prompt.
      if (this.prefixCaching && r.computed === 0 && !r.promptLogprobs) this.adoptCachedPrefix(r);
      const needed = Math.ceil(r.tokens.length / B) - r.blocks.length;
      if (needed > this.blocks.available) {
        this.releaseBlocks(r);
        break;
      }
      this.waiting.shift();
      if (r.tokens.length === r.promptLength) {
        r.cachedPromptTokens = r.computed;
        this.options.onPrefix?.(r.computed, r.promptLength - r.computed);
      }
      this.options.onAdmit?.((performance.now() - r.queuedAt) / 1000);
      this.running.push(r);
      const tokens = Math.min(r.tokens.length - r.computed, budget, this.headRowCap(r));
      this.reserve(r, r.computed + tokens);
      const s = { r, tokens };
      picked.push(s);
      pickedOf.set(r, s);
      budget -= tokens;
    }
    return picked;
  }

  /** After a step: keys of blocks that just filled, and blocks the sliding window no longer reaches. */
  private afterStep(r: Request, before: number): void {
    const B = this.blocks.blockTokens;
    if (this.prefixCaching) {
      const full = Math.floor(r.computed / B);
      if (full > Math.floor(before / B)) {
        this.fillKeys(r, full);
        for (let i = Math.floor(before / B); i < full; i++) if (r.blocks[i] >= 0) this.blocks.register(r.blocks[i], r.keys[i]);
      }
    }
    const window = this.kvWindow;
    if (window === undefined) return;
    // The next query sits at position `computed`; keys before computed − window + 1 are out of its reach.
    const firstKept = Math.floor(Math.max(0, r.computed - window + 1) / B);
    for (let i = 0; i < firstKept; i++)
      if (r.blocks[i] >= 0) {
        this.blocks.release(r.blocks[i]);
        r.blocks[i] = -1;
      }
  }

  private async loop(): Promise<void> {
    this.looping = true;
    const limit = this.model.config.max_position_embeddings;
    try {
      while (this.running.length || this.waiting.length) {
        // Timers (deadlines) and new requests get their turn between steps, also when the experts answer
        // without ever leaving the microtask queue (in-process).
        await new Promise((resolve) => setImmediate(resolve));
        this.running = this.running.filter((r) => {
          // Same stopping rule as always: tokens still wanted and room in the context for the next id (a
          // request for prompt logprobs first computes its prompt, also with max_tokens 0).
          if (!r.done && !this.wantsRowLogits(r) && !(r.tokens.length - r.promptLength < r.sampling.maxTokens && r.tokens.length <= limit)) this.finish(r, 'length');
          if (r.done) this.releaseBlocks(r);
          return !r.done;
        });
        for (const r of this.waiting) if (!r.done && r.sampling.maxTokens === 0 && !r.promptLogprobs) this.finish(r, 'length');
        this.waiting = this.waiting.filter((r) => !r.done);
        if (this.model.dense.version !== this.cacheVersion) {
          // New weights (a training step): cached blocks no longer match their tokens.
          this.blocks.clearCache();
          this.cacheVersion = this.model.dense.version;
        }
        const picked = this.schedule();
        if (!picked.length) continue;
        this.stats.steps++;
        this.stats.maxSequencesPerStep = Math.max(this.stats.maxSequencesPerStep, picked.length);
        this.stats.maxTokensPerStep = Math.max(this.stats.maxTokensPerStep, picked.reduce((n, p) => n + p.tokens, 0));
        const seqs: StepSequence[] = picked.map(({ r, tokens }) => ({
          ids: Int32Array.from(r.tokens.slice(r.computed, r.computed + tokens)), past: r.computed, blocks: r.blocks,
          logits: r.computed + tokens === r.tokens.length, allLogits: this.wantsRowLogits(r),
        }));
        // Messages to the experts may wait as long as the most patient request of the step.
        const deadline = picked.every((p) => p.r.deadline !== undefined) ? Math.max(...picked.map((p) => p.r.deadline!)) : undefined;
        let results: Awaited<ReturnType<MixtralModel['step']>>;
        try {
          results = await this.model.step(seqs, this.store, `gen${this.stats.steps}`,
            { requestIds: picked.flatMap((p) => (p.r.requestId ? [p.r.requestId] : [])), deadline });
        } catch (err) {
          for (const { r } of picked) {
            this.fail(r, err as Error);
            this.releaseBlocks(r);
          }
          this.running = this.running.filter((r) => !r.done);
          continue;
        }
        picked.forEach(({ r, tokens }, i) => {
          const before = r.computed;
          r.computed += tokens;
          this.afterStep(r, before);
          if (r.done) return; // left during the step (deadline); its blocks go at the next boundary
          for (const reason of results[i].degraded ?? []) (r.degraded ??= new Set()).add(reason);
          const rows = results[i].rowLogits;
          if (rows && r.promptLogprobs) {
            // Row j holds the distribution of the id at position before + j + 1.
            const V = this.model.config.vocab_size;
            for (let j = 0; j < tokens; j++) {
              const at = before + j + 1;
              if (at >= r.promptLength) break;
              r.promptLogprobs[at] = tokenLogprob(rows.subarray(j * V, (j + 1) * V), r.tokens[at], r.want.promptLogprobs!);
            }
          }
          if (r.promptLogprobs && !r.promptLogprobsSent && r.computed >= r.promptLength) {
            r.promptLogprobsSent = true;
            try {
              r.want.onPromptLogprobs?.(r.promptLogprobs);
            } catch (err) {
              return this.fail(r, err as Error);
            }
          }
          const logits = results[i].logits;
          if (!logits) return; // a prompt chunk: no token yet
          if (r.tokens.length - r.promptLength >= r.sampling.maxTokens) return this.finish(r, 'length'); // prompt logprobs only
          try {
            const next = r.sampler.next(logits);
            const logprob = r.logprobs ? tokenLogprob(logits, next, r.want.logprobs!) : undefined;
            if (r.stop.has(next)) this.finish(r, 'stop');
            else {
              r.tokens.push(next);
              if (logprob) r.logprobs!.push(logprob);
              if (r.onToken?.(next, logprob) === true) this.finish(r, 'stop');
            }
          } catch (err) {
            // A failing callback (e.g. a client's stream) ends its own request, not the step.
            this.fail(r, err as Error);
          }
        });
      }
    } catch (err) {
      // Nothing may stay unanswered (or crash the process) if the loop itself fails.
      for (const r of [...this.running, ...this.waiting]) {
        this.fail(r, err as Error);
        this.releaseBlocks(r);
      }
      this.running = [];
      this.waiting = [];
    } finally {
      this.looping = false;
      if (this.closing) this.idle?.();
    }
  }
}

function positive(n: number, what: string): number {
  if (!(Number.isInteger(n) && n > 0)) throw new RangeError(`${what} must be a positive integer, got ${n}`);
  return n;
}

/**
 * Continues one prompt in-process; returns only the new ids. `onToken` sees each new id as it is chosen
 * and may return true to stop there. The same engine as serving, with room for one sequence.
 */
export function generate(model: MixtralModel, prompt: Int32Array, o: SamplingOptions, onToken?: OnToken): Promise<Generation> {
  return new Scheduler(model, { maxSequences: 1, kvCacheTokens: model.config.max_position_embeddings }).submit(prompt, o, onToken);
}
