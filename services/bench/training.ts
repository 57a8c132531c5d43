// training suite: tokens/s of the `small` model trained in one process versus 2 routers × 2 shards as
// processes on this machine (same global batch), from each run's metrics.jsonl (median step after warm-up).
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { EXIT_WITH_PARENT_ENV } from '../cli/supervisor.js';
import { median, report, type BenchRow } from './report.js';

const CLI = fileURLToPath(new URL('../cli/main.js', import.meta.url));

function run(args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    // The run stops when the bench is gone, even when the bench was killed outright.
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, [EXIT_WITH_PARENT_ENV]: '1' } });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`switchyard ${args.join(' ')} failed (${code}): ${stderr.slice(-2000)}`))));
  });
}

async function stepRates(outDir: string, warmup: number): Promise<{ tokensPerSecond: number; allreduceSeconds?: number; allreduceBytes?: number }> {
  const records = (await readFile(join(outDir, 'metrics.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as Record<string, number>)
    .filter((r) => r.step > warmup && r.val_loss === undefined); // validation steps include eval time
  return {
    tokensPerSecond: median(records.map((r) => r.tokens_per_s)),
    ...(records[0]?.allreduce_s !== undefined ? { allreduceSeconds: median(records.map((r) => r.allreduce_s)), allreduceBytes: records[0].allreduce_bytes } : {}),
  };
}

export async function trainingSuite(quick: boolean): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'switchyard-bench-training-'));
  const steps = quick ? 8 : 30;
  const warmup = 2;
  try {
    const common = ['train', '--config', 'small', '--steps', String(steps)];
    await run([...common, '--single-process', '--out', join(dir, 'single')]);
    await run([...common, '--routers', '2', '--shards', '2', '--out', join(dir, 'distributed')]);
    const single = await stepRates(join(dir, 'single'), warmup);
    const distributed = await stepRates(join(dir, 'distributed'), warmup);
    const rows: BenchRow[] = [
      { name: 'single process: tokens/s (median step)', value: single.tokensPerSecond, unit: 'tokens/s' },
      {
        name: '2 routers × 2 shards (5 processes): tokens/s', value: distributed.tokensPerSecond, unit: 'tokens/s',
        anchor: single.tokensPerSecond, ratio: distributed.tokensPerSecond / single.tokensPerSecond,
      },
      { name: 'dense all-reduce per step (2 routers)', value: distributed.allreduceSeconds! * 1000, unit: 'ms' },
      { name: 'dense all-reduce payload per router', value: distributed.allreduceBytes! / 1e6, unit: 'MB' },
    ];
    await report('training', rows, { quick, config: 'small', steps, warmup_steps_excluded: warmup, note: 'validation steps excluded; all processes share this machine\'s cores' });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
