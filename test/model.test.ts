import { test } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend } from '../services/core/backend.js';
import { parseModelConfig, preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { AdamW } from '../services/core/optim/adamw.js';
import { InProcessTransport, type RowBatch } from '../services/core/model/experts.js';
import { Rng } from '../services/core/data/random.js';
import * as tf from '@tensorflow/tfjs-core';

await initBackend();
const tiny = preset('tiny');

async function trainSteps(config: ReturnType<typeof parseModelConfig>, steps: number) {
  const model = MixtralModel.initialize(config, 9);
  const settings = { beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 };
  const optimizers = [new AdamW(model.dense, settings), new AdamW(model.localExperts!.params, settings)];
  const B = 4;
  const T = 16;
  const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 31 + 7) % 256);
  const targets = Int32Array.from(ids, (v) => (v + 1) % 256);
  const losses: number[] = [];
  let stats;
  for (let s = 0; s < steps; s++) {
    const r = await model.lossAndGradients(ids, targets, B, T, { passId: `s${s}`, train: true });
    losses.push(r.crossEntropy);
    stats = r.layerStats;
    for (const o of optimizers) o.apply(3e-3);
    model.dense.clearGrads();
    model.localExperts!.params.clearGrads();
  }
  for (const o of optimizers) o.dispose();
  model.dispose();
  return { losses, stats: stats! };
}

test('64 experts per layer (GLaM shape) train, every token routed to k experts', async () => {
  const config = parseModelConfig({ ...tiny.model, num_local_experts: 64 });
  const { losses, stats } = await trainSteps(config, 4);
  assert.ok(losses.every(Number.isFinite));
  assert.ok(losses[3] < losses[0], `loss falls on a repeated batch: ${losses}`);
  for (const layer of stats) {
    assert.equal(layer.countsBeforeDrop.length, 64);
    assert.equal(layer.countsBeforeDrop.reduce((a, b) => a + b, 0), 4 * 16 * 2);
    assert.equal(layer.droppedChoices, 0, 'mixtral routing is dropless');
  }
});

test('switch and gshard policies with tight capacity drop tokens and still train', async () => {
  for (const [policy, k] of [['switch', 1], ['gshard', 2], ['topk', 3]] as const) {
    const config = parseModelConfig({
      ...tiny.model, num_experts_per_tok: k,
      switchyard_gate: { ...tiny.model.switchyard_gate, policy, capacity_factor: 0.5, min_capacity: 1 },
    });
    const { losses, stats } = await trainSteps(config, 3);
    assert.ok(losses.every(Number.isFinite), policy);
    for (const layer of stats) {
      assert.ok(layer.droppedChoices > 0, `${policy} drops beyond capacity`);
      for (const count of layer.countsAfterDrop) assert.ok(count <= layer.capacity, `${policy}: no expert over capacity`);
    }
  }
});

test('an expert that got no tokens still steps: zero gradient, weight decay applied', async () => {
  const model = MixtralModel.initialize(tiny.model, 2);
  const table = model.localExperts!.params;
  const name = table.names()[0];
  const before = table.get(name).dataSync().slice();
  const opt = new AdamW(table, { beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 });
  opt.apply(0.01);
  const after = table.get(name).dataSync();
  for (let i = 0; i < before.length; i++) assert.ok(Math.abs(after[i] - before[i] * (1 - 0.01 * 0.1)) < 1e-7);
  assert.equal(opt.step, 1);
  opt.dispose();
  model.dispose();
});

test('a training step whose experts fail at any layer, in its forward or its backward, leaves no tensors behind', async () => {
  // Three layers (the failure comes first, in the middle, last) and gate jitter (noise tensors per layer).
  const config = parseModelConfig({ ...tiny.model, num_hidden_layers: 3, switchyard_gate: { ...tiny.model.switchyard_gate, jitter_eps: 0.1 } });
  const reference = MixtralModel.initialize(config, 5);
  const experts = reference.localExperts!;
  let failing: { kind: 'forward' | 'backward'; layer: number } | undefined;
  const lost = (kind: 'forward' | 'backward', batches: RowBatch[]) => failing?.kind === kind && batches.some((b) => b.layer === failing!.layer);
  // The real expert set, behind a transport whose holder of one layer is lost.
  class LosingTransport extends InProcessTransport {
    override forward(passId: string, batches: RowBatch[], train: boolean): Promise<Float32Array[]> {
      return lost('forward', batches) ? Promise.reject(new Error('shard lost')) : super.forward(passId, batches, train);
    }
    override backward(passId: string, batches: RowBatch[]): Promise<Float32Array[]> {
      return lost('backward', batches) ? Promise.reject(new Error('shard lost')) : super.backward(passId, batches);
    }
  }
  const model = new MixtralModel(config, new LosingTransport(experts));
  model.loadDense(reference.toHf());
  const B = 2;
  const T = 8;
  const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 37 + 5) % 256);
  const targets = Int32Array.from(ids, (v) => (v + 3) % 256);
  // The same noise every step, so every step routes alike (and the transposed weights it uses exist from the first).
  const step = (passId: string) => {
    const noise = new Rng(13);
    return model.lossAndGradients(ids, targets, B, T, { passId, train: true, random: () => noise.next() });
  };
  // A lost step's gradients that reached the tables are the caller's to discard (the trainers do).
  const discardGradients = () => {
    model.dense.clearGrads();
    experts.params.clearGrads();
  };
  const { loss } = await step('warm-up');
  discardGradients();
  for (const kind of ['forward', 'backward'] as const)
    for (let layer = 0; layer < config.num_hidden_layers; layer++) {
      const before = tf.memory().numTensors;
      failing = { kind, layer };
      await assert.rejects(step(`lost-${kind}-${layer}`), /shard lost/);
      discardGradients();
      assert.equal(tf.memory().numTensors, before, `experts lost in the ${kind} of layer ${layer}: tensors leaked`);
    }
  failing = undefined;
  assert.equal((await step('after')).loss, loss, 'the failed steps left nothing that changes the next one');
  discardGradients();
  model.dispose();
  reference.dispose();
});
