// Observability against real processes: the router's counters agree exactly with the routing plans; a
// real Prometheus (Debian package) scrapes a local cluster with the project's recording rules, and
// after skewed traffic the imbalance rule passes its alert threshold while a tight capacity factor makes
// the drop-ratio rule positive; every metric the dashboards and rules use is exported; and the live
// /dashboard page shows the load in a headless Chromium.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { parseModelConfig, preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { assignmentSpec, spreadExperts } from '../services/core/placement.js';
import { metricNamesInConfig, metricNamesInExpr } from './support/config-names.js';
import { freePort, startCluster, startIdleTrainingRun, type IdleTrainingRun, type TestCluster } from './support/cluster.js';
import { repoRoot } from './support/paths.js';
import { kubectlGate, renderKustomization } from './support/kubectl.js';
import { spawnTracked } from './support/services.js';
import { until } from './support/until.js';

await initBackend();
// 8 experts, top-2, GShard capacity at inference: skewed traffic overloads two experts and drops tokens.
const config = parseModelConfig({
  ...preset('tiny').model, num_local_experts: 8,
  switchyard_gate: { policy: 'gshard', capacity_factor: 1.0, eval_capacity_factor: 0.5, min_capacity: 1 },
});
const L = config.num_hidden_layers;
const E = config.num_local_experts;
let root: string;
let cluster: TestCluster;
let base: string;
const metricUrls: string[] = [];
/** The training services (each exports the training series only it has), beside the serving cluster Prometheus scrapes. */
let training: IdleTrainingRun | undefined;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-observability-'));
  const checkpoint = join(root, 'skewed');
  const model = MixtralModel.initialize(config, 3);
  await saveModel(checkpoint, model);
  model.dispose();
  cluster = await startCluster(checkpoint, spreadExperts(L, E, 2).map(assignmentSpec), [[]]);
  base = cluster.routers[0].base;
  metricUrls.push(`${base}/metrics`);
  for (const s of [cluster.coordinator, ...cluster.shards]) metricUrls.push(s.ready.input!.match(/metrics (http:\/\/\S+\/metrics)/)![1]);
  const runDir = join(root, 'run');
  await mkdir(runDir);
  training = await startIdleTrainingRun(checkpoint, runDir, { model: config, train: preset('tiny').train });
});

after(async () => {
  await cluster?.stop();
  await training?.stop();
  await rm(root, { recursive: true, force: true });
});

/** Sample values of one metric family, keyed by its label text. */
async function samples(url: string, name: string): Promise<Map<string, number>> {
  const text = await (await fetch(url)).text();
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$/);
    if (m && m[1] === name) out.set(m[2] ?? '', Number(m[3]));
  }
  return out;
}

const infer = (ids: number[], batch: number) => fetch(`${base}/v2/models/skewed/infer`, {
  method: 'POST', headers: { 'content-type': 'application/json' },
  body: JSON.stringify({
    inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [batch, ids.length / batch], data: ids }],
    outputs: [{ name: 'routing_experts' }, { name: 'routing_weights' }],
  }),
}).then(async (r) => {
  assert.equal(r.status, 200);
  return (await r.json()) as { outputs: Array<{ name: string; shape: number[]; data: number[] }> };
});

test('routed, kept and dropped counters equal the routing plans exactly', async () => {
  const before = await samples(`${base}/metrics`, 'switchyard_expert_tokens_total');
  const droppedBefore = await samples(`${base}/metrics`, 'switchyard_expert_dropped_tokens_total');
  const routed = new Map<string, number>();
  const kept = new Map<string, number>();
  const add = (m: Map<string, number>, k: string) => m.set(k, (m.get(k) ?? 0) + 1);
  // A known mix: skewed and varied sequences, batches of different sizes.
  const mix = [
    { ids: Array.from({ length: 32 }, () => 97), batch: 1 },
    { ids: Array.from({ length: 48 }, (_, i) => (i * 37 + 11) % 256), batch: 2 },
    { ids: Array.from({ length: 60 }, (_, i) => (i % 3 === 0 ? 101 : (i * 13) % 256)), batch: 3 },
  ];
  for (const { ids, batch } of mix) {
    const res = await infer(ids, batch);
    const experts = res.outputs.find((o) => o.name === 'routing_experts')!;
    const weights = res.outputs.find((o) => o.name === 'routing_weights')!;
    const perLayer = experts.data.length / L;
    experts.data.forEach((e, i) => {
      const key = `{layer="${Math.floor(i / perLayer)}",expert="${e}"`;
      add(routed, key);
      if (weights.data[i] > 0) add(kept, key);
    });
  }
  const after = await samples(`${base}/metrics`, 'switchyard_expert_tokens_total');
  const droppedAfter = await samples(`${base}/metrics`, 'switchyard_expert_dropped_tokens_total');
  const delta = (a: Map<string, number>, b: Map<string, number>, key: string) => (a.get(key) ?? 0) - (b.get(key) ?? 0);
  let totalDropped = 0;
  for (let l = 0; l < L; l++)
    for (let e = 0; e < E; e++) {
      const key = `{layer="${l}",expert="${e}"`;
      const r = routed.get(key) ?? 0;
      const k = kept.get(key) ?? 0;
      assert.equal(delta(after, before, `${key},stage="routed"}`), r, `routed ${key}`);
      assert.equal(delta(after, before, `${key},stage="kept"}`), k, `kept ${key}`);
      assert.equal(delta(droppedAfter, droppedBefore, `${key},reason="capacity"}`), r - k, `dropped ${key}`);
      totalDropped += r - k;
    }
  assert.ok(totalDropped > 0, 'the tight capacity factor dropped some choices');
});

test('a real Prometheus with the project\'s rules: skewed traffic trips the imbalance threshold, tight capacity makes the drop ratio positive', async () => {
  const dir = join(root, 'prometheus');
  await mkdir(join(dir, 'data'), { recursive: true });
  const rulesDir = join(repoRoot, 'deploy', 'prometheus', 'rules');
  const ruleFiles = (await readdir(rulesDir)).filter((f) => f.endsWith('.yml')).map((f) => join(rulesDir, f));
  const targets = metricUrls.map((u) => new URL(u));
  const scrape = targets.map((t, i) => [
    `  - job_name: target${i}`, `    metrics_path: ${t.pathname}`, '    static_configs:', `      - targets: ['${t.host}']`,
  ].join('\n')).join('\n');
  await writeFile(join(dir, 'prometheus.yml'), [
    'global:', '  scrape_interval: 1s', '  evaluation_interval: 1s',
    'rule_files:', ...ruleFiles.map((f) => `  - ${f}`), 'scrape_configs:', scrape, '',
  ].join('\n'));
  const port = await freePort();
  const prometheus = spawnTracked('prometheus', [
    `--config.file=${join(dir, 'prometheus.yml')}`, `--storage.tsdb.path=${join(dir, 'data')}`, `--web.listen-address=127.0.0.1:${port}`,
  ]);
  const query = async (expr: string): Promise<Array<{ metric: Record<string, string>; value: [number, string] }>> => {
    const res = await fetch(`http://127.0.0.1:${port}/api/v1/query?query=${encodeURIComponent(expr)}`);
    const json = (await res.json()) as { data: { result: Array<{ metric: Record<string, string>; value: [number, string] }> } };
    return json.data.result;
  };
  // Skewed traffic: the same byte over and over sends every token to the same two experts.
  let stop = false;
  const traffic = (async () => {
    while (!stop) await infer(Array.from({ length: 64 }, () => 97), 2);
  })();
  try {
    let imbalance = 0;
    let drops = 0;
    // A Prometheus that exits (bad rule file, port taken) ends the wait at once.
    let exited = false;
    void prometheus.exited.then(() => { exited = true; });
    await until('the imbalance and drop-ratio rules', async () => {
      if (exited) return false;
      const i = await query('max(switchyard:layer_imbalance:max_over_mean)');
      const d = await query('switchyard:drop_ratio:rate1m');
      imbalance = Number(i[0]?.value[1] ?? 0);
      drops = Number(d[0]?.value[1] ?? 0);
      return imbalance > 2 && drops > 0 ? true : undefined;
    }, 60_000, 1_000).catch(() => false);
    // The alert threshold (deploy/prometheus/rules/alerts.yml) is max/mean > 2.
    assert.ok(imbalance > 2, `imbalance rule reached ${imbalance}; prometheus log: ${prometheus.stderr().slice(-500)}`);
    assert.ok(drops > 0, `drop-ratio rule reached ${drops}`);
    const up = await query('up');
    assert.equal(up.length, metricUrls.length);
    assert.ok(up.every((s) => s.value[1] === '1'), 'every service was scraped');
  } finally {
    stop = true;
    await traffic;
    await prometheus.stop();
  }
});

/** Metric names in the KEDA ScaledObjects' Prometheus queries of every rendered overlay. */
function scaledObjectMetricNames(): string[] {
  const names = new Set<string>();
  for (const overlay of ['cpu', 'gpu'])
    for (const doc of renderKustomization<{ kind?: string; spec?: { triggers?: Array<{ type: string; metadata: { query?: string } }> } }>(`k8s/overlays/${overlay}`))
      if (doc.kind === 'ScaledObject')
        for (const t of doc.spec?.triggers ?? []) if (t.type === 'prometheus' && t.metadata.query) for (const n of metricNamesInExpr(t.metadata.query)) names.add(n);
  return [...names];
}

/** Metric names the local serving cluster's and training run's services export (and `up`, which Prometheus adds). */
async function exportedMetricNames(): Promise<Set<string>> {
  await infer(Array.from({ length: 16 }, (_, i) => i), 1); // labelled series appear with their first sample
  const exported = new Set<string>(['up']);
  for (const url of [...metricUrls, ...Object.values(training!.metricsUrls)]) {
    const text = await (await fetch(url)).text();
    for (const line of text.split('\n')) {
      const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]/);
      if (m) exported.add(m[1]);
    }
  }
  return exported;
}

test('every metric the dashboards and rules use is in the services\' /metrics output', async () => {
  const { recording, used } = metricNamesInConfig(repoRoot);
  const exported = await exportedMetricNames();
  const missing = used.filter((n) => !recording.includes(n) && !exported.has(n));
  assert.deepEqual(missing, [], `used by rules or dashboards but not exported: ${missing.join(', ')}`);
});

// A ScaledObject on a metric that is not exported never scales, silently. Rendering needs kubectl ≥ 1.27
// (skipped, saying so, without one); a kustomization that does not render fails here.
test('every metric the KEDA autoscalers query is in the services\' /metrics output', kubectlGate, async () => {
  const scaling = scaledObjectMetricNames();
  assert.ok(scaling.includes('switchyard_expert_queue_rows'), `KEDA queries use ${scaling.join(', ')}`);
  const exported = await exportedMetricNames();
  const missing = scaling.filter((n) => !exported.has(n));
  assert.deepEqual(missing, [], `queried by KEDA but not exported: ${missing.join(', ')}`);
});

test('the live /dashboard in headless Chromium shows load on the experts that received tokens', async () => {
  const { chromium } = await import('playwright-core');
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM_PATH ?? '/usr/bin/chromium', args: ['--no-sandbox'] });
  let stop = false;
  const traffic = (async () => {
    while (!stop) await infer(Array.from({ length: 64 }, () => 97), 2);
  })();
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
    await page.goto(`${base}/dashboard`);
    await page.waitForSelector('.bar[data-expert]');
    await page.waitForFunction(() => [...document.querySelectorAll<HTMLElement>('.bar')].some((b) => Number(b.dataset.load) > 0), undefined, { timeout: 15_000 });
    const bars = await page.$$eval('.layer', (layers) => layers.map((l) => ({
      layer: Number((l as HTMLElement).dataset.layer),
      loads: [...l.querySelectorAll<HTMLElement>('.bar')].map((b) => ({ load: Number(b.dataset.load), height: b.getBoundingClientRect().height })),
    })));
    assert.equal(bars.length, L);
    for (const { layer, loads } of bars) {
      assert.equal(loads.length, E);
      // Experts that received tokens recently (the window decays) have visible bars; with this skew most get few.
      const top = Math.max(...loads.map((b) => b.load));
      const loaded = loads.map((b, e) => (b.load > 0.01 * top ? e : -1)).filter((e) => e >= 0);
      assert.ok(top > 0 && loaded.length > 0, `layer ${layer} shows load`);
      for (const e of loaded) assert.ok(loads[e].height > 0, `layer ${layer} expert ${e} (load ${loads[e].load}) has a visible bar`);
      assert.ok(loads.some((b) => b.height < 0.5 * Math.max(...loads.map((x) => x.height))), `layer ${layer}: the skew is visible`);
    }
    const artifacts = join(repoRoot, 'test-artifacts');
    await mkdir(artifacts, { recursive: true });
    await page.screenshot({ path: join(artifacts, 'dashboard.png'), fullPage: true });
  } finally {
    stop = true;
    await traffic;
    await browser.close();
  }
});
