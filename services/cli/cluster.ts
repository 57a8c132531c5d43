// `switchyard up`: the whole cluster as child processes on one machine — a coordinator, expert shards
// holding the default spread of experts, and routers — supervised like a Deployment (a member that exits
// is restarted on the same ports after a backoff; only a crash loop stops the cluster) and stopped
// together on Ctrl-C or SIGTERM.
import { Supervisor, SERVICE_RESTARTS } from './supervisor.js';

export interface ClusterOptions {
  checkpoint: string;
  shards: number;
  routers: number;
  host: string;
  port: number;
  /** Each service's output goes to `<logDir>/<name>.log` (processes.json lists the pids). */
  logDir: string;
  log: (line: string) => void;
  /** Bearer token file of the coordinator's /admin/placement endpoint (unset: the endpoint is off). */
  adminTokenFile?: string;
  /** Routers' ping-pong micro-batches (unset: the router's default). */
  microBatches?: number;
  /** More `serve router` / `serve expert` flags, e.g. ['--max-batch', '32']. */
  routerArgs?: string[];
  shardArgs?: string[];
}

export class Cluster {
  private readonly supervisor: Supervisor;
  routerUrls: string[] = [];
  coordinatorAddress = '';
  /** Prometheus endpoints of the coordinator and shards (routers serve /metrics on their HTTP port). */
  metricsUrls: string[] = [];
  /** The coordinator's placement admin endpoint (`http://H:P`, the same port as its /metrics). */
  adminUrl = '';
  /** Settles with the reason when a member crash-loops and the cluster stops because of it. */
  readonly failed: Promise<string>;

  constructor(readonly options: ClusterOptions) {
    this.supervisor = new Supervisor(options.logDir, options.log, SERVICE_RESTARTS);
    let fail: (why: string) => void = () => undefined;
    this.failed = new Promise((resolve) => { fail = resolve; });
    // Only a member that cannot be kept running (a crash loop) takes the cluster down.
    this.supervisor.onFailure = (_name, why) => {
      if (this.stopping) return;
      options.log(`switchyard: ${why}; stopping the cluster`);
      void this.stop().then(() => {
        process.exitCode = 1;
        fail(why);
      });
    };
    this.supervisor.onRestarted = (name) => options.log(`switchyard: ${name} is running again`);
  }

  get stopping(): boolean {
    return this.supervisor.stopping;
  }

  /**
   * Starts a member on any free ports, then pins the ports it got for its restarts: peers, the printed
   * URLs and scrapers keep finding it where it was. `args(ports)` builds the command line.
   */
  private async start(name: string, args: (ports: string[]) => string[], ready: RegExp, ports: string[]): Promise<RegExpMatchArray> {
    const match = await this.supervisor.start({ name, args: args(ports), ready, restart: true });
    this.supervisor.setArgs(name, args(ports.map((_, i) => portOf(match[i + 1]))));
    return match;
  }

  async up(): Promise<void> {
    const o = this.options;
    const adminToken = o.adminTokenFile ? ['--admin-token-file', o.adminTokenFile] : [];
    const [, coordinator, coordinatorMetrics] = await this.start('coordinator', ([port, metricsPort]) => [
      'serve', 'coordinator', '--host', o.host, '--port', port, '--metrics-port', metricsPort, ...adminToken,
    ], /listening on (\S+) \(metrics (\S+)\)/, ['0', '0']);
    this.coordinatorAddress = coordinator;
    this.adminUrl = new URL(coordinatorMetrics).origin;
    const shards = await Promise.all(Array.from({ length: o.shards }, (_, i) => this.startShard(`shard-${i}`, `spread:${i}/${o.shards}`)));
    this.metricsUrls = [coordinatorMetrics, ...shards];
    const routers = await Promise.all(Array.from({ length: o.routers }, (_, i) => this.start(`router-${i}`, ([port]) => [
      'serve', 'router', '--checkpoint', o.checkpoint, '--host', o.host, '--port', port, '--coordinator', coordinator,
      ...(o.microBatches !== undefined ? ['--micro-batches', String(o.microBatches)] : []), ...(o.routerArgs ?? []),
    ], /listening on (\S+)/, [String(o.port === 0 ? 0 : o.port + i)])));
    this.routerUrls = routers.map((m) => `http://${m[1]}`);
    await Promise.all(this.routerUrls.map((url) => waitReady(url)));
  }

  /** Starts a shard holding `experts` (e.g. 'none': the coordinator's planner gives it experts); resolves with its /metrics URL. */
  async startShard(name: string, experts: string): Promise<string> {
    const o = this.options;
    const [, , metrics] = await this.start(name, ([port, metricsPort]) => [
      'serve', 'expert', '--checkpoint', o.checkpoint, '--experts', experts, '--host', o.host, '--port', port, '--metrics-port', metricsPort,
      '--coordinator', this.coordinatorAddress, '--shard-id', name, ...(o.shardArgs ?? []),
    ], /listening on (\S+) .*\(metrics (\S+)\)/, ['0', '0']);
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

/** The port of `host:port` or of a URL. */
function portOf(address: string): string {
  return /^\w+:\/\//.test(address) ? new URL(address).port : address.slice(address.lastIndexOf(':') + 1);
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
