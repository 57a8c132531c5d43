// The Prometheus rules, their unit tests, the scrape config and the Grafana dashboard under deploy/ are
// only exercised when someone opens Grafana or gets paged; these checks catch a broken rule, a wrong
// threshold or a misspelt metric at `npm test` instead. promtool must be on PATH.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { metricNamesInConfig, metricNamesInExpr } from './support/config-names.js';
import { repoRoot } from './support/paths.js';
import { registry, setBuildInfo } from '../services/core/metrics/registry.js';
// Loading a module registers nothing: each service registers its own groups when it starts.
import { ALL_GROUPS, ROLE_GROUPS, type Role } from './support/role-metrics.js';
import { TPOT_BUCKETS, TTFT_BUCKETS } from '../services/router/request-metrics.js';
import { parse } from 'yaml';

const prometheusDir = join(repoRoot, 'deploy', 'prometheus');
const dashboardPath = join(repoRoot, 'deploy', 'grafana', 'dashboards', 'switchyard.json');

/** Runs promtool and returns its output; on failure the assertion message carries what promtool said. */
function promtool(args: string[], cwd = repoRoot): string {
  try {
    return execFileSync('promtool', args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string };
    assert.fail(`promtool ${args.join(' ')} failed:\n${e.stdout ?? ''}${e.stderr ?? e.message}`);
  }
}

test('promtool check rules accepts both rule files', () => {
  const out = promtool(['check', 'rules', 'deploy/prometheus/rules/recording.yml', 'deploy/prometheus/rules/alerts.yml']);
  assert.match(out, /SUCCESS: 11 rules found/);
  assert.match(out, /SUCCESS: 8 rules found/);
});

test('promtool unit tests of the recording rules and alerts pass', () => {
  assert.match(promtool(['test', 'rules', 'deploy/prometheus/tests/alerts.test.yml']), /SUCCESS/);
});

test('promtool check config accepts prometheus.yml and finds its rule files', () => {
  // rule_files is relative (rules/*.yml) so it works both in the source tree and mounted at /etc/prometheus.
  const out = promtool(['check', 'config', 'prometheus.yml'], prometheusDir);
  assert.match(out, /SUCCESS: 2 rule files found/);
  assert.match(out, /is valid prometheus config file syntax/);
});

interface Target { refId?: string; expr?: string }
interface Panel { type: string; title?: string; datasource?: { type?: string; uid?: string }; targets?: Target[]; panels?: Panel[]; gridPos?: unknown }
interface Dashboard { uid: string; title: string; schemaVersion: number; panels: Panel[]; templating: { list: { name: string; type: string; query: unknown; multi?: boolean; includeAll?: boolean }[] } }

test('the Grafana dashboard: datasource variable everywhere, the nine rows in order, a query in every target', () => {
  const dashboard = JSON.parse(readFileSync(dashboardPath, 'utf8')) as Dashboard;
  assert.equal(dashboard.uid, 'switchyard-moe');
  assert.equal(dashboard.schemaVersion, 39);

  const variables = new Map(dashboard.templating.list.map((v) => [v.name, v]));
  assert.equal(variables.get('datasource')?.type, 'datasource');
  assert.equal(variables.get('datasource')?.query, 'prometheus');
  const layer = variables.get('layer');
  assert.ok(layer?.multi && layer.includeAll, 'layer is a multi-value variable with All');
  assert.match(JSON.stringify(layer.query), /label_values\(switchyard_expert_tokens_total, layer\)/);
  const model = variables.get('model');
  assert.ok(model?.multi && model.includeAll, 'model is a multi-value variable with All');
  assert.match(JSON.stringify(model.query), /label_values\(switchyard_router_requests_finished_total, model\)/);

  // Expanded rows keep their panels after them at top level; collapsed rows nest them.
  const rows: string[] = [];
  const queryPanels: Panel[] = [];
  const rowOf = new Map<Panel, string>();
  for (const panel of dashboard.panels) {
    if (panel.type === 'row') {
      rows.push(panel.title ?? '');
      queryPanels.push(...(panel.panels ?? []));
    } else {
      queryPanels.push(panel);
      rowOf.set(panel, rows.at(-1) ?? '');
    }
  }
  assert.deepEqual(rows, ['Overview', 'Per-expert load', 'Capacity and drops', 'Imbalance', 'Queue and scaling', 'Latency', 'Generation', 'Coordinator', 'Placement']);
  assert.ok(queryPanels.length >= 25, `only ${queryPanels.length} panels`);

  for (const panel of queryPanels) {
    assert.ok(panel.gridPos, `${panel.title} has a gridPos`);
    assert.deepEqual(panel.datasource, { type: 'prometheus', uid: '${datasource}' }, `${panel.title} uses the datasource variable`);
    assert.ok(panel.targets && panel.targets.length > 0, `${panel.title} has targets`);
    const refIds = new Set<string>();
    for (const target of panel.targets) {
      assert.ok(target.expr && target.expr.trim() !== '', `${panel.title}: target ${target.refId} has an expr`);
      assert.ok(target.refId && !refIds.has(target.refId), `${panel.title}: refIds are present and distinct`);
      refIds.add(target.refId);
    }
  }

  // The Generation row: TTFT, TPOT, end to end, tokens, sequences and finish reasons, each per model.
  const generation = queryPanels.filter((p) => rowOf.get(p) === 'Generation');
  const used = generation.flatMap((p) => p.targets!.flatMap((t) => metricNamesInExpr(t.expr!)));
  for (const name of ['switchyard_router_time_to_first_token_seconds_bucket', 'switchyard:time_to_first_token_seconds:p99',
    'switchyard_router_time_per_output_token_seconds_bucket', 'switchyard:time_per_output_token_seconds:p99', 'switchyard_router_e2e_request_latency_seconds_bucket',
    'switchyard_router_prompt_tokens_total', 'switchyard_router_generation_tokens_total', 'switchyard_router_sequences_running',
    'switchyard_router_sequences_waiting', 'switchyard_router_requests_finished_total']) assert.ok(used.includes(name), `the Generation row shows ${name}`);
  for (const panel of generation)
    for (const target of panel.targets!) {
      assert.match(target.expr!, /\{model=~"\$model"\}/, `${panel.title}: ${target.refId} follows the model variable`);
      assert.match(target.expr!, /by \([^)]*\bmodel\b[^)]*\)|^switchyard:[a-z_:0-9]+\{/, `${panel.title}: ${target.refId} is per model`);
    }
});

interface Rule { alert?: string; record?: string; expr: string }

test('the SLO alerts are on the TTFT and TPOT recording rules, with thresholds that are bucket bounds', () => {
  const rules = (parse(readFileSync(join(prometheusDir, 'rules', 'alerts.yml'), 'utf8')) as { groups: Array<{ rules: Rule[] }> }).groups.flatMap((g) => g.rules);
  const alerts = new Map(rules.filter((r) => r.alert).map((r) => [r.alert!, r.expr]));
  assert.ok(!alerts.has('SwitchyardLatencyP99OverSLO'), 'end-to-end latency (which grows with max_tokens) pages no one');
  const cases: Array<[string, string, number[]]> = [
    ['SwitchyardTimeToFirstTokenP99OverSLO', 'switchyard:time_to_first_token_seconds:p99', TTFT_BUCKETS],
    ['SwitchyardTimePerOutputTokenP99OverSLO', 'switchyard:time_per_output_token_seconds:p99', TPOT_BUCKETS],
  ];
  for (const [alert, record, buckets] of cases) {
    const m = alerts.get(alert)?.match(/^(\S+) > ([0-9.]+)$/);
    assert.ok(m, `${alert}: <recording rule> > <threshold>`);
    assert.equal(m[1], record);
    // A bound at the threshold: "p99 above it" is "more than 1% slower than it", not an interpolation.
    assert.ok(buckets.includes(Number(m[2])), `${alert}: ${m[2]} is a bucket bound of ${buckets.join(', ')}`);
  }
});

test('metricNamesInExpr keeps metrics and recording rules, drops functions, keywords and labels', () => {
  assert.deepEqual(
    metricNamesInExpr('histogram_quantile(0.99, sum by (le, route) (rate(switchyard_http_request_duration_seconds_bucket{route="/v1/completions"}[5m])))'),
    ['switchyard_http_request_duration_seconds_bucket'],
  );
  assert.deepEqual(
    metricNamesInExpr('max by (layer) (switchyard:expert_tokens:rate1m) / avg by (layer) (switchyard:expert_tokens:rate1m)'),
    ['switchyard:expert_tokens:rate1m'],
  );
  assert.deepEqual(
    metricNamesInExpr('sum(rate(a_total[$__rate_interval] offset 5m)) / on (job) group_left (version) moe_build_info > bool 1e3 unless up'),
    ['a_total', 'moe_build_info', 'up'],
  );
  assert.deepEqual(metricNamesInExpr('sum without (instance) (x{le="+Inf", a=~"b|c"}) # trailing comment mentioning y'), ['x']);
});

/**
 * The names the services' registries export, read from the registry after registering every role's
 * metric groups (router, shards serving and training, coordinators with and without a training job,
 * training replicas), as each service does when it starts; histograms by their base name.
 */
function exportedNames(): Set<string> {
  for (const role of Object.keys(ROLE_GROUPS) as Role[]) for (const group of ROLE_GROUPS[role]) ALL_GROUPS[group].register();
  setBuildInfo('test', 'none', 'test');
  // `up` is Prometheus' own, per scraped target.
  return new Set([...registry.getMetricsAsArray().map((m) => m.name), 'up']);
}

test('metricNamesInConfig: every recording rule is found, and every used name is exported or recorded', () => {
  const { recording, used } = metricNamesInConfig(repoRoot);
  assert.deepEqual(recording, [
    'switchyard:allreduce_seconds:p99', 'switchyard:capacity_utilization:max', 'switchyard:drop_ratio:rate1m',
    'switchyard:expert_queue_rows:sum', 'switchyard:expert_tokens:rate1m', 'switchyard:http_request_duration_seconds:p99',
    'switchyard:layer_imbalance:cv', 'switchyard:layer_imbalance:max_over_mean', 'switchyard:router_rejections:rate5m',
    'switchyard:time_per_output_token_seconds:p99', 'switchyard:time_to_first_token_seconds:p99',
  ]);
  assert.ok(used.length >= 25, `only ${used.length} names used: ${used.join(', ')}`);
  for (const name of ['switchyard_expert_tokens_total', 'switchyard:layer_imbalance:max_over_mean', 'switchyard_http_request_duration_seconds_bucket', 'up',
    'switchyard_router_time_to_first_token_seconds_bucket', 'switchyard_router_time_per_output_token_seconds_bucket']) {
    assert.ok(used.includes(name), `${name} is used`);
  }
  const recorded = new Set(recording);
  const exported = exportedNames();
  const unknown = used.filter((n) => !recorded.has(n) && !exported.has(n) && !exported.has(n.replace(/_(bucket|sum|count)$/, '')));
  assert.deepEqual(unknown, [], 'names used by rules or dashboards that nothing exports');
});
