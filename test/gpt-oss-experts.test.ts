// GPT-OSS experts: MXFP4 dequantization, U8 tensors through safetensors and checkpoints, the fused
// checkpoint layout, and the clamped-SwiGLU experts with biases against a plain float64 loop.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../services/core/backend.js';
import { parseModelConfig, preset } from '../services/core/config.js';
import { familyOf } from '../services/core/model/family.js';
import { dequantizeMxfp4, dequantizeMxfp4Expert, FP4_E2M1_VALUES } from '../services/core/checkpoint/mxfp4.js';
import {
  CheckpointError, examineCheckpoint, isByteTensor, loadCheckpoint, readSafetensors, readSafetensorsHeader, writeSafetensors,
  type ByteTensor, type StoredTensor, type Tensor,
} from '../services/core/checkpoint/index.js';
import { SILU } from '../services/core/model/expert.js';
import { ExpertSet } from '../services/core/model/experts.js';
import {
  gptOssExpertFromHf, gptOssExpertNames, gptOssExpertsToHf, gptOssExpertTensorNames, isGptOssByteTensor, type GptOssHostExpert,
} from '../services/core/model/gpt-oss-experts.js';

await initBackend();

/** A small deterministic generator (xorshift32), so failures reproduce. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 32;
  };
}

const uniform = (next: () => number, n: number, scale: number) => Float32Array.from({ length: n }, () => (next() * 2 - 1) * scale);
const bytesOf = (next: () => number, n: number, lo = 0, hi = 255) => Uint8Array.from({ length: n }, () => lo + Math.floor(next() * (hi - lo + 1)));

// ------------------------------------------------------------------------------------------ MXFP4

test('MXFP4: hand-computed values, low nibble first, 2^(s−127) scales, each expert transposed', () => {
  // One expert, two rows of one group of 2 bytes (4 values). Row 0, scale 128 (×2): 0x21 → lo 1 (0.5),
  // hi 2 (1); 0x9F → lo 15 (−6), hi 9 (−0.5). Row 1, scale 125 (×¼): 0x07 → 6, 0; 0xE0 → 0, −4.
  const blocks: ByteTensor = { shape: [1, 2, 1, 2], bytes: Uint8Array.of(0x21, 0x9f, 0x07, 0xe0) };
  const scales: ByteTensor = { shape: [1, 2, 1], bytes: Uint8Array.of(128, 125) };
  const rows = [[1, 2, -12, -1], [1.5, 0, 0, -1]];
  const out = dequantizeMxfp4(blocks, scales);
  assert.deepEqual(out.shape, [1, 4, 2]);
  // [in, rows]: out[k][r] = rows[r][k].
  assert.deepEqual([...out.values], [1, 1.5, 2, 0, -12, 0, -1, -1]);
  for (let k = 0; k < 4; k++) for (let r = 0; r < 2; r++) assert.equal(out.values[k * 2 + r], rows[r]![k]);

  // Code 8 is −0; scale 0 is 2^−127 (a float32 subnormal, exact); scale 255 (E8M0 NaN) gives non-finite values.
  const edge = dequantizeMxfp4({ shape: [1, 3, 1, 1], bytes: Uint8Array.of(0x18, 0x71, 0x10) }, { shape: [1, 3, 1], bytes: Uint8Array.of(127, 0, 255) });
  assert.deepEqual(edge.shape, [1, 2, 3]);
  const [neg0, sub, nan, one, sub6, inf] = [edge.values[0], edge.values[1], edge.values[2], edge.values[3], edge.values[4], edge.values[5]];
  assert.ok(Object.is(neg0, -0), `code 8 is −0, got ${neg0}`);
  assert.equal(one, 0.5);
  assert.equal(sub, 0.5 * 2 ** -127);
  assert.equal(sub6, 6 * 2 ** -127);
  assert.ok(Number.isNaN(nan), 'code 0 × 2^128 is NaN, as 0 × inf in transformers');
  assert.equal(inf, Infinity);
});

test('MXFP4: the real block size against an e2m1 decode from the bits; one expert equals its slice of all', () => {
  // e2m1 from its definition, independent of the lookup table: sign, 2 exponent bits (bias 1), 1 mantissa bit.
  const e2m1 = (code: number) => {
    const sign = code & 8 ? -1 : 1;
    const exp = (code >> 1) & 3;
    const mant = code & 1;
    return sign * (exp === 0 ? mant * 0.5 : 2 ** (exp - 1) * (1 + mant / 2));
  };
  for (let c = 0; c < 16; c++) assert.ok(Object.is(FP4_E2M1_VALUES[c], e2m1(c)), `code ${c}`);
  const next = rng(7);
  const [E, R, G, B] = [3, 5, 2, 16];
  const blocks: ByteTensor = { shape: [E, R, G, B], bytes: bytesOf(next, E * R * G * B) };
  const scales: ByteTensor = { shape: [E, R, G], bytes: bytesOf(next, E * R * G, 120, 134) };
  const all = dequantizeMxfp4(blocks, scales);
  const IN = G * B * 2;
  assert.deepEqual(all.shape, [E, IN, R]);
  for (let e = 0; e < E; e++)
    for (let r = 0; r < R; r++)
      for (let k = 0; k < IN; k++) {
        const g = Math.floor(k / (2 * B));
        const byte = blocks.bytes[((e * R + r) * G + g) * B + Math.floor((k % (2 * B)) / 2)]!;
        const code = k % 2 === 0 ? byte & 15 : byte >> 4;
        const want = e2m1(code) * 2 ** (scales.bytes[(e * R + r) * G + g]! - 127);
        assert.ok(Object.is(all.values[(e * IN + k) * R + r], want), `e ${e} r ${r} k ${k}`);
      }
  for (let e = 0; e < E; e++) {
    const one = dequantizeMxfp4Expert(blocks, scales, e);
    assert.deepEqual(one.shape, [IN, R]);
    assert.deepEqual(one.values, all.values.subarray(e * IN * R, (e + 1) * IN * R));
  }
  assert.throws(() => dequantizeMxfp4Expert(blocks, scales, E), RangeError);
  assert.throws(() => dequantizeMxfp4(blocks, { shape: [E, R], bytes: scales.bytes }), CheckpointError);
});

// ------------------------------------------------------------------------------------------ U8 tensors

test('U8 tensors: written as U8, read back as bytes only when selected, refused otherwise', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'switchyard-u8-'));
  try {
    const file = join(dir, 'model.safetensors');
    const blocks: ByteTensor = { shape: [2, 3, 4], bytes: Uint8Array.from({ length: 24 }, (_, i) => (i * 37 + 5) & 255) };
    const bias: Tensor = { shape: [3], values: Float32Array.of(0.5, -1.25, 3) };
    await writeSafetensors(file, new Map<string, StoredTensor>([['w_blocks', blocks], ['bias', bias]]), undefined, 'BF16');
    const header = await readSafetensorsHeader(file);
    assert.equal(header.tensors.get('w_blocks')!.dtype, 'U8');
    assert.equal(header.tensors.get('bias')!.dtype, 'BF16');

    const read = await readSafetensors(file, { byteTensors: (n) => n.endsWith('_blocks') });
    const got = read.tensors.get('w_blocks')!;
    assert.ok(isByteTensor(got));
    assert.deepEqual(got.shape, [2, 3, 4]);
    assert.deepEqual(got.bytes, blocks.bytes);
    const gotBias = read.tensors.get('bias')!;
    assert.ok(!isByteTensor(gotBias));
    assert.deepEqual([...gotBias.values], [0.5, -1.25, 3]);

    // Unselected U8 is refused as before; a selected float tensor is refused too.
    await assert.rejects(readSafetensors(file), /w_blocks' has dtype U8, which is not supported/);
    await assert.rejects(readSafetensors(file, { byteTensors: () => true }), /'bias' is read as bytes, so it must be stored as U8, not BF16/);
    // Float reads are unchanged.
    assert.deepEqual([...(await readSafetensors(file, { names: ['bias'] })).tensors.get('bias')!.values], [0.5, -1.25, 3]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('U8 tensors in a checkpoint: examineCheckpoint and loadCheckpoint accept the ones a family keeps as bytes', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'switchyard-u8-ckpt-'));
  try {
    const n = gptOssExpertNames;
    const tensors = new Map<string, StoredTensor>([
      [n.blocks(0, 'down_proj'), { shape: [1, 2, 1, 2], bytes: Uint8Array.of(1, 2, 3, 4) }],
      [n.scales(0, 'down_proj'), { shape: [1, 2, 1], bytes: Uint8Array.of(127, 128) }],
      [n.downBias(0), { shape: [1, 2], values: Float32Array.of(1, 2) }],
    ]);
    await writeFile(join(dir, 'config.json'), JSON.stringify(preset('tiny').model));
    await writeSafetensors(join(dir, 'model.safetensors'), tensors);
    const expectedTensors = new Map([...tensors].map(([name, t]) => [name, t.shape]));

    const refused = await examineCheckpoint(dir, { expectedTensors });
    assert.equal(refused.problems.length, 1);
    assert.match(refused.problems[0]!, /2 tensor\(s\) in an unsupported dtype .*down_proj_blocks: U8; .*down_proj_scales: U8/);
    assert.deepEqual((await examineCheckpoint(dir, { expectedTensors, byteTensors: isGptOssByteTensor })).problems, []);
    // A selected tensor stored as floats is named as such.
    const wrong = await examineCheckpoint(dir, { expectedTensors, byteTensors: (name) => name.endsWith('_bias') });
    assert.ok(wrong.problems.some((p) => /not in U8, as quantized blocks and scales must be: .*down_proj_bias: F32/.test(p)), wrong.problems.join('\n'));

    const loaded = await loadCheckpoint(dir, { expectedTensors, byteTensors: isGptOssByteTensor });
    assert.deepEqual([...loaded.tensors.keys()], [...tensors.keys()]);
    const scales = loaded.tensors.get(n.scales(0, 'down_proj'))!;
    assert.ok(isByteTensor(scales) && scales.bytes[1] === 128);
    const bias = loaded.tensors.get(n.downBias(0))!;
    assert.ok(!isByteTensor(bias) && bias.values[1] === 2);
    await assert.rejects(loadCheckpoint(dir, { expectedTensors }), /unsupported dtype/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

// ------------------------------------------------------------------------------------------ fused layout

test('gptOssExpertFromHf: gate is the even columns, up the odd ones; biases alike; down as stored', () => {
  // E = 2, D = 2, I = 2: gate_up_proj[e][d][c] = 100·e + 10·d + c, so every value names its place.
  const E = 2, D = 2, I = 2;
  const gateUp = Float32Array.from({ length: E * D * 2 * I }, (_, i) => {
    const e = Math.floor(i / (D * 2 * I)), d = Math.floor(i / (2 * I)) % D, c = i % (2 * I);
    return 100 * e + 10 * d + c;
  });
  const n = gptOssExpertNames;
  const tensors = new Map<string, Tensor>([
    [n.gateUp(3), { shape: [E, D, 2 * I], values: gateUp }],
    [n.gateUpBias(3), { shape: [E, 2 * I], values: Float32Array.of(0, 1, 2, 3, 10, 11, 12, 13) }],
    [n.down(3), { shape: [E, I, D], values: Float32Array.of(0, 1, 2, 3, 20, 21, 22, 23) }],
    [n.downBias(3), { shape: [E, D], values: Float32Array.of(5, 6, 7, 8) }],
  ]);
  const w = gptOssExpertFromHf(tensors, 3, 1);
  assert.deepEqual(w.w1t.shape, [D, I]);
  assert.deepEqual([...w.w1t.values], [100, 102, 110, 112]);
  assert.deepEqual([...w.w3t.values], [101, 103, 111, 113]);
  assert.deepEqual(w.w2t.shape, [I, D]);
  assert.deepEqual([...w.w2t.values], [20, 21, 22, 23]);
  assert.deepEqual([...w.b1.values], [10, 12]);
  assert.deepEqual([...w.b3.values], [11, 13]);
  assert.deepEqual([...w.b2.values], [7, 8]);
  assert.throws(() => gptOssExpertFromHf(tensors, 3, 2), RangeError);
  assert.throws(() => gptOssExpertFromHf(tensors, 4, 0), /model\.layers\.4\.mlp\.experts\.gate_up_proj missing/);

  // And back: fusing both experts gives the tensors it was cut from.
  const out = new Map<string, Tensor>();
  gptOssExpertsToHf(out, 3, [gptOssExpertFromHf(tensors, 3, 0), w]);
  assert.deepEqual([...out.keys()].sort(), gptOssExpertTensorNames(3, 'unquantized').sort());
  for (const [name, t] of tensors) {
    assert.deepEqual(out.get(name)!.shape, t.shape, name);
    assert.deepEqual(out.get(name)!.values, t.values, name);
  }
});

test('gptOssExpertFromHf: the MXFP4 form gives what the dequantized unquantized form gives', () => {
  const next = rng(11);
  const E = 3, D = 8, I = 4, B = 2; // groups of 2B = 4 values: D / 4 and I / 4 groups
  const n = gptOssExpertNames;
  const guBlocks: ByteTensor = { shape: [E, 2 * I, D / (2 * B), B], bytes: bytesOf(next, E * 2 * I * D / 2) };
  const guScales: ByteTensor = { shape: [E, 2 * I, D / (2 * B)], bytes: bytesOf(next, E * 2 * I * D / (2 * B), 124, 130) };
  const dnBlocks: ByteTensor = { shape: [E, D, I / (2 * B), B], bytes: bytesOf(next, E * D * I / 2) };
  const dnScales: ByteTensor = { shape: [E, D, I / (2 * B)], bytes: bytesOf(next, E * D * I / (2 * B), 124, 130) };
  const biases: Array<[string, Tensor]> = [
    [n.gateUpBias(0), { shape: [E, 2 * I], values: uniform(next, E * 2 * I, 1) }],
    [n.downBias(0), { shape: [E, D], values: uniform(next, E * D, 1) }],
  ];
  const quantized = new Map<string, StoredTensor>([
    [n.blocks(0, 'gate_up_proj'), guBlocks], [n.scales(0, 'gate_up_proj'), guScales],
    [n.blocks(0, 'down_proj'), dnBlocks], [n.scales(0, 'down_proj'), dnScales], ...biases,
  ]);
  assert.deepEqual([...quantized.keys()], gptOssExpertTensorNames(0, 'mxfp4'));
  assert.ok([...quantized.keys()].every((name) => isGptOssByteTensor(name) === isByteTensor(quantized.get(name)!)));
  const unquantized = new Map<string, Tensor>([[n.gateUp(0), dequantizeMxfp4(guBlocks, guScales)], [n.down(0), dequantizeMxfp4(dnBlocks, dnScales)], ...biases]);
  assert.deepEqual(unquantized.get(n.gateUp(0))!.shape, [E, D, 2 * I]);
  assert.deepEqual(unquantized.get(n.down(0))!.shape, [E, I, D]);
  for (let e = 0; e < E; e++) assert.deepEqual(gptOssExpertFromHf(quantized, 0, e), gptOssExpertFromHf(unquantized, 0, e), `expert ${e}`);
  const floatsAsBlocks = new Map<string, StoredTensor>([...quantized, [n.blocks(0, 'down_proj'), { shape: [1], values: Float32Array.of(0) }]]);
  assert.throws(() => gptOssExpertFromHf(floatsAsBlocks, 0, 0), /holds floats, expected MXFP4 bytes/);
});

// ------------------------------------------------------------------------------------------ experts

test('the family says what an expert computes: silu unless gpt_oss, whose limit is swiglu_limit (default 7)', () => {
  const gptOss = { model_type: 'gpt_oss', hidden_size: 64, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2, vocab_size: 259, max_position_embeddings: 64 };
  assert.deepEqual(familyOf(preset('tiny').model).expertActivation, SILU);
  assert.deepEqual(familyOf(parseModelConfig(gptOss)).expertActivation, { kind: 'clamped-swiglu', alpha: 1.702, limit: 7 });
  assert.deepEqual(familyOf(parseModelConfig({ ...gptOss, swiglu_limit: 5.5 })).expertActivation, { kind: 'clamped-swiglu', alpha: 1.702, limit: 5.5 });
  assert.throws(() => parseModelConfig({ ...gptOss, swiglu_limit: -1 }), /swiglu_limit/);
});

/**
 * GPT-OSS's expert as transformers writes it, in float64, straight from the fused tensors:
 * gate_up = x·gate_up_proj[e] + bias; gate = gate_up[::2] clamped above; up = gate_up[1::2] clamped
 * both ways; y = ((up + 1)·gate·σ(α·gate))·down_proj[e] + down_bias.
 */
function gptOssExpert64(
  x: Float32Array, rows: number, fused: { gateUp: Tensor; gateUpBias: Tensor; down: Tensor; downBias: Tensor }, e: number, alpha: number, limit: number,
  bites: { gate: number; upHigh: number; upLow: number },
): Float64Array {
  const [, D, I2] = fused.gateUp.shape as [number, number, number];
  const I = I2 / 2;
  const y = new Float64Array(rows * D);
  for (let r = 0; r < rows; r++) {
    const act = new Float64Array(I);
    for (let i = 0; i < I; i++) {
      let gate = fused.gateUpBias.values[e * I2 + 2 * i]!;
      let up = fused.gateUpBias.values[e * I2 + 2 * i + 1]!;
      for (let d = 0; d < D; d++) {
        gate += x[r * D + d]! * fused.gateUp.values[(e * D + d) * I2 + 2 * i]!;
        up += x[r * D + d]! * fused.gateUp.values[(e * D + d) * I2 + 2 * i + 1]!;
      }
      if (gate > limit) bites.gate++;
      if (up > limit) bites.upHigh++;
      if (up < -limit) bites.upLow++;
      gate = Math.min(gate, limit);
      up = Math.max(-limit, Math.min(up, limit));
      act[i] = (up + 1) * gate / (1 + Math.exp(-alpha * gate));
    }
    for (let d = 0; d < D; d++) {
      let s = fused.downBias.values[e * D + d]!;
      for (let i = 0; i < I; i++) s += act[i]! * fused.down.values[(e * I + i) * D + d]!;
      y[r * D + d] = s;
    }
  }
  return y;
}

test('ExpertSet with the clamped activation and biases equals the float64 reference, clamps biting', () => {
  const next = rng(23);
  const E = 3, D = 8, I = 6, rows = 9;
  const activation = { kind: 'clamped-swiglu', alpha: 1.702, limit: 7 } as const;
  assert.equal(activation.kind, 'clamped-swiglu');
  const fused = {
    gateUp: { shape: [E, D, 2 * I], values: uniform(next, E * D * 2 * I, 1) },
    gateUpBias: { shape: [E, 2 * I], values: uniform(next, E * 2 * I, 0.5) },
    down: { shape: [E, I, D], values: uniform(next, E * I * D, 1) },
    downBias: { shape: [E, D], values: uniform(next, E * D, 0.5) },
  };
  const n = gptOssExpertNames;
  const tensors = new Map<string, Tensor>([[n.gateUp(2), fused.gateUp], [n.gateUpBias(2), fused.gateUpBias], [n.down(2), fused.down], [n.downBias(2), fused.downBias]]);
  // Rows 0–2 small (no clamping), the rest large enough that gate and up leave [−7, 7].
  const x = Float32Array.from({ length: rows * D }, (_, i) => (next() * 2 - 1) * (i < 3 * D ? 1 : 8));
  const experts = new ExpertSet(D, I, activation);
  const before = tf.memory().numTensors;
  try {
    for (let e = 0; e < E; e++) experts.addHost(2, e, gptOssExpertFromHf(tensors, 2, e));
    const bites = { gate: 0, upHigh: 0, upLow: 0 };
    const outputs: Float32Array[] = [];
    for (let e = 0; e < E; e++) {
      const got = experts.forwardRows('p', { layer: 2, expert: e, rowCount: rows, rows: x }, false);
      outputs.push(got);
      const want = gptOssExpert64(x, rows, fused, e, activation.kind === 'clamped-swiglu' ? activation.alpha : 0, 7, bites);
      for (let r = 0; r < rows; r++) {
        let scale = 0;
        for (let d = 0; d < D; d++) scale = Math.max(scale, Math.abs(want[r * D + d]!));
        for (let d = 0; d < D; d++) {
          const i = r * D + d;
          assert.ok(Math.abs(got[i]! - want[i]!) <= 1e-6 * scale, `expert ${e} row ${r} col ${d}: ${got[i]} vs ${want[i]} (row scale ${scale})`);
        }
      }
    }
    assert.ok(bites.gate > 0 && bites.upHigh > 0 && bites.upLow > 0, `clamps bit ${JSON.stringify(bites)}`);

    // Biases are parameters of the expert: named, digested, moved by adopt, freed by remove.
    assert.deepEqual(experts.paramNames(2, 1), ['w1t', 'w3t', 'w2t', 'b1', 'b3', 'b2'].map((p) => `layers.2.experts.1.${p}`));
    const digest = experts.digest(2, 1);
    const shard = new ExpertSet(D, I, activation);
    try {
      shard.adopt(experts);
      assert.equal(experts.keys().length, 0);
      assert.deepEqual(shard.paramNames(2, 1), ['w1t', 'w3t', 'w2t', 'b1', 'b3', 'b2'].map((p) => `layers.2.experts.1.${p}`));
      assert.equal(shard.digest(2, 1), digest);
      assert.deepEqual(shard.forwardRows('q', { layer: 2, expert: 1, rowCount: rows, rows: x }, false), outputs[1]);
      assert.throws(() => new ExpertSet(D, I).adopt(shard), /cannot adopt experts computing clamped-swiglu/);
      // Inference only: a training forward is refused, and leaves no tensor behind.
      const held = tf.memory().numTensors;
      assert.throws(() => shard.forwardRows('t', { layer: 2, expert: 1, rowCount: rows, rows: x }, true), /not trainable/);
      assert.equal(tf.memory().numTensors, held);
      shard.remove(2, 1);
      assert.equal(tf.memory().numTensors, held - 6);
      // Back to host and out as fused tensors: what was loaded.
      const host = (t: tf.Tensor): Tensor => ({ shape: [...t.shape], values: t.dataSync() as Float32Array });
      const all: GptOssHostExpert[] = [0, 1, 2].map((e) => {
        if (e === 1) return gptOssExpertFromHf(tensors, 2, 1);
        const w = shard.weights(2, e);
        return { w1t: host(w.w1t), w3t: host(w.w3t), w2t: host(w.w2t), b1: host(w.b1!), b3: host(w.b3!), b2: host(w.b2!) };
      });
      const out = new Map<string, Tensor>();
      gptOssExpertsToHf(out, 2, all);
      for (const [name, t] of tensors) assert.deepEqual(out.get(name)!.values, t.values, name);
    } finally {
      shard.dispose();
    }
  } finally {
    experts.dispose();
  }
  assert.equal(tf.memory().numTensors, before);
});

test('ExpertSet checks bias shapes; silu experts keep their three parameters', () => {
  const experts = new ExpertSet(4, 3);
  try {
    const m = (r: number, c: number) => tf.zeros([r, c]) as tf.Tensor2D;
    experts.add(0, 0, { w1t: m(4, 3), w3t: m(4, 3), w2t: m(3, 4) });
    assert.deepEqual(experts.paramNames(0, 0), ['layers.0.experts.0.w1t', 'layers.0.experts.0.w3t', 'layers.0.experts.0.w2t']);
    assert.deepEqual(Object.keys(experts.weights(0, 0)), ['w1t', 'w3t', 'w2t']);
    const wrong = { w1t: m(4, 3), w3t: m(4, 3), w2t: m(3, 4), b2: tf.zeros([3]) as tf.Tensor1D };
    assert.throws(() => experts.add(0, 1, wrong), /bias b2 has shape \[3\], expected \[4\]/);
    assert.equal(experts.holds(0, 1), false);
    tf.dispose(Object.values(wrong));
  } finally {
    experts.dispose();
  }
});
