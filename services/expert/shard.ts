// An expert shard's request handling: decode the row batches of one ExpertRequest, compute them with
// the shard's ExpertSet, encode the reply. Transport-free, so it is tested without a network.
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

/** The shard gauges read the newest shard of the process when Prometheus scrapes. */
let currentShard: ExpertShard | undefined;
const computeSeconds = new Histogram({
  name: 'switchyard_expert_compute_seconds', help: 'Compute time of one message (all its row batches)', registers: [],
  buckets: [0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
});
const rowsTotal = new Counter({ name: 'switchyard_expert_rows_total', help: 'Rows computed per (layer, expert) and kind (forward, forward_train, backward)', labelNames: ['layer', 'expert', 'kind'], registers: [] });

/** Exported once a shard starts (any shard: serving or training). */
export const shardMetricGroup = new MetricGroup([
  new Gauge({ name: 'switchyard_expert_queue_rows', help: 'Rows waiting at this shard to be computed (the autoscaling signal)', registers: [], collect() { this.set(currentShard?.queuedRows ?? 0); } }),
  new Gauge({ name: 'switchyard_expert_first_row_seconds', help: 'Time from this shard\'s registration with the coordinator to the first row it served (0 until then)', registers: [], collect() {
    const registered = currentShard?.registeredAt?.();
    const first = currentShard?.firstRowAt;
    this.set(registered !== undefined && first !== undefined ? Math.max(0, first - registered) / 1000 : 0);
  } }),
  new Gauge({ name: 'switchyard_expert_held', help: 'Experts this shard holds', registers: [], collect() { this.set(currentShard?.experts.keys().length ?? 0); } }),
  new Gauge({ name: 'switchyard_expert_queue_messages', help: 'Messages waiting at this shard', registers: [], collect() { this.set(currentShard?.queuedMessages ?? 0); } }),
  computeSeconds,
  rowsTotal,
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

export class ExpertShard {
  /** Rows computed per (layer/expert) since start, for metrics and tests. */
  readonly rowsServed = new Map<string, number>();
  messagesServed = 0;
  /** Epoch ms of the first served row, and of the registration (set by the serving process). */
  firstRowAt?: number;
  registeredAt?: () => number | undefined;
  private readonly recentRows = new DecayingRates(1, 5);
  /** Present while the shard trains: orders training rows after the optimizer steps they depend on. */
  gate?: StepGate;

  /** Messages received and not yet computed: one is computed per event-loop turn, so health checks and scrapes stay responsive. */
  private readonly queue: Array<{ request: ExpertRequest__Output; rows: number; reply: (r: ExpertReply) => void; abandoned?: () => boolean }> = [];
  private scheduled = false;
  queuedRows = 0;

  /** `log` receives one record per served message (pass, kind, rows, request ids). */
  constructor(public experts: ExpertSet, private readonly log?: (record: Record<string, unknown>) => void) {
    currentShard = this;
    shardMetricGroup.register();
  }

  /** Rows computed per second recently (the measured load the coordinator compares across shards). */
  rowsPerSecond(): number {
    return this.recentRows.rates()[0];
  }

  get queuedMessages(): number {
    return this.queue.length;
  }

  /**
   * Queues a request; `reply` gets its answer (in arrival order, except training rows held for their
   * weights). `abandoned` says when the caller no longer waits, so the rows are not computed.
   */
  enqueue(request: ExpertRequest__Output, reply: (r: ExpertReply) => void, abandoned?: () => boolean): void {
    const rows = request.batches.reduce((n, b) => n + (Number(b.rows?.shape?.[0]) || 0), 0);
    this.queue.push({ request, rows, reply, abandoned });
    this.queuedRows += rows;
    this.schedule();
  }

  private schedule(): void {
    if (this.scheduled || this.queue.length === 0) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      const job = this.queue.shift();
      if (!job) return;
      this.queuedRows -= job.rows;
      // Nobody waits for the answer any more (the caller's stream was cancelled): skip the compute.
      if (job.abandoned?.()) {
        job.reply({ messageId: job.request.messageId, error: { code: status.CANCELLED, message: 'the caller went away' } });
        this.schedule();
        return;
      }
      const answer = this.submit(job.request);
      if (answer instanceof Promise) void answer.then(job.reply);
      else job.reply(answer);
      this.schedule();
    });
  }

  /** Answers a request, after its weights step when it is a training request. */
  submit(request: ExpertRequest__Output): ExpertReply | Promise<ExpertReply> {
    const generation = Number(request.trainGeneration);
    if (!this.gate || generation === 0) return this.handle(request);
    const verdict = this.gate.admit(generation, Number(request.weightsStep));
    if (verdict === undefined) return this.handle(request);
    if (verdict instanceof ShardError) return { messageId: request.messageId, error: { code: verdict.code, message: verdict.message } };
    return verdict.then(() => this.handle(request), (err: ShardError) => ({ messageId: request.messageId, error: { code: err.code, message: err.message } }));
  }

  handle(request: ExpertRequest__Output): ExpertReply {
    const started = performance.now();
    try {
      const { batches, dtype } = this.decode(request);
      let outputs: Float32Array[];
      if (request.kind === 'ROW_KIND_FORWARD' || request.kind === 'ROW_KIND_FORWARD_TRAIN') {
        const train = request.kind === 'ROW_KIND_FORWARD_TRAIN';
        outputs = batches.map((b) => this.experts.forwardRows(request.passId, b, train));
      } else if (request.kind === 'ROW_KIND_BACKWARD') {
        outputs = batches.map((b) => this.experts.backwardRows(request.passId, b));
      } else {
        throw new ShardError(status.INVALID_ARGUMENT, `unsupported row kind ${request.kind}`);
      }
      this.messagesServed++;
      this.firstRowAt ??= Date.now();
      this.recentRows.add(0, batches.reduce((n, b) => n + b.rowCount, 0));
      this.log?.({
        msg: 'rows served', pass: request.passId, kind: request.kind, request_ids: request.requestIds,
        batches: batches.map((b) => `${expertKeyText(b)}:${b.rowCount}`).join(' '),
      });
      const kind = request.kind.replace('ROW_KIND_', '').toLowerCase();
      for (const b of batches) {
        const key = expertKeyText(b);
        this.rowsServed.set(key, (this.rowsServed.get(key) ?? 0) + b.rowCount);
        rowsTotal.inc({ layer: String(b.layer), expert: String(b.expert), kind }, b.rowCount);
      }
      computeSeconds.observe((performance.now() - started) / 1000);
      return {
        messageId: request.messageId,
        // Replies use the dtype the request came in.
        batches: batches.map((b, i) => ({ layer: b.layer, expert: b.expert, rows: toWireTensor(outputs[i], [b.rowCount, this.experts.hidden], dtype) })),
        credits: batches.map((b) => ({ layer: b.layer, expert: b.expert, rows: b.rowCount })),
      };
    } catch (err) {
      const code = err instanceof ShardError || err instanceof WireError ? err.code
        : err instanceof MissingPassError ? status.FAILED_PRECONDITION
        : err instanceof RangeError ? status.INVALID_ARGUMENT : status.INTERNAL;
      return { messageId: request.messageId, error: { code, message: (err as Error).message, missing: err instanceof ShardError ? err.missing : [] } };
    }
  }

  private decode(request: ExpertRequest__Output): { batches: RowBatch[]; dtype: FloatDtype } {
    if (!request.passId) throw new ShardError(status.INVALID_ARGUMENT, 'pass_id is empty');
    const seen = new Set<string>();
    for (const b of request.batches) {
      const key = expertKeyText(b);
      if (seen.has(key)) throw new ShardError(status.INVALID_ARGUMENT, `two batches for (layer ${b.layer}, expert ${b.expert})`);
      seen.add(key);
    }
    // Name every expert not held, so the router skips only those here and sends the others again.
    const missing = request.batches.filter((b) => !this.experts.holds(b.layer, b.expert)).map((b) => ({ layer: b.layer, expert: b.expert }));
    if (missing.length)
      throw new ShardError(status.NOT_FOUND, `${missing.map((k) => `expert (layer ${k.layer}, expert ${k.expert})`).join(', ')} ${missing.length === 1 ? 'is' : 'are'} not held by this shard`, missing);
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
