// Whole-model numerical checks on the `tiny` preset: logits against the float64 reference, every
// parameter gradient of lossAndGradients against float64 central differences of the reference objective
// (routing forced to the model's decisions), KV-cache decoding against full recomputation, and no tensor
// leak across training calls.
import { before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../services/core/backend.js';
import { parseModelConfig, preset, type MixtralConfig as ModelConfig } from '../services/core/config.js';
import { Rng } from '../services/core/data/random.js';
import { choicesOf } from './support/routing.js';
import { MixtralModel } from '../services/core/model/model.js';
import type { ParameterTable } from '../services/core/model/parameters.js';
import { disposeAll } from '../services/core/model/tensors.js';
import {
  centralDiff, maxAbs, maxAbsDiff, referenceForward, referenceLogits, referenceLoss, relErr, sampleIndices, toF64,
  type Params64,
} from './support/reference64.js';

const GRAD_TOL = 1e-3;
/** entries checked per parameter tensor (wqkv: SUBSET/2 from each of its q, k and v blocks) */
const SUBSET = 32;
const BATCH = 2;
const TOKENS = 6;

let config: ModelConfig;

before(async () => {
  await initBackend();
  const tiny = preset('tiny').model;
  // nonzero auxiliary terms, large enough that a wrong aux or z gradient shows in the gate gradients
  config = parseModelConfig({ ...tiny, switchyard_gate: { ...tiny.switchyard_gate, aux_loss_coef: 0.1, z_loss_coef: 0.05 } });
  assert.equal(config.switchyard_gate.policy, 'mixtral');
});

function tables(model: MixtralModel): ParameterTable[] {
  return [model.dense, model.localExperts!.params];
}

/** Float64 copies of every parameter (dense and experts) under the model's names and layouts. */
function params64Of(model: MixtralModel): Params64 {
  const out: Params64 = new Map();
  for (const table of tables(model)) for (const name of table.names()) out.set(name, toF64(table.get(name).dataSync()));
  return out;
}

/**
 * Replaces every parameter with seeded random values of O(1)-activation scale (the preset's 0.02 init
 * leaves attention almost uniform and the experts nearly linear, which would hide errors in those paths).
 * With `idleExpert`, every embedding gets a large positive feature 0 and layer 0's gate maps that feature
 * strongly away from the last expert, so that expert receives no token in layer 0.
 */
function randomizeParameters(model: MixtralModel, seed: number, idleExpert = false): void {
  const rng = new Rng(seed);
  for (const table of tables(model))
    for (const name of table.names()) {
      const old = table.get(name);
      const n = old.size;
      const fanIn = old.shape.length === 2 ? old.shape[0] : 1;
      const values = new Float32Array(n);
      for (let i = 0; i < n; i++) {
        const z = rng.normal();
        if (old.shape.length === 1) values[i] = 1 + 0.2 * z; // norm weights
        else if (name === 'embed') values[i] = idleExpert && i % (old.shape as number[])[1] === 0 ? 4 + 0.1 * z : z;
        else if (name.endsWith('.gate')) values[i] = (1.5 * z) / Math.sqrt(fanIn);
        else if (name.endsWith('.wqkv')) values[i] = (1.2 * z) / Math.sqrt(fanIn);
        else if (name.endsWith('.wo') || name.endsWith('.w2t')) values[i] = (0.5 * z) / Math.sqrt(fanIn);
        else values[i] = z / Math.sqrt(fanIn);
      }
      if (idleExpert && name === 'layers.0.gate') values[(old.shape as number[])[1] - 1] = -2;
      table.set(name, tf.tensor(values, old.shape));
    }
}

function randomIds(rng: Rng, n: number, vocab: number): Int32Array {
  return Int32Array.from({ length: n }, () => rng.nextInt(vocab));
}

/** The model's routing decisions per layer, token-major over all groups. */

/** Gradient values of `name`; disposes the zeros tensor gradOrZeros creates when nothing accumulated. */
function gradOf(table: ParameterTable, name: string): Float32Array {
  const had = table.hasGrad(name);
  const g = table.gradOrZeros(name);
  const values = (g.dataSync() as Float32Array).slice();
  if (!had) g.dispose();
  return values;
}

describe('MixtralModel (tiny preset) against the float64 reference', () => {
  for (const weights of ['preset init', 'randomized'] as const) {
    test(`logits match referenceLogits (${weights} weights)`, async (t) => {
      const model = MixtralModel.initialize(config, 11);
      if (weights === 'randomized') randomizeParameters(model, 12);
      const rng = new Rng(13);
      const ids = randomIds(rng, BATCH * TOKENS, config.vocab_size);
      const out = await model.forward(ids, BATCH, TOKENS, { passId: 'logits', train: false });
      const logits = (out.logits.dataSync() as Float32Array).slice();
      const modelChoices = choicesOf(out.stats);
      disposeAll([out.logits, out.hidden, out.kv]);
      const p64 = params64Of(model);
      const free = referenceForward(p64, config, ids, BATCH, TOKENS, { train: false });
      free.choices.forEach((c, l) => assert.deepEqual([...c], [...modelChoices[l]], `layer ${l}: reference routing differs`));
      const ref = referenceLogits(p64, config, ids, BATCH, TOKENS, modelChoices);
      const err = maxAbsDiff(logits, ref);
      t.diagnostic(`max |logits − reference| = ${err.toExponential(2)} (max |logit| ${maxAbs(ref).toExponential(2)})`);
      assert.ok(err <= 1e-4, `logits differ from the reference by ${err}`);
      // the public logits() path gives the same values
      const again = await model.logits(ids, BATCH, TOKENS);
      assert.ok(maxAbsDiff(again, logits) <= 1e-6, 'logits() and forward() disagree');
      model.dispose();
    });
  }

  for (const weights of ['randomized', 'preset init'] as const) {
    test(`every parameter gradient of lossAndGradients vs float64 central differences, aux and z on (${weights} weights)`, async (t) => {
      const model = MixtralModel.initialize(config, 21);
      if (weights === 'randomized') randomizeParameters(model, 22, true);
      const rng = new Rng(23);
      // ids drawn from a pool of 8 tokens, so repeated tokens must add up in the embedding gradient
      const pool = randomIds(rng, 8, config.vocab_size);
      const ids = Int32Array.from({ length: BATCH * TOKENS }, () => pool[rng.nextInt(pool.length)]);
      assert.ok(new Set(ids).size < ids.length);
      const targets = randomIds(rng, BATCH * TOKENS, config.vocab_size);
      for (const table of tables(model)) table.clearGrads();
      const res = await model.lossAndGradients(ids, targets, BATCH, TOKENS, { passId: 'gc', train: true });
      const forced = choicesOf(res.layerStats);
      const p64 = params64Of(model);

      const free = referenceForward(p64, config, ids, BATCH, TOKENS, { train: true });
      free.choices.forEach((c, l) => assert.deepEqual([...c], [...forced[l]], `layer ${l}: reference routing differs`));
      const L = () => referenceLoss(p64, config, ids, targets, BATCH, TOKENS, forced);
      const refLoss = L();
      t.diagnostic(`loss ${res.loss} (CE ${res.crossEntropy}, aux ${res.auxLoss}, z ${res.zLoss}); reference ${refLoss}`);
      assert.ok(Math.abs(res.loss - refLoss) <= 1e-5 * refLoss, `loss ${res.loss} vs reference ${refLoss}`);
      assert.ok(res.auxLoss > 0 && res.zLoss > 0);
      const rowsPerExpert = free.rowsPerExpert;
      res.layerStats.forEach((s, l) => assert.deepEqual([...s.countsAfterDrop], [...rowsPerExpert[l]], `layer ${l} rows per expert`));
      const idle = config.num_local_experts - 1;
      if (weights === 'randomized') assert.equal(rowsPerExpert[0][idle], 0, `layer 0 expert ${idle} was meant to receive no token`);

      const usedRows = [...new Set(ids)];
      let worst = 0;
      let worstName = '';
      let checked = 0;
      for (const table of tables(model))
        for (const name of table.names()) {
          const analytic = gradOf(table, name);
          const x64 = p64.get(name)!;
          let idx: number[];
          if (name === 'embed') {
            // most embedding rows get no gradient: sample the rows of the ids present, plus a few others
            const D = config.hidden_size;
            const used = usedRows.flatMap((r) => Array.from({ length: D }, (_, d) => r * D + d));
            idx = [...sampleIndices(() => rng.next(), used.length, SUBSET).map((i) => used[i]), ...sampleIndices(() => rng.next(), x64.length, 8)];
            for (let r = 0; r < config.vocab_size; r++)
              if (!usedRows.includes(r))
                for (let d = 0; d < D; d++) assert.equal(analytic[r * D + d], 0, `embed row ${r} (unused token) must get no gradient`);
          } else if (name.endsWith('.wqkv')) {
            // the same number of entries from each of the q, k and v column blocks
            const D = config.hidden_size;
            const hd = config.head_dim ?? D / config.num_attention_heads;
            const qW = config.num_attention_heads * hd;
            const kvW = config.num_key_value_heads * hd;
            const width = qW + 2 * kvW;
            idx = [];
            for (const [c0, w] of [[0, qW], [qW, kvW], [qW + kvW, kvW]])
              for (const j of sampleIndices(() => rng.next(), D * w, SUBSET / 2)) idx.push(Math.floor(j / w) * width + c0 + (j % w));
          } else {
            idx = sampleIndices(() => rng.next(), x64.length, SUBSET);
          }
          const m = /^layers\.(\d+)\.experts\.(\d+)\./.exec(name);
          if (m && rowsPerExpert[Number(m[1])][Number(m[2])] === 0)
            assert.ok(analytic.every((v) => v === 0), `${name}: expert that received no token must have a zero gradient`);
          const a = idx.map((i) => analytic[i]);
          const n = idx.map((i) => centralDiff(L, x64, i));
          const err = relErr(a, n);
          checked++;
          if (err > worst) { worst = err; worstName = name; }
          t.diagnostic(`${name}: rel err ${err.toExponential(2)} over ${idx.length} entries (|n| ${Math.sqrt(n.reduce((s, v) => s + v * v, 0)).toExponential(2)})`);
          assert.ok(err <= GRAD_TOL, `${name}: gradient relative error ${err} > ${GRAD_TOL}`);
        }
      const expected = model.dense.names().length + model.localExperts!.params.names().length;
      assert.equal(checked, expected);
      t.diagnostic(`checked ${checked} parameter tensors; worst ${worstName} ${worst.toExponential(2)}`);
      t.diagnostic(`rows per expert: ${rowsPerExpert.map((r) => `[${[...r]}]`).join(' ')}`);
      model.dispose();
    });
  }

  test("aux_loss_scope 'batch' (HF's loss pooled over layers and groups): loss and gate/norm gradients vs float64 central differences", async (t) => {
    // two routing groups per layer, so pooling over groups and over layers both matter
    const batchScope = parseModelConfig({ ...config, switchyard_gate: { ...config.switchyard_gate, aux_loss_coef: 1, aux_loss_scope: 'batch' } });
    const model = MixtralModel.initialize(batchScope, 31);
    randomizeParameters(model, 32);
    const rng = new Rng(33);
    const ids = randomIds(rng, BATCH * TOKENS, batchScope.vocab_size);
    const targets = randomIds(rng, BATCH * TOKENS, batchScope.vocab_size);
    for (const table of tables(model)) table.clearGrads();
    const res = await model.lossAndGradients(ids, targets, BATCH, TOKENS, { passId: 'gc-batch', train: true, groupTokens: TOKENS });
    const forced = choicesOf(res.layerStats);
    const p64 = params64Of(model);
    const L = () => referenceLoss(p64, batchScope, ids, targets, BATCH, TOKENS, forced, { groupTokens: TOKENS });
    const grouped = referenceLoss(p64, { ...batchScope, switchyard_gate: { ...batchScope.switchyard_gate, aux_loss_scope: 'group' } }, ids, targets, BATCH, TOKENS, forced, { groupTokens: TOKENS });
    const refLoss = L();
    t.diagnostic(`loss ${res.loss} (aux ${res.auxLoss}); reference ${refLoss}, with per-group aux ${grouped}`);
    assert.ok(Math.abs(res.loss - refLoss) <= 1e-5 * refLoss, `loss ${res.loss} vs reference ${refLoss}`);
    assert.ok(Math.abs(grouped - refLoss) > 1e-3, 'pooled and per-group aux coincide: the check proves nothing');
    for (const name of model.dense.names().filter((n) => n.endsWith('.gate') || n.endsWith('_norm'))) {
      const analytic = gradOf(model.dense, name);
      const x64 = p64.get(name)!;
      const idx = sampleIndices(() => rng.next(), x64.length, SUBSET);
      const err = relErr(idx.map((i) => analytic[i]), idx.map((i) => centralDiff(L, x64, i)));
      t.diagnostic(`${name}: rel err ${err.toExponential(2)}`);
      assert.ok(err <= GRAD_TOL, `${name}: gradient relative error ${err} > ${GRAD_TOL}`);
    }
    for (const table of tables(model)) table.clearGrads();
    model.dispose();
  });

  test('KV-cache decoding equals full recomputation (prefill 5, decode 6)', async (t) => {
    for (const weights of ['preset init', 'randomized'] as const) {
      const model = MixtralModel.initialize(config, 31);
      if (weights === 'randomized') randomizeParameters(model, 32);
      const rng = new Rng(33);
      const B = 2, prompt = 5, steps = 6, V = config.vocab_size;
      const total = prompt + steps;
      const seqs = Array.from({ length: B }, () => randomIds(rng, total, V));
      const prefix = (len: number): Int32Array => {
        const out = new Int32Array(B * len);
        seqs.forEach((s, b) => out.set(s.subarray(0, len), b * len));
        return out;
      };
      let worst = 0;
      const first = await model.forward(prefix(prompt), B, prompt, { passId: 'prefill', train: false });
      let kv = first.kv;
      const lastRows = (values: Float32Array, rowsPerSeq: number): Float32Array => {
        const out = new Float32Array(B * V);
        for (let b = 0; b < B; b++) out.set(values.subarray(((b + 1) * rowsPerSeq - 1) * V, (b + 1) * rowsPerSeq * V), b * V);
        return out;
      };
      {
        const full = await model.logits(prefix(prompt), B, prompt);
        worst = Math.max(worst, maxAbsDiff(first.logits.dataSync() as Float32Array, full));
      }
      disposeAll([first.logits, first.hidden]);
      let scale = 0;
      for (let step = 0; step < steps; step++) {
        const past = prompt + step;
        const next = Int32Array.from(seqs, (s) => s[past]);
        const out = await model.forward(next, B, 1, { passId: `decode${step}`, train: false }, kv, past);
        disposeAll(kv);
        kv = out.kv;
        const stepLogits = (out.logits.dataSync() as Float32Array).slice();
        disposeAll([out.logits, out.hidden]);
        const full = lastRows(await model.logits(prefix(past + 1), B, past + 1), past + 1);
        worst = Math.max(worst, maxAbsDiff(stepLogits, full));
        scale = Math.max(scale, maxAbs(full));
      }
      disposeAll(kv);
      t.diagnostic(`${weights} weights: max |decode − full| = ${worst.toExponential(2)} (max |logit| ${scale.toExponential(2)})`);
      assert.ok(worst <= 1e-5, `${weights}: KV-cache logits differ from full recomputation by ${worst}`);
      model.dispose();
    }
  });

  test('no tensor leak across two identical lossAndGradients calls', async () => {
    const model = MixtralModel.initialize(config, 41);
    const rng = new Rng(42);
    const ids = randomIds(rng, BATCH * TOKENS, config.vocab_size);
    const targets = randomIds(rng, BATCH * TOKENS, config.vocab_size);
    const run = async (): Promise<number> => {
      await model.lossAndGradients(ids, targets, BATCH, TOKENS, { passId: 'leak', train: true });
      for (const table of tables(model)) table.clearGrads();
      return tf.memory().numTensors;
    };
    const afterFirst = await run();
    const afterSecond = await run();
    assert.equal(afterSecond, afterFirst, `tensor count grew from ${afterFirst} to ${afterSecond}`);
    // an evaluation forward + KV decode step leaves nothing behind either, once its outputs are disposed
    const out = await model.forward(ids, BATCH, TOKENS, { passId: 'eval', train: false });
    const step = await model.forward(ids.subarray(0, BATCH), BATCH, 1, { passId: 'eval2', train: false }, out.kv, TOKENS);
    disposeAll([out.logits, out.hidden, out.kv, step.logits, step.hidden, step.kv]);
    assert.equal(tf.memory().numTensors, afterSecond, 'evaluation forward leaked tensors');
    model.dispose();
  });
});
