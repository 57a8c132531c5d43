// `switchyard up`: the whole cluster as child processes on one machine — a coordinator, expert shards
// holding the default spread of experts, and routers — stopped together on Ctrl-C or SIGTERM.
import { Supervisor } from './supervisor.js';

export interface ClusterOptions {
  checkpoint: string;
  shards: number;
  routers: number;
  host: string;
  port: number;
  /** Each service's output goes to `<logDir>/<name>.log` (processes.json lists the pids). */
  logDir: string;
  log: (line: string) => void;
}

export class Cluster {
  private readonly supervisor: Supervisor;
  routerUrls: string[] = [];
  coordinatorAddress = '';
  /** Prometheus endpoints of the coordinator and shards (routers serve /metrics on their HTTP port). */
  metricsUrls: string[] = [];

  constructor(readonly options: ClusterOptions) {
    this.supervisor = new Supervisor(options.logDir, options.log, 0);
    // One service failing takes the cluster down (nothing here restarts it; Kubernetes would).
    const failed = (why: string) => {
      if (this.stopping) return;
      options.log(`switchyard: ${why}; stopping the cluster`);
      void this.stop().then(() => { process.exitCode = 1; });
    };
    this.supervisor.onFailure = (_name, why) => failed(why);
    this.supervisor.onDone = (name) => failed(`${name} exited`);
  }

  get stopping(): boolean {
    return this.supervisor.stopping;
  }

  private start(name: string, args: string[], ready: RegExp): Promise<RegExpMatchArray> {
    return this.supervisor.start({ name, args, ready, restart: false });
  }

  async up(): Promise<void> {
    const o = this.options;
    const [, coordinator, coordinatorMetrics] = await this.start('coordinator', ['serve', 'coordinator', '--host', o.host, '--port', '0'], /listening on (\S+) \(metrics (\S+)\)/);
    this.coordinatorAddress = coordinator;
    const shards = await Promise.all(Array.from({ length: o.shards }, (_, i) => this.startShard(`shard-${i}`, `spread:${i}/${o.shards}`)));
    this.metricsUrls = [coordinatorMetrics, ...shards];
    const routers = await Promise.all(Array.from({ length: o.routers }, (_, i) => this.start(`router-${i}`, [
      'serve', 'router', '--checkpoint', o.checkpoint, '--host', o.host, '--port', String(o.port === 0 ? 0 : o.port + i), '--coordinator', coordinator,
    ], /listening on (\S+)/)));
    this.routerUrls = routers.map((m) => `http://${m[1]}`);
    await Promise.all(this.routerUrls.map((url) => waitReady(url)));
  }

  /** Starts a shard holding `experts` (e.g. 'none': the coordinator's planner gives it experts); resolves with its /metrics URL. */
  async startShard(name: string, experts: string): Promise<string> {
    const o = this.options;
    const [, metrics] = await this.start(name, [
      'serve', 'expert', '--checkpoint', o.checkpoint, '--experts', experts, '--host', o.host, '--port', '0',
      '--coordinator', this.coordinatorAddress, '--shard-id', name,
    ], /listening on .*\(metrics (\S+)\)/);
    return metrics;
  }

  pids(): Record<string, number> {
    return this.supervisor.pids();
  }

  /**
   * SIGTERM to every child, SIGKILL after 10 s: routers first (they finish admitted requests), then the
   * coordinator, so shards leaving a cluster that stops as a whole do not have their experts moved.
   */
  async stop(): Promise<void> {
    const rank = (name: string) => (name.startsWith('router') ? 0 : name === 'coordinator' ? 1 : 2);
    await this.supervisor.stop((names) => names.reverse().sort((a, b) => rank(a) - rank(b)));
  }
}

export async function waitReady(url: string, timeoutMs = 120_000): Promise<void> {
  const started = Date.now();
  while (Date.now() - started < timeoutMs) {
    try {
      if ((await fetch(`${url}/v2/health/ready`)).status === 200) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`router ${url} not ready within ${timeoutMs / 1000} s`);
}
