// Distributed training (2 routers × 2 shards as real processes on 127.0.0.1) against the single-process
// reference: same losses and weights, identical replicas, recovery from a killed shard, and a crash in
// the middle of a checkpoint write.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset, type TrainSettings } from '../services/core/config.js';
import { loadCheckpoint } from '../services/core/checkpoint/index.js';
import { loadModel } from '../services/core/checkpoint/model.js';
import { checkpointDirOf, metricsFileOf, train } from '../services/core/train/trainer.js';
import { runCli } from './support/cli.js';
import { startService, type RunningService } from './support/services.js';
import { until } from './support/until.js';
import { repoRoot } from './support/paths.js';

await initBackend();
const root = await mkdtemp(join(tmpdir(), 'switchyard-dist-'));
after(() => rm(root, { recursive: true, force: true }));

const tiny = preset('tiny');
type Record_ = Record<string, number>;

async function metrics(outDir: string): Promise<Record_[]> {
  return (await readFile(metricsFileOf(outDir), 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as Record_);
}

/** Single-process reference runs, by step count (cached: several tests share them). */
const references = new Map<number, Promise<string>>();
function reference(settings: TrainSettings): Promise<string> {
  const key = settings.steps * 1000 + settings.checkpoint_interval;
  if (!references.has(key)) {
    const out = join(root, `reference-${key}`);
    references.set(key, train({ model: tiny.model, train: settings, outDir: out }).then(() => out));
  }
  return references.get(key)!;
}

async function configFile(name: string, train: Partial<TrainSettings>): Promise<string> {
  const path = join(root, `${name}.json`);
  await writeFile(path, JSON.stringify({ base: 'tiny', train }));
  return path;
}

/** Asserts every loss within 1e-4 relative; returns the worst relative difference. */
function assertLossesEqual(got: Record_[], want: Record_[], fromStep = 1): number {
  assert.equal(got.length, want.length, 'steps');
  let worst = 0;
  for (let i = fromStep - 1; i < want.length; i++) {
    assert.equal(got[i].step, want[i].step);
    const rel = Math.abs(got[i].loss - want[i].loss) / Math.abs(want[i].loss);
    assert.ok(rel <= 1e-4, `step ${want[i].step}: loss ${got[i].loss} vs ${want[i].loss} (relative ${rel})`);
    worst = Math.max(worst, rel);
  }
  return worst;
}

/** Max over tensors of max|a−b| / max|b|. */
async function weightsDifference(dirA: string, dirB: string): Promise<{ worst: number; tensors: number }> {
  const a = await loadCheckpoint(dirA);
  const b = await loadCheckpoint(dirB);
  assert.deepEqual([...a.tensors.keys()].sort(), [...b.tensors.keys()].sort());
  let worst = 0;
  for (const [name, tb] of b.tensors) {
    const ta = a.tensors.get(name)!;
    let diff = 0;
    let scale = 0;
    for (let i = 0; i < tb.values.length; i++) {
      diff = Math.max(diff, Math.abs(ta.values[i] - tb.values[i]));
      scale = Math.max(scale, Math.abs(tb.values[i]));
    }
    worst = Math.max(worst, diff / Math.max(scale, 1e-30));
  }
  return { worst, tensors: b.tensors.size };
}

async function jsonLines(file: string): Promise<Array<Record<string, unknown>>> {
  return (await readFile(file, 'utf8')).split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
}


/** `switchyard train` in its own process group, so a test can kill the whole run at once. */
function startTrain(args: string[], env: Record<string, string> = {}): { child: ChildProcess; exit: Promise<number | null>; output: () => string } {
  const child = spawn(process.execPath, [join(repoRoot, 'dist', 'services', 'cli', 'main.js'), 'train', ...args], {
    cwd: repoRoot, env: { ...process.env, ...env }, detached: true, stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout!.on('data', (d: Buffer) => { output += d.toString(); });
  child.stderr!.on('data', (d: Buffer) => { output += d.toString(); });
  const exit = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, exit, output: () => output };
}

function killGroup(child: ChildProcess): void {
  try {
    process.kill(-child.pid!, 'SIGKILL');
  } catch {
    // already gone
  }
}

test('2 routers × 2 shards train exactly like one process: every loss and the final weights within 1e-4', async () => {
  const ref = await reference(tiny.train);
  const out = join(root, 'dist');
  const run = await runCli(['train', '--config', 'tiny', '--routers', '2', '--shards', '2', '--out', out]);
  assert.equal(run.code, 0, run.stderr);
  assert.match(run.stdout, /trained 20 steps/);
  const got = await metrics(out);
  assertLossesEqual(got, await metrics(ref));
  for (const r of got) assert.ok(r.allreduce_bytes > 0 && r.allreduce_s >= 0, 'all-reduce figures in metrics.jsonl');
  // Router replicas stay bit-identical: same dense weights after every step.
  const digests = async (router: string) => (await jsonLines(join(out, 'logs', `${router}.log`))).filter((r) => r.msg === 'step applied').map((r) => r.dense_digest);
  const [d0, d1] = [await digests('router-0'), await digests('router-1')];
  assert.equal(d0.length, 20);
  assert.deepEqual(d1, d0);
  const { worst, tensors } = await weightsDifference(checkpointDirOf(out), checkpointDirOf(ref));
  assert.equal(tensors, 3 + tiny.model.num_hidden_layers * (7 + 3 * tiny.model.num_local_experts), "every tensor of the model");
  assert.ok(worst <= 1e-4, `final weights differ by ${worst} (relative)`);
  // The cluster checkpoint is an ordinary sharded Hugging Face checkpoint with every part in the index.
  const files = await readdir(checkpointDirOf(out));
  for (const f of ['model.safetensors.index.json', 'optimizer.safetensors.index.json', 'model-router-0.safetensors', 'model-shard-0.safetensors', 'model-shard-1.safetensors'])
    assert.ok(files.includes(f), `${f} in the checkpoint`);
  (await loadModel(checkpointDirOf(out))).dispose();
});

test('switch with Random Token Selection and capacity drops: 2 routers keep exactly the tokens one process keeps', async () => {
  // the counter-based selection stream is keyed by global token index, so each replica draws the
  // single-process uniforms of its half of the batch
  const gate = { ...tiny.model.switchyard_gate, policy: 'switch' as const, capacity_factor: 0.5 };
  const model = { ...tiny.model, num_experts_per_tok: 1, switchyard_gate: gate };
  const settings = { ...tiny.train, steps: 5, checkpoint_interval: 5, eval_interval: 5 };
  const ref = join(root, 'rts-reference');
  await train({ model, train: settings, outDir: ref });
  const config = join(root, 'rts.json');
  await writeFile(config, JSON.stringify({ base: 'tiny', model: { num_experts_per_tok: 1, switchyard_gate: gate }, train: { steps: 5, checkpoint_interval: 5, eval_interval: 5 } }));
  const out = join(root, 'rts-dist');
  // One lane per router pass: micro-batches change where float32 rounding falls, and capacity dropping
  // turns a last-bit difference in a gate logit into a different kept token a few steps later; the
  // kept tokens here must match exactly (test/pipeline-cluster.test.ts covers the lanes).
  const run = await runCli(['train', '--config', config, '--routers', '2', '--shards', '2', '--micro-batches', '1', '--out', out]);
  assert.equal(run.code, 0, run.stderr);
  const [got, want] = [await metrics(out), await metrics(ref)];
  assert.ok(want.every((r) => r.dropped_fraction > 0), 'every step drops tokens');
  assert.deepEqual(got.map((r) => r.dropped_fraction), want.map((r) => r.dropped_fraction));
  assertLossesEqual(got, want);
  const { worst } = await weightsDifference(checkpointDirOf(out), checkpointDirOf(ref));
  assert.ok(worst <= 1e-4, `final weights differ by ${worst} (relative)`);
});

test('a replicated expert: rows split over both holders, replicas identical after every step, losses still equal', async () => {
  const ref = await reference(tiny.train);
  const out = join(root, 'replicated');
  const run = await runCli(['train', '--config', 'tiny', '--routers', '2', '--shards', '2', '--replicate', '0:1,1:2', '--out', out]);
  assert.equal(run.code, 0, run.stderr);
  assertLossesEqual(await metrics(out), await metrics(ref));
  const { worst } = await weightsDifference(checkpointDirOf(out), checkpointDirOf(ref));
  assert.ok(worst <= 1e-4, `final weights differ by ${worst} (relative)`);
  const applied = async (shard: string) => (await jsonLines(join(out, 'logs', `${shard}.log`))).filter((r) => r.msg === 'step applied') as Array<{ step: number; replicas: Record<string, string>; replica_rows: Record<string, number> }>;
  const [a, b] = [await applied('shard-0'), await applied('shard-1')];
  assert.equal(a.length, 20);
  assert.equal(b.length, 20);
  for (let i = 0; i < 20; i++) {
    assert.deepEqual(Object.keys(a[i].replicas).sort(), ['0/1', '1/2']);
    assert.deepEqual(a[i].replicas, b[i].replicas, `replica digests after step ${i + 1}`);
  }
  // Both holders computed rows of each replicated expert (the routers split its rows among replicas).
  for (const key of ['0/1', '1/2']) {
    assert.ok(a.some((r) => r.replica_rows[key] > 0), `shard-0 served rows of ${key}`);
    assert.ok(b.some((r) => r.replica_rows[key] > 0), `shard-1 served rows of ${key}`);
  }
});

test('kill -9 a shard at step 7 of 15: it is restarted, the run rolls back to its checkpoint and finishes with the same losses', async () => {
  const settings = { ...tiny.train, steps: 15, checkpoint_interval: 5 };
  const ref = await reference(settings);
  const out = join(root, 'killed');
  const run = startTrain(['--config', await configFile('kill', { steps: 15, checkpoint_interval: 5 }), '--routers', '2', '--shards', '2', '--out', out]);
  try {
    await until('step 7', async () => ((await metrics(out)).length >= 7 ? true : undefined));
    // Training metrics are live on Prometheus while the run goes on.
    const routerLog = await readFile(join(out, 'logs', 'router-0.log'), 'utf8');
    const url = routerLog.match(/metrics (http:\/\/\S+\/metrics)/)![1];
    const pids = JSON.parse(await readFile(join(out, 'logs', 'processes.json'), 'utf8')) as Record<string, number>;
    process.kill(pids['shard-1'], 'SIGKILL');
    const text = await (await fetch(url)).text();
    assert.match(text, /^switchyard_train_step [1-9]/m);
    assert.match(text, /^switchyard_train_loss \d/m);
    assert.match(text, /^switchyard_allreduce_bytes_total\{group="dense"\} [1-9]/m);
    assert.match(text, /^switchyard_train_expert_tokens_total\{layer="0",expert="0",stage="routed"\} [1-9]/m);
    assert.match(text, /^switchyard_train_tokens_per_second \d/m);
    assert.equal(await run.exit, 0, run.output());
  } finally {
    killGroup(run.child);
  }
  assert.match(run.output(), /shard-1 exited \(SIGKILL\); restarting it/);
  const coordinator = await jsonLines(join(out, 'logs', 'coordinator.log'));
  const aborts = coordinator.filter((r) => r.msg === 'training attempt aborted');
  const resumes = coordinator.filter((r) => r.msg === 'training attempt started').map((r) => r.resume_step);
  assert.ok(aborts.length >= 1, 'the step in flight was aborted');
  assert.ok(resumes.length >= 2 && resumes.slice(1).every((s) => s === 5 || s === 10), `resumed from a committed checkpoint: ${resumes.join(', ')}`);
  assertLossesEqual(await metrics(out), await metrics(ref));
});

test('Ctrl-C stops a distributed run at once: every shard ends its step protocol calls and exits as stopped, not failed', async () => {
  const out = join(root, 'interrupted');
  const run = startTrain(['--config', 'tiny', '--steps', '2000', '--routers', '1', '--shards', '2', '--out', out]);
  try {
    await until('step 3', async () => ((await metrics(out)).length >= 3 ? true : undefined));
    // A terminal's Ctrl-C: SIGINT to the whole process group (train and every service it started).
    process.kill(-run.child.pid!, 'SIGINT');
    assert.equal(await run.exit, 130, run.output());
  } finally {
    killGroup(run.child);
  }
  assert.doesNotMatch(run.output(), /did not stop within/);
  for (const shard of ['shard-0', 'shard-1']) {
    const records = await jsonLines(join(out, 'logs', `${shard}.log`));
    assert.ok(records.some((r) => r.msg === 'training stopped'), `${shard} stopped`);
    assert.ok(!records.some((r) => r.msg === 'training failed'), `${shard} did not fail`);
  }
});

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

test('a crash while a checkpoint is written leaves the previous one loadable, and --resume finishes the run exactly', async () => {
  const settings = { ...tiny.train, steps: 12, checkpoint_interval: 4 };
  const ref = await reference(settings);
  const out = join(root, 'crashed');
  const config = await configFile('crash', { steps: 12, checkpoint_interval: 4 });
  const ckpt = checkpointDirOf(out);
  const run = startTrain(['--config', config, '--routers', '2', '--shards', '2', '--out', out], { SWITCHYARD_TEST_CHECKPOINT_DELAY_MS: '1500' });
  try {
    // Wait until a shard's part of the step-8 checkpoint is on disk but the checkpoint is not committed.
    const stagingOf8 = async () => (await readdir(out)).find((f) => /^checkpoint\.tmp-g\d+-s8$/.test(f));
    await until('a staged part of checkpoint 8', async () => {
      const staging = await stagingOf8();
      return staging && (await readdir(join(out, staging))).some((f) => f.startsWith('model-shard-')) ? true : undefined;
    });
    killGroup(run.child);
    // The children notice their parent is gone and stop too.
    await run.exit;
  } finally {
    killGroup(run.child);
  }
  const state = JSON.parse(await readFile(join(ckpt, 'trainer_state.json'), 'utf8')) as { step: number };
  assert.equal(state.step, 4, 'the committed checkpoint is still step 4');
  (await loadModel(ckpt)).dispose();
  const staged = (await readdir(out)).filter((f) => /^checkpoint\.tmp-g\d+-s8$/.test(f));
  assert.equal(staged.length, 1, 'the half-written checkpoint was left in its staging folder');
  // The killed run's children (they poll for their parent) are gone before the run restarts.
  const orphans = Object.values(JSON.parse(await readFile(join(out, 'logs', 'processes.json'), 'utf8')) as Record<string, number>);
  await until('the killed run\'s services exited', async () => (orphans.every((pid) => !isAlive(pid)) ? true : undefined), 30_000, 50);
  const resumed = await runCli(['train', '--config', config, '--routers', '2', '--shards', '2', '--out', out, '--resume']);
  assert.equal(resumed.code, 0, resumed.stderr);
  assertLossesEqual(await metrics(out), await metrics(ref), 5);
  assert.ok(!existsSync(join(out, staged[0])), 'stale staging folders are cleaned up');
  const { worst } = await weightsDifference(ckpt, checkpointDirOf(ref));
  assert.ok(worst <= 1e-4, `final weights differ by ${worst} (relative)`);
});

test('a shard added at step 5 of 12 gets experts at the next step boundary (with their optimizer state): losses equal the run without it', async (t) => {
  const changes = { steps: 12, checkpoint_interval: 100 };
  const ref = await reference({ ...tiny.train, ...changes });
  const out = join(root, 'scaled-up');
  // Steps stretched so the new process starts while the run goes on.
  const run = startTrain(['--config', await configFile('scale-up', changes), '--routers', '1', '--shards', '2', '--out', out], { SWITCHYARD_TEST_STEP_DELAY_MS: '700' });
  let extra: RunningService | undefined;
  try {
    await until('step 5', async () => ((await metrics(out)).length >= 5 ? true : undefined));
    const coordinator = run.output().match(/coordinator (127\.0\.0\.1:\d+)/)![1];
    extra = await startService(['serve', 'expert', '--train', '--experts', 'none', '--checkpoint', checkpointDirOf(out), '--port', '0',
      '--coordinator', coordinator, '--shard-id', 'shard-new'], /listening on/);
    assert.equal(await run.exit, 0, run.output());
  } finally {
    killGroup(run.child);
    await extra?.stop();
  }
  const extraOutput = extra?.stderr() ?? '';
  const coordinator = await jsonLines(join(out, 'logs', 'coordinator.log'));
  const change = coordinator.find((r) => r.msg === 'training attempt ended for a placement change');
  assert.ok(change, `the placement changed during the run: ${JSON.stringify(coordinator.map((r) => r.msg))} ${extraOutput}`);
  assert.equal(coordinator.filter((r) => r.msg === 'training attempt aborted').length, 0, 'no failure');
  const attempts = coordinator.filter((r) => r.msg === 'training attempt started') as Array<{ members: string[]; resume_step: number }>;
  const last = attempts.at(-1)!;
  assert.ok(last.members.includes('shard-new'), `the new shard trains: ${last.members.join(', ')}`);
  assert.ok(last.resume_step >= 5 && last.resume_step < 12, `resumed at the boundary after step ${last.resume_step}`);
  const planned = coordinator.find((r) => r.msg === 'training placement planned') as { assignment: Record<string, number>; loads: number } | undefined;
  assert.ok(planned && planned.assignment['shard-new'] > 0 && planned.loads > 0, `experts moved to the new shard: ${JSON.stringify(planned)}`);
  const lossDiff = assertLossesEqual(await metrics(out), await metrics(ref));
  const { worst } = await weightsDifference(checkpointDirOf(out), checkpointDirOf(ref));
  assert.ok(worst <= 1e-4, `final weights differ by ${worst} (relative)`);
  t.diagnostic(`shard joined after step ${last.resume_step}; ${planned.loads} experts moved to it; worst loss difference ${lossDiff.toExponential(2)}, final weights ${worst.toExponential(2)} (relative)`);
});
