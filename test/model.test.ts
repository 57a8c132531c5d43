import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../services/core/backend.js';
import { parseModelConfig, preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { AdamW } from '../services/core/optim/adamw.js';
import { InProcessTransport, type RowBatch } from '../services/core/model/experts.js';
import { Rng } from '../services/core/data/random.js';

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
    const r = await model.lossAndGradients(ids, targets, B, T, { passId: `s${s}`, train: true, rts: { seed: 9, step: s + 1, firstToken: 0 } });
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
  const config = tiny.model;
  const model = MixtralModel.initialize(config, 2);
  // Starve expert 3 in every layer: a large constant in residual dimension 0 (from the embedding, carried
  // by the residual stream) that every gate reads as a large negative logit for expert 3 only.
  const embed = model.dense.get('embed');
  const rows = embed.dataSync().slice() as Float32Array;
  for (let v = 0; v < config.vocab_size; v++) rows[v * config.hidden_size] = 8;
  model.dense.set('embed', tf.tensor(rows, embed.shape));
  for (let l = 0; l < config.num_hidden_layers; l++) {
    const gate = model.dense.get(`layers.${l}.gate`);
    const g = gate.dataSync().slice() as Float32Array; // [hidden, experts]
    for (let e = 0; e < config.num_local_experts; e++) g[e] = e === 3 ? -50 : 0;
    model.dense.set(`layers.${l}.gate`, tf.tensor(g, gate.shape));
  }
  const table = model.localExperts!.params;
  const B = 2;
  const T = 16;
  const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 31 + 7) % 256);
  const targets = Int32Array.from(ids, (v) => (v + 1) % 256);
  const result = await model.lossAndGradients(ids, targets, B, T, { passId: 'starved', train: true });
  for (const layer of result.layerStats) {
    assert.equal(layer.countsBeforeDrop[3], 0, 'expert 3 got no token');
    assert.ok(layer.countsBeforeDrop[0] > 0 && layer.countsBeforeDrop[1] > 0);
  }
  const starved = table.names().filter((n) => /^layers\.\d+\.experts\.3\./.test(n));
  const used = table.names().filter((n) => /^layers\.\d+\.experts\.0\./.test(n));
  assert.equal(starved.length, 3 * config.num_hidden_layers);
  for (const name of starved) assert.equal(tf.tidy(() => tf.max(tf.abs(table.gradOrZeros(name))).dataSync()[0]), 0, `${name}: zero gradient`);
  const before = new Map(table.names().map((n) => [n, table.get(n).dataSync().slice()]));
  const lr = 0.01;
  const weightDecay = 0.1;
  const opt = new AdamW(table, { beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay });
  opt.apply(lr);
  const decayedOnly = (name: string) => {
    const after = table.get(name).dataSync();
    const was = before.get(name)!;
    return was.every((w, i) => Math.abs(after[i] - w * (1 - lr * weightDecay)) < 1e-7);
  };
  for (const name of starved) assert.ok(decayedOnly(name), `${name}: weight decay applied, nothing else`);
  for (const name of used) assert.ok(!decayedOnly(name), `${name}: an expert that got tokens moves by its gradient too`);
  assert.equal(opt.step, 1);
  opt.dispose();
  model.dispose();
});

test('Random Token Selection (switch, use_rts): keyed by (seed, step), data-parallel halves route like the whole batch, evaluation keeps the first tokens', async () => {
  const config = parseModelConfig({
    ...tiny.model, num_experts_per_tok: 1,
    switchyard_gate: { ...tiny.model.switchyard_gate, policy: 'switch', capacity_factor: 0.5, eval_capacity_factor: 0.5, min_capacity: 1 },
  });
  const model = MixtralModel.initialize(config, 5);
  const B = 4;
  const T = 16;
  const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 53 + 11) % 256);
  const targets = Int32Array.from(ids, (v) => (v + 3) % 256);
  /** per layer, every group's slots end to end (−1 = dropped) */
  const route = async (from: number, sequences: number, rts?: { seed: number; step: number }, m = model) => {
    const r = await m.lossAndGradients(ids.subarray(from * T, (from + sequences) * T), targets.subarray(from * T, (from + sequences) * T), sequences, T, {
      passId: 'rts', train: true, groupTokens: T, ...(rts ? { rts: { ...rts, firstToken: from * T } } : {}),
    });
    m.dense.clearGrads();
    m.localExperts!.params.clearGrads();
    return r.layerStats.map((s) => s.plans.flatMap((p) => Array.from(p.slot)));
  };
  await assert.rejects(route(0, B), /use_rts/);
  const whole = await route(0, B, { seed: 1, step: 3 });
  assert.ok(whole.every((slots) => slots.some((x) => x < 0)), 'every layer drops tokens');
  assert.deepEqual(await route(0, B, { seed: 1, step: 3 }), whole, 'same key, same routing');
  // two replicas holding sequences 0–1 and 2–3 route exactly as one process
  const [a, b] = [await route(0, 2, { seed: 1, step: 3 }), await route(2, 2, { seed: 1, step: 3 })];
  assert.deepEqual(a.map((slots, l) => [...slots, ...b[l]]), whole);
  const kept = (r: number[][]) => r.map((slots) => slots.map((x) => x >= 0));
  assert.notDeepEqual(kept(await route(0, B, { seed: 2, step: 3 })), kept(whole), 'another seed keeps other tokens');
  assert.notDeepEqual(kept(await route(0, B, { seed: 1, step: 4 })), kept(whole), 'another step keeps other tokens');
  // use_rts false: the first tokens of each expert, no key needed (today's behaviour)
  const firstOnes = MixtralModel.initialize(parseModelConfig({ ...config, switchyard_gate: { ...config.switchyard_gate, use_rts: false } }), 5);
  const first = await route(0, B, undefined, firstOnes);
  assert.notDeepEqual(kept(first), kept(whole), 'RTS changed the kept set');
  // evaluation never draws: a train:false pass keeps the first tokens, exactly as use_rts false
  const evalSlots = async (m: MixtralModel) => {
    const out = await m.forward(ids, B, T, { passId: 'eval', train: false, groupTokens: T });
    out.logits.dispose();
    out.hidden.dispose();
    out.kv.forEach((c) => tf.dispose([c.k, c.v]));
    return out.stats.map((s) => s.plans.flatMap((p) => Array.from(p.slot)));
  };
  const evaluated = await evalSlots(model);
  assert.ok(evaluated.some((slots) => slots.some((x) => x < 0)), 'evaluation drops tokens');
  assert.deepEqual(evaluated, await evalSlots(firstOnes));
  firstOnes.dispose();
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
