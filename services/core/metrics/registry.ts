// One Prometheus registry per process (prom-client) and the HTTP endpoint that exposes it. Services
// that already run an HTTP server mount `metricsText` there; the others start this small server.
//
// Each service exports only its own metrics: a module creates its metrics unregistered (`registers: []`)
// as a MetricGroup, and registers the group when the component that fills it starts (the router engine,
// the shard, the coordinator, a training loop...). Loading a module therefore exports nothing, so the one
// CLI that holds every service exports per process only what the service it runs owns.
import { createServer, type Server } from 'node:http';
import { collectDefaultMetrics, Gauge, Registry, type Metric } from 'prom-client';
import { busyMetrics } from './busy.js';

export const registry = new Registry();
collectDefaultMetrics({ register: registry });

/** Metrics one module owns, created unregistered; `register()` exports them (idempotent per registry). */
export class MetricGroup {
  readonly metrics: readonly Metric[];

  constructor(metrics: Iterable<Metric>) {
    this.metrics = [...metrics];
  }

  /**
   * The busy-share metrics (./busy.ts) that every service's group lists, e.g.
   * `new MetricGroup([..., ...MetricGroup.busy])`: the same objects everywhere, so a process running
   * two services exports them once.
   */
  static get busy(): readonly Metric[] {
    return busyMetrics;
  }

  /** Their names (histograms by their base name). */
  get names(): string[] {
    return this.metrics.map(metricName);
  }

  /**
   * Adds them to `into` (the process registry by default), skipping those already there; returns this.
   * A metric with an `onRegister()` method (the busy gauge's sampler) has it called.
   */
  register(into: Registry = registry): this {
    for (const metric of this.metrics) {
      if (into.getSingleMetric(metricName(metric)) !== metric) into.registerMetric(metric);
      (metric as { onRegister?: () => void }).onRegister?.();
    }
    return this;
  }
}

/** prom-client keeps the name on the object but does not declare it on Metric. */
function metricName(metric: Metric): string {
  return (metric as unknown as { name: string }).name;
}

let buildInfo: Gauge | undefined;

/** `moe_build_info{version, backend, service} 1` (DESIGN §11), set once the backend is known. */
export function setBuildInfo(version: string, backend: string, service: string): void {
  buildInfo ??= new Gauge({ name: 'moe_build_info', help: 'Switchyard version and compute backend of this process', labelNames: ['version', 'backend', 'service'], registers: [registry] });
  buildInfo.reset();
  buildInfo.set({ version, backend, service }, 1);
}

export async function metricsText(): Promise<{ contentType: string; body: string }> {
  return { contentType: registry.contentType, body: await registry.metrics() };
}

export interface MetricsServer { port: number; close(): Promise<void> }

/** Serves GET /metrics on host:port (0 = any free port). */
export async function startMetricsServer(host: string, port: number): Promise<MetricsServer> {
  const server: Server = createServer((req, res) => {
    if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'only GET /metrics is served here' }));
      return;
    }
    metricsText().then(({ contentType, body }) => res.writeHead(200, { 'content-type': contentType }).end(body),
      (err: Error) => res.writeHead(500, { 'content-type': 'application/json' }).end(JSON.stringify({ error: err.message })));
  });
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(port, host, () => resolve()));
  const address = server.address();
  return {
    port: typeof address === 'object' && address ? address.port : port,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}
