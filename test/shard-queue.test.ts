// The expert shard's queue (issue 16): waiting inference messages computed once per expert, per-router
// credits and queue bounds enforced on arrival with RESOURCE_EXHAUSTED, and what a router does with that
// refusal. Real shard processes on 127.0.0.1; to have several messages wait at a shard at once, the test
// stops the shard process (SIGSTOP), sends, and lets it go on (SIGCONT): it then reads them all before
// its next compute turn.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { status } from '@grpc/grpc-js';
import * as tf from '@tensorflow/tfjs-core';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { type ExpertSet, type RowBatch } from '../services/core/model/experts.js';
import { MoeLayer } from '../services/core/model/moe.js';
import { loadExpertSet, saveModel } from '../services/core/checkpoint/model.js';
import { GrpcExpertTransport, ShardAtCapacityError, type ServingOptions } from '../services/core/wire/grpc-transport.js';
import { fromWireTensor, toWireTensor } from '../services/core/wire/tensor.js';
import { OverloadError, isUnserved, type Unserved } from '../services/core/overload.js';
import { ExpertShard, RouterStream } from '../services/expert/shard.js';
import type { ExpertReply } from '../services/generated/switchyard/v1/ExpertReply.js';
import { metricValue } from './support/cluster.js';
import { startService, type RunningService } from './support/services.js';
import { until } from './support/until.js';

await initBackend();
const tiny = preset('tiny').model;
const D = tiny.hidden_size;
let root: string;
let checkpoint: string;
/** The checkpoint's experts of layer 0, computed in this process: what every shard must answer. */
let reference: ExpertSet;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-shard-queue-'));
  checkpoint = join(root, 'tiny');
  const model = MixtralModel.initialize(tiny, 7);
  await saveModel(checkpoint, model);
  model.dispose();
  reference = await loadExpertSet(checkpoint, [0, 1, 2, 3].map((expert) => ({ layer: 0, expert })));
});

after(async () => {
  reference.dispose();
  await rm(root, { recursive: true, force: true });
});

/** Rows with values that differ per row and per seed. */
function rows(count: number, seed: number): Float32Array {
  return Float32Array.from({ length: count * D }, (_, i) => Math.sin(seed * 7.1 + i * 0.37) * 0.8);
}

const batch = (expert: number, rowCount: number, seed: number): RowBatch => ({ layer: 0, expert, rowCount, rows: rows(rowCount, seed) });

function assertClose(got: Float32Array, want: Float32Array, what: string): void {
  assert.equal(got.length, want.length, `${what}: length`);
  let diff = 0;
  for (let i = 0; i < want.length; i++) diff = Math.max(diff, Math.abs(got[i] - want[i]));
  assert.ok(diff <= 1e-6, `${what}: max |Δ| ${diff}`);
}

interface Shard { service: RunningService; address: string; metrics: string; pid: number }

async function startShard(args: string[]): Promise<Shard> {
  const service = await startService(['serve', 'expert', '--checkpoint', checkpoint, '--port', '0', '--metrics-port', '0', ...args], /listening on (\S+) .*\(metrics (http:\S+)\)/);
  return { service, address: service.ready[1], metrics: service.ready[2], pid: service.child.pid! };
}

/**
 * Runs `send` while the shard process is stopped, so everything it sends waits in the shard's socket
 * and is read in one go when it continues. The streams must be open already (one call answered each).
 */
async function whileStopped<T>(shard: Shard, send: () => T, sent: () => boolean = () => true): Promise<T> {
  process.kill(shard.pid, 'SIGSTOP');
  try {
    const pending = send();
    await until('the messages to be written', async () => (sent() ? true : undefined), 30_000);
    // Written to the socket: the kernel holds the bytes for the stopped process.
    await new Promise((resolve) => setTimeout(resolve, 200));
    return pending;
  } finally {
    process.kill(shard.pid, 'SIGCONT');
  }
}

const metric = (shard: Shard, name: string) => metricValue(shard.metrics, name);

test('in process: inference messages waiting together run once per expert, each row as if its message were alone; training keeps its order', async () => {
  const experts = await loadExpertSet(checkpoint, [{ layer: 0, expert: 0 }, { layer: 0, expert: 1 }]);
  const shard = new ExpertShard(experts);
  try {
    const routers = [new RouterStream(), new RouterStream()];
    const replies = new Map<string, ExpertReply>();
    const request = (id: number, kind: string, passId: string, batches: RowBatch[], dtype: 'F32' | 'BF16' = 'F32') => ({
      messageId: String(id), passId, kind, requestIds: [], trainGeneration: '0', weightsStep: '0',
      batches: batches.map((b) => ({ layer: b.layer, expert: b.expert, rows: toWireTensor(b.rows, [b.rowCount, D], dtype) })),
    });
    // Five inference messages from two routers (one in bf16, one with a row-less batch), and a training
    // forward whose backward follows in the same turn: the backward finds its activations only if the
    // training messages keep their order.
    const inference: Array<{ id: number; batches: RowBatch[]; dtype?: 'BF16' }> = [
      { id: 1, batches: [batch(0, 3, 1), batch(1, 2, 2)] },
      { id: 2, batches: [batch(1, 5, 3)] },
      { id: 3, batches: [batch(0, 1, 4), batch(1, 0, 5)] },
      { id: 4, batches: [batch(0, 4, 6)], dtype: 'BF16' },
      { id: 5, batches: [batch(1, 2, 7), batch(0, 2, 8)] },
    ];
    const done = new Promise<void>((resolve) => {
      const answer = (r: ExpertReply) => {
        replies.set(String(r.messageId), r);
        if (replies.size === inference.length + 2) resolve();
      };
      shard.enqueue(request(10, 'ROW_KIND_FORWARD_TRAIN', 't', [batch(0, 2, 9)]) as never, answer, undefined, routers[0]);
      inference.forEach((m, i) => shard.enqueue(request(m.id, 'ROW_KIND_FORWARD', `p${m.id}`, m.batches, m.dtype) as never, answer, undefined, routers[i % 2]));
      shard.enqueue(request(11, 'ROW_KIND_BACKWARD', 't', [batch(0, 2, 10)]) as never, answer, undefined, routers[0]);
    });
    assert.equal(shard.queuedMessages, inference.length + 2, 'all wait for the compute turn');
    await done;
    assert.equal(shard.inferenceRuns, 2, 'one run per expert for five messages');
    for (const m of inference) {
      const reply = replies.get(String(m.id))!;
      assert.equal(reply.error, undefined, reply.error?.message);
      assert.deepEqual(reply.batches!.map((b) => [b.layer, b.expert, Number(b.rows!.shape![0])]), m.batches.map((b) => [b.layer, b.expert, b.rowCount]), 'batch order and row counts');
      reply.batches!.forEach((b, i) => {
        // What the message gets alone: its rows as it sent them (bf16-rounded), through the same expert.
        const sent = fromWireTensor(toWireTensor(m.batches[i].rows, [m.batches[i].rowCount, D], m.dtype ?? 'F32') as never, 'sent').values;
        const alone = experts.forwardRows('alone', { ...m.batches[i], rows: sent }, false);
        const got = fromWireTensor(b.rows as never, 'reply').values;
        assertClose(got, m.dtype ? fromWireTensor(toWireTensor(alone, [m.batches[i].rowCount, D], 'BF16') as never, 'rounded').values : alone, `message ${m.id} batch ${i}`);
      });
    }
    assert.equal(replies.get('10')!.error, undefined, replies.get('10')!.error?.message);
    assert.equal(replies.get('11')!.error, undefined, `the backward ran after its forward: ${replies.get('11')!.error?.message}`);
    assert.equal(shard.queuedRows, 0);
    assert.equal(shard.queuedBytes, 0);
  } finally {
    experts.dispose();
  }
});

test('a shard computes messages that wait together once per expert, whichever router sent them, and answers each as if alone', async () => {
  const shard = await startShard(['--experts', '0:0-3']);
  const routers = [0, 1].map(() => new GrpcExpertTransport(() => [shard.address], D));
  try {
    // Open both streams, then send three messages per router while the shard is stopped.
    for (const [r, t] of routers.entries()) await t.forward(`warm${r}`, [batch(0, 1, r)], false);
    const messages = [0, 1].flatMap((r) => [0, 1, 2].map((m) => ({ r, batches: [batch(0, 1 + m + r, 10 * r + m), batch(1, 2 + m, 20 * r + m)] })));
    const savedBefore = await metric(shard, 'switchyard_expert_merged_messages_total');
    const replies = await whileStopped(shard, () => messages.map((m, i) => routers[m.r].forward(`p${i}`, m.batches, false)));
    const outputs = await Promise.all(replies);
    outputs.forEach((out, i) => messages[i].batches.forEach((b, j) => assertClose(out[j], reference.forwardRows('alone', b, false), `message ${i} batch ${j}`)));
    // 6 messages × 2 experts: 12 (message, expert) pairs; fewer expert runs than that is what merging saved.
    const saved = (await metric(shard, 'switchyard_expert_merged_messages_total')) - savedBefore;
    const runs = 12 - saved;
    assert.ok(runs < messages.length, `${runs} expert runs for ${messages.length} messages (${saved} saved by merging)`);
  } finally {
    for (const t of routers) t.close();
    await shard.service.stop();
  }
});

test('per-router credits: 16 more rows of an expert with 8 in flight and --token-budget 8 are refused at once; other routers go on', async () => {
  const shard = await startShard(['--experts', '0:0,1', '--token-budget', '8']);
  const [mine, other] = [0, 1].map(() => new GrpcExpertTransport(() => [shard.address], D));
  try {
    await mine.forward('warm', [batch(1, 1, 0)], false);
    await other.forward('warm', [batch(1, 1, 0)], false);
    const [first, over, others] = await whileStopped(shard, () => [
      mine.forward('first', [batch(0, 8, 1)], false),
      mine.forward('over', [batch(0, 16, 2)], false).then(() => undefined, (err: Error) => err),
      other.forward('others', [batch(0, 8, 3)], false),
    ] as const);
    assertClose((await first)[0], reference.forwardRows('a', batch(0, 8, 1), false), 'the first 8 rows');
    const refused = await over;
    assert.ok(refused instanceof ShardAtCapacityError, `refused with RESOURCE_EXHAUSTED: ${refused}`);
    assert.equal(refused.code, status.RESOURCE_EXHAUSTED);
    assert.match(refused.message, /expert \(layer 0, expert 0\): this router has 8 rows of it in flight here; 16 more would exceed its limit of 8 rows per expert/);
    assertClose((await others)[0], reference.forwardRows('c', batch(0, 8, 3), false), 'another router\'s rows of the same expert');
    // With nothing of the expert in flight, one batch over the share still goes alone.
    assertClose((await mine.forward('alone', [batch(0, 16, 2)], false))[0], reference.forwardRows('d', batch(0, 16, 2), false), 'an oversized batch alone');
    assert.equal(await metric(shard, 'switchyard_expert_refused_rows_total{reason="credits"}'), 16);
  } finally {
    mine.close();
    other.close();
    await shard.service.stop();
  }
});

test('bounded queue: a burst over --max-queue-rows or --max-queue-bytes is refused at once, what is accepted stays within the bound, later messages are served', async () => {
  const rowBytes = D * 4;
  for (const [flag, bound, reason] of [['--max-queue-rows', 24, 'queue_rows'], ['--max-queue-bytes', 24 * rowBytes, 'queue_bytes']] as const) {
    const shard = await startShard(['--experts', '0:0,1', flag, String(bound)]);
    const transport = new GrpcExpertTransport(() => [shard.address], D);
    try {
      await transport.forward('warm', [batch(0, 1, 0)], false);
      // Five messages of 8 rows: 40 rows where 24 fit.
      const burst = await whileStopped(shard, () => [0, 1, 2, 3, 4].map((i) => transport.forward(`b${i}`, [batch(i % 2, 8, i)], false).then((out) => out, (err: Error) => err)));
      const results = await Promise.all(burst);
      const refusals = results.filter((r): r is ShardAtCapacityError => r instanceof ShardAtCapacityError);
      assert.ok(refusals.length >= 2, `${refusals.length} of 5 refused`);
      for (const err of refusals) {
        const m = err.message.match(new RegExp(`queue full: (\\d+) (?:bytes of )?rows? accepted and not answered here; (\\d+) more would exceed ${flag} ${bound}`));
        assert.ok(m, err.message);
        const [held, more] = [Number(m[1]), Number(m[2])];
        assert.ok(held <= bound && held + more > bound, `${held} held within ${bound}, ${more} more past it`);
      }
      results.forEach((r, i) => {
        if (!(r instanceof Error)) assertClose(r[0], reference.forwardRows('x', batch(i % 2, 8, i), false), `accepted message ${i}`);
        else assert.ok(r instanceof ShardAtCapacityError, String(r));
      });
      assert.ok(results.length - refusals.length <= 24 / 8, 'no more accepted than the bound holds');
      assert.equal(await metric(shard, `switchyard_expert_refused_rows_total{reason="${reason}"}`), refusals.length * 8);
      assert.equal(await metric(shard, 'switchyard_expert_queue_rows'), 0, 'nothing left behind');
      const later = await transport.forward('later', [batch(0, 24, 9)], false);
      assertClose(later[0], reference.forwardRows('y', batch(0, 24, 9), false), 'a later message up to the bound');
    } finally {
      transport.close();
      await shard.service.stop();
    }
  }
});

test('router: a refused batch is unserved at capacity (drop), waited for (wait), and the shard is not marked down', async () => {
  const shard = await startShard(['--experts', '0:0,1', '--token-budget', '8']);
  const unserved: string[] = [];
  const transport = (options: ServingOptions) => new GrpcExpertTransport(() => [shard.address], D, { ...options, onUnserved: (l, e, n, reason) => unserved.push(`${l}/${e}:${n}:${reason}`) });
  const drop = transport({ overflow: 'drop' });
  const wait = transport({ overflow: 'wait' });
  try {
    for (const t of [drop, wait]) await t.serve('warm', [batch(1, 1, 0)]);
    const [held, dropped] = await whileStopped(shard, () => [drop.serve('held', [batch(0, 8, 1)]), drop.serve('over', [batch(0, 16, 2), batch(1, 2, 3)])]);
    assertClose((await held)[0] as Float32Array, reference.forwardRows('a', batch(0, 8, 1), false), 'the rows in flight');
    const out = await dropped;
    assert.ok(isUnserved(out[0]) && /expert 0\/0 is at capacity/.test((out[0] as Unserved).unserved), JSON.stringify(out[0]));
    assert.ok(isUnserved(out[1]), 'the whole refused message is unserved, its other batch too');
    assert.deepEqual(unserved, ['0/0:16:at_capacity', '0/1:2:at_capacity']);
    assert.equal(drop.health.isDown(shard.address), false, 'RESOURCE_EXHAUSTED does not mark the shard down');
    // wait: the refused batch goes again after a short pause, within the deadline, and is served.
    unserved.length = 0;
    const deadline = Date.now() + 30_000;
    const [first, retried] = await whileStopped(shard, () => [wait.serve('held', [batch(0, 8, 4)], { deadline }), wait.serve('over', [batch(0, 16, 5)], { deadline })]);
    assertClose((await first)[0] as Float32Array, reference.forwardRows('b', batch(0, 8, 4), false), 'the rows in flight');
    assertClose((await retried)[0] as Float32Array, reference.forwardRows('c', batch(0, 16, 5), false), 'the refused rows, sent again');
    assert.deepEqual(unserved, []);
    assert.ok(wait.messagesSent.get(shard.address)! >= 4, 'warm, held, refused, and at least one retry');
    assert.ok((await metric(shard, 'switchyard_expert_refused_rows_total{reason="credits"}')) >= 32, 'both refusals were the shard\'s');
    // Still in use by both.
    assert.ok((await drop.serve('after', [batch(0, 2, 6)]))[0] instanceof Float32Array);
  } finally {
    drop.close();
    wait.close();
    await shard.service.stop();
  }
});

test('router: rows a shard refuses are rerouted to the next-best expert (reroute) or fail the request with OverloadError (reject)', async () => {
  // Expert 0/0 alone on a shard with one row of credits; 0/1–0/3 on another.
  const [lone, rest] = await Promise.all([startShard(['--experts', '0:0', '--token-budget', '1']), startShard(['--experts', '0:1-3'])]);
  const placement = (_: number, expert: number) => [expert === 0 ? lone.address : rest.address];
  // One token whose gate ranks the experts 0 > 1 > 2 > 3: it chooses 0 and 1.
  const h = tf.tensor2d(rows(1, 42), [1, D]);
  const gateW = tf.tensor2d(Float32Array.from({ length: D * 4 }, (_, i) => (i < 4 ? [3, 2, 1, 0][i] / h.dataSync()[0] : 0)), [D, 4]);
  const transports: GrpcExpertTransport[] = [];
  try {
    for (const policy of ['reroute', 'reject'] as const) {
      const unserved: string[] = [];
      const transport = new GrpcExpertTransport(placement, D, { overflow: policy, onUnserved: (l, e, _n, reason) => unserved.push(`${l}/${e}:${reason}`) });
      transports.push(transport);
      const rerouted: Array<{ expert: number; served: boolean }> = [];
      const serve = transport.serve.bind(transport);
      transport.serve = async (passId, batches, context) => {
        const out = await serve(passId, batches, context);
        if (passId.endsWith('/reroute')) batches.forEach((b, i) => rerouted.push({ expert: b.expert, served: out[i] instanceof Float32Array }));
        return out;
      };
      await serve('warm', [batch(0, 1, 0), batch(1, 1, 0)]);
      const moe = new MoeLayer(0, D, 4, 2, tiny.switchyard_gate, transport);
      // One row of 0/0 in flight on this router's stream, then the layer's own row of 0/0: refused.
      const [held, call] = await whileStopped(lone, () => [
        serve('held', [batch(0, 1, 1)]),
        moe.forward(h, gateW, { passId: `step-${policy}`, train: false, groupTokens: 0 }).then((r) => r, (err: Error) => err),
      ] as const, () => transport.messagesSent.get(lone.address) === 3);
      const result = await call;
      assert.ok((await held)[0] instanceof Float32Array, 'the row in flight was served');
      assert.deepEqual(unserved, ['0/0:at_capacity'], `${policy}: only the refused expert's rows`);
      assert.equal(transport.health.isDown(lone.address), false);
      if (policy === 'reroute') {
        assert.ok(!(result instanceof Error), String(result));
        assert.deepEqual(rerouted, [{ expert: 2, served: true }], 'the choice of expert 0 went to expert 2, the best not chosen');
        assert.deepEqual([...result.stats.degradedTokens!], [1]);
        result.y.dispose();
      } else {
        assert.ok(result instanceof OverloadError, `reject: ${result}`);
        assert.match(result.message, /expert 0\/0 is at capacity/);
        assert.deepEqual(rerouted, []);
      }
    }
  } finally {
    for (const t of transports) t.close();
    tf.dispose([h, gateW]);
    await Promise.all([lone.service.stop(), rest.service.stop()]);
  }
});
