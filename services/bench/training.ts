// training suite: tokens/s of a model trained in one process versus 2 routers × 2 shards as processes on
// this machine (same global batch), from each run's metrics.jsonl (median step after warm-up, validation
// steps excluded), for `small` and for `medium`'s layer shape. Every run trains with routing_group_tokens =
// seq_len, so its micro-batches (whole routing groups) pipeline and the distributed run computes what the
// single process computes: every step's loss of every distributed run is checked against the single
// process's within 1e-4 (relative) before anything is reported, and no speed-up beyond the machine's cores
// is accepted. `small` also runs with --micro-batches 1, so the micro-batches' effect shows.
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { EXIT_WITH_PARENT_ENV } from '../cli/supervisor.js';
import { median, report, speedupRow, type BenchRow } from './report.js';
import { busyShare, scrapeBusy, type ServiceScrape } from './busy-scrape.js';
import { BUSY_MEASURES, type BusyMeasure } from '../core/metrics/busy.js';

const CLI = fileURLToPath(new URL('../cli/main.js', import.meta.url));
/** Largest |loss_distributed − loss_single| / |loss_single| of any step (as test/distributed-train.test.ts). */
export const LOSS_TOLERANCE = 1e-4;

function run(args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    // The run stops when the bench is gone, even when the bench was killed outright.
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, [EXIT_WITH_PARENT_ENV]: '1' } });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`switchyard ${args.join(' ')} failed (${code}): ${stderr.slice(-2000)}`))));
  });
}

type StepRecord = { step: number; loss: number; tokens_per_s?: number; val_loss?: number; allreduce_s?: number; allreduce_bytes?: number };

async function records(outDir: string): Promise<StepRecord[]> {
  return (await readFile(join(outDir, 'metrics.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as StepRecord);
}

/**
 * Every step of a distributed run against the single-process run of the same config: the same steps,
 * each loss within `tolerance` relative. Throws with the first step that differs; returns the worst.
 */
export function checkSameLosses(label: string, got: StepRecord[], want: StepRecord[], tolerance = LOSS_TOLERANCE): number {
  if (got.length !== want.length) throw new Error(`${label}: ${got.length} steps, the single-process run ${want.length}`);
  let worst = 0;
  for (let i = 0; i < want.length; i++) {
    if (got[i].step !== want[i].step) throw new Error(`${label}: line ${i + 1} is step ${got[i].step}, the single-process run's step ${want[i].step}`);
    const rel = Math.abs(got[i].loss - want[i].loss) / Math.abs(want[i].loss);
    if (!(rel <= tolerance))
      throw new Error(`${label}: step ${want[i].step}: loss ${got[i].loss} vs ${want[i].loss} in one process (relative ${rel}, allowed ${tolerance})`);
    worst = Math.max(worst, rel);
  }
  return worst;
}

function stepRates(all: StepRecord[], warmup: number): { tokensPerSecond: number; timedSteps: number; allreduceSeconds?: number; allreduceBytes?: number } {
  const timed = all.filter((r) => r.step > warmup && r.val_loss === undefined); // validation steps include eval time
  if (timed.length === 0) throw new Error(`no step after the ${warmup} warm-up steps without validation to time`);
  return {
    tokensPerSecond: median(timed.map((r) => r.tokens_per_s!)),
    timedSteps: timed.length,
    ...(timed[0].allreduce_s !== undefined ? { allreduceSeconds: median(timed.map((r) => r.allreduce_s!)), allreduceBytes: timed[0].allreduce_bytes } : {}),
  };
}

/**
 * Each process of a distributed run, scraped twice a second while it trains: its busy counters
 * (`switchyard_busy_seconds_total`, services/core/metrics/busy.ts) from the /metrics URL its log names,
 * so the suite can report every service's busy share over the timed steps.
 */
class RunBusySampler {
  private readonly urls = new Map<string, string>();
  private readonly samples = new Map<string, Array<{ steps: number; scrape: ServiceScrape }>>();
  private readonly timer: NodeJS.Timeout;
  private sampling = false;

  constructor(private readonly outDir: string) {
    this.timer = setInterval(() => void this.sample(), 500);
  }

  private async sample(): Promise<void> {
    if (this.sampling) return;
    this.sampling = true;
    try {
      const logs = join(this.outDir, 'logs');
      for (const file of (await readdir(logs).catch(() => [])).filter((f) => f.endsWith('.log'))) {
        const name = file.slice(0, -4);
        if (this.urls.has(name)) continue;
        const url = (await readFile(join(logs, file), 'utf8')).match(/metrics (http:\/\/\S+\/metrics)/)?.[1];
        if (url) this.urls.set(name, url);
      }
      const steps = (await readFile(join(this.outDir, 'metrics.jsonl'), 'utf8').catch(() => '')).split('\n').filter((l) => l.startsWith('{')).length;
      await Promise.all([...this.urls].map(async ([name, url]) => {
        const scrape = await scrapeBusy(url).catch(() => undefined); // gone at the end of the run
        if (!scrape) return;
        if (!this.samples.has(name)) this.samples.set(name, []);
        this.samples.get(name)!.push({ steps, scrape });
      }));
    } finally {
      this.sampling = false;
    }
  }

  /** Each process's busy share from its first scrape after `warmup` steps to its last (processes exit one by one). */
  stop(warmup: number): Map<string, Record<BusyMeasure, number>> {
    clearInterval(this.timer);
    const shares = new Map<string, Record<BusyMeasure, number>>();
    for (const [name, all] of this.samples) {
      const timed = all.filter((s) => s.steps > warmup);
      if (timed.length >= 2 && timed.at(-1)!.scrape.at - timed[0].scrape.at >= 1000) shares.set(name, busyShare(timed[0].scrape, timed.at(-1)!.scrape));
    }
    return shares;
  }
}

interface TrainConfig {
  name: string;
  /** The `--config FILE` JSON. */
  spec: { base: string; model?: Record<string, unknown>; train: Record<string, unknown> };
  warmup: number;
  /** Distributed runs' --micro-batches values; the first is the default (2), compared with the single process against the target. */
  microBatches: number[];
}

/**
 * `medium`'s layer shape (hidden 1024, intermediate 2048, 16 heads / 4 KV heads, 8 experts top-2) with
 * fewer layers: all 8 cannot train in one wasm process (4 GB heap; weights, gradients, Adam moments and
 * the transposed and XNNPACK-packed expert copies take ≈ 1.4 GB per layer), and the single process is
 * the reference. SWITCHYARD_BENCH_TRAIN_MEDIUM_LAYERS overrides.
 */
function mediumLayers(): number {
  const raw = process.env.SWITCHYARD_BENCH_TRAIN_MEDIUM_LAYERS?.trim();
  if (!raw) return 2;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1 || n > 8) throw new RangeError(`SWITCHYARD_BENCH_TRAIN_MEDIUM_LAYERS='${raw}' must be an integer in [1, 8]`);
  return n;
}

function configs(quick: boolean): TrainConfig[] {
  const noEval = { eval_interval: 100_000, eval_batches: 1, checkpoint_interval: 100_000 };
  const small: TrainConfig = {
    name: 'small',
    spec: { base: 'small', train: { steps: quick ? 8 : 30, routing_group_tokens: 128 } },
    warmup: 2,
    microBatches: [2, 1],
  };
  const layers = mediumLayers();
  const medium: TrainConfig = {
    name: `medium shape, ${layers} layers`,
    spec: {
      base: 'medium', model: { num_hidden_layers: layers },
      train: { steps: quick ? 4 : 12, batch_sequences: 8, seq_len: 128, routing_group_tokens: 128, warmup_steps: 1, ...noEval },
    },
    warmup: 1,
    microBatches: [2],
  };
  return [small, medium];
}

export async function trainingSuite(quick: boolean): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'switchyard-bench-training-'));
  const rows: BenchRow[] = [];
  const context: Record<string, unknown> = {
    quick, lossTolerance: LOSS_TOLERANCE,
    note: 'validation steps excluded; all processes share this machine\'s cores; every distributed run\'s losses checked against the single process\'s before reporting',
  };
  try {
    for (const c of configs(quick)) {
      const file = join(dir, `${c.name.replace(/\W+/g, '-')}.json`);
      await writeFile(file, JSON.stringify(c.spec));
      const common = ['train', '--config', file];
      const singleDir = join(dir, `${c.name}-single`.replace(/\W+/g, '-'));
      const t0 = performance.now();
      await run([...common, '--single-process', '--out', singleDir]);
      const singleRecords = await records(singleDir);
      const single = stepRates(singleRecords, c.warmup);
      const seconds: Record<string, number> = { single: (performance.now() - t0) / 1000 };
      rows.push({ name: `${c.name}: single process: tokens/s (median step)`, value: single.tokensPerSecond, unit: 'tokens/s' });
      const perMicroBatches = new Map<number, number>();
      const checks: Record<string, number> = {};
      for (const m of c.microBatches) {
        const label = `${c.name}: 2 routers × 2 shards, ${m} micro-batch${m === 1 ? '' : 'es'}`;
        const out = join(dir, `${c.name}-m${m}`.replace(/\W+/g, '-'));
        const t1 = performance.now();
        const sampler = new RunBusySampler(out);
        let busy: Map<string, Record<BusyMeasure, number>>;
        try {
          await run([...common, '--routers', '2', '--shards', '2', '--micro-batches', String(m), '--out', out]);
        } finally {
          busy = sampler.stop(c.warmup);
        }
        seconds[`m=${m}`] = (performance.now() - t1) / 1000;
        const got = await records(out);
        // Nothing is reported for a run that did not train what the single process trained.
        const worst = checkSameLosses(label, got, singleRecords);
        checks[`m=${m}`] = worst;
        const d = stepRates(got, c.warmup);
        if (d.allreduceSeconds === undefined) throw new Error(`${label}: metrics.jsonl has no all-reduce figures`);
        perMicroBatches.set(m, d.tokensPerSecond);
        process.stderr.write(`training: ${label}: ${d.tokensPerSecond.toFixed(0)} tokens/s vs ${single.tokensPerSecond.toFixed(0)} in one process; ` +
          `checked ${got.length} steps' losses, worst relative difference ${worst.toExponential(2)}\n`);
        rows.push(
          speedupRow(`${label}: tokens/s`, d.tokensPerSecond, 'tokens/s', single.tokensPerSecond, m === 2 ? { min: 1.3 } : undefined),
          { name: `${label}: worst step loss vs single process (checked <= 1e-4)`, value: worst, unit: 'rel' },
          { name: `${label}: dense all-reduce per step`, value: d.allreduceSeconds * 1000, unit: 'ms' },
          { name: `${label}: dense all-reduce payload per router`, value: d.allreduceBytes! / 1e6, unit: 'MB' },
          ...[...busy].sort(([a], [b]) => (a < b ? -1 : 1)).flatMap(([name, share]) => BUSY_MEASURES.map((measure) => ({
            name: `${label}: busy share, ${name} ${measure.replace('_', ' ')}`, value: share[measure], unit: 'share',
          }))),
        );
        if (busy.size) {
          const cores = [...busy.values()].reduce((sum, share) => sum + share.cpu, 0);
          rows.push({ name: `${label}: busy share, all processes' cpu (core-seconds per second)`, value: cores, unit: 'cores', anchor: availableParallelism(), ratio: cores / availableParallelism() });
        }
      }
      if (perMicroBatches.has(1) && perMicroBatches.has(2)) {
        const [m2, m1] = [perMicroBatches.get(2)!, perMicroBatches.get(1)!];
        rows.push({ name: `${c.name}: 2 routers × 2 shards, 2 micro-batches vs 1: tokens/s`, value: m2, unit: 'tokens/s', anchor: m1, ratio: m2 / m1 });
      }
      context[c.name] = { config: c.spec, warmupStepsExcluded: c.warmup, timedSteps: single.timedSteps, worstLossDifference: checks, seconds };
    }
    await report('training', rows, context);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
