import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import * as grpc from '@grpc/grpc-js';
import { status } from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { ExpertSet } from '../services/core/model/experts.js';
import { loadDenseModel, saveModel } from '../services/core/checkpoint/model.js';
import { GrpcExpertTransport } from '../services/core/wire/grpc-transport.js';
import { toWireTensor } from '../services/core/wire/tensor.js';
import { ExpertShard } from '../services/expert/shard.js';
import { runShardTraining } from '../services/expert/trainer.js';
import { StepAborted, trainingPassId, type TrainLink } from '../services/core/wire/train-link.js';
import { startExpertServer } from '../services/expert/server.js';
import { registry } from '../services/core/metrics/registry.js';
import { parseAssignment } from '../services/expert/assignment.js';
import { startService, type RunningService } from './support/services.js';
import * as tf from '@tensorflow/tfjs-core';
import { countRefusedWrites, watchListenerWarnings } from './support/streams.js';

await initBackend();
const tiny = preset('tiny');
let root: string;
let checkpoint: string;
let reference: MixtralModel;
const services: RunningService[] = [];
const B = 2;
const T = 12;
const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 29 + 3) % 256);
const targets = Int32Array.from(ids, (v) => (v * 7 + 1) % 256);

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-shards-'));
  checkpoint = join(root, 'ckpt');
  reference = MixtralModel.initialize(tiny.model, 11);
  await saveModel(checkpoint, reference);
});

after(async () => {
  await Promise.all(services.map((s) => s.stop()));
  reference.dispose();
  await rm(root, { recursive: true, force: true });
});

async function shard(experts: string): Promise<string> {
  const s = await startService(['serve', 'expert', '--checkpoint', checkpoint, '--experts', experts, '--port', '0'], /listening on (\S+)/);
  services.push(s);
  return s.ready[1];
}

function assertLogitsClose(got: Float32Array, want: Float32Array): void {
  let maxDiff = 0;
  for (let i = 0; i < want.length; i++) maxDiff = Math.max(maxDiff, Math.abs(want[i] - got[i]));
  assert.ok(maxDiff <= 1e-5, `max |Δlogit| = ${maxDiff}`);
}

/** The router's dense gradients equal the in-process reference's (relative to each tensor's scale). */
function assertGradientsClose(distributed: MixtralModel): void {
  for (const name of reference.dense.names()) {
    const ga = reference.dense.gradOrZeros(name).dataSync();
    const gb = distributed.dense.gradOrZeros(name).dataSync();
    let diff = 0;
    let scale = 0;
    for (let i = 0; i < ga.length; i++) {
      diff = Math.max(diff, Math.abs(ga[i] - gb[i]));
      scale = Math.max(scale, Math.abs(ga[i]));
    }
    assert.ok(diff <= 1e-5 * Math.max(1, scale), `${name}: max |Δgrad| ${diff}`);
  }
}

/**
 * The router's model over `transport` gives the in-process logits, loss and dense gradients (backward
 * over the wire too); `afterForward` checks which shards served.
 */
async function assertMatchesReference(transport: GrpcExpertTransport, passId: string, afterForward: () => void): Promise<void> {
  const distributed = await loadDenseModel(checkpoint, transport);
  try {
    assertLogitsClose(await distributed.logits(ids, B, T), await reference.logits(ids, B, T));
    afterForward();
    const a = await reference.lossAndGradients(ids, targets, B, T, { passId, train: true });
    const b = await distributed.lossAndGradients(ids, targets, B, T, { passId, train: true });
    assert.ok(Math.abs(a.loss - b.loss) <= 1e-6, `loss ${a.loss} vs ${b.loss}`);
    assertGradientsClose(distributed);
  } finally {
    reference.dense.clearGrads();
    reference.localExperts!.params.clearGrads();
    transport.close();
    distributed.dispose();
  }
}

for (const [arrangement, specs] of [
  ['one layer per shard', ['0:0-3', '1:0-3']],
  ["a layer's experts split over shards, each shard holding several layers", ['0:0,1;1:2,3', '0:2,3;1:0,1']],
] as const) {
  test(`two expert shards (${arrangement}) give the single-process logits and dense gradients`, async () => {
    const addresses = await Promise.all(specs.map(shard));
    const owner = new Map<string, string>();
    specs.forEach((spec, i) => {
      for (const { layer, expert } of parseAssignment(spec, 2, 4)) owner.set(`${layer}/${expert}`, addresses[i]);
    });
    const transport = new GrpcExpertTransport((l, e) => [owner.get(`${l}/${e}`)!], tiny.model.hidden_size);
    await assertMatchesReference(transport, 'p', () => {
      assert.deepEqual([...transport.messagesSent.keys()].sort(), [...addresses].sort(), 'both shards were used');
    });
  });
}

test('every expert replicated on two shards: rows split over the replicas, logits and gradients unchanged', async () => {
  const addresses = await Promise.all(['all', 'all'].map(shard));
  const transport = new GrpcExpertTransport(() => addresses, tiny.model.hidden_size);
  // Each row's backward must reach the replica that ran its forward (else the shard has no activations).
  await assertMatchesReference(transport, 'r', () => {
    assert.deepEqual([...transport.messagesSent.keys()].sort(), [...addresses].sort(), 'both replicas served rows');
  });
});

test('bf16 on the wire keeps logits within bf16 tolerance', async () => {
  const address = await shard('all');
  const transport = new GrpcExpertTransport(() => [address], tiny.model.hidden_size, { wireDtype: 'BF16' });
  const distributed = await loadDenseModel(checkpoint, transport);
  try {
    const want = await reference.logits(ids, B, T);
    const got = await distributed.logits(ids, B, T);
    let maxDiff = 0;
    let scale = 0;
    for (let i = 0; i < want.length; i++) {
      maxDiff = Math.max(maxDiff, Math.abs(want[i] - got[i]));
      scale = Math.max(scale, Math.abs(want[i]));
    }
    assert.ok(maxDiff > 0, 'bf16 rounding is visible');
    assert.ok(maxDiff <= 2 ** -7 * Math.max(1, scale), `max |Δlogit| ${maxDiff} within bf16 tolerance`);
  } finally {
    transport.close();
    distributed.dispose();
  }
});

test('an expert shard answers grpc.health.v1 and keeps serving after bad messages', async () => {
  const address = await shard('0:0');
  const Health = grpc.makeClientConstructor(healthService, 'grpc.health.v1.Health');
  const client = new Health(address, grpc.credentials.createInsecure());
  const reply = await new Promise<{ status: string }>((resolve, reject) =>
    (client as unknown as { Check: (req: object, cb: (e: Error | null, r: { status: string }) => void) => void }).Check({ service: '' }, (e, r) => (e ? reject(e) : resolve(r))));
  assert.equal(reply.status, 'SERVING');
  client.close();
  // Bytes that are not an ExpertRequest end that stream with INVALID_ARGUMENT (grpc-js alone says INTERNAL).
  const raw = new grpc.Client(address, grpc.credentials.createInsecure());
  const garbage = await new Promise<grpc.ServiceError>((resolve) => {
    const call = raw.makeBidiStreamRequest('/switchyard.v1.ExpertService/Exchange', (b: Buffer) => b, (b: Buffer) => b);
    call.on('error', resolve);
    call.on('data', () => undefined);
    call.write(Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]));
  });
  raw.close();
  assert.equal(garbage.code, status.INVALID_ARGUMENT);
  assert.match(garbage.details, /malformed request/);
  const transport = new GrpcExpertTransport(() => [address], tiny.model.hidden_size);
  try {
    await assert.rejects(transport.forward('bad', [{ layer: 0, expert: 1, rowCount: 1, rows: new Float32Array(32) }], false), /not held by this shard/);
    await assert.rejects(transport.forward('bad', [{ layer: 0, expert: 0, rowCount: 2, rows: new Float32Array(32) }], false), /needs 64 values/);
    const rows = await transport.forward('ok', [{ layer: 0, expert: 0, rowCount: 1, rows: new Float32Array(32).fill(0.5) }], false);
    assert.equal(rows[0].length, 32, 'still serving');
  } finally {
    transport.close();
  }
});

test('NOT_FOUND: only the experts the shard lacks skip it; the others of the message are served there', async () => {
  // The router's placement is behind: it still lists 0/2 on a shard that holds only 0/0 and 0/1.
  const experts = new ExpertSet(4, 8);
  for (const e of [0, 1]) experts.add(0, e, { w1t: tf.ones([4, 8]), w3t: tf.ones([4, 8]), w2t: tf.ones([8, 4]) });
  const server = await startExpertServer(experts, '127.0.0.1', 0);
  const unserved: string[] = [];
  const transport = new GrpcExpertTransport(() => [`127.0.0.1:${server.port}`], 4, { onUnserved: (layer, expert) => unserved.push(`${layer}/${expert}`) });
  try {
    const batch = (expert: number) => ({ layer: 0, expert, rowCount: 1, rows: new Float32Array(4).fill(0.5) });
    for (const pass of ['first', 'second']) {
      const out = await transport.serve(pass, [batch(0), batch(1), batch(2)]);
      assert.ok(out[0] instanceof Float32Array && out[1] instanceof Float32Array, `${pass}: the experts the shard holds are served: ${JSON.stringify(out)}`);
      assert.ok(!(out[2] instanceof Float32Array), 'the one it lacks is not');
    }
    assert.deepEqual(unserved, ['0/2', '0/2']);
    assert.equal(transport.health.isDown(`127.0.0.1:${server.port}`), false, 'NOT_FOUND does not mark the shard down');
  } finally {
    transport.close();
    await server.close();
    experts.dispose();
  }
});

test('the shard refuses malformed requests with the right status codes', () => {
  const experts = new ExpertSet(4, 8);
  experts.add(0, 0, { w1t: tf.ones([4, 8]), w3t: tf.ones([4, 8]), w2t: tf.ones([8, 4]) });
  const shardHandler = new ExpertShard(experts);
  const request = (over: object) => ({ messageId: '1', passId: 'p', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 0, expert: 0, rows: toWireTensor(new Float32Array(8), [2, 4]) }], ...over });
  const code = (over: object) => shardHandler.handle(request(over) as never).error?.code;
  assert.equal(code({}), undefined);
  assert.equal(code({ kind: 'ROW_KIND_UNSPECIFIED' }), status.INVALID_ARGUMENT);
  assert.equal(code({ passId: '' }), status.INVALID_ARGUMENT);
  assert.equal(code({ batches: [{ layer: 0, expert: 0, rows: { dtype: 'DTYPE_F32', shape: [2, 5], data: Buffer.alloc(40) } }] }), status.INVALID_ARGUMENT);
  assert.equal(code({ batches: [{ layer: 0, expert: 0, rows: { dtype: 'DTYPE_F32', shape: [2, 4], data: Buffer.alloc(31) } }] }), status.INVALID_ARGUMENT);
  assert.equal(code({ batches: [{ layer: 3, expert: 0, rows: toWireTensor(new Float32Array(4), [1, 4]) }] }), status.NOT_FOUND);
  const rows = toWireTensor(new Float32Array(4), [1, 4]);
  const notHeld = shardHandler.handle(request({ batches: [{ layer: 3, expert: 0, rows }, { layer: 0, expert: 0, rows }, { layer: 3, expert: 1, rows }] }) as never).error;
  assert.deepEqual(notHeld?.missing, [{ layer: 3, expert: 0 }, { layer: 3, expert: 1 }], 'NOT_FOUND names every expert not held, and only those');
  assert.equal(code({ kind: 'ROW_KIND_BACKWARD', passId: 'never-forwarded' }), status.FAILED_PRECONDITION);
  const reply = shardHandler.handle(request({ kind: 'ROW_KIND_FORWARD_TRAIN', passId: 't' }) as never);
  assert.deepEqual(reply.credits, [{ layer: 0, expert: 0, rows: 2 }], 'credits come back with the reply');
  assert.equal(code({ kind: 'ROW_KIND_BACKWARD', passId: 't' }), undefined);
  experts.dispose();
});

test('an aborted training attempt frees the activations its passes saved at the shard, before the next attempt starts', async () => {
  const dir = join(root, 'training-ckpt');
  await saveModel(dir, reference, { state: { step: 0 }, optimizers: {} });
  const D = tiny.model.hidden_size;
  const shardHandler = new ExpertShard(new ExpertSet(D, tiny.model.intermediate_size));
  const generation = 5;
  let arrived!: () => void;
  const atBarrier = new Promise<void>((resolve) => { arrived = resolve; });
  let abort!: (err: Error) => void;
  const aborted = new Promise<never>((_, reject) => { abort = reject; });
  let rejoinedHolding!: (numTensors: number) => void;
  const rejoined = new Promise<number>((resolve) => { rejoinedHolding = resolve; });
  let joins = 0;
  // The coordinator's side of the step protocol: one attempt that aborts while the shard waits for the
  // routers' backward, then a JOIN of the next attempt, which may wait long for a restarted member.
  const link = {
    sync: async (request: { phase: string }) => {
      assert.equal(request.phase, 'TRAIN_PHASE_JOIN');
      if (joins++ === 0) return { generation: String(generation), resumeStep: '0', checkpointDir: dir, trainSettingsJson: JSON.stringify(tiny.train), replicas: [] };
      rejoinedHolding(tf.memory().numTensors);
      throw new Error('end of test');
    },
    barrier: async () => {
      arrived();
      return aborted;
    },
  } as unknown as TrainLink;
  const training = runShardTraining({ link, memberId: 'shard-0', shard: shardHandler, keys: parseAssignment('all', 2, 4), log: () => undefined });
  await atBarrier;
  const before = tf.memory().numTensors;
  // A router's step 1 forwards every layer's rows for training, then the router is lost before its backward.
  const pass = trainingPassId(generation, 0, 1);
  for (const layer of [0, 1]) {
    const reply = await shardHandler.submit({
      messageId: String(layer + 1), passId: `${pass}/L${layer}`, kind: 'ROW_KIND_FORWARD_TRAIN', requestIds: [],
      trainGeneration: String(generation), weightsStep: '0',
      batches: [0, 1, 2, 3].map((expert) => ({ layer, expert, rows: toWireTensor(new Float32Array(3 * D).fill(0.1 * (expert + 1)), [3, D]) })),
    } as never);
    assert.ok(!reply.error, reply.error?.message);
  }
  assert.ok(tf.memory().numTensors > before, 'the training forwards saved their activations');
  abort(new StepAborted('step 1 aborted: router-0 stopped answering (lease expired)'));
  assert.equal(await rejoined, before, "the aborted attempt's activations are freed when the shard rejoins, not at the next attempt's reload");
  await assert.rejects(training, /end of test/);
  shardHandler.experts.dispose();
});

test('switchyard_expert_held counts the experts of any shard (no coordinator, no follower needed)', async () => {
  const experts = new ExpertSet(4, 8);
  for (const e of [0, 2]) experts.add(0, e, { w1t: tf.ones([4, 8]), w3t: tf.ones([4, 8]), w2t: tf.ones([8, 4]) });
  new ExpertShard(experts);
  try {
    assert.match(await registry.getSingleMetricAsString('switchyard_expert_held'), /^switchyard_expert_held 2$/m);
  } finally {
    experts.dispose();
  }
});

test('expert assignments parse ranges and lists and refuse nonsense', () => {
  assert.deepEqual(parseAssignment('0:0-1;1:3', 2, 4), [{ layer: 0, expert: 0 }, { layer: 0, expert: 1 }, { layer: 1, expert: 3 }]);
  assert.equal(parseAssignment('all', 2, 4).length, 8);
  const parts = [0, 1, 2].map((i) => parseAssignment(`spread:${i}/3`, 2, 4));
  assert.deepEqual(parts.flat().map((k) => `${k.layer}/${k.expert}`).sort(), parseAssignment('all', 2, 4).map((k) => `${k.layer}/${k.expert}`).sort(), 'the spread parts cover every expert once');
  assert.throws(() => parseAssignment('spread:3/3', 2, 4), /shard index/);
  assert.throws(() => parseAssignment('2:0', 2, 4), /layer 2 has no experts \(layers with experts: 0, 1\)/);
  assert.throws(() => parseAssignment('0:4', 2, 4), /expert 4 is outside 0..3/);
  assert.throws(() => parseAssignment('0:x', 2, 4), /not a non-negative integer/);
  assert.throws(() => parseAssignment('0-1', 2, 4), /expected LAYER:EXPERTS/);
});

test('1 000 dispatches on one long-lived stream add no listeners to it, even under backpressure (no MaxListenersExceededWarning)', async () => {
  const H = 64;
  const ROWS = 256; // 64 KiB a message: with 64 in flight, writes back up and senders wait for 'drain'
  const experts = new ExpertSet(H, 8);
  experts.add(0, 0, { w1t: tf.ones([H, 8]), w3t: tf.ones([H, 8]), w2t: tf.ones([8, H]) });
  const server = await startExpertServer(experts, '127.0.0.1', 0);
  const address = `127.0.0.1:${server.port}`;
  const transport = new GrpcExpertTransport(() => [address], H);
  const warnings = watchListenerWarnings();
  const dispatch = (i: number) => transport.serve(`p${i}`, [{ layer: 0, expert: 0, rowCount: ROWS, rows: new Float32Array(ROWS * H).fill(0.01) }]);
  try {
    await dispatch(0);
    const stream = transport.streamTo(address)!;
    assert.ok(stream, 'the stream is open after the first dispatch');
    const counts = () => Object.fromEntries(stream.eventNames().map((e) => [String(e), stream.listenerCount(e)]));
    const baseline = counts();
    // Count writes the stream refused (backpressure), so the test cannot pass without exercising it.
    const writes = countRefusedWrites(stream);
    const seen: Array<Record<string, number>> = [];
    let next = 1;
    await Promise.all(Array.from({ length: 64 }, async () => {
      while (next < 1000) {
        const out = await dispatch(next++);
        assert.ok(out[0] instanceof Float32Array);
        seen.push(counts());
      }
    }));
    assert.equal(seen.length, 999);
    assert.ok(writes.refused > 0, 'some writes met backpressure');
    assert.equal(transport.streamTo(address), stream, 'all on one stream');
    for (const [i, c] of seen.entries()) assert.deepEqual(c, baseline, `listeners after dispatch ${i + 2} (${writes.refused} writes waited for drain)`);
    assert.deepEqual(await warnings.messages(), []);
  } finally {
    warnings.stop();
    transport.close();
    await server.close();
    experts.dispose();
  }
});
