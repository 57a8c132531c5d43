// serving suite: completions through `switchyard up`'s cluster (coordinator, two shards, one router) at
// 1, 8 and 32 concurrent requests: aggregate tokens/s and request latency p50/p99.
import { median, report, type BenchRow } from './report.js';
import { withSmallCluster } from './local-cluster.js';

const percentile = (values: number[], p: number): number => {
  const s = [...values].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
};

export async function servingSuite(quick: boolean): Promise<void> {
  const rows: BenchRow[] = [];
  const maxTokens = quick ? 16 : 48;
  await withSmallCluster('serving', async (cluster) => {
    const url = `${cluster.routerUrls[0]}/v1/completions`;
    const complete = async (i: number): Promise<{ seconds: number; tokens: number }> => {
      const t0 = performance.now();
      const res = await fetch(url, {
        method: 'POST', headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: `Request ${i}: Call me Ishmael.`, max_tokens: maxTokens, temperature: 0.8, seed: i }),
      });
      const body = (await res.json()) as { usage?: { completion_tokens: number } };
      if (res.status !== 200) throw new Error(`completion failed: ${res.status} ${JSON.stringify(body)}`);
      return { seconds: (performance.now() - t0) / 1000, tokens: body.usage!.completion_tokens };
    };
    await complete(-1); // warm-up
    for (const concurrency of [1, 8, 32]) {
      const rounds = quick ? 1 : 3;
      const rates: number[] = [];
      const latencies: number[] = [];
      for (let r = 0; r < rounds; r++) {
        const t0 = performance.now();
        const done = await Promise.all(Array.from({ length: concurrency }, (_, i) => complete(r * 100 + i)));
        const wall = (performance.now() - t0) / 1000;
        rates.push(done.reduce((n, d) => n + d.tokens, 0) / wall);
        latencies.push(...done.map((d) => d.seconds));
      }
      rows.push({ name: `${concurrency} concurrent, ${maxTokens} tokens each: throughput`, value: median(rates), unit: 'tokens/s' });
      rows.push({ name: `${concurrency} concurrent: latency p50`, value: percentile(latencies, 50), unit: 's' });
      rows.push({ name: `${concurrency} concurrent: latency p99`, value: percentile(latencies, 99), unit: 's' });
    }
  });
  await report('serving', rows, { model: 'small (random weights)', shards: 2, routers: 1, maxTokens, quick });
}
