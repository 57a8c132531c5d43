// Faults and overload with real processes on 127.0.0.1 (DESIGN §7): shards killed under load (with and
// without replicas), the coordinator restarted under load, overload at twice the measured capacity,
// SIGTERM under load, and the security options.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { assignmentSpec, spreadExperts } from '../services/core/placement.js';
import { complete, coordinatorHttp, metricValue, startCluster, startLoad, untilInFlight, type Outcome, type TestCluster } from './support/cluster.js';
import { until } from './support/until.js';
import { makeTlsEnv } from './support/pki.js';
import { startService } from './support/services.js';

await initBackend();
const tiny = preset('tiny');
let root: string;
let checkpoint: string;
const spread = spreadExperts(tiny.model.num_hidden_layers, tiny.model.num_local_experts, 2).map(assignmentSpec);
const body = { prompt: 'Call me Ishmael.', max_tokens: 12, temperature: 0.8 };

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-faults-'));
  checkpoint = join(root, 'tiny');
  const model = MixtralModel.initialize(tiny.model, 5);
  await saveModel(checkpoint, model);
  model.dispose();
});

after(async () => {
  await rm(root, { recursive: true, force: true });
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const statuses = (o: Outcome[]) => [...new Set(o.map((x) => x.status))].sort();

async function withCluster(shards: string[], routers: string[][], fn: (c: TestCluster) => Promise<void>, env: Record<string, string> = {}): Promise<void> {
  const c = await startCluster(checkpoint, shards, routers, env);
  try {
    await fn(c);
  } finally {
    await c.stop();
  }
}

test('kill -9 a shard holding replicated experts under load: zero failed requests, none degraded', async () => {
  await withCluster(['all', 'all'], [[]], async (c) => {
    const base = c.routers[0].base;
    const load = startLoad(base, 8, body);
    try {
      await load.answers(10, 'answers before the kill');
      c.shards[1].child.kill('SIGKILL');
      await c.shards[1].exited;
      // Before the coordinator notices (the router's own failover), then after the lease (2 s) ran out
      // and the placement lists only the survivor.
      await load.answers(10, 'answers after the kill');
      await until('shard-1\'s lease to run out', async () => (
        (await metricValue(`${coordinatorHttp(c)}/metrics`, 'switchyard_coordinator_members{role="expert-shard"}')) === 1 ? true : undefined), 60_000);
      await load.answers(20, 'answers after the lease ran out');
    } finally {
      await load.stop();
    }
    const outcomes = load.outcomes;
    assert.deepEqual(statuses(outcomes), [200], outcomes.find((o) => o.status !== 200)?.error);
    assert.equal(outcomes.filter((o) => o.degraded).length, 0, 'the surviving replica served every row');
  });
});

test('kill -9 a shard holding non-replicated experts: degraded (drop) or 503 (reject), never a hang; not degraded once it is back', async () => {
  // Rows for a lost shard must not hold a request past its deadline (the requests would hang without one).
  const deadline = { 'x-request-timeout-ms': '10000' };
  await withCluster(spread, [['--overflow', 'drop'], ['--overflow', 'reject']], async (c) => {
    const [drop, strict] = c.routers.map((r) => r.base);
    const loads = [startLoad(drop, 4, body, deadline), startLoad(strict, 4, body, deadline)];
    try {
      await Promise.all(loads.map((l) => l.answers(5, 'answers before the kill')));
      c.shards[1].child.kill('SIGKILL');
      await c.shards[1].exited;
      // Each router has learned of the loss once its answers show it (degraded, or refused).
      await Promise.all([
        until('degraded answers from the drop router', async () => (loads[0].outcomes.filter((o) => o.degraded).length >= 5 ? true : undefined), 60_000),
        until('503s from the reject router', async () => (loads[1].outcomes.filter((o) => o.status === 503).length >= 5 ? true : undefined), 60_000),
      ]);
    } finally {
      await Promise.all(loads.map((l) => l.stop()));
    }
    const [dropped, rejected] = loads.map((l) => l.outcomes);
    // Drop never refuses for the lost shard; only a deadline the loaded machine could not keep answers 503.
    const refusedByDrop = dropped.filter((o) => o.status !== 200);
    assert.ok(refusedByDrop.every((o) => o.status === 503 && o.retryAfter !== null && /deadline/.test(o.error ?? '')), refusedByDrop.find((o) => o.status !== 503 || !/deadline/.test(o.error ?? ''))?.error);
    assert.ok(dropped.some((o) => o.degraded), 'drop policy: answers flagged degraded');
    assert.ok(statuses(rejected).every((s) => s === 200 || s === 503), `statuses ${statuses(rejected)}`);
    const refused = rejected.filter((o) => o.status === 503);
    assert.ok(refused.length > 0, 'reject policy: 503 while experts are out of reach');
    assert.ok(refused.every((o) => o.retryAfter !== null), '503 carries Retry-After');
    assert.ok(rejected.every((o) => !o.degraded));
    // The shard comes back (same id, its experts reloaded): answers are whole again.
    await c.restartShard(1);
    let healthy = 0;
    await until('ten answers in a row without degradation after the restart', async () => {
      const o = await complete(drop, body);
      healthy = o.status === 200 && !o.degraded ? healthy + 1 : 0;
      return healthy >= 10 ? true : undefined;
    }, 60_000, 50);
    assert.equal((await complete(strict, body)).status, 200);
  });
});

test('restart the coordinator under load: zero failed requests', async () => {
  await withCluster(spread, [[]], async (c) => {
    const load = startLoad(c.routers[0].base, 6, body);
    try {
      await load.answers(10, 'answers before the kill');
      c.coordinator.child.kill('SIGKILL');
      await c.coordinator.exited;
      await load.answers(20, 'answers while the coordinator is down');
      await c.restartCoordinator();
      // Routers and shards re-register with the new coordinator: the cluster keeps serving through it.
      await until('every member registered with the restarted coordinator', async () => (
        (await metricValue(`${coordinatorHttp(c)}/metrics`, 'switchyard_coordinator_members{role="expert-shard"}')) === 2 ? true : undefined), 60_000);
      await load.answers(20, 'answers after the restart');
    } finally {
      await load.stop();
    }
    const outcomes = load.outcomes;
    assert.deepEqual(statuses(outcomes), [200], outcomes.find((o) => o.status !== 200)?.error);
    assert.equal(outcomes.filter((o) => o.degraded).length, 0);
  });
});

test('overload at twice the measured capacity for 20 s: only 200 or 503 + Retry-After, deadlines kept, memory bounded, the queue empties afterwards', async () => {
  const timeoutMs = 2_000;
  await withCluster(spread, [['--max-batch', '8', '--max-queue', '8']], async (c) => {
    const base = c.routers[0].base;
    const sequential = async (n: number) => {
      const ms: number[] = [];
      for (let i = 0; i < n; i++) ms.push((await complete(base, { ...body, seed: i })).ms);
      return ms.sort((a, b) => a - b)[n >> 1];
    };
    const baseline = await sequential(7);
    // Capacity: a closed loop at the batch size for 3 s.
    const started = performance.now();
    const closed = await startLoad(base, 8, body, {}, 3_000).ended;
    const capacity = closed.filter((o) => o.status === 200).length / ((performance.now() - started) / 1000);
    // Open loop at twice that rate for 20 s.
    const rate = 2 * capacity;
    const outcomes: Array<Promise<Outcome>> = [];
    const rss: number[] = [];
    const t0 = performance.now();
    const sampler = setInterval(() => {
      void fetch(`${base}/metrics`).then((r) => r.text()).then((text) => {
        const m = text.match(/^process_resident_memory_bytes (\d+)/m);
        if (m) rss.push(Number(m[1]));
      }).catch(() => undefined);
    }, 500);
    for (let i = 0; performance.now() - t0 < 20_000; i++) {
      outcomes.push(complete(base, { ...body, seed: i }, { 'x-request-timeout-ms': String(timeoutMs) }));
      const due = t0 + ((i + 1) * 1000) / rate;
      const wait = due - performance.now();
      if (wait > 0) await sleep(wait);
    }
    clearInterval(sampler);
    const results = await Promise.all(outcomes);
    const ok = results.filter((o) => o.status === 200).length;
    const refused = results.filter((o) => o.status === 503);
    assert.deepEqual(statuses(results).filter((s) => s !== 200 && s !== 503), [], results.find((o) => o.status !== 200 && o.status !== 503)?.error);
    assert.ok(refused.length > 0, `at twice capacity some requests are refused (${ok} ok of ${results.length})`);
    assert.ok(refused.every((o) => o.retryAfter !== null), 'every 503 has Retry-After');
    const late = results.filter((o) => o.ms > timeoutMs + 1_000);
    assert.equal(late.length, 0, `answered past deadline + 1 s: ${late.map((o) => o.ms.toFixed(0)).join(', ')}`);
    // Documented bound (README): the router stays under 1 GiB resident whatever the offered load.
    assert.ok(rss.length > 10 && Math.max(...rss) < 2 ** 30, `router RSS peaked at ${(Math.max(...rss) / 2 ** 20).toFixed(0)} MiB`);
    // Recovery by the router's own gauges: nothing left queued or running, and answers come again.
    await until('the router idle after the load', async () => (
      (await metricValue(`${base}/metrics`, 'switchyard_router_queue_depth')) === 0 && (await metricValue(`${base}/metrics`, 'switchyard_router_running_sequences')) === 0 ? true : undefined), 60_000);
    const recovered = await sequential(7);
    assert.equal((await complete(base, body)).status, 200);
    process.stderr.write(`# overload: capacity ${capacity.toFixed(1)} req/s, offered ${rate.toFixed(1)} req/s, ${ok} ok, ${refused.length} refused, peak RSS ${(Math.max(...rss) / 2 ** 20).toFixed(0)} MiB, p50 latency ${baseline.toFixed(0)} → ${recovered.toFixed(0)} ms\n`);
  });
});

test('SIGTERM under load: in-flight requests complete, then the router and a replicated shard exit 0', async () => {
  await withCluster(['all', 'all'], [[]], async (c) => {
    const base = c.routers[0].base;
    const inflight = Array.from({ length: 6 }, (_, i) => complete(base, { ...body, max_tokens: 40, seed: i }));
    await untilInFlight(base, 6);
    const shardExit = new Promise<number | null>((resolve) => c.shards[1].child.once('exit', (code) => resolve(code)));
    c.shards[1].child.kill('SIGTERM');
    const results = await Promise.all(inflight);
    assert.deepEqual(statuses(results), [200], results.find((o) => o.status !== 200)?.error);
    assert.equal(await shardExit, 0);
    const more = Array.from({ length: 6 }, (_, i) => complete(base, { ...body, max_tokens: 40, seed: 100 + i }));
    await untilInFlight(base, 6);
    const routerExit = new Promise<number | null>((resolve) => c.routers[0].service.child.once('exit', (code) => resolve(code)));
    c.routers[0].service.child.kill('SIGTERM');
    const finished = await Promise.all(more);
    assert.deepEqual(statuses(finished), [200], finished.find((o) => o.status !== 200)?.error);
    assert.ok(finished.every((o) => !o.degraded));
    assert.equal(await routerExit, 0);
  });
});

test('bearer token on the HTTP API; mTLS between services (plaintext peers are refused)', async () => {
  // A CA and one certificate for every service (the local cluster's processes share it).
  const tls = { ...makeTlsEnv(join(root, 'pki')), SWITCHYARD_API_TOKEN: 's3cret-token' };
  await withCluster(spread, [[]], async (c) => {
    const base = c.routers[0].base;
    const denied = await complete(base, body);
    assert.equal(denied.status, 401);
    const wrong = await complete(base, body, { authorization: 'Bearer nope' });
    assert.equal(wrong.status, 401);
    const ok = await complete(base, body, { authorization: 'Bearer s3cret-token' });
    assert.equal(ok.status, 200, ok.error);
    assert.equal((await fetch(`${base}/v2/health/ready`)).status, 200, 'probes need no token');
    // A router without certificates cannot reach the mTLS coordinator: it never becomes ready.
    const plain = await startService(['serve', 'router', '--checkpoint', checkpoint, '--port', '0', '--coordinator', c.coordinatorAddress], /listening on (\S+)/);
    try {
      await sleep(1_500);
      assert.equal((await fetch(`http://${plain.ready[1]}/v2/health/ready`)).status, 503);
    } finally {
      await plain.stop();
    }
  }, tls);
});

test('credits: concurrent calls beyond a shard\'s budget wait (wait policy) or are refused (reject policy)', async () => {
  // Budget 1 row per expert, two routers: each router may keep one row per expert in flight, plus one
  // oversized batch when nothing else is in flight.
  const c = await startCluster(checkpoint, spread, [['--overflow', 'wait', '--infer-concurrency', '8'], ['--overflow', 'reject', '--infer-concurrency', '8']], {}, 2_000, ['--token-budget', '1']);
  try {
    const infer = (base: string, i: number) => fetch(`${base}/v2/models/tiny/infer`, {
      method: 'POST', headers: { 'content-type': 'application/json', 'x-request-timeout-ms': '20000' },
      body: JSON.stringify({ inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [4, 32], data: Array.from({ length: 128 }, (_, j) => (i * 31 + j * 7) % 256) }] }),
    }).then(async (r) => ({ status: r.status, body: (await r.json()) as { error?: string } }));
    const [wait, reject] = c.routers.map((r) => r.base);
    const waited = await Promise.all(Array.from({ length: 8 }, (_, i) => infer(wait, i)));
    assert.deepEqual([...new Set(waited.map((r) => r.status))], [200], JSON.stringify(waited.find((r) => r.status !== 200)?.body));
    const refused = await Promise.all(Array.from({ length: 8 }, (_, i) => infer(reject, i)));
    assert.ok(refused.every((r) => r.status === 200 || r.status === 503));
    const capacity = refused.filter((r) => r.status === 503);
    assert.ok(capacity.length > 0, 'some calls found no credits');
    // Open Inference's error object: {"error": "<message>"}.
    assert.ok(capacity.every((r) => /at capacity/.test(r.body.error!)), capacity.map((r) => r.body.error).join('; '));
    const metrics = await (await fetch(`${reject}/metrics`)).text();
    assert.match(metrics, /switchyard_router_unserved_rows_total\{layer="\d",expert="\d",reason="at_capacity"\} [1-9]/);
  } finally {
    await c.stop();
  }
});
