import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { createInterface } from 'node:readline';
import { BENCH_SUITES } from '../services/bench/index.js';
import { peerPython } from '../services/bench/peer.js';
import { EXIT_WITH_PARENT_ENV } from '../services/cli/supervisor.js';
import { runCli } from './support/cli.js';
import { startService } from './support/services.js';
import { makeTlsEnv } from './support/pki.js';
import { repoRoot } from './support/paths.js';
import { until } from './support/until.js';

const root = await mkdtemp(join(tmpdir(), 'switchyard-cli-'));
after(() => rm(root, { recursive: true, force: true }));

test('train --single-process writes a checkpoint and metrics; generate continues a prompt', async () => {
  const out = join(root, 'run');
  const trained = await runCli(['train', '--config', 'tiny', '--steps', '6', '--single-process', '--out', out]);
  assert.equal(trained.code, 0, trained.stderr);
  // Whichever backend starts first here (wasm without the optional native packages) is announced.
  assert.match(trained.stderr, /compute backend: (tensorflow-gpu|tensorflow|wasm|cpu) \(tfjs '\w+'.*\d+ threads?\)/);
  assert.match(trained.stdout, /trained 6 steps on Moby Dick/);
  const lines = (await readFile(join(out, 'metrics.jsonl'), 'utf8')).trim().split('\n');
  assert.equal(lines.length, 6);
  const gen = await runCli(['generate', '--model', join(out, 'checkpoint'), '--prompt', 'Ahab', '--max-tokens', '12', '--temperature', '0']);
  assert.equal(gen.code, 0, gen.stderr);
  assert.ok(gen.stdout.startsWith('Ahab'));
});

test('a JSON config file overrides a base preset, and an invalid one lists every problem', async () => {
  const good = join(root, 'good.json');
  await writeFile(good, JSON.stringify({ base: 'tiny', model: { num_local_experts: 6 }, train: { steps: 2, batch_sequences: 2 } }));
  const out = join(root, 'file-run');
  const r = await runCli(['train', '--config', good, '--out', out]);
  assert.equal(r.code, 0, r.stderr);
  const config = JSON.parse(await readFile(join(out, 'checkpoint', 'config.json'), 'utf8'));
  assert.equal(config.num_local_experts, 6);
  assert.equal(config.model_type, 'mixtral');
  const bad = join(root, 'bad.json');
  await writeFile(bad, JSON.stringify({ base: 'tiny', model: { num_experts_per_tok: 9, hidden_size: 30, switchyard_gate: { capacity_factor: 0 } } }));
  const refused = await runCli(['train', '--config', bad, '--out', join(root, 'bad-run')]);
  assert.equal(refused.code, 2);
  assert.match(refused.stderr, /num_experts_per_tok \(k=9\) exceeds num_local_experts \(4\)/);
  assert.match(refused.stderr, /hidden_size 30 is not divisible by num_attention_heads 4/);
  assert.match(refused.stderr, /capacity factor must be > 0/);
  const notJson = join(root, 'not.json');
  await writeFile(notJson, '{ nope');
  const unreadable = await runCli(['train', '--config', notJson]);
  assert.equal(unreadable.code, 2);
  assert.match(unreadable.stderr, /not valid JSON/);
});

test('bad input gets a clear message and exit code 2', async () => {
  const cases: Array<[string[], RegExp]> = [
    [['train', '--config', 'nonexistent'], /neither a preset .* nor a file/],
    [['train', '--config', 'tiny', '--routers', '3', '--shards', '2', '--out', join(root, 'uneven')], /does not split over 3 routers/],
    [['generate', '--model', join(root, 'missing')], /does not exist/],
    [['train', '--config', 'tiny', '--data', join(root, 'no-such-file.txt')], /no-such-file/],
    [['train', '--config', 'tiny', '--out', join(root, 'never-trained'), '--resume'], /--resume: no checkpoint in/],
    [['serve', 'expert', '--checkpoint', join(root, 'missing'), '--experts', 'none'], /--experts none needs --coordinator/],
  ];
  for (const [args, message] of cases) {
    const r = await runCli(args);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, message);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace for user errors');
  }
  const steps = await runCli(['train', '--steps', 'zero']);
  assert.notEqual(steps.code, 0);
  assert.match(steps.stderr, /--steps must be an integer/);
  const shards = await runCli(['up', '--shards', '0']);
  assert.notEqual(shards.code, 0);
  assert.match(shards.stderr, /--shards must be an integer ≥ 1/);
});

function nativeInstalled(pkg: string): boolean {
  try {
    createRequire(import.meta.url).resolve(pkg);
    return true;
  } catch {
    return false;
  }
}

test('SWITCHYARD_BACKEND forces a backend and rejects unknown names', async () => {
  const out = join(root, 'cpu-run');
  const forced = await runCli(['train', '--config', 'tiny', '--steps', '1', '--single-process', '--out', out], { SWITCHYARD_BACKEND: 'cpu' });
  assert.equal(forced.code, 0, forced.stderr);
  assert.match(forced.stderr, /compute backend: cpu \(tfjs 'cpu', 1 thread\)/);
  const bad = await runCli(['train', '--config', 'tiny', '--steps', '1', '--out', out], { SWITCHYARD_BACKEND: 'quantum' });
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /SWITCHYARD_BACKEND='quantum' is not one of tensorflow-gpu, tensorflow, wasm, cpu/);
  const native = await runCli(['train', '--config', 'tiny', '--steps', '1', '--single-process', '--out', join(root, 'native-run')], { SWITCHYARD_BACKEND: 'tensorflow' });
  // tfjs-node is an optional dependency whose install needs the internet: where it is installed, forcing it
  // must run on it; where it is absent, forcing it must fail loudly instead of falling back.
  if (nativeInstalled('@tensorflow/tfjs-node')) {
    assert.equal(native.code, 0, native.stderr);
    assert.match(native.stderr, /compute backend: tensorflow \(tfjs 'tensorflow'/);
  } else {
    assert.equal(native.code, 1, native.stderr);
    assert.match(native.stderr, /backend 'tensorflow' forced by SWITCHYARD_BACKEND could not start/);
    assert.doesNotMatch(native.stderr, /compute backend:/, 'no other backend was started instead');
  }
});

test('SWITCHYARD_WASM_THREADS runs wasm multi-threaded with the same numbers as one thread', async () => {
  const losses: number[][] = [];
  for (const threads of ['1', '2']) {
    const out = join(root, `threads-${threads}`);
    const r = await runCli(['train', '--config', 'tiny', '--steps', '3', '--out', out], { SWITCHYARD_BACKEND: 'wasm', SWITCHYARD_WASM_THREADS: threads });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, new RegExp(`compute backend: wasm \\(tfjs 'wasm', SIMD, ${threads} threads?\\)`));
    losses.push((await readFile(join(out, 'metrics.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l).loss as number));
  }
  assert.deepEqual(losses[1], losses[0]);
  const bad = await runCli(['train', '--config', 'tiny', '--steps', '1', '--out', join(root, 'threads-bad')], { SWITCHYARD_WASM_THREADS: 'many' });
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /SWITCHYARD_WASM_THREADS='many' must be a positive integer/);
});

test('a training run the bench starts stops by itself when the bench is killed outright', async () => {
  // A stand-in for the bench: starts `train` as the training suite does (exit-with-parent), then gets SIGKILL.
  const bench = spawn(process.execPath, ['-e', `
    const child = require('node:child_process').spawn(process.execPath, ${JSON.stringify([join(repoRoot, 'dist', 'services', 'cli', 'main.js'), 'train', '--config', 'tiny', '--steps', '1000000', '--single-process', '--out', join(root, 'orphan')])},
      { stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, ${EXIT_WITH_PARENT_ENV}: '1' } });
    console.log(child.pid);
    setInterval(() => {}, 1000);`], { stdio: ['ignore', 'pipe', 'pipe'] });
  const lines = createInterface({ input: bench.stdout! });
  const train = Number(await new Promise<string>((resolve) => lines.once('line', resolve)));
  const alive = () => { try { process.kill(train, 0); return true; } catch { return false; } };
  try {
    // Once the backend is announced, train watches its parent.
    await new Promise<void>((resolve) => createInterface({ input: bench.stderr! }).on('line', (line) => { if (/compute backend/.test(line)) resolve(); }));
    bench.kill('SIGKILL');
    await until('the orphaned training run to stop', async () => (alive() ? undefined : true), 30_000, 100);
  } finally {
    if (alive()) process.kill(train, 'SIGKILL');
  }
});

test('bench --quick runs every suite and reports each target as a ratio', async () => {
  const dir = join(root, 'bench');
  await mkdir(dir);
  // moe-layer's medium expert shape, training's medium-shape runs and the serving suite's cluster per
  // micro-batch setting (issue 16) take the quick run past 5 minutes on 2 cores.
  const r = await runCli(['bench', '--quick'], {}, dir, 900_000);
  assert.equal(r.code, 0, r.stderr);
  type Summary = { rows: Array<{ name: string; value: number; unit: string; anchor?: number; ratio?: number; target?: string }>; context: Record<string, unknown> };
  const results = new Map<string, Summary>();
  for (const suite of BENCH_SUITES) {
    assert.match(r.stdout, new RegExp(`== ${suite} ==`));
    results.set(suite, JSON.parse(await readFile(join(dir, 'bench-results', `${suite}.json`), 'utf8')) as Summary);
  }
  for (const [suite, { rows }] of results) {
    for (const row of rows.filter((row) => row.target)) assert.ok(Number.isFinite(row.ratio), `${suite}: '${row.name}' has a target (${row.target}) but no ratio`);
  }
  const rows = (suite: string) => results.get(suite)!.rows;
  const forward = rows('compute').find((row) => row.name.startsWith('expert forward'));
  const backward = rows('compute').find((row) => row.name.startsWith('expert backward'));
  assert.ok(forward && forward.ratio! > 0 && forward.target === '>= 0.8');
  assert.ok(backward && backward.ratio! > 0 && backward.target === '>= 0.6');
  const moe = rows('moe-layer').filter((row) => row.target === '>= 1.3');
  assert.ok(moe.length >= 1 && moe.every((row) => row.ratio! > 0), 'distributed MoE layer measured against one process');
  assert.ok(rows('moe-layer').some((row) => row.name.includes('max|Δy| / max|y|')), 'the distributed output checked against one process');
  const wire = rows('wire');
  assert.ok(wire.filter((row) => row.target === '<= 1.02').every((row) => row.ratio! >= 1), 'wire bytes per row measured against raw bytes');
  assert.ok(wire.some((row) => row.name.startsWith('grpc-js bidi stream') && row.ratio! > 0), 'grpc-js stream against raw TCP');
  const serving = rows('serving');
  for (const label of ['small in-process', 'medium in-process'])
    for (const concurrency of [1, 8]) {
      const name = `${label}, ${concurrency} concurrent: throughput`;
      assert.ok(serving.find((row) => row.name === name && row.unit === 'tokens/s')?.value! > 0, name);
      if (label.endsWith('in-process'))
        for (const measure of ['TTFT p50', 'TTFT p99', 'TPOT median', 'latency p99'])
          assert.ok(serving.find((row) => row.name === `${label}, ${concurrency} concurrent: ${measure}`)?.value! > 0, `${label}, ${concurrency} concurrent: ${measure}`);
    }
  // The cluster per micro-batch setting, against the in-process engine and m = 1, with each service's busy share.
  for (const m of [1, 2]) {
    const name = `medium cluster, 8 concurrent, m=${m}: decode throughput (concurrency / TPOT) vs in-process`;
    assert.ok(serving.find((row) => row.name === name)?.ratio! > 0, name);
    for (const service of ['router-0', 'shard-0', 'shard-1'])
      for (const measure of ['event loop', 'cpu'])
        assert.ok(serving.some((row) => row.name === `medium cluster, 8 concurrent, m=${m}: busy share, ${service} ${measure}` && row.value > 0), `m=${m}: ${service} ${measure} busy share`);
  }
  assert.ok(serving.find((row) => row.name === 'medium cluster, 8 concurrent, m=2 vs m=1: decode throughput')?.ratio! > 0, 'm=2 against m=1');
  const prefix = serving.find((row) => row.name.startsWith('medium in-process, prefix reuse') && row.target === '>= 5');
  assert.ok(prefix && prefix.ratio! > 0, 'prefix reuse: first TTFT / second, with its target');
  assert.ok(serving.find((row) => /^medium in-process, \d+ concurrent, context 128: TPOT median$/.test(row.name))?.value! > 0, 'context curve at L=128');
  const allreduce = rows('allreduce').filter((row) => row.target === '>= 0.5');
  assert.ok(allreduce.length >= 1 && allreduce.every((row) => row.ratio! > 0), 'all-reduce bandwidth against the raw stream ceiling');
  const training = rows('training').filter((row) => / 2 routers × 2 shards, 2 micro-batches: tokens\/s$/.test(row.name));
  assert.equal(training.length, 2, 'small and medium-shape distributed training');
  assert.ok(training.every((row) => row.ratio! > 0 && row.target === '>= 1.3'), 'distributed training tokens/s against one process');
  assert.ok(rows('training').some((row) => row.name === 'small: 2 routers × 2 shards, 2 micro-batches vs 1: tokens/s' && row.ratio! > 0), 'micro-batches 2 against 1');
  const load = rows('load');
  assert.ok(load.find((row) => row.name.startsWith('maximum sustainable'))!.value > 0);
  assert.equal(load.filter((row) => row.name.endsWith('share answered 503')).length, 3, '503 share at 50%, 100% and 200% of the maximum');
  const elastic = rows('elastic');
  const firstRow = elastic.find((row) => row.name.includes('first served row'));
  assert.ok(firstRow && firstRow.value > 0 && firstRow.anchor === 10 && firstRow.target === '< 1', 'registration → first served row of an added shard, against 10 s');
  const clients = elastic.find((row) => row.name.startsWith('load clients meanwhile'));
  assert.ok(clients && clients.anchor! > 0, 'shards were added under load, and the clients\' failures are counted');
  // The planner's target: on the held-out half, no worse than the default spread with the same shards and budget.
  const planned = elastic.filter((row) => row.name.endsWith(': planner max/mean (held-out half)'));
  assert.ok(planned.length > 0);
  for (const row of planned) {
    const label = row.name.slice(0, row.name.indexOf(': planner'));
    const spread = elastic.find((s) => s.name === `${label}: default spread max/mean (held-out half)`)!;
    assert.ok(row.value <= spread.value + 1e-9 && row.anchor === spread.value, `${label}: planner ${row.value} vs spread ${spread.value}`);
  }
  // The peer suite may skip only where the same interpreter cannot import torch for this test either.
  const peer = results.get('peer')!;
  if (peer.context.skipped) assert.notEqual(spawnSync(peerPython(), ['-c', 'import torch']).status, 0, `peer suite skipped: ${peer.context.skipped}`);
  else assert.ok(peer.rows.some((row) => row.name === 'Switchyard / PyTorch' && row.ratio! > 0), 'Switchyard against PyTorch');
  const unknown = await runCli(['bench', 'nosuch']);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /unknown bench suite/);
});

test('health answers 0 for a SERVING service, 1 for none; under mTLS it dials with the services\' certificates', async () => {
  const coordinatorReady = /coordinator listening on (\S+) /;
  const plain = await startService(['serve', 'coordinator', '--port', '0'], coordinatorReady);
  try {
    const address = plain.ready[1];
    const serving = await runCli(['health', address]);
    assert.equal(serving.code, 0, serving.stderr);
    assert.equal(serving.stdout, `${address}: SERVING\n`);
  } finally {
    await plain.stop();
  }
  const gone = await runCli(['health', plain.ready[1], '--timeout-ms', '500']);
  assert.equal(gone.code, 1);
  assert.match(gone.stdout, /no answer/);
  // Compose passes SWITCHYARD_TLS_* to the health check as to the service it checks.
  const tls = makeTlsEnv(join(root, 'pki'));
  const secured = await startService(['serve', 'coordinator', '--port', '0'], coordinatorReady, tls);
  try {
    const address = secured.ready[1];
    const withCertificates = await runCli(['health', address], tls);
    assert.equal(withCertificates.code, 0, withCertificates.stdout + withCertificates.stderr);
    const without = await runCli(['health', address, '--timeout-ms', '1000']);
    assert.equal(without.code, 1, 'a plaintext check cannot reach an mTLS service');
  } finally {
    await secured.stop();
  }
});
