// `switchyard up`: the whole cluster as child processes on one machine — a coordinator, expert shards
// holding the default spread of experts, and routers — stopped together on Ctrl-C or SIGTERM.
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

export interface ClusterOptions {
  checkpoint: string;
  shards: number;
  routers: number;
  host: string;
  port: number;
  log: (line: string) => void;
}

interface Child {
  name: string;
  process: ChildProcess;
  stderrTail: string[];
}

const CLI = fileURLToPath(new URL('./main.js', import.meta.url));

export class Cluster {
  private readonly children: Child[] = [];
  stopping = false;
  routerUrls: string[] = [];
  coordinatorAddress = '';
  /** Prometheus endpoints of the coordinator and shards (routers serve /metrics on their HTTP port). */
  metricsUrls: string[] = [];

  constructor(readonly options: ClusterOptions) {}

  /** Starts `args` and resolves with the first stdout match of `ready`. */
  private start(name: string, args: string[], ready: RegExp): Promise<RegExpMatchArray> {
    // Children stop by themselves should this process die without stopping them.
    const env = { ...process.env, SWITCHYARD_EXIT_WITH_PARENT: '1' };
    const child: Child = { name, process: spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env }), stderrTail: [] };
    this.children.push(child);
    createInterface({ input: child.process.stderr! }).on('line', (line) => {
      child.stderrTail.push(line);
      if (child.stderrTail.length > 20) child.stderrTail.shift();
    });
    return new Promise((resolve, reject) => {
      createInterface({ input: child.process.stdout! }).on('line', (line) => {
        const m = line.match(ready);
        if (m) resolve(m);
      });
      child.process.once('exit', (code, signal) => {
        const why = `${name} exited (${signal ?? `code ${code}`})${child.stderrTail.length ? `:\n  ${child.stderrTail.join('\n  ')}` : ''}`;
        reject(new Error(why));
        if (!this.stopping) {
          this.options.log(`switchyard: ${why}; stopping the cluster`);
          void this.stop().then(() => { process.exitCode = 1; });
        }
      });
    });
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
    return Object.fromEntries(this.children.map((c) => [c.name, c.process.pid ?? -1]));
  }

  /**
   * SIGTERM to every child, SIGKILL after 10 s: routers first (they finish admitted requests), then the
   * coordinator, so shards leaving a cluster that stops as a whole do not have their experts moved.
   */
  async stop(): Promise<void> {
    this.stopping = true;
    const rank = (c: Child) => (c.name.startsWith('router') ? 0 : c.name === 'coordinator' ? 1 : 2);
    const order = [...this.children].reverse().sort((a, b) => rank(a) - rank(b));
    for (const c of order) {
      if (c.process.exitCode !== null || c.process.signalCode !== null) continue;
      const exited = new Promise<void>((resolve) => c.process.once('exit', () => resolve()));
      c.process.kill('SIGTERM');
      const timer = setTimeout(() => c.process.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    }
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
