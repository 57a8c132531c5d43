// `switchyard placement show | plan | apply`: the coordinator's placement admin endpoint from a terminal.
import { ConfigError } from '../core/config.js';
import { readToken } from '../core/auth.js';

export interface PlacementFlags { admin: string; tokenFile?: string; json?: boolean }

const ACTIONS = { show: ['GET', '/admin/placement'], plan: ['POST', '/admin/placement/plan'], apply: ['POST', '/admin/placement/apply'] } as const;

type Row = Record<string, unknown>;

function table(rows: Row[], columns: string[]): string {
  const cell = (v: unknown) => (v === null || v === undefined ? '-' : typeof v === 'number' ? String(Math.round(v * 1000) / 1000) : String(v));
  const widths = columns.map((c) => Math.max(c.length, ...rows.map((r) => cell(r[c]).length)));
  const line = (values: string[]) => values.map((v, i) => v.padEnd(widths[i])).join('  ').trimEnd();
  return [line(columns), ...rows.map((r) => line(columns.map((c) => cell(r[c]))))].join('\n');
}

function render(action: keyof typeof ACTIONS, body: Row): string {
  if (action === 'show') {
    const shards = body.shards as Row[];
    return [
      `placement version ${String(body.version)}, migrations ${String(body.generation)}, routers ${String(body.routers)}`,
      table(shards, ['shard_id', 'address', 'max_experts', 'draining', 'rows_per_second', 'serving']),
      `replicated experts: ${(body.replicated as Row[]).map((r) => `${String(r.layer)}/${String(r.expert)}×${(r.shards as string[]).length}`).join(' ') || 'none'}`,
      `shard load max/mean: predicted ${Number(body.predicted_max_over_mean).toFixed(3)}, measured ${Number(body.measured_max_over_mean).toFixed(3)}`,
    ].join('\n');
  }
  const plan = body.plan as Row | undefined;
  const lines: string[] = [];
  if (action === 'apply') lines.push(`${body.applied ? 'applied' : 'not applied'}: ${String(body.reason)} (${Number(body.seconds).toFixed(2)} s, ${String(body.loaded)} expert copies loaded)`);
  if (plan) {
    const assignment = plan.assignment as Record<string, string>;
    const load = plan.predictedLoad as Record<string, number>;
    lines.push(table(Object.keys(assignment).map((id) => ({ shard_id: id, predicted_load: load[id] ?? 0, experts: assignment[id] })), ['shard_id', 'predicted_load', 'experts']));
    lines.push(`replicas: ${(plan.replicas as Row[]).map((r) => `${String(r.layer)}/${String(r.expert)}×${String(r.shards)}`).join(' ') || 'none'}`);
    lines.push(`shard load max/mean: now ${Number(plan.currentMaxOverMean).toFixed(3)}, planned ${Number(plan.predictedMaxOverMean).toFixed(3)}, lower bound ${Number(plan.lowerBoundMaxOverMean).toFixed(3)}; ${String(plan.loads)} expert copies to load`);
  }
  return lines.join('\n');
}

export async function placementCommand(action: string, flags: PlacementFlags): Promise<void> {
  if (!(action in ACTIONS)) throw new ConfigError(`placement ${action}: expected show, plan or apply`);
  const token = await readToken(flags.tokenFile, '--token-file', 'SWITCHYARD_ADMIN_TOKEN');
  if (!token) throw new ConfigError('placement: the admin endpoint needs a token (--token-file or SWITCHYARD_ADMIN_TOKEN)');
  const [method, path] = ACTIONS[action as keyof typeof ACTIONS];
  let response: Response;
  try {
    response = await fetch(new URL(path, flags.admin), { method, headers: { authorization: `Bearer ${token}` } });
  } catch (err) {
    throw new ConfigError(`placement: cannot reach ${flags.admin}: ${(err as Error).message}`);
  }
  const body = (await response.json().catch(() => ({}))) as Row;
  if (!response.ok) throw new ConfigError(`placement ${action}: ${response.status} ${String((body.error as Row | undefined)?.message ?? response.statusText)}`);
  process.stdout.write((flags.json ? JSON.stringify(body, null, 2) : render(action as keyof typeof ACTIONS, body)) + '\n');
}
