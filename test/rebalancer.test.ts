// Membership and the rebalancer in memory, with an injected clock and shards that are only table rows:
// what a shard serves, the key checks, the interval's hysteresis and back-off, and a stopping coordinator.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { expertKeys, expertKeyText, type ExpertKey } from '../services/core/placement.js';
import { Membership } from '../services/coordinator/membership.js';
import { DEFAULT_REBALANCE, Rebalancer, type RebalancerOptions } from '../services/coordinator/rebalancer.js';
import { until } from './support/until.js';

const SHAPE = { moeLayers: [0], experts: 4 };
const k = (expert: number): ExpertKey => ({ layer: 0, expert });
const texts = (keys: ExpertKey[]) => keys.map(expertKeyText).sort();

/** Shard `a` holds all four experts of one MoE layer; a router reports `demand` rows per second for each. */
function cluster(demand = [10, 10, 10, 10]) {
  const membership = new Membership(60_000);
  const shard = (memberId: string, experts: ExpertKey[]) =>
    membership.register({ memberId, role: 'expert-shard', address: `127.0.0.1:${memberId}`, experts, tokenBudget: 64 }, SHAPE);
  shard('a', expertKeys([0], 4));
  membership.register({ memberId: 'router', role: 'router', address: '', experts: [], tokenBudget: 0 });
  membership.recordLoad('router', new Map(expertKeys([0], 4).map((key, i) => [expertKeyText(key), demand[i]])), 0);
  return { membership, shard };
}

function rebalancerOf(membership: Membership, options: Partial<RebalancerOptions>) {
  const started: string[] = [];
  const rebalancer = new Rebalancer(membership, { ...DEFAULT_REBALANCE, intervalMs: 0, ...options, log: (r) => { if (r.msg === 'placement migration started') started.push(String(r.reason)); } });
  return { rebalancer, started };
}

test('membership: a shard serves what it holds within its assignment; reports and registrations outside the model are refused', () => {
  const m = new Membership(1000);
  const versions: number[] = [];
  m.watch((t) => versions.push(t.version));
  const a = m.register({ memberId: 'a', role: 'expert-shard', address: 'A', experts: [k(0), k(1)], tokenBudget: 64 }, SHAPE);
  assert.deepEqual(texts(m.serving(a)), ['0/0', '0/1'], 'no assignment yet: everything held');
  m.assign(new Map([['a', [k(1), k(2)]]]));
  assert.deepEqual(texts(m.serving(a)), ['0/1'], 'held ∩ assigned: 0/2 is not loaded yet, 0/0 is on its way out');
  assert.deepEqual(m.placement().entries.filter((e) => e.shardIds.length).map(expertKeyText), ['0/1']);
  assert.equal(m.reportHoldings('a', a.leaseId, [k(1), k(2)]), true);
  assert.deepEqual(texts(m.serving(a)), ['0/1', '0/2']);
  const before = versions.length;
  assert.equal(m.reportHoldings('a', a.leaseId, [k(2), k(1)]), true);
  assert.equal(versions.length, before, 'a report that changes nothing publishes nothing');
  assert.equal(m.reportHoldings('a', 'stale', [k(3)]), false, 'unknown lease');
  assert.throws(() => m.reportHoldings('a', a.leaseId, [k(4)]), /expert \(layer 0, expert 4\) is outside the model/);
  assert.throws(() => m.reportHoldings('a', a.leaseId, [{ layer: 1, expert: 0 }]), /outside the model/);
  assert.deepEqual(texts(m.get('a')!.experts), ['0/1', '0/2'], 'a refused report changes nothing');
  assert.throws(() => m.register({ memberId: 'b', role: 'expert-shard', address: 'B', experts: [k(7)], tokenBudget: 64 }), /outside the model/);
  assert.throws(() => m.register({ memberId: 'c', role: 'expert-shard', address: 'C', experts: [], tokenBudget: 64 }, { moeLayers: [0], experts: 8 }), /the cluster MoE layers \[0\] × 4 experts/);
  assert.deepEqual(m.list().map((x) => x.memberId), ['a']);
});

test('membership: a refused registration does not fix the cluster\'s shape', () => {
  const m = new Membership(1000);
  assert.throws(() => m.register({ memberId: '', role: 'expert-shard', address: 'A', experts: [], tokenBudget: 64 }, { moeLayers: [0], experts: 8 }), /member_id is empty/);
  assert.throws(() => m.register({ memberId: 'a', role: 'expert-shard', address: 'A', experts: [k(9)], tokenBudget: 64 }, { moeLayers: [0], experts: 8 }), /outside the model/);
  assert.equal(m.shape, undefined);
  m.register({ memberId: 'a', role: 'expert-shard', address: 'A', experts: [k(0)], tokenBudget: 64 }, SHAPE);
  assert.deepEqual(m.shape, SHAPE);
});

test('a stopping coordinator ends the migration waiting for a shard and every one queued or asked for later', async () => {
  const { membership, shard } = cluster();
  // A long load timeout: any wait close() does not end shows up as a timeout reason, not as stopping.
  const { rebalancer, started } = rebalancerOf(membership, { loadTimeoutMs: 2_000 });
  try {
    shard('b', []); // joins empty and never reports what it loads
    const first = rebalancer.rebalance('first');
    const queued = rebalancer.rebalance('queued');
    await until('the plan to give the new shard experts', async () => ((membership.get('b')?.assigned?.length ?? 0) > 0 ? true : undefined), 5_000);
    rebalancer.close();
    for (const result of [await first, await queued, await rebalancer.rebalance('after close'), await rebalancer.drain('a')]) {
      assert.equal('applied' in result ? result.applied : result.drained, false);
      assert.match('reason' in result ? result.reason : result.message, /abandoned, the coordinator is stopping/);
    }
    assert.deepEqual(started, ['first'], 'nothing starts after close()');
  } finally {
    rebalancer.close();
  }
});

test('interval: acts on a clear imbalance, never queues behind a running migration, and backs off after an abandoned one', async () => {
  // a serves everything, b only expert 0: max/mean 1.75, and moving experts to b halves a's load.
  const { membership, shard } = cluster();
  shard('b', [k(0)]);
  let now = 1_000_000_000;
  const intervalMs = 3_600_000; // the real interval never fires during the test; the test calls tick()
  const { rebalancer, started } = rebalancerOf(membership, { intervalMs, loadTimeoutMs: 300, now: () => now });
  try {
    const first = rebalancer.tick(); // b never reports what it loads: this migration is abandoned
    await until('the first migration', async () => (started.length ? true : undefined), 5_000);
    now += intervalMs;
    await rebalancer.tick();
    assert.equal(started.length, 1, 'a tick while a migration waits queues no other');
    await first;
    assert.equal(rebalancer.generation, 0);
    await rebalancer.tick();
    assert.equal(started.length, 1, 'no retry within an interval of the abandoned migration');
    now += intervalMs;
    const retry = rebalancer.tick();
    await until('the retry an interval later', async () => (started.length === 2 ? true : undefined), 5_000);
    rebalancer.close();
    await retry;
  } finally {
    rebalancer.close();
  }
});

test('interval: a balanced placement is left alone', async () => {
  const { membership, shard } = cluster();
  membership.reportHoldings('a', membership.get('a')!.leaseId, [k(0), k(1)]);
  shard('b', [k(2), k(3)]);
  const { rebalancer, started } = rebalancerOf(membership, { intervalMs: 3_600_000, now: () => 10_000_000_000 });
  try {
    await rebalancer.tick();
    assert.deepEqual(started, []);
    assert.equal(membership.get('a')!.assigned, undefined);
  } finally {
    rebalancer.close();
  }
});
