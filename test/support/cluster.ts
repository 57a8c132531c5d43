// A serving cluster of real processes on 127.0.0.1 for fault and load tests: a coordinator (optionally
// on a fixed port, so it can be restarted where members look for it), shards with given expert
// assignments and routers with given options. Everything is stopped by `stop()`.
import { writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { startService, type RunningService } from './services.js';
import { waitReady } from '../../services/cli/cluster.js';
import { until } from './until.js';
import { RUN_FILE, type RunFile } from '../../services/cli/train-cluster.js';

export { waitReady };

export interface TestCluster {
  coordinator: RunningService;
  coordinatorAddress: string;
  shards: RunningService[];
  routers: Array<{ service: RunningService; base: string }>;
  /** Starts shard `i` again (same id and assignment), e.g. after killing it. */
  restartShard(i: number): Promise<RunningService>;
  /** Starts one more shard (index shards.length) holding `spec`, e.g. 'none' for an elastic one. */
  addShard(spec: string, extraArgs?: string[]): Promise<RunningService>;
  restartCoordinator(): Promise<void>;
  stop(): Promise<void>;
}

export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const port = (server.address() as { port: number }).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}


export async function startCluster(
  checkpoint: string, shardSpecs: string[], routerArgs: string[][], env: Record<string, string> = {}, leaseTtlMs = 2_000, shardExtraArgs: string[] = [],
  coordinatorExtraArgs: string[] = [],
): Promise<TestCluster> {
  const all: RunningService[] = [];
  const start = async (args: string[], ready: RegExp) => {
    const s = await startService(args, ready, env);
    all.push(s);
    return s;
  };
  const port = await freePort();
  // No periodic rebalancing unless a test asks for it: tests expect the placement they started.
  const coordinatorArgs = ['serve', 'coordinator', '--port', String(port), '--lease-ttl-ms', String(leaseTtlMs), '--rebalance-interval-ms', '0', ...coordinatorExtraArgs];
  const coordinatorAddress = `127.0.0.1:${port}`;
  const specs = [...shardSpecs];
  const shardArgs = (i: number) => ['serve', 'expert', '--checkpoint', checkpoint, '--experts', specs[i], '--port', '0',
    '--coordinator', coordinatorAddress, '--shard-id', `shard-${i}`, '--drain-ms', '300', ...shardExtraArgs];
  const cluster: TestCluster = {
    coordinator: await start(coordinatorArgs, /listening on/),
    coordinatorAddress,
    shards: [],
    routers: [],
    restartShard: async (i) => {
      cluster.shards[i] = await start(shardArgs(i), /listening on/);
      return cluster.shards[i];
    },
    addShard: async (spec, extraArgs = []) => {
      specs.push(spec);
      const shard = await start([...shardArgs(specs.length - 1), ...extraArgs], /listening on/);
      cluster.shards.push(shard);
      return shard;
    },
    restartCoordinator: async () => {
      cluster.coordinator = await start(coordinatorArgs, /listening on/);
    },
    stop: async () => {
      await Promise.all(all.map((s) => s.stop()));
    },
  };
  try {
    for (let i = 0; i < specs.length; i++) cluster.shards.push(await start(shardArgs(i), /listening on/));
    for (const extra of routerArgs) {
      const service = await start(['serve', 'router', '--checkpoint', checkpoint, '--port', '0', '--coordinator', coordinatorAddress, ...extra], /listening on (\S+)/);
      cluster.routers.push({ service, base: `http://${service.ready[1]}` });
    }
    for (const r of cluster.routers) await waitReady(r.base, 30_000);
  } catch (err) {
    await cluster.stop();
    throw err;
  }
  return cluster;
}

export interface Outcome {
  status: number;
  ms: number;
  retryAfter: string | null;
  degraded: boolean;
  error?: string;
}

/** One completion; network failures are status 0. */
export async function complete(base: string, body: Record<string, unknown>, headers: Record<string, string> = {}): Promise<Outcome> {
  const t0 = performance.now();
  try {
    const res = await fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });
    const json = (await res.json()) as { degraded?: unknown; error?: { message: string } };
    return { status: res.status, ms: performance.now() - t0, retryAfter: res.headers.get('retry-after'), degraded: json.degraded !== undefined, error: json.error?.message };
  } catch (err) {
    return { status: 0, ms: performance.now() - t0, retryAfter: null, degraded: false, error: (err as Error).message };
  }
}

/** Clients sending completions back to back; tests wait on answers (events), never on sleeps. */
export interface Load {
  /** Every answer so far, in arrival order (grows while the load runs). */
  readonly outcomes: Outcome[];
  /** Resolves once `n` more answers than now have arrived; rejects if the load ends first. */
  answers(n: number, what?: string): Promise<void>;
  /** Stops the clients (each finishes its current request) and resolves with every outcome. */
  stop(): Promise<Outcome[]>;
  /** Resolves with every outcome once the load has ended (stopped, or its time or request cap reached). */
  ended: Promise<Outcome[]>;
}

/**
 * `concurrency` clients sending completions back to back until `stop()`, or at the latest after
 * `maxMs` or `maxRequests` (the loops are bounded even when a test fails before it stops them).
 */
export function startLoad(
  base: string, concurrency: number, body: Record<string, unknown>, headers: Record<string, string> = {}, maxMs = 120_000, maxRequests = 100_000,
): Load {
  const outcomes: Outcome[] = [];
  let stopped = false;
  const cap = setTimeout(() => { stopped = true; }, maxMs);
  const done = Promise.all(Array.from({ length: concurrency }, async (_, w) => {
    for (let i = 0; !stopped && outcomes.length < maxRequests; i++) outcomes.push(await complete(base, { ...body, seed: w * 10_000 + i }, headers));
  })).then(() => {
    stopped = true;
    clearTimeout(cap);
    return outcomes;
  });
  return {
    outcomes,
    answers: async (n, what = `${n} more answers`) => {
      const target = outcomes.length + n;
      const reached = await until(what, async () => (outcomes.length >= target ? true : stopped ? false : undefined), maxMs);
      if (!reached) throw new Error(`the load ended before ${what} (${outcomes.length} answers)`);
    },
    stop: () => {
      stopped = true;
      return done;
    },
    ended: done,
  };
}

/** The value of one series in a Prometheus text page, named exactly as printed (labels included, e.g. `x{role="router"}`). */
export async function metricValue(metricsUrl: string, name: string): Promise<number> {
  const text = await (await fetch(metricsUrl)).text();
  const m = text.match(new RegExp(`^${name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} (\\S+)$`, 'm'));
  if (!m) throw new Error(`${metricsUrl} has no ${name}`);
  return Number(m[1]);
}

/** The coordinator's HTTP origin (its /metrics and /admin/placement), from its ready line. */
export function coordinatorHttp(c: TestCluster): string {
  return c.coordinator.ready.input!.match(/\(metrics (http:\/\/[^/\s]+)\/metrics\)/)![1];
}

/** Resolves once the router at `base` is answering at least `n` requests at once, by its own gauge. */
export async function untilInFlight(base: string, n: number): Promise<void> {
  // The scrape is in flight too while the gauge is read.
  await until(`${n} requests in flight at ${base}`, async () => ((await metricValue(`${base}/metrics`, 'switchyard_http_requests_in_flight')) >= n + 1 ? true : undefined), 60_000);
}

/** The services of a distributed training run that never takes a step, each with its /metrics URL. */
export interface IdleTrainingRun {
  coordinator: RunningService;
  shard: RunningService;
  trainer: RunningService;
  metricsUrls: { coordinator: string; shard: string; trainer: string };
  stop(): Promise<void>;
}

/**
 * A training coordinator (`--train-*`), one training shard holding every expert and one training replica
 * (`serve trainer`, index 0 of 2): the job waits for the second replica, which never comes, so the run
 * never starts and the three stay up until `stop()`, exporting their metrics. `runDir` receives train.json;
 * `run.train.batch_sequences` must split over 2 replicas.
 */
export async function startIdleTrainingRun(checkpoint: string, runDir: string, run: RunFile, env: Record<string, string> = {}): Promise<IdleTrainingRun> {
  await writeFile(join(runDir, RUN_FILE), JSON.stringify(run));
  const all: RunningService[] = [];
  const start = async (args: string[], ready: RegExp) => {
    const s = await startService(args, ready, env);
    all.push(s);
    return s;
  };
  const stop = async () => { await Promise.all(all.map((s) => s.stop())); };
  const metricsLine = /metrics (http:\/\/\S+\/metrics)/;
  try {
    const coordinator = await start(['serve', 'coordinator', '--port', '0', '--train-routers', '2', '--train-shards', '1', '--train-checkpoint', checkpoint],
      /listening on (\S+) .*metrics (http:\/\/\S+\/metrics)/);
    const shard = await start(['serve', 'expert', '--train', '--checkpoint', checkpoint, '--experts', 'all', '--port', '0',
      '--coordinator', coordinator.ready[1], '--shard-id', 'shard-0'], metricsLine);
    const trainer = await start(['serve', 'trainer', '--run', runDir, '--index', '0', '--routers', '2', '--coordinator', coordinator.ready[1]], metricsLine);
    return { coordinator, shard, trainer, metricsUrls: { coordinator: coordinator.ready[2], shard: shard.ready[1], trainer: trainer.ready[1] }, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}
