// load suite (autocannon on loopback): completions against a local cluster (small model, two shards,
// one router with its default admission settings). First the maximum sustainable rate (closed loop,
// answers 200), then open-loop rates of 50%, 100% and 200% of it: p50/p99 latency and the share of 503.
import { report, type BenchRow } from './report.js';
import { withSmallCluster } from './local-cluster.js';

interface Run { rps: number; ok: number; refused: number; other: number; p50: number; p99: number }

export async function loadSuite(quick: boolean): Promise<void> {
  // A bench dependency only (devDependencies): loaded when the suite runs.
  const { default: autocannon } = await import('autocannon');
  const seconds = quick ? 4 : 15;
  const rows: BenchRow[] = [];
  await withSmallCluster('load', async (cluster) => {
    const url = `${cluster.routerUrls[0]}/v1/completions`;
    const run = async (connections: number, overallRate?: number): Promise<Run> => {
      const r = await autocannon({
        url, method: 'POST', connections, duration: seconds, timeout: 30, ...(overallRate ? { overallRate } : {}),
        headers: { 'content-type': 'application/json', 'x-request-timeout-ms': '5000' },
        body: JSON.stringify({ prompt: 'Call me Ishmael. Some years ago', max_tokens: 16, temperature: 0.8 }),
      });
      const count = (code: string) => Number((r.statusCodeStats as Record<string, { count: number }>)[code]?.count ?? 0);
      const ok = count('200');
      const refused = count('503');
      const total = r.requests.total;
      return { rps: ok / seconds, ok, refused, other: total - ok - refused, p50: r.latency.p50, p99: r.latency.p99 };
    };
    await run(8); // warm-up
    const max = await run(64);
    rows.push({ name: 'maximum sustainable rate (closed loop, 64 connections)', value: max.rps, unit: 'completions/s' });
    rows.push({ name: '  at it: latency p50 / p99', value: max.p50, unit: 'ms', anchor: max.p99 });
    for (const fraction of [0.5, 1, 2]) {
      const offered = Math.max(1, Math.round(max.rps * fraction));
      // Enough connections that the offered rate is not capped by the clients.
      const r = await run(Math.min(1024, Math.max(64, offered * 4)), offered);
      const total = r.ok + r.refused + r.other;
      rows.push({ name: `${fraction * 100}% (${offered}/s offered): latency p50`, value: r.p50, unit: 'ms' });
      rows.push({ name: `${fraction * 100}%: latency p99`, value: r.p99, unit: 'ms' });
      rows.push({ name: `${fraction * 100}%: share answered 503`, value: total ? r.refused / total : 0, unit: 'fraction' });
      rows.push({ name: `${fraction * 100}%: other failures (not 200/503)`, value: r.other, unit: 'requests', anchor: total, ratio: r.other / total, target: '= 0', met: r.other === 0 });
    }
    await report('load', rows, { quick, seconds, model: 'small (random weights)', shards: 2, routers: 1, max_tokens: 16, deadline_ms: 5000 });
  });
}
