// How busy a process is (issue 16): event-loop busy time and CPU time, as counters and as a share of the
// trailing window. Every service puts `busyMetrics` in the metric group it registers (router: serving,
// shard: shard, coordinator: coordinator, training processes: training), so each exports them for itself;
// a scraper that reads the counters before and after a run gets each service's busy share of that run,
// and several services' shares side by side show how much their work overlapped.
//
// - event_loop: time the event loop was not waiting for I/O (performance.eventLoopUtilization().active):
//   JavaScript, and wasm kernels called from it, on the main thread. At most 1 per second of wall time.
// - cpu: user + system CPU time of the whole process (process.cpuUsage()): every thread, so wasm worker
//   threads (SWITCHYARD_WASM_THREADS), the garbage collector's helpers and libuv's pool count too; it can
//   exceed 1 per second of wall time.
import { performance } from 'node:perf_hooks';
import { Counter, Gauge, type Metric } from 'prom-client';

export const BUSY_MEASURES = ['event_loop', 'cpu'] as const;
export type BusyMeasure = (typeof BUSY_MEASURES)[number];

/** Busy seconds of each measure since the process (event loop: since the loop) started, at `at` (performance.now(), ms). */
export interface BusySample {
  at: number;
  event_loop: number;
  cpu: number;
}

export function busySample(): BusySample {
  const elu = performance.eventLoopUtilization();
  const cpu = process.cpuUsage();
  return { at: performance.now(), event_loop: elu.active / 1000, cpu: (cpu.user + cpu.system) / 1e6 };
}

/** Busy shares since the start (no earlier sample to compare with). */
function sinceStart(now: BusySample): Record<BusyMeasure, number> {
  return { event_loop: performance.eventLoopUtilization().utilization, cpu: now.cpu / Math.max(process.uptime(), 1e-3) };
}

/**
 * Samples taken every `intervalMs` by an unref'd timer (it never keeps a process alive), keeping those
 * of the last `windowMs`: the busy share of each measure over the trailing window.
 */
export class BusyWindow {
  private samples: BusySample[] = [];
  private timer?: NodeJS.Timeout;

  constructor(readonly windowMs = 10_000, readonly intervalMs = 1_000, private readonly read: () => BusySample = busySample) {}

  get running(): boolean {
    return this.timer !== undefined;
  }

  /** Starts sampling (idempotent): the first sample now, then one every interval. */
  start(): void {
    if (this.timer) return;
    this.samples.push(this.read());
    this.timer = setInterval(() => this.add(this.read()), this.intervalMs).unref();
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
    this.samples = [];
  }

  /** Keeps a sample (the timer's; tests feed their own). */
  add(sample: BusySample): void {
    this.samples.push(sample);
    // The oldest kept sample is at most one interval older than the window (so a full window is there).
    const from = sample.at - this.windowMs - this.intervalMs;
    while (this.samples.length > 2 && this.samples[0].at < from) this.samples.shift();
  }

  /**
   * Busy seconds per wall second over the trailing window, from the oldest sample inside it to now
   * (a shorter span right after start; the whole life of the process before the first sample).
   */
  shares(now: BusySample = this.read()): Record<BusyMeasure, number> {
    const from = this.samples.find((s) => s.at >= now.at - this.windowMs) ?? this.samples.at(-1);
    const span = from ? (now.at - from.at) / 1000 : 0;
    if (!from || span < 0.05) return sinceStart(now);
    // The loop's clock and performance.now() are read microseconds apart: a fully busy loop may show
    // a hair above 1 over a short span, which is 1.
    return { event_loop: Math.min(1, (now.event_loop - from.event_loop) / span), cpu: (now.cpu - from.cpu) / span };
  }
}

/** The process's window (10 s, sampled every second), started when a service registers the gauge. */
export const busyWindow = new BusyWindow();

/** A metric that starts something when a MetricGroup registers it (MetricGroup.register calls this). */
class BusyRatioGauge extends Gauge<'measure'> {
  onRegister(): void {
    busyWindow.start();
  }
}

const busySeconds = new Counter({
  name: 'switchyard_busy_seconds_total',
  help: 'Busy time of this process: measure="event_loop" (the event loop not waiting for I/O, at most 1 s per second) or "cpu" (user + system CPU of all its threads)',
  labelNames: ['measure'], registers: [],
  collect() {
    const s = busySample();
    this.reset();
    for (const measure of BUSY_MEASURES) this.inc({ measure }, s[measure]);
  },
});

const busyRatio = new BusyRatioGauge({
  name: 'switchyard_busy_ratio',
  help: 'Busy seconds per wall second over the last 10 s (sampled every second), by measure (event_loop: at most 1; cpu: all threads, may exceed 1)',
  labelNames: ['measure'], registers: [],
  collect() {
    busyWindow.start(); // registered some other way than through a MetricGroup: the window starts at the first scrape
    const shares = busyWindow.shares();
    for (const measure of BUSY_MEASURES) this.set({ measure }, shares[measure]);
  },
});

/** The busy metrics: every service lists these in the metric group it registers. */
export const busyMetrics: readonly Metric[] = [busySeconds, busyRatio];
