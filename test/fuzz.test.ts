// Generated malformed input against real processes: at least 200 HTTP requests to the router and 200
// gRPC messages to a shard and the coordinator. Every one must be refused with a 4xx or
// INVALID_ARGUMENT (an expert the shard does not hold: NOT_FOUND), no process may crash, and valid
// requests sent afterwards must get correct answers.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import * as grpc from '@grpc/grpc-js';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { Rng } from '../services/core/data/random.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { assignmentSpec, spreadExperts } from '../services/core/placement.js';
import { CHANNEL_OPTIONS, loadProtos } from '../services/core/wire/protos.js';
import type { ExpertReply__Output } from '../services/generated/switchyard/v1/ExpertReply.js';
import type { ExpertRequest } from '../services/generated/switchyard/v1/ExpertRequest.js';
import { complete, startCluster, type TestCluster } from './support/cluster.js';

await initBackend();
const tiny = preset('tiny');
const D = tiny.model.hidden_size;
let root: string;
let cluster: TestCluster;
let shardAddress: string;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-fuzz-'));
  const checkpoint = join(root, 'tiny');
  const model = MixtralModel.initialize(tiny.model, 9);
  await saveModel(checkpoint, model);
  model.dispose();
  cluster = await startCluster(checkpoint, spreadExperts(2, 4, 2).map(assignmentSpec), [[]]);
  shardAddress = cluster.shards[0].ready.input!.match(/listening on (\S+)/)![1];
});

after(async () => {
  await cluster?.stop();
  await rm(root, { recursive: true, force: true });
});

const alive = () => [cluster.coordinator, ...cluster.shards, ...cluster.routers.map((r) => r.service)].every((s) => s.child.exitCode === null && s.child.signalCode === null);

/** Malformed HTTP requests, generated from a seeded stream: broken JSON, wrong types, out-of-range values, bad headers. */
function httpCases(count: number): Array<{ path: string; body: string | Buffer; headers: Record<string, string> }> {
  const rng = new Rng(77);
  const pick = <T>(xs: T[]): T => xs[Math.floor(rng.next() * xs.length)];
  const junk = (): unknown => pick<() => unknown>([
    () => null, () => -1, () => 1e308, () => [], () => ({}), () => true,
    () => -Math.floor(rng.next() * 1e9), () => [1, 'a', null], () => ({ nested: { deeper: [] } }),
  ])();
  const json = { 'content-type': 'application/json' };
  const makers: Array<() => { path: string; body: string | Buffer; headers: Record<string, string> }> = [
    () => ({ path: '/v1/completions', body: '{"prompt": "unterminated', headers: json }),
    () => ({ path: '/v1/completions', body: Buffer.from(Array.from({ length: 64 }, () => Math.floor(rng.next() * 256))), headers: json }),
    () => ({ path: '/v1/completions', body: JSON.stringify({ prompt: junk() }), headers: json }),
    () => ({ path: '/v1/completions', body: JSON.stringify({ prompt: 'ok', max_tokens: pick([-1, 1e9, 'ten', 1.5, [16]]) }), headers: json }),
    () => ({ path: '/v1/completions', body: JSON.stringify({ prompt: 'ok', temperature: pick([-0.5, 'hot', 99, { t: 1 }]) }), headers: json }),
    () => ({ path: '/v1/completions', body: JSON.stringify({ prompt: 'ok', top_p: pick([0, -1, 2, 'all']) }), headers: json }),
    () => ({ path: '/v1/completions', body: JSON.stringify({ prompt: 'ok', stop: junk() === null ? 5 : [1, 2, 3, 4, 5, 6] }), headers: json }),
    () => ({ path: '/v1/completions', body: JSON.stringify({ prompt: 'ok', model: 'no-such-model' }), headers: json }),
    () => ({ path: '/v1/completions', body: JSON.stringify({ prompt: 'x'.repeat(200 + Math.floor(rng.next() * 500)) }), headers: json }),
    () => ({ path: '/v1/completions', body: JSON.stringify({ prompt: '' }), headers: json }),
    () => ({ path: '/v1/completions', body: JSON.stringify({ prompt: pick<unknown>([[1, 'a'], [[]], [[1, -2]], [[999999]], [true]]) }), headers: json }),
    () => ({ path: '/v1/completions', body: JSON.stringify({ prompt: 'ok', [pick(['frobnicate', 'suffix', 'best_of'])]: pick<unknown>([2, 'x', true]) }), headers: json }),
    () => ({ path: '/v1/chat/completions', body: JSON.stringify({ messages: junk() }), headers: json }),
    () => ({ path: '/v1/chat/completions', body: JSON.stringify({ messages: [{ role: pick(['wizard', 1, null]), content: 'x' }] }), headers: json }),
    () => ({ path: '/v1/chat/completions', body: JSON.stringify({ messages: [{ role: 'user', content: pick<unknown>([[{ type: 'image_url' }], 5, [{ text: 1 }]]) }] }), headers: json }),
    () => ({ path: '/tokenize', body: JSON.stringify(pick<unknown>([{}, { prompt: 1 }, { prompt: 'x', messages: [] }])), headers: json }),
    () => ({ path: '/detokenize', body: JSON.stringify({ tokens: pick<unknown>([[-1], ['a'], 5]) }), headers: json }),
    () => ({ path: '/v1/completions', body: JSON.stringify({ prompt: 'ok' }), headers: { ...json, 'x-request-timeout-ms': String(pick(['-5', 'soon', '0', '1e12'])) } }),
    () => ({ path: '/v1/completions', body: 'prompt=ok', headers: { 'content-type': 'application/x-www-form-urlencoded' } }),
    () => ({ path: '/v2/models/tiny/infer', body: JSON.stringify({ inputs: junk() }), headers: json }),
    () => ({ path: '/v2/models/tiny/infer', body: JSON.stringify({ inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [1, 3], data: [1, 2] }] }), headers: json }),
    () => ({ path: '/v2/models/tiny/infer', body: JSON.stringify({ inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [1, 2], data: [1, 99999] }] }), headers: json }),
    () => ({ path: '/v2/models/tiny/infer', body: JSON.stringify({ inputs: [{ name: 'input_ids', datatype: 'FP32', shape: [-1, 2], data: [0.5, 1] }] }), headers: json }),
    () => ({ path: '/v2/models/other/infer', body: JSON.stringify({ inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [1, 1], data: [1] }] }), headers: json }),
    () => ({ path: '/v2/models/tiny/infer', body: Buffer.from([1, 2, 3, 4]), headers: { 'content-type': 'application/octet-stream', 'inference-header-content-length': String(pick([-1, 99, 'x'])) } }),
  ];
  return Array.from({ length: count }, (_, i) => makers[i % makers.length]());
}

test('≥ 200 malformed HTTP requests: only 4xx with a JSON message; the router keeps serving correctly', async () => {
  const base = cluster.routers[0].base;
  const cases = httpCases(216);
  const seen = new Map<number, number>();
  for (const c of cases) {
    const res = await fetch(`${base}${c.path}`, { method: "POST", headers: c.headers, body: typeof c.body === "string" ? c.body : new Uint8Array(c.body) });
    const text = await res.text();
    seen.set(res.status, (seen.get(res.status) ?? 0) + 1);
    assert.ok(res.status >= 400 && res.status < 500, `${c.path} ${String(c.body).slice(0, 80)} → ${res.status} ${text.slice(0, 200)}`);
    // Open Inference paths answer {"error": "<message>"}, OpenAI paths {"error": {"message", "type"}}.
    const error = (JSON.parse(text) as { error?: string | { message?: string } }).error;
    assert.ok(c.path.startsWith('/v2/') ? typeof error === 'string' && error : typeof error === 'object' && error.message, `a JSON error message for ${c.path} ${String(c.body).slice(0, 80)}: ${text.slice(0, 200)}`);
  }
  assert.ok(alive(), 'no process crashed');
  const valid = await complete(base, { prompt: 'Call me Ishmael.', max_tokens: 8, temperature: 0 });
  assert.equal(valid.status, 200, valid.error);
  const again = await complete(base, { prompt: 'Call me Ishmael.', max_tokens: 8, temperature: 0 });
  assert.equal(again.status, 200);
  process.stderr.write(`# http fuzz statuses: ${JSON.stringify(Object.fromEntries(seen))}\n`);
});

test('≥ 200 malformed gRPC messages to a shard and the coordinator: INVALID_ARGUMENT (or NOT_FOUND), every service keeps serving', async () => {
  const protos = loadProtos();
  const rng = new Rng(99);
  const client = new protos.switchyard.v1.ExpertService(shardAddress, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  const codes = new Map<number, number>();
  const count = (code: number) => codes.set(code, (codes.get(code) ?? 0) + 1);
  const rows = (n: number, width = D) => Buffer.from(new Float32Array(n * width).map(() => rng.next()).buffer);
  const f32 = (shape: number[], data: Buffer) => ({ dtype: 'DTYPE_F32' as const, shape, data });
  const nan = () => { const b = rows(2); b.writeFloatLE(Number.NaN, 8); return b; };
  const bad: Array<() => ExpertRequest> = [
    () => ({ passId: 'p', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 0, expert: 0, rows: f32([2, D + 1], rows(2, D + 1)) }] }),
    () => ({ passId: 'p', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 0, expert: 0, rows: f32([2, D], rows(1)) }] }),
    () => ({ passId: 'p', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 0, expert: 0, rows: f32([2, D], nan()) }] }),
    () => ({ passId: '', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 0, expert: 0, rows: f32([1, D], rows(1)) }] }),
    () => ({ passId: 'p', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 0, expert: 0, rows: f32([1, D], rows(1)) }, { layer: 0, expert: 0, rows: f32([1, D], rows(1)) }] }),
    () => ({ passId: 'p', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 0, expert: 0, rows: { dtype: 'DTYPE_UNSPECIFIED', shape: [1, D], data: rows(1) } }] }),
    () => ({ passId: 'p', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 0, expert: 0, rows: f32([D], rows(1)) }] }),
    () => ({ passId: 'p', kind: 'ROW_KIND_UNSPECIFIED', batches: [{ layer: 0, expert: 0, rows: f32([1, D], rows(1)) }] }),
    () => ({ passId: 'p', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 7, expert: 99, rows: f32([1, D], rows(1)) }] }),
    () => ({ passId: 'p', kind: 'ROW_KIND_BACKWARD', batches: [{ layer: 0, expert: 0, rows: f32([1, D - 1], rows(1, D - 1)) }] }),
  ];
  // Structured but invalid requests on one stream: each gets an error reply, the stream stays open.
  const call = client.Exchange();
  const replies = new Map<string, (r: ExpertReply__Output) => void>();
  call.on('data', (r: ExpertReply__Output) => replies.get(r.messageId)?.(r));
  for (let i = 0; i < 160; i++) {
    const messageId = String(i + 1);
    const reply = new Promise<ExpertReply__Output>((resolve) => replies.set(messageId, resolve));
    call.write({ ...bad[i % bad.length](), messageId });
    const r = await Promise.race([reply, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`no reply to malformed request ${i}`)), 5_000))]);
    assert.ok(r.error, `request ${i} was refused`);
    assert.ok(r.error.code === grpc.status.INVALID_ARGUMENT || r.error.code === grpc.status.NOT_FOUND, `request ${i}: code ${r.error.code} ${r.error.message}`);
    count(r.error.code);
  }
  call.end();
  // Bytes that are no ExpertRequest at all: the stream ends with INVALID_ARGUMENT.
  const raw = new (grpc.makeGenericClientConstructor({
    Exchange: { path: '/switchyard.v1.ExpertService/Exchange', requestStream: true, responseStream: true, requestSerialize: (b: Buffer) => b, requestDeserialize: (b: Buffer) => b, responseSerialize: (b: Buffer) => b, responseDeserialize: (b: Buffer) => b },
  }, 'Raw'))(shardAddress, grpc.credentials.createInsecure(), CHANNEL_OPTIONS) as unknown as { Exchange(): grpc.ClientDuplexStream<Buffer, Buffer>; close(): void };
  for (let i = 0; i < 25; i++) {
    const s = raw.Exchange();
    const ended = new Promise<number>((resolve) => s.on('error', (e: grpc.ServiceError) => resolve(e.code)));
    s.on('data', () => undefined);
    // Field 1 with an unfinished varint: protobuf decoding throws (it forgives a lot else).
    s.write(Buffer.from([0x0f, 0x80 + i]));
    const code = await Promise.race([ended, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`raw message ${i}: the stream did not end`)), 5_000))]);
    assert.equal(code, grpc.status.INVALID_ARGUMENT);
    count(code);
  }
  raw.close();
  // The coordinator: registrations it cannot accept.
  const coordinator = new protos.switchyard.v1.Coordinator(cluster.coordinatorAddress, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  const register = (req: object) => new Promise<number>((resolve) => coordinator.Register(req, (err) => resolve(err?.code ?? 0)));
  const badRegistrations = [{ role: 'ROLE_UNSPECIFIED', memberId: 'x' }, { role: 'ROLE_EXPERT_SHARD', memberId: '' }, { role: 'ROLE_EXPERT_SHARD', memberId: 'no-address' }];
  for (let i = 0; i < 30; i++) {
    const code = await register(badRegistrations[i % badRegistrations.length]);
    assert.equal(code, grpc.status.INVALID_ARGUMENT);
    count(code);
  }
  coordinator.close();
  client.close();
  const total = [...codes.values()].reduce((a, b) => a + b, 0);
  assert.ok(total >= 200, `${total} malformed gRPC messages`);
  assert.ok(alive(), 'no process crashed');
  // A valid request to the shard, then through the whole cluster.
  const check = new protos.switchyard.v1.ExpertService(shardAddress, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  const good = check.Exchange();
  const first = new Promise<ExpertReply__Output>((resolve) => good.on('data', resolve));
  const key = spreadExperts(2, 4, 2)[0][0];
  good.write({ messageId: '1', passId: 'ok', kind: 'ROW_KIND_FORWARD', batches: [{ layer: key.layer, expert: key.expert, rows: f32([3, D], rows(3)) }] });
  const ok = await first;
  assert.equal(ok.error, null);
  assert.deepEqual(ok.batches[0].rows!.shape, [3, D]);
  good.end();
  check.close();
  assert.equal((await complete(cluster.routers[0].base, { prompt: 'Call me Ishmael.', max_tokens: 8 })).status, 200);
  process.stderr.write(`# grpc fuzz codes: ${JSON.stringify(Object.fromEntries(codes))}\n`);
});
