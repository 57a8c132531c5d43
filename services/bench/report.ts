// Bench output: a printed table per suite and a JSON file in bench-results/.
import { mkdir, writeFile } from 'node:fs/promises';
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

const fmt = (x: number | undefined, digits = 2): string => (x === undefined ? '' : Number.isInteger(x) ? String(x) : x.toFixed(digits));

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
