import { test, after, before } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { assignmentSpec, expertKeyText, placementOf, spreadExperts, unplaced, type PlacementTable } from '../services/core/placement.js';
import { parseAssignment } from '../services/expert/assignment.js';
import { Membership } from '../services/coordinator/membership.js';
import { CoordinatorLink } from '../services/core/wire/coordinator-link.js';
import { loadProtos } from '../services/core/wire/protos.js';
import { startGrpcServer } from '../services/core/wire/server.js';
import { startCoordinator } from '../services/coordinator/server.js';
import { buildAdminApp } from '../services/coordinator/admin.js';
import { DEFAULT_REBALANCE, Rebalancer } from '../services/coordinator/rebalancer.js';
import { until } from './support/until.js';
import { startService, type RunningService } from './support/services.js';

test('the default placement spreads every layer over every shard evenly', () => {
  const spread = spreadExperts(4, 8, 3);
  assert.deepEqual(spread.map((s) => s.length), [11, 11, 10]);
  for (let layer = 0; layer < 4; layer++) {
    const holders = new Set(spread.flatMap((s, i) => (s.some((k) => k.layer === layer) ? [i] : [])));
    assert.equal(holders.size, 3, `layer ${layer} spans all shards`);
  }
  for (const keys of spread) assert.deepEqual(parseAssignment(assignmentSpec(keys), 4, 8), keys, 'assignment text round-trips');
  const table = placementOf(spread.map((experts, i) => ({ shardId: `s${i}`, address: `a${i}`, experts })), 1);
  assert.equal(table.entries.length, 32);
  assert.deepEqual(unplaced(table, 4, 8), []);
});

test('an expert on two shards is placed on both (replicas)', () => {
  const table = placementOf([
    { shardId: 'b', address: 'B', experts: [{ layer: 0, expert: 1 }] },
    { shardId: 'a', address: 'A', experts: [{ layer: 0, expert: 1 }, { layer: 0, expert: 0 }] },
  ], 3);
  assert.deepEqual(table.entries, [{ layer: 0, expert: 0, shardIds: ['a'] }, { layer: 0, expert: 1, shardIds: ['a', 'b'] }]);
  assert.deepEqual(unplaced(table, 1, 3), [{ layer: 0, expert: 2 }]);
});

test('leases: a silent shard is removed, a re-registration replaces the old lease, every change is pushed', () => {
  let now = 0;
  const m = new Membership(1000, () => now);
  const seen: number[] = [];
  const routers: number[] = [];
  m.watch((t) => { seen.push(t.entries.length); routers.push(t.routers ?? 0); });
  const a = m.register({ memberId: 'a', role: 'expert-shard', address: 'A', experts: [{ layer: 0, expert: 0 }], tokenBudget: 64 });
  m.register({ memberId: 'b', role: 'expert-shard', address: 'B', experts: [{ layer: 0, expert: 1 }], tokenBudget: 64 });
  m.register({ memberId: 'r', role: 'router', address: '', experts: [], tokenBudget: 0 });
  assert.deepEqual(seen, [1, 2, 2], 'a router leaves the entries alone');
  assert.deepEqual(routers, [0, 0, 1], 'but re-divides the shards\' budgets into credits');
  assert.deepEqual(m.placement().shards.map((s) => s.tokenBudget), [64, 64]);
  now = 600;
  assert.equal(m.heartbeat('a', a.leaseId), true);
  now = 1200;
  assert.deepEqual(m.expire().sort(), ['b', 'r']);
  assert.deepEqual(m.placement().entries.map((e) => e.shardIds), [['a']]);
  assert.deepEqual(seen, [1, 2, 2, 1]);
  const again = m.register({ memberId: 'a', role: 'expert-shard', address: 'A2', experts: [{ layer: 0, expert: 0 }], tokenBudget: 64 });
  assert.equal(m.heartbeat('a', a.leaseId), false, 'the replaced lease is gone');
  assert.equal(m.heartbeat('a', again.leaseId), true);
  assert.equal(m.placement().shards[0].address, 'A2');
  assert.throws(() => m.register({ memberId: '', role: 'router', address: '', experts: [], tokenBudget: 0 }), /member_id is empty/);
});

test('a holdings report that fails is re-sent with the heartbeats until the coordinator acknowledges it', async () => {
  // A fake coordinator: the first ReportHoldings fails (a coordinator hiccup), later ones succeed.
  const reports: string[] = [];
  let heartbeats = 0;
  const fake = await startGrpcServer('127.0.0.1', 0, 'switchyard.v1.Coordinator', (server) => server.addService(loadProtos().switchyard.v1.Coordinator.service, {
    Register: (_call: unknown, cb: grpc.sendUnaryData<unknown>) => cb(null, { leaseId: '1', leaseTtlMs: 150 }),
    Heartbeat: (_call: unknown, cb: grpc.sendUnaryData<unknown>) => { heartbeats++; cb(null, { known: true, leaseTtlMs: 150 }); },
    ReportHoldings: (call: grpc.ServerUnaryCall<{ experts: Array<{ layer: number; expert: number }> }, unknown>, cb: grpc.sendUnaryData<unknown>) => {
      reports.push(call.request.experts.map(expertKeyText).join(' '));
      if (reports.length === 1) cb({ code: grpc.status.UNAVAILABLE, details: 'hiccup' });
      else cb(null, { known: true, leaseTtlMs: 150 });
    },
  }));
  const link = new CoordinatorLink(`127.0.0.1:${fake.port}`, { memberId: 's', role: 'ROLE_EXPERT_SHARD', address: 'S' });
  try {
    link.start();
    await until('registered', async () => (link.registrations ? true : undefined), 5_000);
    assert.equal(await link.reportHoldings([{ layer: 0, expert: 1 }]), false, 'the first attempt fails');
    await until('the report re-sent', async () => (reports.length >= 2 ? true : undefined), 5_000);
    assert.deepEqual(reports, ['0/1', '0/1']);
    const seen = heartbeats;
    await until('three more heartbeats', async () => (heartbeats >= seen + 3 ? true : undefined), 5_000);
    assert.equal(reports.length, 2, 'an acknowledged report is not sent again');
  } finally {
    link.close();
    await fake.shutdown(0);
  }
});

test('ReportHoldings refuses a key outside the model (INVALID_ARGUMENT); the admin API answers 403 without a token and 409 when it cannot plan', async () => {
  const coordinator = await startCoordinator('127.0.0.1', 0, 60_000, undefined, { intervalMs: 0 });
  const client = new (loadProtos().switchyard.v1.Coordinator)(`127.0.0.1:${coordinator.port}`, grpc.credentials.createInsecure());
  const call = <T>(method: 'Register' | 'ReportHoldings', request: object) => new Promise<{ err: grpc.ServiceError | null; reply?: T }>((resolve) =>
    (client[method] as unknown as (r: object, cb: (err: grpc.ServiceError | null, reply?: T) => void) => void)(request, (err, reply) => resolve({ err, reply })));
  try {
    const registered = await call<{ leaseId: string }>('Register', {
      memberId: 's', role: 'ROLE_EXPERT_SHARD', address: 'S', experts: [{ layer: 0, expert: 0 }], tokenBudget: 64, modelMoeLayers: [0], modelExperts: 4,
    });
    assert.equal(registered.err, null);
    const outside = await call('ReportHoldings', { memberId: 's', leaseId: registered.reply!.leaseId, experts: [{ layer: 0, expert: 4 }] });
    assert.equal(outside.err?.code, grpc.status.INVALID_ARGUMENT);
    assert.match(outside.err!.details, /outside the model/);
    const conflicting = await call('Register', { memberId: 't', role: 'ROLE_EXPERT_SHARD', address: 'T', modelMoeLayers: [0, 1], modelExperts: 4 });
    assert.equal(conflicting.err?.code, grpc.status.INVALID_ARGUMENT);
    assert.deepEqual(coordinator.membership.get('s')!.experts, [{ layer: 0, expert: 0 }]);
  } finally {
    client.close();
    await coordinator.close();
  }
  const status = async (app: ReturnType<typeof buildAdminApp>, url: string) => (await app.inject({ method: 'POST', url, headers: { authorization: 'Bearer t' } })).statusCode;
  const membership = new Membership(60_000);
  assert.equal(await status(buildAdminApp(membership, undefined, {}), '/admin/placement/plan'), 403, 'no token configured: the admin API is off');
  assert.equal(await status(buildAdminApp(membership, undefined, { token: 't' }), '/admin/placement/apply'), 409, 'a training coordinator moves no experts on demand');
  const rebalancer = new Rebalancer(membership, { ...DEFAULT_REBALANCE, intervalMs: 0 });
  try {
    assert.equal(await status(buildAdminApp(membership, rebalancer, { token: 't' }), '/admin/placement/plan'), 409, 'no shape yet: the plan is infeasible');
  } finally {
    rebalancer.close();
  }
});

// ---- real processes: a coordinator and two shards on 127.0.0.1 ----

await initBackend();
let root: string;
let checkpoint: string;
const services: RunningService[] = [];
before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-coord-'));
  checkpoint = join(root, 'ckpt');
  const model = MixtralModel.initialize(preset('tiny').model, 5);
  await saveModel(checkpoint, model);
  model.dispose();
});
after(async () => {
  await Promise.all(services.map((s) => s.stop()));
  await rm(root, { recursive: true, force: true });
});

async function start(args: string[], ready: RegExp): Promise<RunningService> {
  const s = await startService(args, ready);
  services.push(s);
  return s;
}

function waitFor(link: CoordinatorLink, what: string, ok: (t: PlacementTable) => boolean, timeoutMs = 15_000): Promise<PlacementTable> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const poll = setInterval(() => {
      if (link.placement && ok(link.placement)) {
        clearInterval(poll);
        resolve(link.placement);
      } else if (Date.now() - started > timeoutMs) {
        clearInterval(poll);
        reject(new Error(`timed out waiting for ${what}; last placement ${JSON.stringify(link.placement)}`));
      }
    }, 25);
  });
}

test('shards register, a killed shard is dropped after its lease, and everyone re-registers with a restarted coordinator', async () => {
  const ttl = 600;
  let coordinator = await start(['serve', 'coordinator', '--port', '0', '--lease-ttl-ms', String(ttl)], /listening on (\S+)/);
  const coordinatorAddress = coordinator.ready[1];
  const [specA, specB] = spreadExperts(2, 4, 2).map(assignmentSpec);
  const shardArgs = (id: string, spec: string) => ['serve', 'expert', '--checkpoint', checkpoint, '--experts', spec, '--port', '0', '--coordinator', coordinatorAddress, '--shard-id', id];
  await start(shardArgs('shard-a', specA), /listening on/);
  const shardB = await start(shardArgs('shard-b', specB), /listening on/);
  const watcher = new CoordinatorLink(coordinatorAddress, { memberId: 'test-router', role: 'ROLE_ROUTER' });
  watcher.watch(() => undefined);
  try {
    const full = await waitFor(watcher, 'both shards', (t) => t.shards.length === 2 && unplaced(t, 2, 4).length === 0);
    // A malformed Register gets INVALID_ARGUMENT and the coordinator keeps serving.
    const raw = new grpc.Client(coordinatorAddress, grpc.credentials.createInsecure());
    const refused = await new Promise<grpc.ServiceError | null>((resolve) =>
      raw.makeUnaryRequest('/switchyard.v1.Coordinator/Register', (b: Buffer) => b, (b: Buffer) => b, Buffer.from([0x12, 0x7f]), (err) => resolve(err)));
    raw.close();
    assert.equal(refused?.code, grpc.status.INVALID_ARGUMENT);
    assert.deepEqual(full.shards.map((s) => s.shardId), ['shard-a', 'shard-b']);
    shardB.child.kill('SIGKILL');
    const afterLoss = await waitFor(watcher, 'shard-b dropped', (t) => t.shards.length === 1);
    assert.ok(afterLoss.version > full.version);
    assert.equal(unplaced(afterLoss, 2, 4).length, 4, "shard-b's experts are unplaced");
    // The coordinator restarts on the same port with no memory; the router keeps its last placement meanwhile.
    await coordinator.stop();
    assert.equal(watcher.placement?.shards.length, 1, 'the last placement is kept while the coordinator is away');
    const port = coordinatorAddress.split(':')[1];
    coordinator = await start(['serve', 'coordinator', '--port', port, '--lease-ttl-ms', String(ttl)], /listening on/);
    const back = await waitFor(watcher, 'shard-a re-registered', (t) => t.shards.length === 1 && t.shards[0].shardId === 'shard-a' && t.version >= 1);
    assert.equal(unplaced(back, 2, 4).length, 4);
  } finally {
    watcher.close();
  }
});
