// Bench output: a printed table per suite and a JSON file in bench-results/.
import { mkdir, writeFile } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { join, resolve } from 'node:path';

export interface BenchRow {
  name: string;
  value: number;
  unit: string;
  /** What the value is compared with (the ceiling or anchor), if anything. */
  anchor?: number;
  ratio?: number;
  target?: string;
  met?: boolean;
  /** Lowest and highest of the per-round values when `value` is their median (JSON only, not printed). */
  range?: [number, number];
}

export const BENCH_DIR = 'bench-results';

/** Headroom over the core count before a speed-up counts as impossible (timer noise, turbo, caches). */
export const POSSIBLE_SPEEDUP_SLACK = 1.1;

/**
 * Processes on this machine cannot do more than its cores allow: a distributed figure claiming more than
 * cores × 1.1 times the one-process figure of the same work is a measuring or checking error, and the
 * suite fails with the numbers. Both figures are rates (higher is better). Returns the ratio.
 */
export function checkPossibleSpeedup(label: string, distributed: number, oneProcess: number, cores = availableParallelism()): number {
  const ratio = distributed / oneProcess;
  const limit = cores * POSSIBLE_SPEEDUP_SLACK;
  if (!(oneProcess > 0) || !Number.isFinite(distributed) || ratio > limit)
    throw new Error(`${label}: ${fmt(distributed)} against ${fmt(oneProcess)} in one process is ${ratio.toFixed(3)}×, ` +
      `impossible on ${cores} cores (at most ${limit.toFixed(2)}×): the measurement or its check is wrong`);
  return ratio;
}

/**
 * How a figure past the guard is treated: a full run fails (a figure that cannot be true must not be
 * reported); a `--quick` run (a smoke run, as the test suite makes) takes a second or two per
 * measurement, where one disturbed one-process sample can pass the bound, so it marks the row as not
 * counted and goes on, instead of failing on timing.
 */
export const speedupGuard = { strict: true };

/**
 * A row comparing a distributed rate with the one-process rate of the same work: its ratio, the target
 * when there is one, and the physical-possibility check above (which throws unless speedupGuard says otherwise).
 */
export function speedupRow(name: string, value: number, unit: string, oneProcess: number, target?: { min: number }): BenchRow {
  let ratio: number;
  try {
    ratio = checkPossibleSpeedup(name, value, oneProcess);
  } catch (err) {
    if (speedupGuard.strict) throw err;
    process.stderr.write(`switchyard bench: ${(err as Error).message}; a quick run reports it as not counted\n`);
    return { name: `${name} (not counted: past the ${availableParallelism()}-core bound)`, value, unit, anchor: oneProcess, ratio: value / oneProcess, ...(target ? { target: `>= ${target.min}`, met: false } : {}) };
  }
  return { name, value, unit, anchor: oneProcess, ratio, ...(target ? { target: `>= ${target.min}`, met: ratio >= target.min } : {}) };
}

export function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Median seconds of `reps` calls (awaited when they return a promise) after one warm-up call. */
export async function timeMedian(reps: number, fn: () => void | Promise<void>): Promise<number> {
  await fn();
  const samples: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    await fn();
    samples.push((performance.now() - t0) / 1000);
  }
  return median(samples);
}

const fmt = (x: number | undefined, digits = 2): string =>
  x === undefined ? '' : Number.isInteger(x) ? String(x) : Math.abs(x) < 0.01 ? x.toExponential(digits) : x.toFixed(digits);

export async function report(suite: string, rows: BenchRow[], context: Record<string, unknown>): Promise<string> {
  const header = ['measure', 'value', 'unit', 'anchor', 'ratio', 'target', 'met'];
  const body = rows.map((r) => [r.name, fmt(r.value), r.unit, fmt(r.anchor), fmt(r.ratio, 3), r.target ?? '', r.met === undefined ? '' : r.met ? 'yes' : 'NO']);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  process.stdout.write(`\n== ${suite} ==\n${line(header)}\n${widths.map((w) => '-'.repeat(w)).join('  ')}\n${body.map(line).join('\n')}\n`);
  const dir = resolve(BENCH_DIR);
  await mkdir(dir, { recursive: true });
  const file = join(dir, `${suite}.json`);
  await writeFile(file, JSON.stringify({ suite, date: new Date().toISOString(), context, rows }, null, 2) + '\n');
  return file;
}
