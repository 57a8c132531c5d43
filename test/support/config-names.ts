// Metric names that the observability config (Prometheus rules, Grafana dashboards under deploy/) refers
// to, so tests can compare them with what the services export: a renamed metric would otherwise only
// show up as an empty panel or an alert that never fires. Used by tests only (`yaml` is a dev dependency).
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parse } from 'yaml';

// Words that look like metric names in PromQL but are not. Matched case-insensitively, as PromQL does.
const NOT_METRICS = new Set([
  // aggregations
  'sum', 'min', 'max', 'avg', 'group', 'stddev', 'stdvar', 'count', 'count_values', 'bottomk', 'topk', 'quantile',
  'limitk', 'limit_ratio',
  // binary operators and modifiers
  'and', 'or', 'unless', 'atan2', 'by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'bool', 'offset',
  // literals, @ modifiers, and the histogram bucket label that so often sits next to them
  'inf', 'nan', 'start', 'end', 'le',
  // functions
  'abs', 'absent', 'absent_over_time', 'acos', 'acosh', 'asin', 'asinh', 'atan', 'atanh', 'avg_over_time', 'ceil',
  'changes', 'clamp', 'clamp_max', 'clamp_min', 'cos', 'cosh', 'count_over_time', 'day_of_month', 'day_of_week',
  'day_of_year', 'days_in_month', 'deg', 'delta', 'deriv', 'double_exponential_smoothing', 'exp', 'floor',
  'histogram_avg', 'histogram_count', 'histogram_fraction', 'histogram_quantile', 'histogram_stddev',
  'histogram_stdvar', 'histogram_sum', 'holt_winters', 'hour', 'idelta', 'increase', 'info', 'irate', 'label_join',
  'label_replace', 'last_over_time', 'ln', 'log10', 'log2', 'mad_over_time', 'max_over_time', 'min_over_time',
  'minute', 'month', 'pi', 'predict_linear', 'present_over_time', 'quantile_over_time', 'rad', 'rate', 'resets',
  'round', 'scalar', 'sgn', 'sin', 'sinh', 'sort', 'sort_by_label', 'sort_by_label_desc', 'sort_desc', 'sqrt',
  'stddev_over_time', 'stdvar_over_time', 'sum_over_time', 'tan', 'tanh', 'time', 'timestamp', 'vector', 'year',
]);

// Not preceded by a name character, a digit (durations such as 5m, numbers such as 1e3), '.' or '$'
// (Grafana variables such as $__rate_interval).
const IDENTIFIER = /(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*/g;
// Label lists of grouping modifiers hold label names, never metrics.
const GROUPING = /(?<![A-Za-z0-9_:])(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/gi;

/** Metric names (including recording rules, which contain ':') in one PromQL expression, in order of first use. */
export function metricNamesInExpr(expr: string): string[] {
  const stripped = expr
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""') // label values and regexes
    .replace(/#[^\n]*/g, '') // comments, once '#' inside strings is gone
    .replace(/\{[^}]*\}/g, '{}') // label matchers
    .replace(/\[[^\]]*\]/g, '[]') // ranges and subqueries
    .replace(GROUPING, ' $1 ');
  const names: string[] = [];
  for (const match of stripped.matchAll(IDENTIFIER)) {
    const name = match[0];
    if (NOT_METRICS.has(name.toLowerCase())) continue;
    // A name followed by '(' (possibly after spaces) is a call, not a selector.
    const rest = stripped.slice((match.index ?? 0) + name.length);
    if (/^\s*\(/.test(rest)) continue;
    if (!names.includes(name)) names.push(name);
  }
  return names;
}

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

const isObject = (v: unknown): v is Record<string, Json> => typeof v === 'object' && v !== null && !Array.isArray(v);
const asArray = (v: unknown): unknown[] => (Array.isArray(v) ? v : []);

function filesIn(dir: string, extensions: string[]): string[] {
  return readdirSync(dir).filter((f) => extensions.some((e) => f.endsWith(e))).sort().map((f) => join(dir, f));
}

/** Walks dashboard panels, including those nested in collapsed rows, collecting target expressions. */
function panelExprs(panels: unknown, out: string[]): void {
  for (const panel of asArray(panels)) {
    if (!isObject(panel)) continue;
    for (const target of asArray(panel.targets)) {
      if (isObject(target) && typeof target.expr === 'string') out.push(target.expr);
    }
    panelExprs(panel.panels, out);
  }
}

/**
 * Under a repository root: the recording rules defined in deploy/prometheus/rules/*.yml, and every metric
 * name used by those rules and by the targets of deploy/grafana/dashboards/*.json (histogram series keep
 * their _bucket/_sum/_count suffixes). Both lists are sorted and without duplicates.
 */
export function metricNamesInConfig(root: string): { recording: string[]; used: string[] } {
  const recording = new Set<string>();
  const exprs: string[] = [];
  for (const file of filesIn(join(root, 'deploy', 'prometheus', 'rules'), ['.yml', '.yaml'])) {
    const doc: unknown = parse(readFileSync(file, 'utf8'));
    for (const group of asArray(isObject(doc) ? doc.groups : undefined)) {
      for (const rule of asArray(isObject(group) ? group.rules : undefined)) {
        if (!isObject(rule)) continue;
        if (typeof rule.record === 'string') recording.add(rule.record);
        // A constant expression (`expr: 1`) parses as a number.
        if (rule.expr !== undefined && rule.expr !== null) exprs.push(String(rule.expr));
      }
    }
  }
  for (const file of filesIn(join(root, 'deploy', 'grafana', 'dashboards'), ['.json'])) {
    const dashboard: unknown = JSON.parse(readFileSync(file, 'utf8'));
    if (isObject(dashboard)) panelExprs(dashboard.panels, exprs);
  }
  const used = new Set(exprs.flatMap(metricNamesInExpr));
  return { recording: [...recording].sort(), used: [...used].sort() };
}
