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
import { assignmentSpec, placementOf, spreadExperts, unplaced, type PlacementTable } from '../services/core/placement.js';
import { parseAssignment } from '../services/expert/assignment.js';
import { Membership } from '../services/coordinator/membership.js';
import { CoordinatorLink } from '../services/core/wire/coordinator-link.js';
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
