// No message to a shard exceeds the configured gRPC message size (issue 15, item 3): the router splits
// what it sends one shard into several messages (cutting an expert's rows into ranges when they alone are
// too big), the shard's server refuses anything larger, and callers see exactly the unsplit results —
// inference from a real shard process, training (forward + backward, sub-pass messages) from a shard
// server in this process whose expert gradients can be read.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { status } from '@grpc/grpc-js';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import type { ExpertSet, RowBatch } from '../services/core/model/experts.js';
import { loadDenseModel, loadExpertSet, saveModel } from '../services/core/checkpoint/model.js';
import { ExpertCallError, GrpcExpertTransport } from '../services/core/wire/grpc-transport.js';
import { packageDefinition } from '../services/core/wire/protos.js';
import { toWireTensor } from '../services/core/wire/tensor.js';
import {
  batchCapacity, fittingRequestIds, minMessageBytes, planMessages, rowBytes,
} from '../services/core/wire/message-size.js';
import { startExpertServer, type RunningExpertServer } from '../services/expert/server.js';
import type { ExpertRequest__Output } from '../services/generated/switchyard/v1/ExpertRequest.js';
import type { FloatDtype } from '../services/core/dtypes.js';
import { startService, type RunningService } from './support/services.js';
import { runCli } from './support/cli.js';
import { startCluster } from './support/cluster.js';
import { generate } from '../services/router/scheduler.js';
import { decodeIds, encodeText } from '../services/core/data/bytes.js';

await initBackend();
const small = preset('small');
const tiny = preset('tiny');
const HIDDEN = small.model.hidden_size; // 128: 512 bytes per float32 row
/** The shards' and the routers' limit in the inference tests: 128 float32 rows of the small model. */
const LIMIT = 64 * 1024;

let root: string;
let smallCheckpoint: string;
let tinyCheckpoint: string;
let shard: RunningService;
let shardAddress: string;
let shardMetrics: string;
/** The small model's experts of layers 0 and 1, in this process: the unsplit reference. */
let referenceExperts: ExpertSet;
/** The small model in this process (the checkpoint's weights). */
let smallReference: MixtralModel;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-wire-split-'));
  smallCheckpoint = join(root, 'small');
  tinyCheckpoint = join(root, 'tiny');
  smallReference = MixtralModel.initialize(small.model, 5);
  await saveModel(smallCheckpoint, smallReference);
  const tinyModel = MixtralModel.initialize(tiny.model, 11);
  await saveModel(tinyCheckpoint, tinyModel);
  tinyModel.dispose();
  referenceExperts = await loadExpertSet(smallCheckpoint, [0, 1].flatMap((layer) => Array.from({ length: 8 }, (_, expert) => ({ layer, expert }))));
  shard = await startService(
    ['serve', 'expert', '--checkpoint', smallCheckpoint, '--experts', '0:0-7;1:0-7', '--port', '0', '--metrics-port', '0', '--max-message-bytes', String(LIMIT)],
    /listening on (\S+) .*metrics (http:\/\/\S+\/metrics)/,
  );
  shardAddress = shard.ready[1];
  shardMetrics = shard.ready[2];
});

after(async () => {
  await shard?.stop();
  referenceExperts?.dispose();
  smallReference?.dispose();
  await rm(root, { recursive: true, force: true });
});

/** Deterministic rows in [-1, 1). */
function rows(count: number, hidden: number, seed: number): Float32Array {
  const out = new Float32Array(count * hidden);
  let s = seed >>> 0;
  for (let i = 0; i < out.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s / 2 ** 31 - 1;
  }
  return out;
}

/**
 * One MoE call's rows for the shard: 1930 rows (≈ 990 KB in float32, about 15 messages of 64 KiB), one
 * expert with 1000 rows (≈ 8 messages alone), one batch of no rows, two layers.
 */
const BATCHES: RowBatch[] = [
  { layer: 0, expert: 0, rowCount: 300 }, { layer: 0, expert: 1, rowCount: 200 }, { layer: 0, expert: 2, rowCount: 1000 },
  { layer: 0, expert: 3, rowCount: 0 }, { layer: 1, expert: 5, rowCount: 130 }, { layer: 1, expert: 7, rowCount: 300 },
].map((b, i) => ({ ...b, rows: rows(b.rowCount, HIDDEN, 100 + i) }));

function assertMatchesReference(got: Array<Float32Array | { unserved: string }>): void {
  assert.equal(got.length, BATCHES.length);
  BATCHES.forEach((b, i) => {
    const out = got[i];
    assert.ok(out instanceof Float32Array, `batch ${i} served (${JSON.stringify(out)})`);
    const want = referenceExperts.forwardRows('reference', b, false);
    assert.equal(out.length, want.length, `batch ${i}: ${out.length} floats for ${want.length}`);
    let maxDiff = 0;
    for (let j = 0; j < want.length; j++) maxDiff = Math.max(maxDiff, Math.abs(out[j] - want[j]));
    assert.ok(maxDiff <= 1e-6, `batch ${i} (layer ${b.layer}, expert ${b.expert}): max |Δ| ${maxDiff}`);
  });
}

/** Inference messages the shard process has computed. */
async function shardMessages(): Promise<number> {
  const text = await (await fetch(shardMetrics)).text();
  // A labelled counter has no line before its first message.
  const m = text.match(/^switchyard_expert_messages_total\{kind="forward"\} (\d+)/m);
  return m ? Number(m[1]) : 0;
}

const totalMessages = (t: GrpcExpertTransport): number => [...t.messagesSent.values()].reduce((a, b) => a + b, 0);

test('serve and forward split one shard\'s rows into messages under --max-message-bytes and give the unsplit outputs', async () => {
  const sizes: number[] = [];
  // A credit limit below the big batch: one oversized batch may still go alone (with nothing in flight).
  const transport = new GrpcExpertTransport(() => [shardAddress], HIDDEN, {
    maxMessageBytes: LIMIT, creditLimit: () => 256, onDispatch: (_address, bytes) => sizes.push(bytes),
  });
  try {
    const before = await shardMessages();
    assertMatchesReference(await transport.serve('split-serve/L0', BATCHES, { requestIds: ['req-a', 'req-b'] }));
    const sent = totalMessages(transport);
    const totalBytes = BATCHES.reduce((n, b) => n + b.rowCount * rowBytes(HIDDEN, 'F32'), 0);
    assert.ok(sent >= Math.ceil(totalBytes / LIMIT), `${sent} messages for ${totalBytes} row bytes under ${LIMIT}`);
    assert.ok(sent <= Math.ceil(totalBytes / LIMIT) + 1, `${sent} messages: packed full, not one per piece`);
    assert.equal(await shardMessages() - before, sent, 'the shard computed every message the transport sent');
    assert.ok(Math.max(...sizes) <= LIMIT, `largest payload ${Math.max(...sizes)} bytes`);
    assert.deepEqual(transport.credits.snapshot(), new Map(), 'every credit came back');

    assertMatchesReference(await transport.forward('split-forward/L0', BATCHES, false));
    assert.equal(totalMessages(transport), 2 * sent, 'the plain forward splits alike');
  } finally {
    transport.close();
  }
});

test('the same rows in one message exceed the shard\'s limit: RESOURCE_EXHAUSTED, and the shard serves on', async () => {
  // What the router did before splitting: everything for the shard in one message (its own limit is the default 256 MiB).
  const unsplit = new GrpcExpertTransport(() => [shardAddress], HIDDEN);
  try {
    await assert.rejects(unsplit.serve('unsplit/L0', BATCHES), (err: unknown) => {
      assert.ok(err instanceof ExpertCallError, String(err));
      assert.equal(err.code, status.RESOURCE_EXHAUSTED, err.message);
      assert.match(err.message, /Received message larger than max \(\d+ vs 65536\)/, `the shard refused it: ${err.message}`);
      return true;
    });
    assert.equal(totalMessages(unsplit), 1);
  } finally {
    unsplit.close();
  }
  const split = new GrpcExpertTransport(() => [shardAddress], HIDDEN, { maxMessageBytes: LIMIT, wireDtype: 'BF16' });
  try {
    const got = await split.serve('after/L0', BATCHES);
    assert.ok(got.every((o) => o instanceof Float32Array), 'served after the refusal');
    // bf16 halves the bytes: about half as many messages.
    const bytes = BATCHES.reduce((n, b) => n + b.rowCount * rowBytes(HIDDEN, 'BF16'), 0);
    assert.ok(totalMessages(split) <= Math.ceil(bytes / LIMIT) + 1, `${totalMessages(split)} bf16 messages`);
  } finally {
    split.close();
  }
});

test('planned messages encode (request and reply) within the limit and cover every row once', () => {
  const service = packageDefinition()['switchyard.v1.ExpertService'] as unknown as Record<string, {
    requestSerialize: (m: unknown) => Buffer; responseSerialize: (m: unknown) => Buffer;
  }>;
  const { requestSerialize, responseSerialize } = service.Exchange;
  let seed = 7;
  const rand = (n: number) => {
    seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
    return seed % n;
  };
  const cases: Array<[number, FloatDtype, number, 'random' | 'one-row' | 'no-row']> = [
    [128, 'F32', LIMIT, 'random'], [32, 'BF16', 2048, 'random'], [128, 'F32', minMessageBytes(128, 'F32'), 'random'], [64, 'F16', 10_000, 'random'],
  ];
  // Many small batches filling messages to the last byte (some limit in a span of one batch's estimate
  // leaves no slack): the per-batch estimate must bound the real encoding.
  for (let extra = 0; extra < 160; extra += 3) cases.push([32, 'BF16', 2048 + extra, 'one-row'], [32, 'BF16', 2048 + extra, 'no-row']);
  for (const [hidden, dtype, limit, shape] of cases) {
    for (let trial = 0; trial < (shape === 'random' ? 20 : 1); trial++) {
      const pieceRows = shape === 'one-row' ? new Array<number>(100).fill(1)
        : shape === 'no-row' ? new Array<number>(100).fill(0)
        : Array.from({ length: 1 + rand(12) }, () => (rand(5) === 0 ? 0 : rand(Math.floor(3 * limit / rowBytes(hidden, dtype)))));
      const passId = `g12/r3/s${rand(100000)}/L${rand(64)}`;
      const requestIds = Array.from({ length: rand(80) }, (_, i) => `req-${i}-${'x'.repeat(rand(40))}`);
      const perRow = rowBytes(hidden, dtype);
      const ids = fittingRequestIds(requestIds, limit, passId, perRow);
      const plan = planMessages(pieceRows, perRow, batchCapacity(limit, passId, ids));
      const covered = pieceRows.map(() => 0);
      plan.forEach((chunks, k) => {
        for (const c of chunks) {
          assert.equal(c.rowOffset, covered[c.piece], 'row ranges of a piece come in order, without gaps');
          covered[c.piece] += c.rowCount;
        }
        const batches = chunks.map((c) => ({
          layer: 4_000_000_000, expert: 4_000_000_000 - c.piece, rows: toWireTensor(new Float32Array(c.rowCount * hidden), [c.rowCount, hidden], dtype),
        }));
        const request = requestSerialize({
          messageId: '18446744073709551615', passId: `${passId}/part${k}`, kind: 'ROW_KIND_FORWARD_TRAIN', requestIds: ids, batches,
          trainGeneration: '18446744073709551615', weightsStep: '18446744073709551615',
        });
        assert.ok(request.length <= limit, `request of ${request.length} bytes under ${limit}`);
        const reply = responseSerialize({
          messageId: '18446744073709551615', batches, credits: chunks.map((c, i) => ({ layer: batches[i].layer, expert: batches[i].expert, rows: c.rowCount })),
        });
        assert.ok(reply.length <= limit, `reply of ${reply.length} bytes under ${limit}`);
      });
      assert.deepEqual(covered, pieceRows, 'every row in exactly one message');
    }
  }
});

test('--max-message-bytes is refused at start when not a positive integer or below one row of the model', async () => {
  const expert = await runCli(['serve', 'expert', '--checkpoint', smallCheckpoint, '--port', '0', '--max-message-bytes', '600']);
  assert.equal(expert.code, 2, expert.stderr);
  assert.match(expert.stderr, /--max-message-bytes 600: a message must hold at least one row of this model \(hidden 128 × 4 bytes F32 = 512\).*use at least \d+/);
  const router = await runCli(['serve', 'router', '--checkpoint', smallCheckpoint, '--coordinator', '127.0.0.1:1', '--port', '0', '--max-message-bytes', '600']);
  assert.equal(router.code, 2, router.stderr);
  assert.match(router.stderr, /--max-message-bytes 600: a message must hold at least one row/);
  for (const bad of ['0', '-5', '1.5', 'lots']) {
    const r = await runCli(['serve', 'expert', '--checkpoint', smallCheckpoint, '--max-message-bytes', bad]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /--max-message-bytes must be an integer ≥ 1/);
  }
  assert.throws(() => new GrpcExpertTransport(() => [], HIDDEN, { maxMessageBytes: 600 }), /maxMessageBytes 600: .*use at least/);
});

// Training: a shard server in this process (so its expert gradients can be read) with a 4 KiB limit,
// i.e. about 30 rows of the tiny model (hidden 32) per message.
const TRAIN_LIMIT = 4096;

async function trainingShard(): Promise<{ server: RunningExpertServer; address: string; requests: ExpertRequest__Output[] }> {
  const experts = await loadExpertSet(tinyCheckpoint, [0, 1].flatMap((layer) => Array.from({ length: 4 }, (_, expert) => ({ layer, expert }))));
  const server = await startExpertServer(experts, '127.0.0.1', 0, { maxMessageBytes: TRAIN_LIMIT });
  const requests: ExpertRequest__Output[] = [];
  const enqueue = server.shard.enqueue.bind(server.shard);
  server.shard.enqueue = (request, ...rest) => {
    requests.push(request);
    return enqueue(request, ...rest);
  };
  return { server, address: `127.0.0.1:${server.port}`, requests };
}

test('a training forward and backward split into sub-pass messages give the unsplit loss and dense and expert gradients', async () => {
  const B = 4;
  const T = 32;
  const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 29 + 3) % 256);
  const targets = Int32Array.from(ids, (v) => (v * 7 + 1) % 256);
  const reference = MixtralModel.initialize(tiny.model, 11); // the checkpoint's weights, experts in this process
  const { server, address, requests } = await trainingShard();
  const transport = new GrpcExpertTransport(() => [address], tiny.model.hidden_size, { maxMessageBytes: TRAIN_LIMIT });
  const distributed = await loadDenseModel(tinyCheckpoint, transport);
  try {
    const want = await reference.lossAndGradients(ids, targets, B, T, { passId: 'g1/r0/s1', train: true });
    const got = await distributed.lossAndGradients(ids, targets, B, T, { passId: 'g1/r0/s1', train: true });
    assert.ok(Math.abs(want.loss - got.loss) <= 1e-6, `loss ${want.loss} vs ${got.loss}`);
    const close = (name: string, a: Float32Array, b: Float32Array) => {
      let diff = 0;
      let scale = 0;
      for (let i = 0; i < a.length; i++) {
        diff = Math.max(diff, Math.abs(a[i] - b[i]));
        scale = Math.max(scale, Math.abs(a[i]));
      }
      assert.ok(diff <= 1e-5 * Math.max(1, scale), `${name}: max |Δgrad| ${diff} (scale ${scale})`);
    };
    for (const name of reference.dense.names())
      close(name, reference.dense.gradOrZeros(name).dataSync() as Float32Array, distributed.dense.gradOrZeros(name).dataSync() as Float32Array);
    const expertParams = server.shard.experts.params;
    for (const name of reference.localExperts!.params.names())
      close(name, reference.localExperts!.params.gradOrZeros(name).dataSync() as Float32Array, expertParams.gradOrZeros(name).dataSync() as Float32Array);

    // It was split: several messages per layer and direction, each a sub-pass, and at least one expert's
    // rows cut over two messages of one pass; the backward went as the forward's messages, part by part.
    const forwards = requests.filter((r) => r.kind === 'ROW_KIND_FORWARD_TRAIN');
    const backwards = requests.filter((r) => r.kind === 'ROW_KIND_BACKWARD');
    assert.ok(forwards.length > 2 * 2, `${forwards.length} forward messages for 2 layers`);
    assert.ok(forwards.every((r) => /^g1\/r0\/s1\/L\d\/part\d+$/.test(r.passId)), forwards.map((r) => r.passId).join(' '));
    const rowsOf = (r: ExpertRequest__Output) => r.batches.map((b) => `${b.layer}/${b.expert}:${b.rows!.shape[0]}`).join(' ');
    assert.deepEqual(new Map(backwards.map((r) => [r.passId, rowsOf(r)])), new Map(forwards.map((r) => [r.passId, rowsOf(r)])));
    const expertPasses = new Map<string, number>();
    for (const r of forwards) for (const b of r.batches) {
      const key = `${r.passId.replace(/\/part\d+$/, '')}|${b.layer}/${b.expert}`;
      expertPasses.set(key, (expertPasses.get(key) ?? 0) + 1);
    }
    assert.ok([...expertPasses.values()].some((n) => n > 1), 'an expert\'s rows went in two messages of one pass');
  } finally {
    transport.close();
    distributed.dispose();
    reference.dispose();
    await server.close();
    server.shard.experts.dispose();
  }
});

test('a dropped training pass frees the activations of all its sub-pass messages', async () => {
  const { server, address } = await trainingShard();
  const transport = new GrpcExpertTransport(() => [address], tiny.model.hidden_size, { maxMessageBytes: TRAIN_LIMIT });
  try {
    const batches: RowBatch[] = [{ layer: 0, expert: 1, rowCount: 100, rows: rows(100, tiny.model.hidden_size, 9) }];
    await transport.forward('g2/r0/s1/L0', batches, true);
    assert.ok(totalMessages(transport) >= 4, `${totalMessages(transport)} messages for 100 rows of 128 bytes`);
    server.shard.experts.dropPass('g2'); // what a training shard does when the attempt ends
    await assert.rejects(transport.backward('g2/r0/s1/L0', batches), (err: unknown) => {
      assert.ok(err instanceof ExpertCallError, String(err));
      assert.equal(err.code, status.FAILED_PRECONDITION, err.message);
      assert.match(err.message, /no training forward of pass g2\/r0\/s1\/L0\/part\d+/);
      return true;
    });
  } finally {
    transport.close();
    await server.close();
    server.shard.experts.dispose();
  }
});

test('serve router and serve expert with --max-message-bytes 64 KiB: a long prompt\'s prefill is split and completes as in one process', async () => {
  // Prefill of this prompt (114 bytes) sends the shard 2 rows per token per layer (≈ 117 KB): two messages.
  const prompt = 'Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and nothing';
  const cluster = await startCluster(smallCheckpoint, ['all'], [['--max-message-bytes', String(LIMIT)], []], {}, 2_000, ['--max-message-bytes', String(LIMIT)]);
  try {
    const local = await generate(smallReference, encodeText(prompt), { maxTokens: 4, temperature: 0, topP: 1, seed: 0 });
    const body = { prompt, max_tokens: 4, temperature: 0 };
    const post = (base: string) => fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const res = await post(cluster.routers[0].base);
    const json = (await res.json()) as { choices: Array<{ text: string }>; error?: { message: string } };
    assert.equal(res.status, 200, JSON.stringify(json));
    assert.equal(json.choices[0].text, decodeIds(local.ids));
    // The router's own dispatch counter: more messages than layers × steps means prefill was split.
    const metrics = await (await fetch(`${cluster.routers[0].base}/metrics`)).text();
    const dispatched = [...metrics.matchAll(/^switchyard_dispatch_duration_seconds_count\{[^}]*\} (\d+)/gm)].reduce((n, m) => n + Number(m[1]), 0);
    const layers = small.model.num_hidden_layers;
    assert.ok(dispatched > layers * 4, `${dispatched} messages for ${layers} layers × 4 steps`);
    // The same request through a router with the default limit: one message per layer, refused by the shard.
    const unsplit = await post(cluster.routers[1].base);
    assert.equal(unsplit.status, 500);
    assert.match(((await unsplit.json()) as { error: { message: string } }).error.message, /RESOURCE_EXHAUSTED: Received message larger than max/);
  } finally {
    await cluster.stop();
  }
});
