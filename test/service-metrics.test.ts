// Each service exports only its own metrics (issue 19, item 4): the real services, started as child
// processes on 127.0.0.1 with ephemeral ports, are scraped and compared with the metric groups their
// owning modules define (test/support/role-metrics.ts): every series of the role's groups is there, none
// of another role's, and no switchyard series outside the role's groups.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { registry } from '../services/core/metrics/registry.js';
import { ALL_GROUPS, ROLE_GROUPS, namesOf, type Role } from './support/role-metrics.js';
import { startService, type RunningService } from './support/services.js';
import { startIdleTrainingRun } from './support/cluster.js';

const tiny = preset('tiny');
let root: string;
const services: RunningService[] = [];
const stops: Array<() => Promise<void>> = [];
/** Each role's /metrics URL. */
const metricsUrl = new Map<Role, string>();

async function start(args: string[], ready: RegExp): Promise<RunningService> {
  const s = await startService(args, ready);
  services.push(s);
  return s;
}

// Before anything registers: loading the modules (the imports above) must not export their metrics.
const loadedOnly = registry.getMetricsAsArray().map((m) => m.name).filter((n) => n.startsWith('switchyard_'));

before(async () => {
  await initBackend();
  root = await mkdtemp(join(tmpdir(), 'switchyard-service-metrics-'));
  const checkpoint = join(root, 'tiny-moe');
  const model = MixtralModel.initialize(tiny.model, 3);
  await saveModel(checkpoint, model);
  model.dispose();
  const metricsLine = /metrics (http:\/\/\S+\/metrics)/;

  // A serving cluster: coordinator, one shard following its placement, one router.
  const coordinator = await start(['serve', 'coordinator', '--port', '0', '--rebalance-interval-ms', '0'], /listening on (\S+) .*metrics (http:\/\/\S+\/metrics)/);
  metricsUrl.set('coordinator', coordinator.ready[2]);
  const shard = await start(['serve', 'expert', '--checkpoint', checkpoint, '--experts', 'all', '--port', '0', '--coordinator', coordinator.ready[1], '--shard-id', 'shard-0'], metricsLine);
  metricsUrl.set('expert', shard.ready[1]);
  const router = await start(['serve', 'router', '--checkpoint', checkpoint, '--port', '0', '--coordinator', coordinator.ready[1]], /listening on (\S+)/);
  metricsUrl.set('router', `http://${router.ready[1]}/metrics`);

  // A training run that never starts (the job waits for a second replica): its coordinator, a training
  // shard and one training replica, each exporting from the moment it is up.
  const run = await startIdleTrainingRun(checkpoint, root, { model: tiny.model, train: tiny.train });
  stops.push(run.stop);
  metricsUrl.set('coordinator --train-*', run.metricsUrls.coordinator);
  metricsUrl.set('expert --train', run.metricsUrls.shard);
  metricsUrl.set('trainer', run.metricsUrls.trainer);
});

after(async () => {
  await Promise.all([...services.map((s) => s.stop()), ...stops.map((stop) => stop())]);
  if (root) await rm(root, { recursive: true, force: true });
});

/** The metric families of one scrape (histograms by their base name, as in `# TYPE`). */
async function scrape(url: string): Promise<Set<string>> {
  const res = await fetch(url);
  assert.equal(res.status, 200, `GET ${url}`);
  const families = [...(await res.text()).matchAll(/^# TYPE (\S+) /gm)].map((m) => m[1]);
  return new Set(families);
}

test('loading the modules registers none of their metrics', () => {
  assert.deepEqual(loadedOnly, []);
});

test('every metric group is exported by some role', () => {
  const used = new Set(Object.values(ROLE_GROUPS).flat());
  assert.deepEqual(Object.keys(ALL_GROUPS).filter((g) => !used.has(g)), []);
});

for (const role of Object.keys(ROLE_GROUPS) as Role[]) {
  test(`${role}: /metrics has its own series (+ process defaults and moe_build_info) and no other role's`, async () => {
    const url = metricsUrl.get(role);
    assert.ok(url, `${role} started`);
    const exported = await scrape(url);
    const own = namesOf(role);
    assert.ok(own.size > 0);
    assert.deepEqual([...own].filter((n) => !exported.has(n)), [], `${role}: its own series are all there`);
    const others = new Set(Object.values(ALL_GROUPS).flatMap((g) => g.names).filter((n) => !own.has(n)));
    assert.deepEqual([...others].filter((n) => exported.has(n)), [], `${role}: other roles' series are absent`);
    assert.deepEqual([...exported].filter((n) => /^(switchyard|moe)_/.test(n) && !own.has(n) && n !== 'moe_build_info'), [],
      `${role}: no switchyard series outside its groups`);
    for (const n of ['moe_build_info', 'process_cpu_user_seconds_total', 'nodejs_eventloop_lag_seconds']) assert.ok(exported.has(n), `${role} exports ${n}`);
    if (role === 'router') {
      // Issue 19's complaint, stated directly: no training, all-reduce, checkpoint, placement, coordinator or shard series.
      const foreign = [...exported].filter((n) => /^switchyard_(train|allreduce|checkpoint|placement|coordinator|shard)_|^switchyard_expert_(queue|held|compute|rows|load|first_row|replicas)/.test(n));
      assert.deepEqual(foreign, []);
    }
  });
}
