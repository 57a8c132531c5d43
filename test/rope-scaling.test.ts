// rope_scaling (issue 18): each type's keys validated, inverse frequencies against hand-computed numbers,
// and the model with a scaled rotary embedding against an independent float64 forward, through the full
// forward and the paged serving step.
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { loadModel, saveModel } from '../services/core/checkpoint/model.js';
import { ConfigError, parseModelConfig, preset, type MixtralConfig, type RopeScaling } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { choicesOf } from './support/routing.js';
import { pagedAttentionSettings } from '../services/core/model/paged-attention.js';
import { Rope, ropeFrequencies } from '../services/core/model/rope.js';
import { disposeAll } from '../services/core/model/tensors.js';
import { PagedDecoder } from './support/paged.js';
import { centralDiff, maxAbs, maxAbsDiff, referenceLogits, referenceLoss, relErr, ropeFreq64, sampleIndices, toF64, type Params64 } from './support/reference64.js';
import { Rng } from '../services/core/data/random.js';

await initBackend();
const tiny = preset('tiny').model;

const scalingOf = (rope_scaling: unknown): RopeScaling | null => parseModelConfig({ ...tiny, rope_scaling }).rope_scaling;
const refused = (rope_scaling: unknown, message: RegExp) =>
  assert.throws(() => parseModelConfig({ ...tiny, rope_scaling }), (e: Error) => e instanceof ConfigError && message.test(e.message), `${JSON.stringify(rope_scaling)}: ${message}`);

describe('rope_scaling config', () => {
  test('each type parses with its keys; legacy type is rope_type; default and null are no scaling', () => {
    assert.equal(scalingOf(null), null);
    assert.equal(scalingOf(undefined), null);
    assert.equal(scalingOf({ rope_type: 'default' }), null);
    assert.equal(scalingOf({ type: 'default' }), null);
    assert.deepEqual(scalingOf({ type: 'linear', factor: 2 }), { rope_type: 'linear', factor: 2 });
    assert.deepEqual(scalingOf({ rope_type: 'linear', type: 'linear', factor: 2 }), { rope_type: 'linear', factor: 2 });
    assert.deepEqual(scalingOf({ rope_type: 'dynamic', factor: 2.5 }), { rope_type: 'dynamic', factor: 2.5 });
    assert.deepEqual(scalingOf({ type: 'dynamic', factor: 2, original_max_position_embeddings: 32 }), { rope_type: 'dynamic', factor: 2, original_max_position_embeddings: 32 });
    // Qwen2.5's and DeepSeek-V3's published yarn blocks
    assert.deepEqual(scalingOf({ factor: 4.0, original_max_position_embeddings: 32768, type: 'yarn' }),
      { rope_type: 'yarn', factor: 4, original_max_position_embeddings: 32768, beta_fast: 32, beta_slow: 1, truncate: true });
    assert.deepEqual(scalingOf({ beta_fast: 32, beta_slow: 1, factor: 40, mscale: 1.0, mscale_all_dim: 1.0, original_max_position_embeddings: 4096, type: 'yarn' }),
      { rope_type: 'yarn', factor: 40, original_max_position_embeddings: 4096, beta_fast: 32, beta_slow: 1, mscale: 1, mscale_all_dim: 1, truncate: true });
    assert.deepEqual(scalingOf({ rope_type: 'yarn', factor: 2, attention_factor: 1.5, truncate: false, beta_fast: null }),
      { rope_type: 'yarn', factor: 2, attention_factor: 1.5, beta_fast: 32, beta_slow: 1, truncate: false });
    // Llama 3.1's published block
    assert.deepEqual(scalingOf({ factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192, rope_type: 'llama3' }),
      { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 });
    // DeepSeek-MoE takes the same schema
    const deepseek = parseModelConfig({
      model_type: 'deepseek', hidden_size: 32, intermediate_size: 64, moe_intermediate_size: 16, num_hidden_layers: 2, num_attention_heads: 4,
      num_key_value_heads: 4, n_routed_experts: 4, num_experts_per_tok: 2, vocab_size: 300, max_position_embeddings: 64,
      rope_scaling: { type: 'linear', factor: 2 },
    });
    assert.deepEqual(deepseek.rope_scaling, { rope_type: 'linear', factor: 2 });
  });

  test('unknown types, missing keys, foreign keys and bad values are refused by name', () => {
    refused({ type: 'longrope', short_factor: [1], long_factor: [1] }, /rope_scaling: rope_scaling type "longrope" is not supported \(supported: default, linear, dynamic, yarn, llama3\)/);
    refused({ rope_type: 'ntk', factor: 2 }, /type "ntk" is not supported/);
    refused({ factor: 2 }, /rope_scaling .* has no rope_type \(or legacy type\) key/);
    refused({ rope_type: 'linear', type: 'dynamic', factor: 2 }, /rope_type "linear" and legacy type "dynamic": they must agree/);
    refused({ type: 'linear' }, /rope_scaling type 'linear' is missing factor/);
    refused({ rope_type: 'llama3', factor: 8, low_freq_factor: 1 }, /type 'llama3' is missing high_freq_factor, original_max_position_embeddings/);
    refused({ rope_type: 'linear', factor: 2, beta_fast: 32 }, /rope_scaling key beta_fast is not a key of type 'linear' \(keys: factor\)/);
    refused({ rope_type: 'default', factor: 2 }, /key factor is not accepted with type 'default'/);
    refused({ rope_type: 'dynamic', factor: 2, low_freq_factor: 1, high_freq_factor: 4 }, /keys low_freq_factor, high_freq_factor are not a key of type 'dynamic'/);
    refused({ rope_type: 'linear', factor: 0.5 }, /rope_scaling factor must be a number ≥ 1, not 0.5/);
    refused({ rope_type: 'linear', factor: '2' }, /factor must be a number ≥ 1, not "2"/);
    refused({ rope_type: 'yarn', factor: 4, original_max_position_embeddings: 10.5 }, /original_max_position_embeddings must be a positive integer/);
    refused({ rope_type: 'yarn', factor: 4, beta_fast: 1, beta_slow: 2 }, /beta_fast \(1\) must exceed beta_slow \(2\)/);
    refused({ rope_type: 'yarn', factor: 4, truncate: 'no' }, /truncate must be a boolean/);
    refused({ rope_type: 'yarn', factor: 4, attention_factor: 0 }, /attention_factor must be a number > 0/);
    refused({ rope_type: 'llama3', factor: 8, low_freq_factor: 4, high_freq_factor: 1, original_max_position_embeddings: 64 }, /high_freq_factor \(1\) must exceed low_freq_factor \(4\)/);
    refused('linear', /rope_scaling must be an object or null/);
    assert.throws(() => parseModelConfig({ ...tiny, partial_rotary_factor: 0.5 }), /partial_rotary_factor must be 1/);
    assert.doesNotThrow(() => parseModelConfig({ ...tiny, partial_rotary_factor: 1 }));
  });
});

describe('inverse frequencies against hand-computed values (head_dim 8, theta 10 000)', () => {
  // Unscaled: theta^(−2i/8) = 1, 0.1, 0.01, 0.001.
  const cases: Array<[string, RopeScaling, number, number[], number]> = [
    // ÷4
    ['linear ×4', { rope_type: 'linear', factor: 4 }, 2048, [0.25, 0.025, 0.0025, 0.00025], 1],
    // length fixed at 2·64: base = 10⁴·(2·2 − 1)^(8/6) = 10⁴·3^(4/3), so inv_freq[i] = 10^(−i)·3^(−i/3)
    ['dynamic ×2', { rope_type: 'dynamic', factor: 2 }, 64, [1, 0.06933612743506348, 0.004807498567691362, 1 / 3000], 1],
    // correction dims over 2048 positions: 8·ln(2048/(2π·32))/(2·ln 10⁴) = 1.008 → floor 1, 8·ln(2048/2π)/(2·ln 10⁴) = 2.513 → ceil 3;
    // ramp (i − 1)/2 = 0, 0, ½, 1: pair 2 is (0.01 + 0.01/4)/2; attention 1 + 0.1·ln 4
    ['yarn ×4', { rope_type: 'yarn', factor: 4, beta_fast: 32, beta_slow: 1, truncate: true }, 2048, [1, 0.1, 0.00625, 0.00025], 1.138629436111989],
    // the same without truncation: ramp (2 − 1.008)/(2.513 − 1.008) = 0.6591 at pair 2; attention (1 + 0.1·ln 4)/(1 + 0.05·ln 4)
    ['yarn ×4 untruncated, mscale 1 / 0.5', { rope_type: 'yarn', factor: 4, beta_fast: 32, beta_slow: 1, truncate: false, mscale: 1, mscale_all_dim: 0.5 }, 2048,
      [1, 0.1, 0.005056971521129435, 0.00025], 1.0648216253695715],
    ['yarn ×4, attention_factor 0.9', { rope_type: 'yarn', factor: 4, beta_fast: 32, beta_slow: 1, truncate: true, attention_factor: 0.9 }, 2048, [1, 0.1, 0.00625, 0.00025], 0.9],
    // wavelengths 2π, 20π, 200π, 2000π against 1024/4 = 256 and 1024/1 = 1024: keep, keep, smoothed by
    // s = (1024/(200π) − 1)/3 = 0.20992 → (1 − s)·0.01/8 + s·0.01, ÷8
    ['llama3 ×8', { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 1024 }, 2048,
      [1, 0.1, 0.003086760967011275, 0.000125], 1],
  ];
  for (const [name, scaling, maxPositions, want, attention] of cases)
    test(name, () => {
      for (const [who, got] of [['model', ropeFrequencies(8, 10000, scaling, maxPositions)], ['float64 reference', ropeFreq64(8, 10000, scaling, maxPositions)]] as const) {
        want.forEach((w, i) => assert.ok(Math.abs(got.invFreq[i] - w) <= 1e-12 * w, `${who} inv_freq[${i}] = ${got.invFreq[i]}, want ${w}`));
        assert.ok(Math.abs(got.attentionFactor - attention) <= 1e-12, `${who} attention factor ${got.attentionFactor}, want ${attention}`);
      }
    });

  test('the Rope tables carry the attention factor on cos and sin (host and tensor tables agree)', () => {
    const rope = new Rope(8, 10000, { rope_type: 'yarn', factor: 4, beta_fast: 32, beta_slow: 1, truncate: true }, 2048);
    const positions = Int32Array.of(0, 5, 63);
    const host = rope.hostTables(positions);
    const { cos, sin } = rope.tables(positions);
    const c = cos.dataSync(), s = sin.dataSync();
    const a = 1.138629436111989;
    for (let r = 0; r < 3; r++)
      for (let i = 0; i < 4; i++) {
        const angle = positions[r] * rope.invFreq[i];
        assert.ok(Math.abs(host.cos[r * 4 + i] - a * Math.cos(angle)) <= 1e-6 && Math.abs(host.sin[r * 4 + i] - a * Math.sin(angle)) <= 1e-6);
        assert.equal(c[r * 8 + i], host.cos[r * 4 + i]);
        assert.equal(c[r * 8 + i + 4], host.cos[r * 4 + i]);
        assert.equal(s[r * 8 + i + 4], host.sin[r * 4 + i]);
      }
    disposeAll([cos, sin]);
  });
});

function params64Of(model: MixtralModel): Params64 {
  const out: Params64 = new Map();
  for (const table of [model.dense, model.localExperts!.params]) for (const name of table.names()) out.set(name, toF64(table.get(name).dataSync()));
  return out;
}


const idsFor = (n: number, salt = 11) => Int32Array.from({ length: n }, (_, i) => (i * 37 + salt) % 256);

// On `tiny` (head_dim 8, theta 10 000, 64 positions) each type changes some pairs and keeps others.
const MODEL_CASES: Array<[string, Record<string, unknown>]> = [
  ['linear', { type: 'linear', factor: 4 }],
  ['dynamic', { rope_type: 'dynamic', factor: 2 }],
  // ramp 0, ½, 1, 1 over the pairs; attention factor 1.1386
  ['yarn', { rope_type: 'yarn', factor: 4 }],
  ['yarn (attention_factor 1.7, truncate false)', { rope_type: 'yarn', factor: 4, attention_factor: 1.7, truncate: false, original_max_position_embeddings: 32 }],
  // pair 0 kept, pair 1 smoothed, pairs 2 and 3 ÷8
  ['llama3', { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 }],
];

describe('model with scaled rotary embeddings', () => {
  for (const [name, rope_scaling] of MODEL_CASES) {
    test(`${name}: full-sequence logits = float64 forward within 1e-5 relative; paged serving step = full forward`, async (t) => {
      const c = parseModelConfig({ ...tiny, rope_scaling, initializer_range: 0.2 }) as MixtralConfig;
      const model = MixtralModel.initialize(c, 9);
      after(() => model.dispose());
      const plain = MixtralModel.initialize(parseModelConfig({ ...tiny, initializer_range: 0.2 }), 9);
      after(() => plain.dispose());
      const B = 2, T = 24;
      const ids = idsFor(B * T);
      const out = await model.forward(ids, B, T, { passId: 'ref', train: false });
      const logits = (out.logits.dataSync() as Float32Array).slice();
      const reference = referenceLogits(params64Of(model), c, ids, B, T, choicesOf(out.stats));
      disposeAll([out.logits, out.hidden, out.kv]);
      const rel = maxAbsDiff(logits, reference) / maxAbs(reference);
      t.diagnostic(`${name}: max |logits − reference| / max |reference| = ${rel.toExponential(2)}`);
      assert.ok(rel <= 1e-5, `logits differ from the float64 reference by ${rel} relative`);
      // The scaling is not a no-op: same weights, unscaled rope, different logits.
      assert.ok(maxAbsDiff(await plain.logits(ids, B, T), logits) > 1e-3, 'scaled and unscaled logits agree');

      // Serving: a prompt chunk (matMul path, then per-row path), then token-by-token decode, against
      // recomputing the whole sequence.
      const V = c.vocab_size;
      const seq = idsFor(20, 3);
      const defaultMacs = pagedAttentionSettings.matMulChunkMacs;
      try {
        for (const path of ['matMul', 'rows'] as const) {
          pagedAttentionSettings.matMulChunkMacs = path === 'matMul' ? 0 : Number.POSITIVE_INFINITY;
          const paged = new PagedDecoder(model, 4);
          const prompt = 9;
          let worst = 0;
          const [first] = await paged.step([{ seq: 0, ids: seq.subarray(0, prompt) }], `${path}-prefill`);
          const whole = await model.logits(seq, 1, seq.length);
          worst = maxAbsDiff(first, whole.subarray((prompt - 1) * V, prompt * V));
          for (let past = prompt; past < seq.length; past++) {
            const [step] = await paged.step([{ seq: 0, ids: seq.subarray(past, past + 1) }], `${path}${past}`);
            worst = Math.max(worst, maxAbsDiff(step, whole.subarray(past * V, (past + 1) * V)));
          }
          t.diagnostic(`${name}, ${path} prompt path: worst |paged − full| = ${worst.toExponential(2)}`);
          assert.ok(worst <= 1e-5, `paged step differs from the full forward by ${worst} (${path})`);
        }
      } finally {
        pagedAttentionSettings.matMulChunkMacs = defaultMacs;
      }
    });
  }
});

test('a checkpoint keeps its rope_scaling: config.json round trip, same logits', async () => {
  const root = await mkdtemp(join(tmpdir(), 'switchyard-rope-'));
  after(() => rm(root, { recursive: true, force: true }));
  const c = parseModelConfig({ ...tiny, rope_scaling: { type: 'yarn', factor: 4, mscale: 1, mscale_all_dim: 0.5 } });
  const model = MixtralModel.initialize(c, 4);
  await saveModel(root, model);
  const written = JSON.parse(await readFile(join(root, 'config.json'), 'utf8')) as { rope_scaling: unknown };
  assert.deepEqual(written.rope_scaling, { rope_type: 'yarn', factor: 4, beta_fast: 32, beta_slow: 1, truncate: true, mscale: 1, mscale_all_dim: 0.5 });
  const loaded = await loadModel(root);
  assert.deepEqual(loaded.config.rope_scaling, c.rope_scaling);
  assert.equal(loaded.rope.attentionFactor, model.rope.attentionFactor);
  assert.ok(maxAbsDiff(await loaded.logits(idsFor(12), 1, 12), await model.logits(idsFor(12), 1, 12)) <= 1e-6);
  model.dispose();
  loaded.dispose();
});

test('training with a scaled rope (yarn ×4, llama3 ×8): loss = float64 loss, attention gradients = float64 central differences', async (t) => {
  for (const rope_scaling of [{ rope_type: 'yarn', factor: 4 }, MODEL_CASES[4][1]]) {
    const c = parseModelConfig({ ...tiny, rope_scaling, initializer_range: 0.3 }) as MixtralConfig;
    const model = MixtralModel.initialize(c, 31);
    const B = 2, T = 8;
    const rng = new Rng(32);
    const ids = Int32Array.from({ length: B * T }, () => rng.nextInt(c.vocab_size));
    const targets = Int32Array.from({ length: B * T }, () => rng.nextInt(c.vocab_size));
    for (const table of [model.dense, model.localExperts!.params]) table.clearGrads();
    const res = await model.lossAndGradients(ids, targets, B, T, { passId: 'train', train: true });
    const p64 = params64Of(model);
    const L = () => referenceLoss(p64, c, ids, targets, B, T, choicesOf(res.layerStats));
    const refLoss = L();
    assert.ok(Math.abs(res.loss - refLoss) <= 1e-5 * refLoss, `loss ${res.loss} vs reference ${refLoss}`);
    for (const name of ['layers.0.wqkv', 'layers.1.wqkv', 'layers.1.wo']) {
      const g = model.dense.gradOrZeros(name);
      const analytic = (g.dataSync() as Float32Array).slice();
      const x64 = p64.get(name)!;
      const idx = sampleIndices(() => rng.next(), x64.length, 32);
      const err = relErr(idx.map((i) => analytic[i]), idx.map((i) => centralDiff(L, x64, i)));
      t.diagnostic(`${rope_scaling.rope_type} ${name}: rel err ${err.toExponential(2)}`);
      assert.ok(err <= 1e-3, `${name}: gradient relative error ${err}`);
    }
    model.dispose();
  }
});
