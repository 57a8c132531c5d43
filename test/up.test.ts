import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { startService } from './support/services.js';
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
