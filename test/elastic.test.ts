// Elastic expert scaling with real processes on 127.0.0.1: a shard joining a skewed cluster gets a
// replica of the hot expert and the measured shard load evens out; a shard leaving under load drains
// (its experts move first) and exits 0; no request fails in either change. The planner's own
// properties are checked without processes.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../services/core/backend.js';
import { parseModelConfig, preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { expertKeys } from '../services/core/placement.js';
import { maxOverMean, planPlacement, PlacementInfeasible, placementLoad } from '../services/coordinator/planner.js';
import { startCluster, startLoad, type Outcome, type TestCluster } from './support/cluster.js';
import type { RunningService } from './support/services.js';
import { runCli } from './support/cli.js';
import { until } from './support/until.js';

await initBackend();
const TOKEN = 'elastic-test-admin-token';
// One MoE layer of 4 experts, top-2: a hot expert chosen by every token gets exactly half of all rows.
const config = parseModelConfig({ ...preset('tiny').model, num_hidden_layers: 1 });
const body = { prompt: 'Call me Ishmael. Some years ago', max_tokens: 8, temperature: 0.8 };
let root: string;
let checkpoint: string;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-elastic-'));
  checkpoint = join(root, 'skewed');
  const model = MixtralModel.initialize(config, 11);
  // Skew: a large constant in residual dimension 0 (from the embedding) that only expert 0's gate row
  // reads, so expert 0 is every token's first choice; the second choice still varies.
  const embed = model.dense.get('embed');
  const rows = embed.dataSync().slice() as Float32Array;
  for (let v = 0; v < config.vocab_size; v++) rows[v * config.hidden_size] = 8;
  model.dense.set('embed', tf.tensor(rows, embed.shape));
  const gate = model.dense.get('layers.0.gate');
  const g = gate.dataSync().slice() as Float32Array; // [hidden, experts]
  for (let e = 0; e < config.num_local_experts; e++) g[e] = e === 0 ? 2 : 0;
  model.dense.set('layers.0.gate', tf.tensor(g, gate.shape));
  await saveModel(checkpoint, model);
  model.dispose();
});

after(() => rm(root, { recursive: true, force: true }));

const lineUrl = (s: RunningService, what: RegExp) => s.ready.input!.match(what)![1];
const metricsOf = async (s: RunningService) => (await fetch(lineUrl(s, /metrics (http:\/\/\S+\/metrics)/))).text();
const adminOf = (c: TestCluster) => lineUrl(c.coordinator, /admin (http:\/\/[^/\s]+)\//);

/** Rows each shard computed so far (forward kind), from its /metrics. */
async function shardRows(shards: RunningService[]): Promise<number[]> {
  return Promise.all(shards.map(async (s) => {
    let rows = 0;
    for (const m of (await metricsOf(s)).matchAll(/^switchyard_expert_rows_total\{[^}]*kind="forward"[^}]*\} (\S+)$/gm)) rows += Number(m[1]);
    return rows;
  }));
}

/** Rows per measurement window: counted, not timed, so a slow machine measures the same traffic. */
const WINDOW_ROWS = 4_000;

/** max/mean of the rows each shard computed over the next `rows` rows of traffic (all shards together). */
async function measuredImbalance(shards: RunningService[], rows = WINDOW_ROWS): Promise<{ ratio: number; rows: number[] }> {
  const before = await shardRows(shards);
  const counted = await until(`${rows} more rows computed`, async () => {
    const delta = (await shardRows(shards)).map((r, i) => r - before[i]);
    return delta.reduce((a, b) => a + b, 0) >= rows ? delta : undefined;
  }, 120_000, 100);
  return { ratio: maxOverMean(counted), rows: counted };
}

async function placement(c: TestCluster): Promise<{ shards: Array<{ shard_id: string; serving: string }>; replicated: Array<{ layer: number; expert: number; shards: string[] }> }> {
  const res = await fetch(`${adminOf(c)}/admin/placement`, { headers: { authorization: `Bearer ${TOKEN}` } });
  assert.equal(res.status, 200);
  return res.json() as never;
}


function assertAllServed(outcomes: Outcome[]): void {
  assert.ok(outcomes.length > 10, `${outcomes.length} requests`);
  const failed = outcomes.filter((o) => o.status !== 200);
  assert.equal(failed.length, 0, `failed requests: ${JSON.stringify(failed.slice(0, 3))}`);
  assert.equal(outcomes.filter((o) => o.degraded).length, 0, 'no request lost rows');
}

test('a third shard joins a skewed cluster: the hot expert gets replicas, measured max/mean shard load falls, no request fails', async (t) => {
  const c = await startCluster(checkpoint, ['spread:0/2', 'spread:1/2'], [[]], { SWITCHYARD_ADMIN_TOKEN: TOKEN });
  const load = startLoad(c.routers[0].base, 4, body);
  try {
    await load.answers(10, 'answers before measuring');
    const before = await measuredImbalance(c.shards);
    // The skew is what we built: expert 0 gets half of all routed rows.
    const routed = [...(await (await fetch(`${c.routers[0].base}/metrics`)).text()).matchAll(/^switchyard_expert_tokens_total\{layer="0",expert="(\d)",stage="routed"\} (\S+)$/gm)];
    const total = routed.reduce((s, m) => s + Number(m[2]), 0);
    const hot = Number(routed.find((m) => m[1] === '0')![2]);
    assert.ok(Math.abs(hot / total - 0.5) < 0.01, `expert 0 gets ${hot} of ${total} routed rows`);

    const joined = await c.addShard('none');
    const after = await until('the new shard serving a replica of the hot expert', async () => {
      const p = await placement(c);
      const hotReplicas = p.replicated.find((r) => r.layer === 0 && r.expert === 0);
      return hotReplicas?.shards.includes('shard-2') ? p : undefined;
    });
    // The router routes by the new placement once the new shard has computed rows.
    await until('the new shard computing rows', async () => ((await shardRows([joined]))[0] > 0 ? true : undefined), 60_000);
    const balanced = await measuredImbalance(c.shards);
    assertAllServed(await load.stop());
    // Skew built in: expert 0 on one of two shards gives that shard 2/3 of the rows (max/mean 4/3).
    assert.ok(before.ratio > 1.2, `skewed before: max/mean ${before.ratio.toFixed(3)} (${before.rows.join(', ')})`);
    assert.ok(balanced.ratio < before.ratio, `max/mean ${before.ratio.toFixed(3)} → ${balanced.ratio.toFixed(3)} (${balanced.rows.join(', ')})`);
    assert.ok(balanced.rows[2] > 0, 'the new shard computes rows');
    t.diagnostic(`measured shard max/mean ${before.ratio.toFixed(3)} (rows ${before.rows.join(', ')}) → ${balanced.ratio.toFixed(3)} (rows ${balanced.rows.join(', ')}); ${after.replicated.map((r) => `${r.layer}/${r.expert}×${r.shards.length}`).join(' ')}`);
    assert.ok(after.shards.find((s) => s.shard_id === 'shard-2')!.serving.length > 0);

    // Metrics of the change: replicas, migration time, registration → ready, registration → first row.
    const coordinatorMetrics = await (await fetch(`${adminOf(c)}/metrics`)).text();
    assert.match(coordinatorMetrics, /^switchyard_expert_replicas\{layer="0",expert="0"\} [2-9]/m);
    assert.match(coordinatorMetrics, /^switchyard_placement_migration_seconds_count [1-9]/m);
    assert.match(coordinatorMetrics, /^switchyard_shard_ready_seconds_count 1$/m);
    assert.match(coordinatorMetrics, /^switchyard_placement_generation [1-9]/m);
    const firstRow = Number((await metricsOf(joined)).match(/^switchyard_expert_first_row_seconds (\S+)$/m)![1]);
    assert.ok(firstRow > 0, `registration → first served row ${firstRow} s`);
    t.diagnostic(`registration → first served row ${firstRow.toFixed(2)} s`);

    // The same through the CLI (and nothing without the token).
    const env = { SWITCHYARD_ADMIN_TOKEN: TOKEN };
    const show = await runCli(['placement', 'show', '--admin', adminOf(c)], env);
    assert.equal(show.code, 0, show.stderr);
    assert.match(show.stdout, /shard-2/);
    assert.match(show.stdout, /replicated experts: .*0\/0×[23]/);
    const plan = await runCli(['placement', 'plan', '--admin', adminOf(c), '--json'], env);
    assert.equal(plan.code, 0, plan.stderr);
    const planned = JSON.parse(plan.stdout) as { plan: { loads: number; predictedMaxOverMean: number } };
    assert.equal(planned.plan.loads, 0, 'planner stickiness: a fresh plan keeps the balanced placement');
    assert.equal((await fetch(`${adminOf(c)}/admin/placement`)).status, 401);
    assert.equal((await fetch(`${adminOf(c)}/%61dmin/placement/apply`, { method: 'POST' })).status, 401, 'no way around the token by escaping the path');
    const denied = await runCli(['placement', 'apply', '--admin', adminOf(c)], { SWITCHYARD_ADMIN_TOKEN: 'wrong' });
    assert.equal(denied.code, 2);
    assert.match(denied.stderr, /401/);
  } finally {
    await load.stop(); // clients stop even when an assertion failed
    await c.stop();
  }
});

test('scale-down under load: the leaving shard\'s experts move first, zero failed requests, it exits 0', async () => {
  const c = await startCluster(checkpoint, ['spread:0/3', 'spread:1/3', 'spread:2/3'], [[]], { SWITCHYARD_ADMIN_TOKEN: TOKEN });
  const load = startLoad(c.routers[0].base, 4, body);
  try {
    await load.answers(10, 'answers before the drain');
    const leaving = c.shards[1];
    const exit = new Promise<number | null>((resolve) => leaving.child.once('exit', (code) => resolve(code)));
    leaving.child.kill('SIGTERM');
    assert.equal(await exit, 0, leaving.stderr());
    await load.answers(20, 'answers after the shard left');
    assertAllServed(await load.stop());
    const p = await placement(c);
    assert.deepEqual(p.shards.map((s) => s.shard_id).sort(), ['shard-0', 'shard-2']);
    const served = new Set(p.shards.flatMap((s) => s.serving.split(' ')));
    assert.deepEqual([...served].sort(), ['0/0', '0/1', '0/2', '0/3'], 'every expert still served');
  } finally {
    await load.stop(); // clients stop even when an assertion failed
    await c.stop();
  }
});

test('planner: replicate then pack — hot experts get replicas, budgets hold, the result meets the lower bound on easy cases', () => {
  const shards = (n: number, max = 0) => Array.from({ length: n }, (_, i) => ({ shardId: `s${i}`, maxExperts: max, holds: [] }));
  // One layer, 4 experts, expert 0 half the load, 3 shards: 3 replicas of expert 0 balance exactly.
  const skewed = planPlacement({ experts: expertKeys(1, 4), shards: shards(3), load: [3, 1, 1, 1] });
  assert.equal(skewed.replicas[0], 3);
  assert.ok(skewed.predictedMax / skewed.mean < 1.01, `max/mean ${skewed.predictedMax / skewed.mean}`);
  // Uniform load: no replicas, experts spread evenly.
  const uniform = planPlacement({ experts: expertKeys(2, 8), shards: shards(4), load: new Array(16).fill(5) });
  assert.deepEqual([...uniform.replicas], new Array(16).fill(1));
  assert.deepEqual([...uniform.assignment.values()].map((k) => k.length), [4, 4, 4, 4]);
  // Memory budgets: 2 shards × 3 experts for 4 experts leave 2 spare slots, both go to the hot one... at most.
  const tight = planPlacement({ experts: expertKeys(1, 4), shards: shards(2, 3), load: [10, 1, 1, 1] });
  for (const keys of tight.assignment.values()) assert.ok(keys.length <= 3);
  assert.equal(tight.replicas[0], 2);
  assert.ok(tight.predictedMax >= tight.lowerBound - 1e-9);
  assert.throws(() => planPlacement({ experts: expertKeys(1, 4), shards: shards(1, 3), load: [1, 1, 1, 1] }), PlacementInfeasible);
  // Stickiness: a plan from a balanced placement moves nothing.
  const holds = [...uniform.assignment.values()].map((keys, i) => ({ shardId: `s${i}`, maxExperts: 0, holds: keys }));
  assert.equal(planPlacement({ experts: expertKeys(2, 8), shards: holds, load: new Array(16).fill(5) }).loads, 0);
  // placementLoad splits a replicated expert's demand evenly.
  const loads = placementLoad(new Map([['a', [{ layer: 0, expert: 0 }]], ['b', [{ layer: 0, expert: 0 }, { layer: 0, expert: 1 }]]]), expertKeys(1, 2), [4, 2]);
  assert.deepEqual([...loads.values()], [2, 4]);
});
