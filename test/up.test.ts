import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { cp, mkdir, mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { startService, type RunningService } from './support/services.js';
import { startLoad } from './support/cluster.js';
import { runCli } from './support/cli.js';
import { until } from './support/until.js';
import { EXIT_WITH_PARENT_ENV } from '../services/cli/supervisor.js';

await initBackend();
let root: string;
let checkpoint: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-up-'));
  checkpoint = join(root, 'tiny-moe');
  const model = MixtralModel.initialize(preset('tiny').model, 8);
  await saveModel(checkpoint, model);
  model.dispose();
});
after(() => rm(root, { recursive: true, force: true }));

const childrenOf = (pid: number): number[] => {
  try {
    return execFileSync('ps', ['-o', 'pid=', '--ppid', String(pid)], { encoding: 'utf8' }).split('\n').map((l) => Number(l.trim())).filter((n) => n > 0);
  } catch {
    return [];
  }
};
const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

test('up runs coordinator, shards and router as child processes, serves, and SIGTERM leaves no orphans', async () => {
  const up = await startService(['up', '--model', checkpoint, '--port', '0', '--shards', '2'], /cluster ready at (\S+):/);
  try {
    const api = up.ready[1];
    const children = childrenOf(up.child.pid!);
    assert.equal(children.length, 4, 'coordinator, two shards, one router');
    const res = await fetch(`${api}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'Hello', max_tokens: 5, temperature: 0 }) });
    assert.equal(res.status, 200);
    const body = (await res.json()) as { choices: Array<{ text: string }>; usage: { completion_tokens: number } };
    assert.equal(body.usage.completion_tokens, 5);
    await up.stop();
    assert.equal(up.child.exitCode, 0);
    assert.deepEqual(children.filter(alive), [], 'every child stopped with up');
  } finally {
    await up.stop();
  }
});

test('services started by up stop by themselves when up is killed outright', async () => {
  // Without the test harness's own exit-with-parent setting: only `up` may give it to its children.
  const up = await startService(['up', '--model', checkpoint, '--port', '0', '--shards', '1'], /cluster ready at (\S+):/, { [EXIT_WITH_PARENT_ENV]: '' });
  try {
    const children = childrenOf(up.child.pid!);
    assert.equal(children.length, 3);
    up.child.kill('SIGKILL');
    for (let i = 0; i < 100 && children.some(alive); i++) await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(children.filter(alive), [], 'no orphans after SIGKILL of up');
  } finally {
    await up.stop();
  }
});

test('Ctrl-C reaches every process of the group, yet up stops them in its order: nothing drains, nothing is killed', async () => {
  // A terminal sends SIGINT to the whole foreground process group: up and all of its services at once.
  const cwd = join(root, 'ctrl-c');
  await mkdir(cwd);
  const up = await startService(['up', '--model', checkpoint, '--port', '0', '--shards', '2'], /cluster ready at (\S+):/,
    { [EXIT_WITH_PARENT_ENV]: '' }, 60_000, { cwd, detached: true });
  try {
    const children = childrenOf(up.child.pid!);
    assert.equal(children.length, 4);
    const exited = new Promise((resolve) => up.child.once('exit', resolve));
    process.kill(-up.child.pid!, 'SIGINT');
    await exited;
    assert.equal(up.child.exitCode, 0, up.stderr());
    assert.deepEqual(children.filter(alive), [], 'every service stopped with up');
    assert.doesNotMatch(up.stderr(), /did not stop within/, 'no service had to be killed');
    // Shards drain only when they leave a cluster that goes on; here the coordinator stops before them.
    const coordinatorLog = await readFile(join(cwd, 'runs', 'up', 'coordinator.log'), 'utf8');
    assert.doesNotMatch(coordinatorLog, /drains/);
  } finally {
    await up.stop();
  }
});

/** The pids `up` lists in runs/up/processes.json (it rewrites the file whenever a member starts). */
const pidsOf = async (cwd: string): Promise<Record<string, number>> => JSON.parse(await readFile(join(cwd, 'runs', 'up', 'processes.json'), 'utf8')) as Record<string, number>;

/** A line `up` printed after its ready line (the rest of the block arrives with it or just after). */
const printed = (up: RunningService, line: RegExp): Promise<string> => until(`${line} in up's output`, async () => up.stdout().match(line)?.[1], 10_000);

/** Rows a shard computed so far (every kind), from its /metrics. */
async function shardRows(metricsUrl: string): Promise<number> {
  let rows = 0;
  for (const m of (await (await fetch(metricsUrl)).text()).matchAll(/^switchyard_expert_rows_total\{[^}]*\} (\S+)$/gm)) rows += Number(m[1]);
  return rows;
}

test('up supervises like a Deployment: a shard killed with kill -9 under load is restarted and serves again; no connection error meanwhile; placement show works with the generated admin token', async () => {
  const cwd = join(root, 'kill-shard');
  await mkdir(cwd);
  const up = await startService(['up', '--model', checkpoint, '--port', '0', '--shards', '2'], /cluster ready at (\S+):/, {}, 60_000, { cwd });
  const load = startLoad(up.ready[1], 4, { prompt: 'Hello', max_tokens: 6, temperature: 0.8 });
  try {
    const api = up.ready[1];
    // The admin token: generated, owner-only, and the printed command works as printed.
    const tokenFile = join(cwd, 'runs', 'up', 'admin-token');
    assert.equal((await stat(tokenFile)).mode & 0o777, 0o600);
    assert.match((await readFile(tokenFile, 'utf8')).trim(), /^[\w-]{40,}$/);
    const showLine = await printed(up, /placement:\s+(switchyard placement show .*)$/m);
    const show = await runCli(showLine.replace(/^switchyard /, '').split(' '), {}, cwd);
    assert.equal(show.code, 0, show.stderr);
    assert.match(show.stdout, /shard-0/);
    assert.match(show.stdout, /shard-1/);

    // Shard metrics URLs are pinned across restarts: the second and third printed /metrics are shard-0's and shard-1's.
    const metricsLine = await printed(up, /metrics \(Prometheus\):\s+(.*)$/m);
    const shard0Metrics = metricsLine.split(/\s+/)[2];
    await load.answers(10, 'answers before the kill');
    const killed = (await pidsOf(cwd))['shard-0'];
    process.kill(killed, 'SIGKILL');
    // up says it restarts the shard, and then that it runs again (events in its log, not sleeps).
    await until('up restarting shard-0', async () => (/shard-0 is running again/.test(up.stderr()) ? true : undefined), 60_000);
    assert.match(up.stderr(), /shard-0 exited \(SIGKILL\); restarting it in 0\.5 s/);
    const restarted = (await pidsOf(cwd))['shard-0'];
    assert.notEqual(restarted, killed);
    // The restarted shard (a new process: its counters start at zero) computes rows again.
    await until('the restarted shard computing rows', async () => ((await shardRows(shard0Metrics)) > 0 ? true : undefined), 60_000);
    await load.answers(10, 'answers after the restart');
    const outcomes = await load.stop();
    const failed = outcomes.filter((o) => !(o.status === 200 || (o.status === 503 && o.retryAfter !== null)));
    assert.deepEqual(failed, [], 'every answer is 200 (degraded allowed) or 503 with Retry-After; no connection error');
    assert.equal((await fetch(`${api}/v2/health/ready`)).status, 200);
    await up.stop();
    assert.equal(up.child.exitCode, 0, up.stderr());
  } finally {
    await load.stop();
    await up.stop();
  }
});

test('a member in a crash loop stops up, which says which one and where its log is', async () => {
  const cwd = join(root, 'crash-loop');
  await mkdir(cwd);
  // A model of its own, so it can be broken under the running cluster.
  const model = join(cwd, 'model');
  await cp(checkpoint, model, { recursive: true });
  const up = await startService(['up', '--model', model, '--port', '0', '--shards', '2'], /cluster ready at (\S+):/, {}, 60_000, { cwd });
  try {
    const children = childrenOf(up.child.pid!);
    const exited = new Promise<void>((resolve) => up.child.once('exit', () => resolve()));
    // Every restart of shard-1 now fails at load: 5 exits within 60 s.
    await rm(join(model, 'model.safetensors'));
    process.kill((await pidsOf(cwd))['shard-1'], 'SIGKILL');
    await exited;
    assert.equal(up.child.exitCode, 1);
    const log = join(cwd, 'runs', 'up', 'shard-1.log');
    assert.match(up.stderr(), new RegExp(`shard-1 exited \\(code 2\\); it exited 5 times within 60 s, so it is not restarted again; see ${log.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}; stopping the cluster`));
    assert.equal(up.stderr().match(/shard-1 exited .*restarting it/g)?.length, 4, 'restarted 4 times first');
    assert.match(await readFile(log, 'utf8'), /neither model\.safetensors nor model\.safetensors\.index\.json is present/);
    assert.deepEqual(childrenOf(up.child.pid!).filter(alive), []);
    assert.deepEqual(children.filter(alive), [], 'every member stopped with up');
  } finally {
    await up.stop();
  }
});
