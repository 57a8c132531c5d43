import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile, truncate, stat, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { parseModelConfig, preset, ConfigError } from '../services/core/config.js';
import { loadCheckpoint, saveCheckpoint } from '../services/core/checkpoint/index.js';
import { MixtralModel } from '../services/core/model/model.js';
import { loadModel, saveModel } from '../services/core/checkpoint/model.js';
import { checkpointDirOf, metricsFileOf, train } from '../services/core/train/trainer.js';
import { learningRate } from '../services/core/optim/schedule.js';
import { checkDataParallel } from '../services/router/trainer.js';

await initBackend();
const root = await mkdtemp(join(tmpdir(), 'switchyard-train-'));
after(() => rm(root, { recursive: true, force: true }));

const tiny = preset('tiny');
const ids = Int32Array.from({ length: 2 * 12 }, (_, i) => (i * 37 + 5) % 256);

async function metrics(outDir: string): Promise<Array<Record<string, number>>> {
  return (await readFile(metricsFileOf(outDir), 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
}

test('resume from step N reproduces every later step of an uninterrupted run', async () => {
  const settings = { ...tiny.train, steps: 16, checkpoint_interval: 8, eval_interval: 8 };
  const straight = join(root, 'straight');
  const resumed = join(root, 'resumed');
  await train({ model: tiny.model, train: settings, outDir: straight });
  await train({ model: tiny.model, train: settings, outDir: resumed, stopAfterStep: 10 });
  // Steps 9 and 10 ran after the step-8 checkpoint; resuming must redo them identically.
  await train({ model: tiny.model, train: settings, outDir: resumed, resume: true });
  const a = await metrics(straight);
  const b = await metrics(resumed);
  assert.equal(a.length, 16);
  assert.deepEqual(b.map((r) => r.step), a.map((r) => r.step));
  for (let i = 8; i < 16; i++) {
    assert.equal(b[i].loss, a[i].loss, `loss at step ${i + 1}`);
    assert.equal(b[i].grad_norm, a[i].grad_norm, `grad norm at step ${i + 1}`);
  }
  assert.equal(b[15].val_loss, a[15].val_loss);
  for (const key of ['step', 'loss', 'aux_loss', 'lr', 'tokens', 'tokens_per_s']) assert.ok(key in a[0], `metrics.jsonl has ${key}`);
  assert.ok(a[15].loss < a[0].loss, 'training lowers the loss');
  // The final weights agree too.
  const wa = (await loadCheckpoint(checkpointDirOf(straight))).tensors;
  const wb = (await loadCheckpoint(checkpointDirOf(resumed))).tensors;
  for (const [name, t] of wa) assert.deepEqual(wb.get(name)!.values, t.values, name);
  // A finished run resumed with more steps extends it.
  const extended = await train({ model: tiny.model, train: { ...settings, steps: 18 }, outDir: resumed, resume: true });
  assert.equal(extended.steps, 18);
  assert.deepEqual((await metrics(resumed)).map((r) => r.step), Array.from({ length: 18 }, (_, i) => i + 1));
});

test('switch with Random Token Selection: a resumed run keeps exactly the tokens the uninterrupted run keeps', async () => {
  const model = parseModelConfig({
    ...tiny.model, num_experts_per_tok: 1, switchyard_gate: { ...tiny.model.switchyard_gate, policy: 'switch', capacity_factor: 0.5 },
  });
  const settings = { ...tiny.train, steps: 4, batch_sequences: 2, checkpoint_interval: 2, eval_interval: 4 };
  const straight = join(root, 'rts-straight');
  const resumed = join(root, 'rts-resumed');
  await train({ model, train: settings, outDir: straight });
  await train({ model, train: settings, outDir: resumed, stopAfterStep: 3 });
  await train({ model, train: settings, outDir: resumed, resume: true });
  const [a, b] = [await metrics(straight), await metrics(resumed)];
  assert.ok(a.every((r) => r.dropped_fraction > 0), 'every step drops tokens');
  assert.deepEqual(b.map((r) => [r.loss, r.dropped_fraction, r.grad_norm]), a.map((r) => [r.loss, r.dropped_fraction, r.grad_norm]));
});

test('checkpoint round trip gives identical logits', async () => {
  const model = MixtralModel.initialize(tiny.model, 42);
  const before = await model.logits(ids, 2, 12);
  const dir = join(root, 'roundtrip');
  await saveModel(dir, model);
  model.dispose();
  const loaded = await loadModel(dir);
  const after = await loaded.logits(ids, 2, 12);
  loaded.dispose();
  assert.deepEqual(after, before);
});

test('missing and misshaped tensors are all listed', async () => {
  const model = MixtralModel.initialize(tiny.model, 1);
  const tensors = model.toHf();
  model.dispose();
  tensors.delete('model.layers.1.block_sparse_moe.experts.3.w2.weight');
  tensors.delete('model.norm.weight');
  tensors.set('lm_head.weight', { shape: [7, 32], values: new Float32Array(7 * 32) });
  const dir = join(root, 'broken');
  await saveCheckpoint(dir, { config: tiny.model, tensors });
  await assert.rejects(loadModel(dir), (err: Error) => {
    assert.equal(err.name, 'CheckpointError');
    assert.match(err.message, /experts\.3\.w2\.weight/);
    assert.match(err.message, /model\.norm\.weight/);
    assert.match(err.message, /lm_head\.weight: expected \[259, 32\], found \[7, 32\]/);
    return true;
  });
});

test('a truncated safetensors file is refused, naming the file', async () => {
  const model = MixtralModel.initialize(tiny.model, 1);
  const dir = join(root, 'truncated');
  await saveModel(dir, model);
  model.dispose();
  const file = join(dir, 'model.safetensors');
  await truncate(file, (await stat(file)).size - 100);
  await assert.rejects(loadModel(dir), (err: Error) => err.name === 'CheckpointError' && err.message.includes(file));
});

test('invalid configs are refused with the reason', () => {
  const base = { ...tiny.model } as Record<string, unknown>;
  assert.throws(() => parseModelConfig({ ...base, num_experts_per_tok: 5 }), (e: Error) => e instanceof ConfigError && /exceeds num_local_experts/.test(e.message));
  assert.throws(() => parseModelConfig({ ...base, hidden_size: 30 }), /not divisible by num_attention_heads/);
  assert.throws(() => parseModelConfig({ ...base, switchyard_gate: { ...tiny.model.switchyard_gate, capacity_factor: 0 } }), /capacity factor must be > 0/);
  assert.throws(() => parseModelConfig({ ...base, switchyard_gate: { ...tiny.model.switchyard_gate, eval_capacity_factor: -1 } }), /capacity factor must be > 0/);
  assert.throws(() => parseModelConfig({ ...base, switchyard_gate: { ...tiny.model.switchyard_gate, second_expert_sampling: true } }), /needs policy 'gshard' or 'topk'/);
  assert.throws(() => parseModelConfig({ ...base, num_attention_heads: 4, num_key_value_heads: 3 }), /not a multiple of num_key_value_heads/);
  assert.throws(() => parseModelConfig({ ...base, hidden_size: 'big' }), /hidden_size/);
  // Random Token Selection is DeepSpeed's top-1 option; the pooled aux loss is Mixtral's
  const gate = (g: Record<string, unknown>, k = 2) => parseModelConfig({ ...base, num_experts_per_tok: k, switchyard_gate: { ...tiny.model.switchyard_gate, ...g } });
  assert.throws(() => gate({ policy: 'gshard', use_rts: true }), /switchyard_gate: use_rts .*needs policy 'switch', not 'gshard'/);
  assert.throws(() => gate({ use_rts: 'yes' }), /use_rts/);
  assert.throws(() => gate({ policy: 'switch', aux_loss_scope: 'batch' }, 1), /aux_loss_scope 'batch' .*needs policy 'mixtral'/);
  assert.throws(() => gate({ aux_loss_scope: 'layer' }), /aux_loss_scope/);
  assert.equal(gate({ policy: 'switch' }, 1).switchyard_gate.use_rts, undefined, 'unset: DeepSpeed default (on for switch)');
  assert.equal(gate({}).switchyard_gate.aux_loss_scope, 'group');
  // several router replicas each hold part of the batch: the pooled loss is refused, naming the key
  const batchScope = gate({ aux_loss_scope: 'batch' });
  assert.throws(() => checkDataParallel(tiny.train, 2, batchScope), (e: Error) => e instanceof ConfigError && /model\.switchyard_gate\.aux_loss_scope 'batch'/.test(e.message));
  checkDataParallel(tiny.train, 1, batchScope);
  checkDataParallel(tiny.train, 2, tiny.model);
});

test('an empty corpus is refused before anything is written', async () => {
  const empty = join(root, 'empty.txt');
  await writeFile(empty, '');
  const out = join(root, 'empty-run');
  await assert.rejects(train({ model: tiny.model, train: tiny.train, dataPath: empty, outDir: out }), (e: Error) => e.name === 'CorpusError');
  await assert.rejects(stat(join(out, 'metrics.jsonl')));
});

test('training on a given text folder works and --resume without a checkpoint is refused', async () => {
  const data = join(root, 'texts');
  await mkdir(data, { recursive: true });
  await writeFile(join(data, 'a.txt'), 'the quick brown fox jumps over the lazy dog. '.repeat(40));
  const out = join(root, 'folder-run');
  const summary = await train({ model: tiny.model, train: { ...tiny.train, steps: 3 }, dataPath: data, outDir: out });
  assert.equal(summary.steps, 3);
  assert.match(summary.dataSource, /texts/);
  await assert.rejects(train({ model: tiny.model, train: tiny.train, outDir: join(root, 'nothing'), resume: true }), /no checkpoint/);
});

test('learning rate warms up linearly then decays by cosine to the floor', () => {
  const s = { lr: 1e-3, warmup_steps: 10, steps: 110, min_lr_ratio: 0.1 };
  assert.equal(learningRate(s, 5), 5e-4);
  assert.equal(learningRate(s, 10), 1e-3);
  assert.ok(Math.abs(learningRate(s, 60) - 5.5e-4) < 1e-12);
  assert.ok(Math.abs(learningRate(s, 110) - 1e-4) < 1e-12);
});
