// Training metrics (DESIGN §11), shared by training routers and training shards: base units, `_total`
// counters, label sets bounded by the model's layers and experts. Exported only once a training loop
// registers them (trainingMetricGroup; the coordinator's job view: registerCoordinatorTrainingMetrics).
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import { MetricGroup, registry } from './registry.js';

const BYTES_BUCKETS = [1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];
const SECONDS_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

export const trainingMetrics = {
  step: new Gauge({ name: 'switchyard_train_step', help: 'Last completed training step', registers: [] }),
  loss: new Gauge({ name: 'switchyard_train_loss', help: 'Training objective of the last step (cross-entropy + auxiliary terms)', registers: [] }),
  validationLoss: new Gauge({ name: 'switchyard_train_validation_loss', help: 'Last validation cross-entropy, nats per token', registers: [] }),
  tokensPerSecond: new Gauge({ name: 'switchyard_train_tokens_per_second', help: 'Global-batch tokens per second of the last step', registers: [] }),
  tokens: new Counter({ name: 'switchyard_train_tokens_total', help: 'Training tokens processed (global batch)', registers: [] }),
  stepSeconds: new Histogram({ name: 'switchyard_train_step_seconds', help: 'Wall time of a training step', buckets: SECONDS_BUCKETS, registers: [] }),
  expertTokens: new Counter({
    name: 'switchyard_train_expert_tokens_total', help: 'Routing choices per (layer, expert) in training, before and after capacity',
    labelNames: ['layer', 'expert', 'stage'], registers: [],
  }),
  allReduceSeconds: new Histogram({ name: 'switchyard_allreduce_seconds', help: 'Wall time of one all-reduce (all its buckets)', labelNames: ['group'], buckets: SECONDS_BUCKETS, registers: [] }),
  allReduceBytes: new Counter({ name: 'switchyard_allreduce_bytes_total', help: 'Bytes this process sent into all-reduces', labelNames: ['group'], registers: [] }),
  allReduceMessageBytes: new Histogram({ name: 'switchyard_allreduce_payload_bytes', help: 'Payload of one all-reduce', labelNames: ['group'], buckets: BYTES_BUCKETS, registers: [] }),
  aborts: new Counter({ name: 'switchyard_train_aborted_steps_total', help: 'Training steps aborted (a member failed); the run rolled back to its last checkpoint', registers: [] }),
  checkpointSeconds: new Histogram({ name: 'switchyard_checkpoint_write_seconds', help: 'Time to write this process\'s part of a checkpoint', buckets: SECONDS_BUCKETS, registers: [] }),
};

// Training replicas and training shards export their busy share (event loop, CPU) with it.
export const trainingMetricGroup = new MetricGroup([...Object.values(trainingMetrics), ...MetricGroup.busy]);

// Known label values start at zero, so dashboards and rules find the series before the first event.
for (const group of ['dense', 'experts']) {
  trainingMetrics.allReduceSeconds.zero({ group });
  trainingMetrics.allReduceBytes.inc({ group }, 0);
}

/** Per-(layer, expert) routing counts of one step (global batch). */
export function recordExpertLoad(countsBeforeDrop: ArrayLike<number>[], countsAfterDrop: ArrayLike<number>[]): void {
  countsBeforeDrop.forEach((counts, layer) => {
    for (let e = 0; e < counts.length; e++) {
      trainingMetrics.expertTokens.inc({ layer: String(layer), expert: String(e), stage: 'routed' }, counts[e]);
      trainingMetrics.expertTokens.inc({ layer: String(layer), expert: String(e), stage: 'kept' }, countsAfterDrop[layer][e]);
    }
  });
}

export function recordAllReduce(group: string, seconds: number, bytesSent: number): void {
  trainingMetrics.allReduceSeconds.observe({ group }, seconds);
  trainingMetrics.allReduceBytes.inc({ group }, bytesSent);
  trainingMetrics.allReduceMessageBytes.observe({ group }, bytesSent);
}

/** The coordinator's view of a training run, read when Prometheus scrapes. */
export interface CoordinatorTrainingView {
  generation: () => number; committedStep: () => number; reduceBytesIn: () => number; reduceBytesOut: () => number; pendingChunks: () => number;
}

let coordinatorView: CoordinatorTrainingView | undefined;

export const coordinatorTrainingMetricGroup = new MetricGroup([
  new Gauge({ name: 'switchyard_train_generation', help: 'Current training attempt (changes on every abort)', registers: [], collect() { this.set(coordinatorView?.generation() ?? 0); } }),
  new Gauge({ name: 'switchyard_train_committed_step', help: 'Step of the last committed cluster checkpoint', registers: [], collect() { this.set(coordinatorView?.committedStep() ?? 0); } }),
  new Gauge({ name: 'switchyard_allreduce_pending_chunks', help: 'All-reduce chunks waiting for contributors', registers: [], collect() { this.set(coordinatorView?.pendingChunks() ?? 0); } }),
  new Counter({ name: 'switchyard_allreduce_hub_received_bytes_total', help: 'Bytes the coordinator received into all-reduces', registers: [], collect() { this.reset(); this.inc(coordinatorView?.reduceBytesIn() ?? 0); } }),
  new Counter({ name: 'switchyard_allreduce_hub_sent_bytes_total', help: 'Bytes of sums the coordinator sent back', registers: [], collect() { this.reset(); this.inc(coordinatorView?.reduceBytesOut() ?? 0); } }),
]);

/** A coordinator running a training job exports its view (the newest one registered in the process). */
export function registerCoordinatorTrainingMetrics(view: CoordinatorTrainingView, into: Registry = registry): void {
  coordinatorView = view;
  coordinatorTrainingMetricGroup.register(into);
}
