// Ping-pong micro-batches with real processes on 127.0.0.1 (issue 16): routers with 1, 2 and 4 lanes on
// the same shards serve the same logits and texts; distributed training with 2 lanes per router equals
// training with 1 (losses and final weights within 1e-6 relative over 20 steps).
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { loadCheckpoint } from '../services/core/checkpoint/index.js';
import { checkpointDirOf, metricsFileOf } from '../services/core/train/trainer.js';
import { startCluster } from './support/cluster.js';
import { runCli } from './support/cli.js';
import { relative } from './support/compare.js';

await initBackend();
const tiny = preset('tiny');
let root: string;
let checkpoint: string;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-pipeline-'));
  checkpoint = join(root, 'tiny');
  const model = MixtralModel.initialize(tiny.model, 8);
  await saveModel(checkpoint, model);
  model.dispose();
});

after(async () => {
  await rm(root, { recursive: true, force: true });
});

test('routers with 1, 2 and 4 micro-batches on the same two shards (splitting even small steps): OIP logits within 1e-6, identical greedy texts under concurrency', async (t) => {
  const cluster = await startCluster(checkpoint, ['spread:0/2', 'spread:1/2'], [['--micro-batches', '1'], ['--micro-batches', '2', '--micro-batch-min-rows', '0'], ['--micro-batches', '4', '--micro-batch-min-rows', '0']]);
  try {
    const ids = Array.from({ length: 6 * 11 }, (_, i) => 32 + ((i * 37 + 11) % 90));
    const logitsOf = async (base: string) => {
      const res = await fetch(`${base}/v2/models/tiny/infer`, {
        method: 'POST', headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [6, 11], data: ids }], outputs: [{ name: 'logits' }] }),
      });
      assert.equal(res.status, 200, await res.clone().text());
      return ((await res.json()) as { outputs: Array<{ data: number[] }> }).outputs[0].data;
    };
    const prompts = ['Call me Ishmael.', 'Some years ago', 'never mind how long', 'having little or no money', 'in my purse', 'and nothing', 'particular to interest me', 'on shore'];
    const textsOf = (base: string) => Promise.all(prompts.map(async (prompt) => {
      const res = await fetch(`${base}/v1/completions`, {
        method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt, max_tokens: 10, temperature: 0 }),
      });
      assert.equal(res.status, 200, await res.clone().text());
      const body = (await res.json()) as { choices: Array<{ text: string }>; degraded?: unknown };
      assert.equal(body.degraded, undefined);
      return body.choices[0].text;
    }));
    const [one, ...split] = await Promise.all(cluster.routers.map((r) => logitsOf(r.base)));
    for (const got of split) {
      const rel = relative(got, one);
      t.diagnostic(`max relative |Δlogit| vs 1 lane: ${rel}`);
      assert.ok(rel <= 1e-6, `relative ${rel}`);
    }
    const texts = [];
    for (const r of cluster.routers) texts.push(await textsOf(r.base));
    assert.deepEqual(texts[1], texts[0]);
    assert.deepEqual(texts[2], texts[0]);
  } finally {
    await cluster.stop();
  }
});

test('2 routers × 2 shards with 2 micro-batches per router train like 1: every loss and the final weights within 1e-6 relative over 20 steps', async (t) => {
  const runs: string[] = [];
  for (const lanes of ['1', '2']) {
    const out = join(root, `train-m${lanes}`);
    const run = await runCli(['train', '--config', 'tiny', '--routers', '2', '--shards', '2', '--micro-batches', lanes, '--out', out]);
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stdout, /trained 20 steps/);
    runs.push(out);
  }
  const losses = async (out: string) => (await readFile(metricsFileOf(out), 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as { step: number; loss: number });
  const [one, two] = await Promise.all(runs.map(losses));
  assert.equal(one.filter((r) => r.loss !== undefined).length, 20);
  assert.equal(two.length, one.length);
  one.forEach((r, i) => {
    assert.equal(two[i].step, r.step);
    if (r.loss === undefined) return;
    assert.ok(Math.abs(two[i].loss - r.loss) <= 1e-6 * Math.abs(r.loss), `step ${r.step}: ${two[i].loss} vs ${r.loss}`);
  });
  // Relative difference of each tensor as ‖Δ‖₂ / ‖w‖₂. Lanes sum a weight's gradient in two parts
  // where one lane sums it in one matMul: float32 rounding, which 20 AdamW steps carry to about 1e-6 of
  // the largest weight (the largest element difference is reported too).
  const [a, b] = await Promise.all(runs.map((out) => loadCheckpoint(checkpointDirOf(out))));
  assert.deepEqual([...a.tensors.keys()].sort(), [...b.tensors.keys()].sort());
  let worstL2 = 0;
  let worstMax = 0;
  for (const [name, ta] of a.tensors) {
    const tb = b.tensors.get(name)!;
    let diff = 0;
    let norm = 0;
    for (let i = 0; i < ta.values.length; i++) {
      diff += (tb.values[i] - ta.values[i]) ** 2;
      norm += ta.values[i] ** 2;
    }
    const rel = Math.sqrt(diff / Math.max(norm, 1e-30));
    assert.ok(rel <= 1e-6, `${name}: final weights differ by ${rel} (relative, L2)`);
    worstL2 = Math.max(worstL2, rel);
    worstMax = Math.max(worstMax, relative(tb.values, ta.values));
  }
  t.diagnostic(`final weights: worst ‖Δ‖/‖w‖ ${worstL2.toExponential(2)}, worst max|Δ|/max|w| ${worstMax.toExponential(2)}`);
});
