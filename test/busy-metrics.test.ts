// Busy share per service (issue 16): the busy counters grow while the process computes, the trailing-window
// gauge stays within its bounds, every service's metric group carries them; and the bench's checks fail
// loudly: a speed-up beyond the machine's cores, a distributed MoE output or loss that differs.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { availableParallelism } from 'node:os';
import { Registry } from 'prom-client';
import { MetricGroup } from '../services/core/metrics/registry.js';
import { BusyWindow, busyMetrics, busySample, busyWindow, type BusySample } from '../services/core/metrics/busy.js';
import { servingMetricGroup } from '../services/core/metrics/serving.js';
import { trainingMetricGroup } from '../services/core/metrics/training.js';
import { shardMetricGroup } from '../services/expert/shard.js';
import { coordinatorMetricGroup } from '../services/coordinator/server.js';
import { checkPossibleSpeedup, speedupGuard, speedupRow } from '../services/bench/report.js';
import { checkMoeRow, type LayerResult } from '../services/bench/moe.js';
import { checkSameLosses } from '../services/bench/training.js';
import { busyFromText } from '../services/bench/busy-scrape.js';

function spin(ms: number): void {
  const until = performance.now() + ms;
  let x = 0;
  while (performance.now() < until) x += Math.sqrt(x + 1);
  assert.ok(x > 0);
}

const BUSY_NAMES = ['switchyard_busy_seconds_total', 'switchyard_busy_ratio'];
/** Lets the event loop turn (eventLoopUtilization counts from the loop's start). */
const turn = () => new Promise((resolve) => setTimeout(resolve, 5));

test('the busy counters grow while the process spins, and the gauge stays within [0, 1] (event loop) and [0, cores] (cpu)', async () => {
  const into = new Registry();
  new MetricGroup(busyMetrics).register(into);
  assert.ok(busyWindow.running, 'registering starts the sampler');
  await turn();
  const before = busyFromText(await into.metrics());
  spin(300);
  await turn();
  const after = busyFromText(await into.metrics());
  for (const measure of ['event_loop', 'cpu'] as const) {
    assert.ok(after.seconds[measure] > before.seconds[measure], `${measure} busy seconds grow: ${before.seconds[measure]} → ${after.seconds[measure]}`);
    const ratio = after.ratio[measure];
    assert.ok(ratio !== undefined && ratio >= 0, `${measure} ratio ${ratio}`);
  }
  assert.ok(after.ratio.event_loop! <= 1 + 1e-6, `event loop ratio ${after.ratio.event_loop}`);
  // One thread spins here; other threads (GC helpers) may add a little.
  assert.ok(after.ratio.cpu! <= Math.max(1.5, availableParallelism() * 1.1), `cpu ratio ${after.ratio.cpu}`);
  busyWindow.stop();
});

test('the window: shares over the trailing samples, never above what the samples allow', () => {
  let now: BusySample = { at: 0, event_loop: 0, cpu: 0 };
  const w = new BusyWindow(10_000, 1_000, () => now);
  w.start();
  // 20 s: the first 10 s idle, then fully busy on the loop and 1.5 cpu-seconds per second.
  for (let t = 1; t <= 20; t++) {
    now = t <= 10 ? { at: t * 1000, event_loop: 0, cpu: 0 } : { at: t * 1000, event_loop: t - 10, cpu: 1.5 * (t - 10) };
    w.add(now);
  }
  const shares = w.shares(now);
  assert.equal(shares.event_loop, 1);
  assert.equal(shares.cpu, 1.5);
  w.stop();
  assert.equal(w.running, false);
  // A real sample: cumulative and non-decreasing.
  const a = busySample();
  spin(20);
  const b = busySample();
  assert.ok(b.cpu >= a.cpu && b.event_loop >= a.event_loop && b.at > a.at);
});

test('every service group carries the busy metrics (router serving, shard, coordinator, training)', () => {
  for (const [name, group] of Object.entries({ servingMetricGroup, shardMetricGroup, coordinatorMetricGroup, trainingMetricGroup }))
    for (const metric of BUSY_NAMES) assert.ok(group.names.includes(metric), `${name} lists ${metric}`);
});

test('the impossibility guard: a distributed rate beyond cores × 1.1 of one process fails with the numbers', () => {
  assert.equal(checkPossibleSpeedup('ok', 2.2, 1, 2), 2.2);
  assert.throws(() => checkPossibleSpeedup('moe E=8', 2.3, 1, 2), /moe E=8: 2\.30 against 1 in one process is 2\.300×, impossible on 2 cores \(at most 2\.20×\)/);
  assert.throws(() => checkPossibleSpeedup('x', 100, 1, 64), /impossible on 64 cores/);
  assert.throws(() => checkPossibleSpeedup('zero anchor', 1, 0, 2), /impossible/);
  assert.throws(() => checkPossibleSpeedup('NaN', Number.NaN, 1, 2), /impossible/);
  const cores = availableParallelism();
  assert.throws(() => speedupRow('row', cores * 1.2, 'tokens/s', 1), /impossible on/);
  // A quick (smoke) run reports an over-bound figure as not counted instead of failing on timing.
  speedupGuard.strict = false;
  try {
    const flagged = speedupRow('row', cores * 1.2, 'tokens/s', 1, { min: 1.3 });
    assert.match(flagged.name, /not counted/);
    assert.equal(flagged.met, false);
  } finally {
    speedupGuard.strict = true;
  }
  const row = speedupRow('row', 1.5, 'tokens/s', 1, { min: 1.3 });
  assert.deepEqual({ ratio: row.ratio, anchor: row.anchor, target: row.target, met: row.met }, { ratio: 1.5, anchor: 1, target: '>= 1.3', met: true });
});

test('the moe-layer row check: unserved rows, other rows per expert or another y fail', () => {
  const stats = (counts: number[], degraded?: number[]) => ({
    countsBeforeDrop: Int32Array.from(counts), countsAfterDrop: Int32Array.from(counts), auxLoss: 0, zLoss: 0, droppedChoices: 0, capacity: 0, plans: [],
    ...(degraded ? { degradedTokens: Uint8Array.from(degraded), degradedReasons: ['shard_down'] } : {}),
  });
  const want: LayerResult = { values: Float32Array.from([1, -2, 3, 4]), stats: stats([2, 2]) };
  assert.equal(checkMoeRow('same', { values: want.values.slice(), stats: stats([2, 2]) }, want), 0);
  assert.ok(checkMoeRow('close', { values: Float32Array.from([1, -2, 3, 4 + 2e-5]), stats: stats([2, 2]) }, want) <= 1e-5);
  assert.throws(() => checkMoeRow('far', { values: Float32Array.from([1, -2, 3, 4.001]), stats: stats([2, 2]) }, want), /far: distributed y differs/);
  assert.throws(() => checkMoeRow('nan', { values: Float32Array.from([1, -2, 3, Number.NaN]), stats: stats([2, 2]) }, want), /differs/);
  assert.throws(() => checkMoeRow('counts', { values: want.values, stats: stats([3, 1]) }, want), /rows per expert differ/);
  assert.throws(() => checkMoeRow('unserved', { values: want.values, stats: stats([2, 2], [0, 1]) }, want), /1 of 2 tokens degraded \(shard_down\)/);
});

test('the training check: every step\'s loss within 1e-4 relative, the same steps', () => {
  const run = (losses: number[]) => losses.map((loss, i) => ({ step: i + 1, loss }));
  assert.ok(checkSameLosses('same', run([5, 4, 3]), run([5, 4, 3 * (1 + 5e-5)])) <= 1e-4);
  assert.throws(() => checkSameLosses('drift', run([5, 4, 3.01]), run([5, 4, 3])), /drift: step 3: loss 3\.01 vs 3/);
  assert.throws(() => checkSameLosses('short', run([5, 4]), run([5, 4, 3])), /short: 2 steps, the single-process run 3/);
  assert.throws(() => checkSameLosses('nan', run([5, Number.NaN, 3]), run([5, 4, 3])), /step 2/);
});
