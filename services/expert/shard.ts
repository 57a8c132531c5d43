// An expert shard's request handling: check and decode each ExpertRequest's row batches as it arrives
// (refusing what is over its router's credits or the queue bounds), compute the waiting ones with the
// shard's ExpertSet — inference rows merged per expert — and encode the replies. Transport-free, so it
// is tested without a network.
import { status } from '@grpc/grpc-js';
import { MissingPassError, type ExpertSet, type RowBatch } from '../core/model/experts.js';
import { fromWireTensor, toWireTensor, WireError } from '../core/wire/tensor.js';
import type { FloatDtype } from '../core/dtypes.js';
import type { ExpertReply } from '../generated/switchyard/v1/ExpertReply.js';
import type { ExpertRequest__Output } from '../generated/switchyard/v1/ExpertRequest.js';
import { Counter, Gauge, Histogram } from 'prom-client';
import { MetricGroup } from '../core/metrics/registry.js';
import { DecayingRates } from '../core/metrics/decaying.js';
import { expertKeyText, type ExpertKey } from '../core/placement.js';
import { Credits } from '../core/credits.js';

/** The shard gauges read the newest shard of the process when Prometheus scrapes. */
let currentShard: ExpertShard | undefined;
const computeSeconds = new Histogram({
  name: 'switchyard_expert_compute_seconds', help: 'Compute time of one compute turn\'s inference rows (all waiting messages, merged per expert), or of one training message', registers: [],
  buckets: [0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
});
const rowsTotal = new Counter({ name: 'switchyard_expert_rows_total', help: 'Rows computed per (layer, expert) and kind (forward, forward_train, backward)', labelNames: ['layer', 'expert', 'kind'], registers: [] });
const messagesTotal = new Counter({ name: 'switchyard_expert_messages_total', help: 'Messages answered with their rows computed, per kind (forward, forward_train, backward)', labelNames: ['kind'], registers: [] });
const refusedRows = new Counter({ name: 'switchyard_expert_refused_rows_total', help: 'Rows refused with RESOURCE_EXHAUSTED on arrival: over the router\'s credits, or over --max-queue-rows / --max-queue-bytes', labelNames: ['reason'], registers: [] });
const mergedMessages = new Counter({ name: 'switchyard_expert_merged_messages_total', help: 'Expert runs saved by merging: one (layer, expert) run over the rows of m waiting inference messages adds m − 1', registers: [] });

/** Exported once a shard starts (any shard: serving or training). */
export const shardMetricGroup = new MetricGroup([
  new Gauge({ name: 'switchyard_expert_queue_rows', help: 'Rows accepted by this shard and not answered yet: queued, held for their weights or computing (the autoscaling signal; bounded by --max-queue-rows)', registers: [], collect() { this.set(currentShard?.queuedRows ?? 0); } }),
  new Gauge({ name: 'switchyard_expert_first_row_seconds', help: 'Time from this shard\'s registration with the coordinator to the first row it served (0 until then)', registers: [], collect() {
    const registered = currentShard?.registeredAt?.();
    const first = currentShard?.firstRowAt;
    this.set(registered !== undefined && first !== undefined ? Math.max(0, first - registered) / 1000 : 0);
  } }),
  new Gauge({ name: 'switchyard_expert_held', help: 'Experts this shard holds', registers: [], collect() { this.set(currentShard?.experts.keys().length ?? 0); } }),
  new Gauge({ name: 'switchyard_expert_queue_messages', help: 'Messages accepted by this shard and not answered yet', registers: [], collect() { this.set(currentShard?.queuedMessages ?? 0); } }),
  computeSeconds,
  rowsTotal,
  messagesTotal,
  refusedRows,
  mergedMessages,
  ...MetricGroup.busy,
]);

class ShardError extends Error {
  /** NOT_FOUND: every expert of the request this shard does not hold. */
  constructor(readonly code: status, message: string, readonly missing: ExpertKey[] = []) {
    super(message);
  }
}

/**
 * Holds back training rows until the shard has the weights they need: rows of step n need the weights
 * after step n−1, so a router that finished its step first never computes with stale experts.
 */
export class StepGate {
  /** Current training attempt; the weights step is undefined while the experts (re)load. */
  private generation = 0;
  private appliedStep?: number;
  private waiters: Array<{ generation: number; weightsStep: number; release: (error?: ShardError) => void }> = [];

  /** A new attempt: rows wait until `ready`. */
  begin(generation: number): void {
    this.generation = generation;
    this.appliedStep = undefined;
    this.settle();
  }

  /** The experts now hold the weights after `step` optimizer steps. */
  ready(step: number): void {
    this.appliedStep = step;
    this.settle();
  }

  /** undefined: go ahead; a promise: wait for it; a ShardError: refuse. */
  admit(generation: number, weightsStep: number): ShardError | Promise<void> | undefined {
    const verdict = this.verdict(generation, weightsStep);
    if (verdict !== 'wait') return verdict;
    return new Promise((resolve, reject) => this.waiters.push({ generation, weightsStep, release: (err) => (err ? reject(err) : resolve()) }));
  }

  private verdict(generation: number, weightsStep: number): ShardError | 'wait' | undefined {
    if (generation < this.generation) return new ShardError(status.ABORTED, `rows of aborted training attempt ${generation} (now ${this.generation})`);
    if (generation > this.generation || this.appliedStep === undefined || weightsStep > this.appliedStep) return 'wait';
    if (weightsStep < this.appliedStep) return new ShardError(status.FAILED_PRECONDITION, `rows need the weights after step ${weightsStep}; this shard has applied step ${this.appliedStep}`);
    return undefined;
  }

  private settle(): void {
    const still: typeof this.waiters = [];
    for (const w of this.waiters) {
      const v = this.verdict(w.generation, w.weightsStep);
      if (v === 'wait') still.push(w);
      else w.release(v);
    }
    this.waiters = still;
  }
}

/** Defaults of `serve expert --max-queue-rows` and `--max-queue-bytes`. */
export const DEFAULT_MAX_QUEUE_ROWS = 262_144;
export const DEFAULT_MAX_QUEUE_BYTES = 512 * 1024 * 1024;

/**
 * Rows one compute turn takes at most (a single larger message still goes, alone): between turns the
 * event loop answers health checks and metric scrapes, and reads the next messages.
 */
const ROWS_PER_TURN = 8192;

const ROW_KINDS = new Set(['ROW_KIND_FORWARD', 'ROW_KIND_FORWARD_TRAIN', 'ROW_KIND_BACKWARD']);

/** What a shard accepts: each router's credits per expert and the bounds of its queue. */
export interface ShardLimits {
  /** Inference rows per (layer, expert) one router may have queued or computing here (undefined = unlimited). */
  creditsPerRouter?: number;
  /** Rows accepted and not answered yet, over all routers (default DEFAULT_MAX_QUEUE_ROWS). */
  maxQueueRows?: number;
  /** The same rows as decoded float32 bytes (default DEFAULT_MAX_QUEUE_BYTES). */
  maxQueueBytes?: number;
}

/** One router's Exchange stream: its inference rows at this shard per expert (the credits it uses here). */
export class RouterStream {
  readonly credits = new Credits();
}

/** A request as accepted: its rows decoded (the wire bytes are not kept), who sent it and how to answer. */
interface Job {
  request: ExpertRequest__Output;
  batches: RowBatch[];
  dtype: FloatDtype;
  rows: number;
  /** Decoded float32 bytes of its rows: what --max-queue-bytes counts. */
  bytes: number;
  /** Inference rows: computed merged with other messages' per expert, and within the router's credits. */
  inference: boolean;
  router: RouterStream;
  reply: (r: ExpertReply) => void;
  abandoned?: () => boolean;
}

type Refusal = { reason: 'credits' | 'queue_rows' | 'queue_bytes'; message: string };

export class ExpertShard {
  /** Rows computed per (layer/expert) since start, for metrics and tests. */
  readonly rowsServed = new Map<string, number>();
  messagesServed = 0;
  /** Expert runs over inference rows (one upload, matMul chain and readback each): fewer than the messages when they merge. */
  inferenceRuns = 0;
  /** Epoch ms of the first served row, and of the registration (set by the serving process). */
  firstRowAt?: number;
  registeredAt?: () => number | undefined;
  private readonly recentRows = new DecayingRates(1, 5);
  /** Present while the shard trains: orders training rows after the optimizer steps they depend on. */
  gate?: StepGate;
  /** Each router's share of the token budget; the serving process updates it when the number of routers changes. */
  creditsPerRouter?: number;
  readonly maxQueueRows: number;
  readonly maxQueueBytes: number;

  /** Accepted messages not computed yet, in arrival order (compute turns take them from the front). */
  private readonly queue: Job[] = [];
  private scheduled = false;
  /** Accepted and not answered yet (queued, held back for their weights, or computing): what the bounds limit. */
  queuedRows = 0;
  queuedBytes = 0;
  queuedMessages = 0;
  /** When each accepted message arrived (epoch ms, sub-ms), for the debug log's records. */
  private readonly arrivals = new WeakMap<ExpertRequest__Output, number>();
  /** The stream of callers that name none (tests calling enqueue directly). */
  private readonly anyRouter = new RouterStream();

  /** `log` receives one record per served message (pass, kind, rows, request ids). */
  constructor(public experts: ExpertSet, private readonly log?: (record: Record<string, unknown>) => void, limits: ShardLimits = {}) {
    this.creditsPerRouter = limits.creditsPerRouter;
    this.maxQueueRows = limits.maxQueueRows ?? DEFAULT_MAX_QUEUE_ROWS;
    this.maxQueueBytes = limits.maxQueueBytes ?? DEFAULT_MAX_QUEUE_BYTES;
    currentShard = this;
    shardMetricGroup.register();
  }

  /** Rows computed per second recently (the measured load the coordinator compares across shards). */
  rowsPerSecond(): number {
    return this.recentRows.rates()[0];
  }

  /**
   * Accepts a request from `router`'s stream, or answers it at once: INVALID_ARGUMENT for bad rows,
   * NOT_FOUND for inference rows of experts not held, RESOURCE_EXHAUSTED over the router's credits or the
   * queue bounds (nothing of a refused message is kept). Rows are decoded and checked here, on arrival,
   * so compute turns only compute. `reply` gets the answer; answers may come in any order (they carry the
   * message id), but training messages are computed in arrival order. `abandoned` says when the caller
   * no longer waits, so the rows are not computed.
   */
  enqueue(request: ExpertRequest__Output, reply: (r: ExpertReply) => void, abandoned?: () => boolean, router: RouterStream = this.anyRouter): void {
    const receivedAt = this.log ? performance.timeOrigin + performance.now() : 0;
    let job: Job;
    try {
      const { batches, dtype } = this.decode(request);
      // A forward tagged with a training attempt waits for its weights like training rows do.
      const inference = request.kind === 'ROW_KIND_FORWARD' && Number(request.trainGeneration) === 0;
      // Training rows may arrive before their experts load (the step gate holds them): checked at compute.
      if (inference) this.checkHeld(batches);
      const rows = batches.reduce((n, b) => n + b.rowCount, 0);
      const bytes = batches.reduce((n, b) => n + b.rows.byteLength, 0);
      job = { request: { ...request, batches: [] }, batches, dtype, rows, bytes, inference, router, reply, abandoned };
      if (this.log) this.arrivals.set(job.request, receivedAt);
    } catch (err) {
      return reply(errorReply(request.messageId, err));
    }
    const refusal = this.refusal(job);
    if (refusal) {
      refusedRows.inc({ reason: refusal.reason }, job.rows);
      return reply({ messageId: request.messageId, error: { code: status.RESOURCE_EXHAUSTED, message: refusal.message } });
    }
    this.queue.push(job);
    this.queuedRows += job.rows;
    this.queuedBytes += job.bytes;
    this.queuedMessages++;
    this.schedule();
  }

  /** Why `job` cannot be accepted now; undefined once it is accepted (its credits taken). */
  private refusal(job: Job): Refusal | undefined {
    if (this.queuedRows + job.rows > this.maxQueueRows)
      return { reason: 'queue_rows', message: `queue full: ${this.queuedRows} rows accepted and not answered here; ${job.rows} more would exceed --max-queue-rows ${this.maxQueueRows}` };
    if (this.queuedBytes + job.bytes > this.maxQueueBytes)
      return { reason: 'queue_bytes', message: `queue full: ${this.queuedBytes} bytes of rows accepted and not answered here; ${job.bytes} more would exceed --max-queue-bytes ${this.maxQueueBytes}` };
    // Training rows are paced by the training barrier, not by credits.
    if (!job.inference) return undefined;
    // The routers' own rule (Credits.tryTake): within the share, or one batch alone when none of that expert is in flight.
    const { credits } = job.router;
    const taken: RowBatch[] = [];
    for (const b of job.batches) {
      if (b.rowCount === 0) continue;
      if (credits.tryTake(expertKeyText(b), b.rowCount, this.creditsPerRouter)) {
        taken.push(b);
        continue;
      }
      const inFlight = credits.snapshot().get(expertKeyText(b)) ?? 0;
      for (const t of taken) credits.give(expertKeyText(t), t.rowCount);
      return {
        reason: 'credits',
        message: `expert (layer ${b.layer}, expert ${b.expert}): this router has ${inFlight} rows of it in flight here; ${b.rowCount} more would exceed its limit of ${this.creditsPerRouter} rows per expert (its share of the shard's token budget)`,
      };
    }
    return undefined;
  }

  /** Answers an accepted job and gives back what it held (queue room, the router's credits). */
  private answer(job: Job, reply: ExpertReply): void {
    this.queuedRows -= job.rows;
    this.queuedBytes -= job.bytes;
    this.queuedMessages--;
    if (job.inference) for (const b of job.batches) if (b.rowCount > 0) job.router.credits.give(expertKeyText(b), b.rowCount);
    job.reply(reply);
  }

  private schedule(): void {
    if (this.scheduled || this.queue.length === 0) return;
    this.scheduled = true;
    setImmediate(() => this.computeTurn());
  }

  /**
   * One compute turn: takes waiting messages in arrival order, up to ROWS_PER_TURN rows (at least one
   * message); training messages are computed one by one as they come, the inference rows of all the
   * others once per expert. Replies are handed to their stream without waiting for the write (grpc-js
   * buffers them for a slow reader), so a turn never waits on a reply and the next turn follows at once.
   */
  private computeTurn(): void {
    this.scheduled = false;
    const inference: Job[] = [];
    let rows = 0;
    while (this.queue.length > 0 && (rows === 0 || rows + this.queue[0].rows <= ROWS_PER_TURN)) {
      const job = this.queue.shift()!;
      // Nobody waits for the answer any more (the caller's stream was cancelled): skip the compute.
      if (job.abandoned?.()) {
        this.answer(job, { messageId: job.request.messageId, error: { code: status.CANCELLED, message: 'the caller went away' } });
        continue;
      }
      rows += job.rows;
      if (job.inference) inference.push(job);
      else this.computeAlone(job);
    }
    if (inference.length > 0) this.computeMerged(inference);
    this.schedule();
  }

  /** A training message: after the weights it needs (held back meanwhile, still counted in the queue), on its own. */
  private computeAlone(job: Job): void {
    const answer = this.afterWeights(job.request, () => this.compute(job.request, job.batches, job.dtype));
    if (answer instanceof Promise) void answer.then((reply) => this.answer(job, reply));
    else this.answer(job, answer);
  }

  /**
   * Inference messages of one turn, whichever router sent them: each (layer, expert) runs once over the
   * rows of every message that has some (one upload, one matMul chain, one readback), and the outputs are
   * cut back per message. The expert is row-wise, so every row gets what its message alone would get.
   */
  private computeMerged(jobs: Job[]): void {
    const started = performance.now();
    const outputs = new Map<Job, Float32Array[]>();
    const byExpert = new Map<string, Array<{ job: Job; batch: number }>>();
    for (const job of jobs) {
      try {
        // An expert dropped while the rows waited (the placement moved it): NOT_FOUND, as on arrival.
        this.checkHeld(job.batches);
      } catch (err) {
        this.answer(job, errorReply(job.request.messageId, err));
        continue;
      }
      outputs.set(job, new Array(job.batches.length));
      job.batches.forEach((b, batch) => {
        const key = expertKeyText(b);
        if (!byExpert.has(key)) byExpert.set(key, []);
        byExpert.get(key)!.push({ job, batch });
      });
    }
    const failed = new Map<Job, unknown>();
    for (const parts of byExpert.values()) {
      const live = parts.filter((p) => !failed.has(p.job));
      if (live.length === 0) continue;
      const batches = live.map((p) => p.job.batches[p.batch]);
      const rowCount = batches.reduce((n, b) => n + b.rowCount, 0);
      let rows = batches[0].rows;
      if (batches.length > 1) {
        rows = new Float32Array(batches.reduce((n, b) => n + b.rows.length, 0));
        let at = 0;
        for (const b of batches) {
          rows.set(b.rows, at);
          at += b.rows.length;
        }
      }
      try {
        const out = this.experts.forwardRows(live[0].job.request.passId, { layer: batches[0].layer, expert: batches[0].expert, rowCount, rows }, false);
        this.inferenceRuns++;
        mergedMessages.inc(live.length - 1);
        let at = 0;
        live.forEach((p, i) => {
          outputs.get(p.job)![p.batch] = out.subarray(at, at + batches[i].rows.length);
          at += batches[i].rows.length;
        });
      } catch (err) {
        for (const p of live) failed.set(p.job, err);
      }
    }
    for (const [job, out] of outputs) {
      let reply: ExpertReply;
      try {
        reply = failed.has(job) ? errorReply(job.request.messageId, failed.get(job)) : this.served(job.request, job.batches, job.dtype, out);
      } catch (err) {
        reply = errorReply(job.request.messageId, err);
      }
      this.answer(job, reply);
    }
    computeSeconds.observe((performance.now() - started) / 1000);
  }

  /** Answers a request on its own, after its weights step when it is a training request. */
  submit(request: ExpertRequest__Output): ExpertReply | Promise<ExpertReply> {
    let decoded: { batches: RowBatch[]; dtype: FloatDtype };
    try {
      decoded = this.decode(request);
    } catch (err) {
      return errorReply(request.messageId, err);
    }
    return this.afterWeights(request, () => this.compute(request, decoded.batches, decoded.dtype));
  }

  /** Runs `compute` now, or once the shard has the weights a training request needs, or refuses it (an aborted attempt, stale weights). */
  private afterWeights(request: ExpertRequest__Output, compute: () => ExpertReply): ExpertReply | Promise<ExpertReply> {
    const generation = Number(request.trainGeneration);
    if (!this.gate || generation === 0) return compute();
    const verdict = this.gate.admit(generation, Number(request.weightsStep));
    if (verdict === undefined) return compute();
    if (verdict instanceof ShardError) return errorReply(request.messageId, verdict);
    return verdict.then(compute, (err: ShardError) => errorReply(request.messageId, err));
  }

  /** Answers a request on its own, now (no step gate). */
  handle(request: ExpertRequest__Output): ExpertReply {
    try {
      const { batches, dtype } = this.decode(request);
      return this.compute(request, batches, dtype);
    } catch (err) {
      return errorReply(request.messageId, err);
    }
  }

  /** One message's decoded rows through its experts. */
  private compute(request: ExpertRequest__Output, batches: RowBatch[], dtype: FloatDtype): ExpertReply {
    const started = performance.now();
    try {
      this.checkHeld(batches);
      let outputs: Float32Array[];
      if (request.kind === 'ROW_KIND_FORWARD' || request.kind === 'ROW_KIND_FORWARD_TRAIN') {
        const train = request.kind === 'ROW_KIND_FORWARD_TRAIN';
        outputs = batches.map((b) => this.experts.forwardRows(request.passId, b, train));
      } else if (request.kind === 'ROW_KIND_BACKWARD') {
        outputs = batches.map((b) => this.experts.backwardRows(request.passId, b));
      } else {
        throw new ShardError(status.INVALID_ARGUMENT, `unsupported row kind ${request.kind}`);
      }
      const reply = this.served(request, batches, dtype, outputs);
      computeSeconds.observe((performance.now() - started) / 1000);
      return reply;
    } catch (err) {
      return errorReply(request.messageId, err);
    }
  }

  /** Counts a served message and builds its reply: one batch per request batch, in the dtype the request came in. */
  private served(request: ExpertRequest__Output, batches: RowBatch[], dtype: FloatDtype, outputs: Float32Array[]): ExpertReply {
    this.messagesServed++;
    this.firstRowAt ??= Date.now();
    this.recentRows.add(0, batches.reduce((n, b) => n + b.rowCount, 0));
    this.log?.({
      msg: 'rows served', pass: request.passId, kind: request.kind, request_ids: request.requestIds, received_at: this.arrivals.get(request),
      batches: batches.map((b) => `${expertKeyText(b)}:${b.rowCount}`).join(' '),
    });
    const kind = request.kind.replace('ROW_KIND_', '').toLowerCase();
    messagesTotal.inc({ kind });
    for (const b of batches) {
      const key = expertKeyText(b);
      this.rowsServed.set(key, (this.rowsServed.get(key) ?? 0) + b.rowCount);
      rowsTotal.inc({ layer: String(b.layer), expert: String(b.expert), kind }, b.rowCount);
    }
    return {
      messageId: request.messageId,
      batches: batches.map((b, i) => ({ layer: b.layer, expert: b.expert, rows: toWireTensor(outputs[i], [b.rowCount, this.experts.hidden], dtype) })),
      credits: batches.map((b) => ({ layer: b.layer, expert: b.expert, rows: b.rowCount })),
    };
  }

  /** NOT_FOUND naming every expert not held, so the router skips only those here and sends the others again. */
  private checkHeld(batches: RowBatch[]): void {
    const missing = batches.filter((b) => !this.experts.holds(b.layer, b.expert)).map((b) => ({ layer: b.layer, expert: b.expert }));
    if (missing.length)
      throw new ShardError(status.NOT_FOUND, `${missing.map((k) => `expert (layer ${k.layer}, expert ${k.expert})`).join(', ')} ${missing.length === 1 ? 'is' : 'are'} not held by this shard`, missing);
  }

  /** Checks and decodes a request's rows (INVALID_ARGUMENT when malformed or not finite); which experts are held is checked apart. */
  private decode(request: ExpertRequest__Output): { batches: RowBatch[]; dtype: FloatDtype } {
    if (!request.passId) throw new ShardError(status.INVALID_ARGUMENT, 'pass_id is empty');
    if (!ROW_KINDS.has(request.kind)) throw new ShardError(status.INVALID_ARGUMENT, `unsupported row kind ${request.kind}`);
    const seen = new Set<string>();
    for (const b of request.batches) {
      const key = expertKeyText(b);
      if (seen.has(key)) throw new ShardError(status.INVALID_ARGUMENT, `two batches for (layer ${b.layer}, expert ${b.expert})`);
      seen.add(key);
    }
    let dtype: FloatDtype = 'F32';
    const batches = request.batches.map((b, i) => {
      const decoded = fromWireTensor(b.rows, `batches[${i}].rows`, [null, this.experts.hidden]);
      const values = decoded.values;
      // A plain loop: this runs over every row of every message.
      for (let j = 0; j < values.length; j++)
        if (values[j] - values[j] !== 0) throw new ShardError(status.INVALID_ARGUMENT, `batches[${i}].rows[${j}] is ${values[j]}: rows must be finite`);
      dtype = decoded.dtype;
      return { layer: b.layer, expert: b.expert, rowCount: decoded.shape[0], rows: decoded.values };
    });
    return { batches, dtype };
  }
}

/** The error reply for a failure: its status code by kind (bad input INVALID_ARGUMENT, a lost pass FAILED_PRECONDITION, else INTERNAL). */
function errorReply(messageId: string, err: unknown): ExpertReply {
  const code = err instanceof ShardError || err instanceof WireError ? err.code
    : err instanceof MissingPassError ? status.FAILED_PRECONDITION
    : err instanceof RangeError ? status.INVALID_ARGUMENT : status.INTERNAL;
  return { messageId, error: { code, message: (err as Error).message, missing: err instanceof ShardError ? err.missing : [] } };
}
