// The pieces of distributed training without a model: the coordinator's all-reduce over real gRPC
// streams, the step protocol's barriers and aborts, the shard's step gate, replica placement, credits, and the
// command line's refusals.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import * as grpc from '@grpc/grpc-js';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startCoordinator } from '../services/coordinator/server.js';
import { ReduceHub, type ReduceSink } from '../services/coordinator/allreduce-hub.js';
import { TrainLink, AllReduceError } from '../services/core/wire/train-link.js';
import { CoordinatorLink } from '../services/core/wire/coordinator-link.js';
import { toWireTensor } from '../services/core/wire/tensor.js';
import { StepGate } from '../services/expert/shard.js';
import { spreadExperts, withReplicas } from '../services/core/placement.js';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { runCli } from './support/cli.js';
import { countRefusedWrites, watchListenerWarnings } from './support/streams.js';

await initBackend();
const root = await mkdtemp(join(tmpdir(), 'switchyard-allreduce-'));
after(() => rm(root, { recursive: true, force: true }));

test('all-reduce over the coordinator: multi-chunk sums reach every contributor, identical bytes', async () => {
  const coordinator = await startCoordinator('127.0.0.1', 0, 5_000);
  const links = [0, 1, 2].map((i) => new TrainLink(`127.0.0.1:${coordinator.port}`, `m${i}`));
  try {
    const n = 10_001; // not a multiple of the chunk: the last chunk is short
    const vectors = links.map((_, i) => Float32Array.from({ length: n }, (_, j) => (j % 13) * (i + 1) + 0.25));
    const small = links.map((_, i) => Float32Array.of(i, 2 * i));
    const results = await Promise.all(links.map((l, i) => l.allReduce([
      { name: 'g1/s1/dense', contributors: 3, values: vectors[i] },
      { name: 'g1/s1/stats', contributors: 3, values: small[i] },
    ], 1_000)));
    for (let j = 0; j < n; j += 997) assert.equal(results[0].sums[0][j], vectors[0][j] + vectors[1][j] + vectors[2][j]);
    assert.deepEqual([...results[2].sums[1]], [3, 6]);
    for (const r of results) assert.deepEqual(r.sums[0], results[0].sums[0]);
    assert.equal(results[0].stats.bytesSent, (n + 2) * 4);
    assert.equal(coordinator.reduceHub.pendingChunks, 0);
    // Contributions that disagree are refused with INVALID_ARGUMENT; the coordinator keeps serving.
    const bad = await Promise.allSettled([
      links[0].allReduce([{ name: 'g1/s2/dense', contributors: 2, values: new Float32Array(4) }], 1_000, 5_000),
      links[1].allReduce([{ name: 'g1/s2/dense', contributors: 2, values: new Float32Array(5) }], 1_000, 5_000),
    ]);
    assert.ok(bad.some((r) => r.status === 'rejected' && r.reason instanceof AllReduceError && /disagree/.test(String(r.reason.message))));
    const again = await Promise.all(links.slice(0, 2).map((l) => l.allReduce([{ name: 'g1/s3/dense', contributors: 2, values: Float32Array.of(1.5) }])));
    assert.equal(again[0].sums[0][0], 3);
  } finally {
    for (const l of links) l.close();
    await coordinator.close();
  }
});

test('an all-reduce of 1 000 chunks leaves no listener behind on its stream, however often it waits for drain', async () => {
  const coordinator = await startCoordinator('127.0.0.1', 0, 5_000);
  const link = new TrainLink(`127.0.0.1:${coordinator.port}`, 'm0');
  const warnings = watchListenerWarnings();
  // Watch the call allReduce opens: count its refused writes (backpressure) and read its listeners after.
  type Call = grpc.ClientDuplexStream<unknown, unknown>;
  const calls: Call[] = [];
  let writes = { refused: 0 };
  const open = link.client.AllReduce.bind(link.client) as (...args: unknown[]) => Call;
  (link.client as unknown as { AllReduce: (...args: unknown[]) => Call }).AllReduce = (...args) => {
    const call = open(...args);
    writes = countRefusedWrites(call);
    calls.push(call);
    return call;
  };
  try {
    const values = Float32Array.from({ length: 1_000 * 1_024 }, (_, i) => i % 7);
    const { sums } = await link.allReduce([{ name: 'g1/s1/dense', contributors: 1, values }], 1_024);
    assert.deepEqual(sums[0], values);
    assert.equal(calls.length, 1);
    assert.ok(writes.refused > 0, 'some chunk writes met backpressure');
    for (const event of ['drain', 'close']) assert.equal(calls[0].listenerCount(event), 0, `${event} listeners left after ${writes.refused} waits`);
    assert.deepEqual(await warnings.messages(), []);
  } finally {
    warnings.stop();
    link.close();
    await coordinator.close();
  }
});

test('reduce hub: a contributor that leaves fails its reductions instead of completing them short', () => {
  const written: string[] = [];
  const errors: string[] = [];
  const sink = (id: string): ReduceSink => ({
    write: (c) => { written.push(`${id}:${c.reduction}`); return true; },
    emit: (_e, err) => { errors.push(`${id}:${err.details}`); return true; },
  });
  const [a, b] = [sink('a'), sink('b')];
  const hub = new ReduceHub();
  const chunk = (values: number[]) => ({ reduction: 'g1/s1/dense', contributors: 3, chunk: 0, chunks: 1, values: toWireTensor(Float32Array.from(values), [values.length]) }) as never;
  hub.add(chunk([1, 2]), a);
  hub.add(chunk([3, 4]), b);
  hub.forget(a);
  assert.equal(hub.pendingChunks, 0);
  assert.deepEqual(written, []);
  assert.match(errors.join(), /^b:a contributor of g1\/s1\/dense#0 left/);
  // An aborted generation's reductions are dropped with ABORTED.
  hub.add(chunk([1, 1]), b);
  hub.drop('g1/', 'attempt 1 aborted');
  assert.equal(hub.pendingChunks, 0);
  assert.match(errors.at(-1)!, /attempt 1 aborted/);
});

test('step protocol: barriers answer together; a member restart aborts the attempt and everyone rejoins', async () => {
  const dir = join(root, 'ckpt');
  const model = MixtralModel.initialize(preset('tiny').model, 1);
  await saveModel(dir, model, { state: { step: 0 }, optimizers: {} });
  model.dispose();
  const coordinator = await startCoordinator('127.0.0.1', 0, 5_000, { routers: 1, shards: 1, checkpointDir: dir });
  const address = `127.0.0.1:${coordinator.port}`;
  const members = [
    new CoordinatorLink(address, { memberId: 'router-0', role: 'ROLE_ROUTER' }),
    new CoordinatorLink(address, { memberId: 'shard-0', role: 'ROLE_EXPERT_SHARD', address: '127.0.0.1:1', experts: [{ layer: 0, expert: 0 }] }),
  ];
  const router = new TrainLink(address, 'router-0');
  const shard = new TrainLink(address, 'shard-0');
  try {
    for (const m of members) m.start();
    const settings = JSON.stringify({ ...preset('tiny').train, steps: 3, checkpoint_interval: 10 });
    const [jr, js] = await Promise.all([
      router.sync({ phase: 'TRAIN_PHASE_JOIN', generation: '0', trainSettingsJson: settings }),
      shard.sync({ phase: 'TRAIN_PHASE_JOIN', generation: '0' }),
    ]);
    const g = Number(jr.generation);
    assert.ok(g > 0);
    assert.equal(js.resumeStep, '0');
    assert.equal(js.trainSettingsJson, settings, 'shards learn the settings from the routers');
    let shardDone = false;
    const waiting = shard.barrier(g, 1, 'TRAIN_PHASE_COMMIT', { gradSquareSum: 9 }).then((r) => { shardDone = true; return r; });
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(shardDone, false, 'a barrier waits for every member');
    const commit = await router.barrier(g, 1, 'TRAIN_PHASE_COMMIT', { gradSquareSum: 16 });
    assert.equal(commit.gradNorm, 5, 'global norm over the router and shard shares');
    assert.equal((await waiting).gradNorm, 5);
    assert.equal(commit.checkpoint, false);
    // The same question again (a long poll that timed out) gets the same answer.
    assert.equal((await router.barrier(g, 1, 'TRAIN_PHASE_COMMIT', { gradSquareSum: 16 })).gradNorm, 5);
    // The shard restarts (a new lease under the same id): the attempt in flight is aborted.
    const pending = router.sync({ phase: 'TRAIN_PHASE_BACKWARD_DONE', generation: String(g), step: '2' });
    members[1].close();
    const restarted = new CoordinatorLink(address, { memberId: 'shard-0', role: 'ROLE_EXPERT_SHARD', address: '127.0.0.1:2', experts: [{ layer: 0, expert: 0 }] });
    members.push(restarted);
    restarted.start();
    const aborted = await pending;
    assert.equal(aborted.aborted, true);
    assert.match(aborted.abortReason, /shard-0 restarted/);
    const [r2] = await Promise.all([
      router.sync({ phase: 'TRAIN_PHASE_JOIN', generation: String(g), trainSettingsJson: settings }),
      shard.sync({ phase: 'TRAIN_PHASE_JOIN', generation: '0' }),
    ]);
    assert.equal(Number(r2.generation), g + 1);
    // Stale generations are refused.
    const stale = await router.sync({ phase: 'TRAIN_PHASE_COMMIT', generation: String(g), step: '2' });
    assert.equal(stale.aborted, true);
  } finally {
    router.close();
    shard.close();
    for (const m of members) m.close();
    await coordinator.close();
  }
});

test('TrainSync without a training job is FAILED_PRECONDITION (the coordinator keeps serving)', async () => {
  const coordinator = await startCoordinator('127.0.0.1', 0, 5_000);
  const link = new TrainLink(`127.0.0.1:${coordinator.port}`, 'x');
  try {
    const err = await new Promise<grpc.ServiceError>((resolve) => link.client.TrainSync({ memberId: 'x', phase: 'TRAIN_PHASE_JOIN' }, (e) => resolve(e!)));
    assert.equal(err.code, grpc.status.FAILED_PRECONDITION);
    assert.match(err.details, /no training job/);
  } finally {
    link.close();
    await coordinator.close();
  }
});

test('step gate: training rows wait for their weights step; stale and aborted rows are refused', async () => {
  const gate = new StepGate();
  gate.begin(1);
  const order: string[] = [];
  const early = gate.admit(1, 3);
  assert.ok(early instanceof Promise);
  void early.then(() => order.push('step-3 rows'));
  gate.ready(2);
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(order, []);
  gate.ready(3);
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(order, ['step-3 rows']);
  assert.equal(gate.admit(1, 3), undefined);
  assert.match(String((gate.admit(1, 2) as Error).message), /applied step 3/);
  const held = gate.admit(1, 4) as Promise<void>;
  gate.begin(2);
  await assert.rejects(held, /aborted training attempt 1/);
});

test('hot-expert replicas go to the next shards, one copy per shard', () => {
  const placement = withReplicas(spreadExperts(2, 4, 3), [{ layer: 0, expert: 1 }], 2);
  const holders = placement.map((keys, s) => (keys.some((k) => k.layer === 0 && k.expert === 1) ? s : -1)).filter((s) => s >= 0);
  assert.deepEqual(holders, [1, 2]);
  assert.throws(() => withReplicas(spreadExperts(1, 2, 2), [{ layer: 0, expert: 0 }], 3), /cannot place 3 replicas/);
});

test('train refuses replica placements it cannot make', async () => {
  const replicate = await runCli(['train', '--config', 'tiny', '--single-process', '--replicate', '0:1', '--out', join(root, 'y')]);
  assert.equal(replicate.code, 2);
  assert.match(replicate.stderr, /--replicate .* needs a distributed run/);
  const bad = await runCli(['train', '--config', 'tiny', '--shards', '2', '--replicate', '0:9', '--out', join(root, 'z')]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /the model has 2 layers × 4 experts/);
});

test('credits: a share per key, one oversized batch alone, waiters served in turn or timed out', async () => {
  const { Credits } = await import('../services/core/credits.js');
  const credits = new Credits();
  assert.equal(credits.tryTake('a', 10, 4), true, 'nothing in flight: an oversized batch may go alone');
  assert.equal(credits.tryTake('a', 1, 4), false);
  assert.equal(credits.tryTake('b', 1, 4), true, 'keys are independent');
  const waiting = credits.take('a', 2, 4, Date.now() + 5_000);
  const timedOut = credits.take('a', 3, 4, Date.now() + 20);
  assert.equal(await timedOut, false);
  credits.give('a', 10);
  assert.equal(await waiting, true);
  assert.equal(credits.snapshot().get('a'), 2);
  assert.equal(credits.tryTake('a', 2, 4), true);
  assert.equal(credits.tryTake('a', 1, undefined), true, 'no limit: always');
});
