// The router's per-request serving metrics, the ones serving teams set SLOs on (after vLLM's
// vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds, vllm:e2e_request_latency_seconds,
// vllm:request_queue_time_seconds, vllm:prompt_tokens_total, vllm:generation_tokens_total,
// vllm:num_requests_running/waiting and vllm:request_success_total), each labelled `model` with the served
// model's name. Created unregistered (requestMetricGroup); a RouterEngine registers the group when it
// starts, so only routers export them. RouterEngine.complete() follows each generation with a
// TrackedRequest; docs/observability.md states what each metric counts.
//
// Times are intervals of the monotonic clock (performance.now()) in this process:
//   arrival      RouterEngine.complete() is called: the prompt is parsed, validated and tokenized
//   first token  the first output id is handed to the caller (its onToken callback)
//   finish       the scheduler settles the request: resolved (stop, length, client gone) or rejected
// Output tokens are the ids the caller receives, i.e. usage.completion_tokens: a sampled stop id ends
// the generation without being one.
import { Counter, Gauge, Histogram } from 'prom-client';
import { MetricGroup } from '../core/metrics/registry.js';
import { OverloadError } from '../core/overload.js';
import { SamplingError } from '../core/sampling.js';
import type { Generation } from './scheduler.js';

// Bucket bounds (seconds). The SLO thresholds of deploy/prometheus/rules/alerts.yml (TTFT p99 2 s, TPOT
// p99 0.2 s) are bounds, so "p99 above the threshold" means exactly "more than 1% of the observations
// were slower" rather than an interpolation inside a wide bucket.
/** Time to first token: a cached short prompt in milliseconds up to a long queue plus prefill in minutes. */
export const TTFT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300];
/** Time per output token: a millisecond decode step up to stalls of seconds (a slow shard, a preempted sequence's recompute). */
export const TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 30];
/** End to end: grows with max_tokens (up to 4096 ids at up to seconds each). */
export const E2E_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600];
export const QUEUE_BUCKETS = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];

/**
 * How a generation the engine accepted ended: `stop` (a stop id was sampled, or the caller stopped it at
 * a token: a stop sequence), `length` (max_tokens or the context reached), `abort` (the client went away:
 * its AbortSignal fired), `error` (rejected after it was accepted: its deadline passed while it waited or
 * ran, a model step failed, its token callback threw).
 */
export const FINISH_REASONS = ['stop', 'length', 'abort', 'error'] as const;
export type FinishReason = (typeof FINISH_REASONS)[number];

const labelNames = ['model'] as const;

const ttft = new Histogram({
  name: 'switchyard_router_time_to_first_token_seconds', labelNames, buckets: TTFT_BUCKETS, registers: [],
  help: 'Time from a generation\'s arrival at the engine (prompt tokenized) to its first output token, queue wait and prefill included',
});
const tpot = new Histogram({
  name: 'switchyard_router_time_per_output_token_seconds', labelNames, buckets: TPOT_BUCKETS, registers: [],
  help: 'Time between consecutive output tokens of one generation, one observation per interval (vLLM\'s inter-token latency)',
});
const e2e = new Histogram({
  name: 'switchyard_router_e2e_request_latency_seconds', labelNames, buckets: E2E_BUCKETS, registers: [],
  help: 'Time from a generation\'s arrival at the engine to its finish, whatever the finish reason',
});
const queue = new Histogram({
  name: 'switchyard_router_queue_seconds', labelNames, buckets: QUEUE_BUCKETS, registers: [],
  help: 'Time a generation waited for a place in the batch (observed at each admission, a preempted one again when readmitted)',
});
const promptTokens = new Counter({
  name: 'switchyard_router_prompt_tokens_total', labelNames, registers: [],
  help: 'Prompt tokens of generations whose prefill completed (counted at their first output token)',
});
const generationTokens = new Counter({
  name: 'switchyard_router_generation_tokens_total', labelNames, registers: [],
  help: 'Output tokens generated (usage.completion_tokens; a sampled stop id is not one), counted as they are produced',
});
const finished = new Counter({
  name: 'switchyard_router_requests_finished_total', labelNames: ['model', 'finish_reason'], registers: [],
  help: 'Generations the engine accepted that have finished, by finish reason (stop, length, abort, error)',
});

/** The scheduler depth of each served model (the newest engine of that name), read when Prometheus scrapes. */
const depths = new Map<string, () => { waiting: number; running: number }>();

const running = new Gauge({
  name: 'switchyard_router_sequences_running', labelNames, registers: [],
  help: 'Generations in the running batch',
  collect() {
    for (const [model, depth] of depths) this.set({ model }, depth().running);
  },
});
const waiting = new Gauge({
  name: 'switchyard_router_sequences_waiting', labelNames, registers: [],
  help: 'Generations waiting for a place in the running batch (preempted ones included; Open Inference infer calls are not generations)',
  collect() {
    for (const [model, depth] of depths) this.set({ model }, depth().waiting);
  },
});

export const requestMetricGroup = new MetricGroup([ttft, tpot, e2e, queue, promptTokens, generationTokens, finished, running, waiting]);

/** Models whose series exist already: zeroing a histogram again would erase what it counted. */
const started = new Set<string>();

/** The per-request metrics of one engine serving `model`. */
export class RequestMetrics {
  constructor(readonly model: string, depth: () => { waiting: number; running: number }) {
    depths.set(model, depth);
    if (started.has(model)) return;
    started.add(model);
    // Every series exists from the start, so rules and dashboards find them before the first request.
    for (const histogram of [ttft, tpot, e2e, queue]) histogram.zero({ model });
    promptTokens.inc({ model }, 0);
    generationTokens.inc({ model }, 0);
    for (const reason of FINISH_REASONS) finished.inc({ model, finish_reason: reason }, 0);
  }

  /** A generation waited `seconds` for its place in the batch (the scheduler's onAdmit). */
  queued(seconds: number): void {
    queue.observe({ model: this.model }, seconds);
  }

  /**
   * Starts following one generation at its arrival. Its `deadline` (epoch ms) and `signal` are the ones
   * given to the scheduler: a deadline already past is refused there, and a fired signal means the
   * client went away.
   */
  start(promptLength: number, deadline?: number, signal?: AbortSignal): TrackedRequest {
    return new TrackedRequest(this.model, promptLength, deadline !== undefined && deadline <= Date.now(), signal);
  }
}

/** One generation from its arrival to its finish. */
export class TrackedRequest {
  private readonly arrival = performance.now();
  /** When the latest output token was produced (undefined: none yet). */
  private last?: number;

  constructor(
    private readonly model: string, private readonly promptLength: number,
    /** Refused on arrival whatever the scheduler's state: its deadline had passed. */
    private readonly pastDeadline: boolean, private readonly signal?: AbortSignal,
  ) {}

  /**
   * The token callback to hand the scheduler: records the token, then calls `callback` (if any) with
   * every argument it got and returns what it returns (true stops the generation there).
   */
  onToken<A extends unknown[], R>(callback?: (...args: A) => R): (...args: A) => R | undefined {
    return (...args: A) => {
      this.token();
      return callback?.(...args);
    };
  }

  /** Records how the scheduler's `result` ends and passes it on unchanged. */
  finished(result: Promise<Generation>): Promise<Generation> {
    return result.then(
      (generation) => {
        // A scored prompt (echo + logprobs, max_tokens 0) was processed without an output token.
        if (this.last === undefined && generation.promptLogprobs) promptTokens.inc({ model: this.model }, this.promptLength);
        this.end(this.signal?.aborted ? 'abort' : generation.finishReason);
        return generation;
      },
      (err: unknown) => {
        if (!this.refused(err)) this.end('error');
        throw err;
      },
    );
  }

  private token(): void {
    const now = performance.now();
    const labels = { model: this.model };
    if (this.last === undefined) {
      ttft.observe(labels, (now - this.arrival) / 1000);
      promptTokens.inc(labels, this.promptLength);
    } else {
      tpot.observe(labels, (now - this.last) / 1000);
    }
    this.last = now;
    generationTokens.inc(labels);
  }

  private end(reason: FinishReason): void {
    const labels = { model: this.model };
    e2e.observe(labels, (performance.now() - this.arrival) / 1000);
    finished.inc({ ...labels, finish_reason: reason });
    // A stop id sampled as the first token: the prefill ran, though no output token reached the caller.
    if (reason === 'stop' && this.last === undefined) promptTokens.inc(labels, this.promptLength);
  }

  /**
   * Refusals on arrival, which never became generations (they are 4xx/503 answers, counted by
   * switchyard_http_requests_total and switchyard_router_rejections_total): invalid requests, a full
   * admission queue, a router shutting down, a deadline already past.
   */
  private refused(err: unknown): boolean {
    if (err instanceof SamplingError) return true;
    if (!(err instanceof OverloadError)) return false;
    return err.reason === 'queue_full' || err.reason === 'shutting_down' || (err.reason === 'deadline' && this.pastDeadline);
  }
}
