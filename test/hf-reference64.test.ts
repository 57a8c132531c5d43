// The float64 Hugging Face reference (test/support/hf-reference64.ts) and the tiny checkpoint writer
// (test/support/tiny-hf-checkpoint.ts), checked where the project already has a trusted implementation
// (Mixtral: a published-layout bf16 checkpoint in two shards, loaded by loadModel) and, piece by piece,
// where it has none yet: MXFP4 dequantisation, gpt_oss's clamped SwiGLU, YaRN, OLMoE's clip_qkv and
// Qwen3's per-head q_norm.
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { loadModel } from '../services/core/checkpoint/model.js';
import { dequantMxfp4_64, gptOssGlu64, hfAttentionInputs64, hfReferenceLogits, hfRopeParameters64, type HfTensors } from './support/hf-reference64.js';
import { tinyConfigs, writeTinyHfCheckpoint, type TinyCheckpoint } from './support/tiny-hf-checkpoint.js';

await initBackend();
const root = await mkdtemp(join(tmpdir(), 'switchyard-hf-ref64-'));
after(() => rm(root, { recursive: true, force: true }));

const BATCH = 2;
const TOKENS = 9;
const idsFor = (n: number, salt = 5) => Int32Array.from({ length: n }, (_, i) => (i * 41 + salt * 13) % 259);

const maxAbs = (a: ArrayLike<number>) => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
};
const maxAbsDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
};

let dirs = 0;
async function tiny(config: Record<string, unknown>, opts: Parameters<typeof writeTinyHfCheckpoint>[2]): Promise<{ dir: string; ckpt: TinyCheckpoint }> {
  const dir = join(root, `ckpt-${dirs++}`);
  return { dir, ckpt: await writeTinyHfCheckpoint(dir, config, opts) };
}

/** A [rows, D] block of RMS-normed-looking rows (values of order 1), deterministic. */
function rowsOf(rows: number, D: number): Float64Array {
  return Float64Array.from({ length: rows * D }, (_, i) => Math.sin(1.7 * i + 0.3) * 1.3);
}

/** y = W·x for a [out, in] weight, written again here so the checks below do not lean on the reference's loops. */
function project(x: Float64Array, rows: number, w: { shape: number[]; values: ArrayLike<number> }): Float64Array {
  const [out, inner] = w.shape;
  const y = new Float64Array(rows * out);
  for (let r = 0; r < rows; r++) for (let o = 0; o < out; o++) for (let i = 0; i < inner; i++) y[r * out + o] += w.values[o * inner + i] * x[r * inner + i];
  return y;
}

describe('mixtral against the project', () => {
  const variants = [
    ['bf16, two shards', {}, { seed: 11 }],
    ['bf16, two shards, sliding_window 4', { sliding_window: 4 }, { seed: 12 }],
    ['f32, one shard', { torch_dtype: 'float32' }, { seed: 13, dtype: 'F32', shards: 1 }],
  ] as const;
  for (const [label, extra, opts] of variants) {
    test(`${label}: loadModel on the tiny checkpoint gives the reference's logits`, async (t) => {
      const config = { ...tinyConfigs().mixtral, ...extra };
      const { dir, ckpt } = await tiny(config, opts);
      const model = await loadModel(dir);
      try {
        const ids = idsFor(BATCH * TOKENS);
        const got = await model.logits(ids, BATCH, TOKENS);
        const want = hfReferenceLogits(config, ckpt.tensors, ids, BATCH, TOKENS);
        const err = maxAbsDiff(got, want);
        const scale = maxAbs(want);
        t.diagnostic(`max |project − reference| = ${err.toExponential(2)}, max |logit| = ${scale.toFixed(3)}`);
        assert.ok(scale > 0.5, `logits too small to compare: ${scale}`);
        assert.ok(err <= 1e-5 * scale, `project logits differ from the float64 reference by ${err} (max |logit| ${scale})`);
      } finally {
        model.dispose();
      }
    });
  }
});

describe('tiny checkpoint files', () => {
  test('shards, index (total_size, weight_map) and bf16 values exactly as stored', async () => {
    const config = tinyConfigs().qwen2_moe;
    const { dir, ckpt } = await tiny(config, { seed: 3, shards: 3 });
    const files = (await readdir(dir)).sort();
    assert.deepEqual(files, ['config.json', 'model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors', 'model.safetensors.index.json']);
    const index = JSON.parse(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8')) as { metadata: { total_size: number }; weight_map: Record<string, string> };
    assert.deepEqual(Object.keys(index.weight_map).sort(), [...ckpt.tensors.keys()].sort());
    let total = 0;
    const seen = new Map<string, { dtype: string; shape: number[]; bytes: Buffer }>();
    for (const file of files.filter((f) => f.endsWith('.safetensors'))) {
      const buf = await readFile(join(dir, file));
      const n = Number(buf.readBigUInt64LE(0));
      assert.equal((8 + n) % 8, 0, 'header padded to 8 bytes');
      const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
      for (const [name, info] of Object.entries(header)) {
        if (name === '__metadata__') continue;
        assert.equal(index.weight_map[name], file);
        const bytes = buf.subarray(8 + n + info.data_offsets[0], 8 + n + info.data_offsets[1]);
        total += bytes.length;
        seen.set(name, { dtype: info.dtype, shape: info.shape, bytes });
      }
    }
    assert.equal(index.metadata.total_size, total);
    for (const [name, t] of ckpt.tensors) {
      const s = seen.get(name)!;
      assert.equal(s.dtype, 'BF16');
      assert.deepEqual(s.shape, t.shape);
      for (let i = 0; i < t.values.length; i++) {
        // bf16 is the upper half of the float32 bits: the returned value must be exactly what is stored.
        const stored = new Float32Array(new Uint32Array([s.bytes.readUInt16LE(2 * i) << 16]).buffer)[0];
        if (stored !== t.values[i]) assert.fail(`${name}[${i}]: stored ${stored}, returned ${t.values[i]}`);
      }
    }
    const written = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
    assert.equal(written.torch_dtype, 'bfloat16');
    assert.deepEqual(written.architectures, ['Qwen2MoeForCausalLM']);
  });

  test('published names per family: dense qwen2_moe layer, shared expert, tied head, qwen3 norms, olmoe norms, gpt_oss experts', async () => {
    const c = tinyConfigs();
    const q2 = (await tiny(c.qwen2_moe, { seed: 1 })).ckpt.tensors;
    assert.deepEqual(q2.get('model.layers.1.mlp.gate_proj.weight')?.shape, [128, 64]);
    assert.ok(!q2.has('model.layers.1.mlp.gate.weight'));
    assert.deepEqual(q2.get('model.layers.0.mlp.experts.7.down_proj.weight')?.shape, [64, 32]);
    assert.deepEqual(q2.get('model.layers.2.mlp.shared_expert.up_proj.weight')?.shape, [96, 64]);
    assert.deepEqual(q2.get('model.layers.2.mlp.shared_expert_gate.weight')?.shape, [1, 64]);
    assert.deepEqual(q2.get('model.layers.0.self_attn.k_proj.bias')?.shape, [32]);
    assert.ok(!q2.has('model.layers.0.self_attn.o_proj.bias') && !q2.has('lm_head.weight'));
    const q3 = (await tiny(c.qwen3_moe, { seed: 1 })).ckpt.tensors;
    assert.deepEqual(q3.get('model.layers.0.self_attn.q_proj.weight')?.shape, [96, 64]);
    assert.deepEqual(q3.get('model.layers.0.self_attn.o_proj.weight')?.shape, [64, 96]);
    assert.deepEqual(q3.get('model.layers.0.self_attn.q_norm.weight')?.shape, [24]);
    assert.deepEqual(q3.get('model.layers.0.self_attn.k_norm.weight')?.shape, [24]);
    const ol = (await tiny(c.olmoe, { seed: 1 })).ckpt.tensors;
    assert.deepEqual(ol.get('model.layers.0.self_attn.q_norm.weight')?.shape, [64]);
    assert.deepEqual(ol.get('model.layers.0.self_attn.k_norm.weight')?.shape, [32]);
    assert.deepEqual(ol.get('model.layers.1.mlp.experts.15.gate_proj.weight')?.shape, [32, 64]);
    const go = (await tiny(c.gpt_oss, { seed: 1 })).ckpt.tensors;
    assert.deepEqual(go.get('model.layers.0.mlp.experts.gate_up_proj')?.shape, [8, 64, 128]);
    assert.deepEqual(go.get('model.layers.0.mlp.experts.down_proj')?.shape, [8, 64, 64]);
    assert.deepEqual(go.get('model.layers.0.self_attn.sinks')?.shape, [4]);
    assert.deepEqual(go.get('model.layers.0.self_attn.q_proj.weight')?.shape, [128, 64]);
    assert.deepEqual(go.get('model.layers.0.mlp.router.bias')?.shape, [8]);
    const gq = (await tiny(c.gpt_oss, { seed: 1, mxfp4: true })).ckpt.tensors;
    const blocks = gq.get('model.layers.2.mlp.experts.gate_up_proj_blocks')!;
    assert.deepEqual([blocks.shape, blocks.dtype, blocks.values instanceof Uint8Array], [[8, 128, 2, 16], 'U8', true]);
    assert.deepEqual(gq.get('model.layers.2.mlp.experts.down_proj_scales')?.shape, [8, 64, 2]);
    assert.ok(!gq.has('model.layers.2.mlp.experts.gate_up_proj'));
  });
});

describe('pieces the project cannot check yet', () => {
  test('dequantMxfp4_64: e2m1 codes, low nibble first, scale 2^(s − 127), transposed to [E, in, out]', () => {
    // One expert, two output rows, one group of 32 inputs.
    const blocks = new Uint8Array(2 * 16);
    blocks[0] = 0x21; // codes 1 (0.5) then 2 (1.0)
    blocks[1] = 0xf8; // codes 8 (−0) then 15 (−6)
    blocks[15] = 0x7e; // codes 14 (−4) then 7 (6)
    blocks[16] = 0x3b; // row 1: codes 11 (−1.5) then 3 (1.5)
    blocks[17] = 0xc5; // codes 5 (3) then 12 (−2)
    const out = dequantMxfp4_64({ shape: [1, 2, 1, 16], values: blocks }, { shape: [1, 2, 1], values: [128, 125] });
    assert.deepEqual(out.shape, [1, 32, 2]);
    const at = (input: number, row: number) => out.values[input * 2 + row];
    assert.equal(at(0, 0), 1.0); // 0.5 · 2
    assert.equal(at(1, 0), 2.0); // 1.0 · 2
    assert.ok(Object.is(at(2, 0), -0));
    assert.equal(at(3, 0), -12); // −6 · 2
    assert.equal(at(30, 0), -8); // −4 · 2
    assert.equal(at(31, 0), 12); // 6 · 2
    assert.equal(at(0, 1), -0.375); // −1.5 / 4
    assert.equal(at(1, 1), 0.375);
    assert.equal(at(2, 1), 0.75);
    assert.equal(at(3, 1), -0.5);
    assert.equal(at(4, 1), 0);

    // Two experts, three rows, two groups: every element against the layout written out longhand.
    const FP4 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6];
    const E = 2, R = 3, G = 2;
    const b = Uint8Array.from({ length: E * R * G * 16 }, (_, i) => (i * 97 + 31) % 256);
    const s = Uint8Array.from({ length: E * R * G }, (_, i) => 120 + ((i * 5) % 11));
    const big = dequantMxfp4_64({ shape: [E, R, G, 16], values: b }, { shape: [E, R, G], values: s });
    assert.deepEqual(big.shape, [E, G * 32, R]);
    for (let e = 0; e < E; e++)
      for (let col = 0; col < G * 32; col++)
        for (let r = 0; r < R; r++) {
          const g = Math.floor(col / 32);
          const byte = b[((e * R + r) * G + g) * 16 + Math.floor((col % 32) / 2)];
          const code = col % 2 === 0 ? byte & 15 : byte >> 4;
          const want = FP4[code] * 2 ** (s[(e * R + r) * G + g] - 127);
          assert.equal(big.values[(e * G * 32 + col) * R + r], want, `e ${e} in ${col} out ${r}`);
        }
  });

  test('gpt_oss SwiGLU: gate clamped above at 7, up clamped to ±7, (up + 1) · gate · σ(1.702 · gate)', () => {
    const cases: Array<[number, number, number]> = [
      [1, 0.5, 1.268693648899232],
      [10, -9, -41.99971876981991],
      [-10, 8, -3.2463690358842494e-6],
      [0.25, -3, -0.3023992998003884],
      [7.5, 7.5, 55.99962502642654],
    ];
    for (const [gate, up, want] of cases) {
      const got = gptOssGlu64(gate, up);
      assert.ok(Math.abs(got - want) <= 1e-12 * Math.max(1, Math.abs(want)), `glu(${gate}, ${up}) = ${got}, want ${want}`);
    }
  });

  test('olmoe: q_norm / k_norm over the whole projection, then clip_qkv clamps q, k and v', async () => {
    const config = tinyConfigs().olmoe;
    const { ckpt } = await tiny(config, { seed: 21 });
    const rows = 6;
    const D = 64;
    const x = rowsOf(rows, D);
    const { q, k, v } = hfAttentionInputs64(config, ckpt.tensors, 1, x, rows);
    const clip = config.clip_qkv as number;
    const p = 'model.layers.1.self_attn.';
    const normWhole = (y: Float64Array, dim: number, w: ArrayLike<number>) => {
      const out = new Float64Array(y.length);
      for (let r = 0; r < y.length / dim; r++) {
        let ss = 0;
        for (let i = 0; i < dim; i++) ss += y[r * dim + i] ** 2;
        for (let i = 0; i < dim; i++) out[r * dim + i] = (y[r * dim + i] / Math.sqrt(ss / dim + 1e-5)) * w[i];
      }
      return out;
    };
    const clamp = (y: Float64Array) => y.map((t) => Math.min(clip, Math.max(-clip, t)));
    const t = ckpt.tensors;
    const wantQ = clamp(normWhole(project(x, rows, t.get(`${p}q_proj.weight`)!), 64, t.get(`${p}q_norm.weight`)!.values));
    const wantK = clamp(normWhole(project(x, rows, t.get(`${p}k_proj.weight`)!), 32, t.get(`${p}k_norm.weight`)!.values));
    const wantV = clamp(project(x, rows, t.get(`${p}v_proj.weight`)!));
    assert.ok(maxAbsDiff(q, wantQ) < 1e-12 && maxAbsDiff(k, wantK) < 1e-12 && maxAbsDiff(v, wantV) < 1e-12);
    const clipped = [...q, ...k, ...v].filter((y) => Math.abs(y) === clip).length;
    assert.ok(clipped > 10, `clip_qkv ${clip} should bite in the tiny config; ${clipped} values clipped`);
    // Clamping before the norm would give other values.
    const clampFirst = normWhole(clamp(project(x, rows, t.get(`${p}q_proj.weight`)!)), 64, t.get(`${p}q_norm.weight`)!.values);
    assert.ok(maxAbsDiff(q, clampFirst) > 1e-3);
    // Without clip_qkv, values exceed the bound.
    const free = hfAttentionInputs64({ ...config, clip_qkv: null }, ckpt.tensors, 1, x, rows);
    assert.ok(maxAbs(free.q) > clip && maxAbs(free.v) > clip);
  });

  test('qwen3_moe: q_norm and k_norm normalise each head (head_dim 24) on its own', async () => {
    const config = tinyConfigs().qwen3_moe;
    const { ckpt } = await tiny(config, { seed: 22 });
    const rows = 5;
    const x = rowsOf(rows, 64);
    const { q, k } = hfAttentionInputs64(config, ckpt.tensors, 0, x, rows);
    const p = 'model.layers.0.self_attn.';
    const t = ckpt.tensors;
    const perHead = (y: Float64Array, w: ArrayLike<number>) => {
      const out = new Float64Array(y.length);
      for (let g = 0; g < y.length; g += 24) {
        let ss = 0;
        for (let i = 0; i < 24; i++) ss += y[g + i] ** 2;
        for (let i = 0; i < 24; i++) out[g + i] = (y[g + i] / Math.sqrt(ss / 24 + 1e-6)) * w[i];
      }
      return out;
    };
    const rawQ = project(x, rows, t.get(`${p}q_proj.weight`)!);
    assert.equal(q.length, rows * 4 * 24);
    assert.ok(maxAbsDiff(q, perHead(rawQ, t.get(`${p}q_norm.weight`)!.values)) < 1e-12);
    assert.ok(maxAbsDiff(k, perHead(project(x, rows, t.get(`${p}k_proj.weight`)!), t.get(`${p}k_norm.weight`)!.values)) < 1e-12);
    // Each head of q / weight has mean square 1 (up to eps); a norm over the whole row would not.
    const w = t.get(`${p}q_norm.weight`)!.values;
    for (let g = 0; g < q.length; g += 24) {
      let ms = 0;
      for (let i = 0; i < 24; i++) ms += (q[g + i] / w[i]) ** 2 / 24;
      assert.ok(Math.abs(ms - 1) < 1e-4, `head at ${g}: mean square ${ms}`);
    }
  });

  test('YaRN for gpt_oss: attention factor 0.1·ln(factor) + 1, ramp between the correction dims, truncate', () => {
    const config = tinyConfigs().gpt_oss;
    const { invFreq, attentionFactor } = hfRopeParameters64(config);
    assert.equal(invFreq.length, 16);
    assert.ok(Math.abs(attentionFactor - (0.1 * Math.log(4) + 1)) < 1e-15);
    const base = (i: number) => 150000 ** (-(2 * i) / 32);
    // low = max(0, dim·ln(16 / (32·2π)) / (2 ln θ)) = 0; high = dim·ln(16 / 2π) / (2 ln θ) ≈ 1.2548 (not rounded: truncate false).
    const high = (32 * Math.log(16 / (2 * Math.PI))) / (2 * Math.log(150000));
    const expect = (i: number, hi: number) => {
      const ramp = Math.min(1, Math.max(0, i / hi));
      return (base(i) / 4) * ramp + base(i) * (1 - ramp);
    };
    for (let i = 0; i < 16; i++) assert.ok(Math.abs(invFreq[i] - expect(i, high)) <= 1e-15 * base(i), `inv_freq[${i}]`);
    assert.equal(invFreq[0], 1);
    const truncated = hfRopeParameters64({ ...config, rope_scaling: { ...(config.rope_scaling as object), truncate: true } }).invFreq;
    assert.ok(Math.abs(truncated[1] - expect(1, 2)) < 1e-15 && Math.abs(truncated[1] - invFreq[1]) > 1e-3, 'truncate rounds high up to 2');
    assert.throws(() => hfRopeParameters64({ ...config, rope_scaling: { ...(config.rope_scaling as object), factor: 8 } }), /transformers versions disagree/);
    // The default RoPE: 1 / θ^(2i/d).
    const plain = hfRopeParameters64(tinyConfigs().mixtral);
    assert.equal(plain.attentionFactor, 1);
    assert.ok(plain.invFreq.every((f, i) => Math.abs(f - 1e6 ** (-(2 * i) / 16)) < 1e-16));
  });
});

describe('every family runs from its tiny checkpoint', () => {
  const configs = tinyConfigs();
  for (const family of Object.keys(configs) as Array<keyof typeof configs>) {
    test(`${family}: finite, non-trivial, batch rows independent`, async (t) => {
      const config = configs[family];
      const { ckpt } = await tiny(config, { seed: 7 });
      const ids = idsFor(BATCH * TOKENS, 2);
      const logits = hfReferenceLogits(config, ckpt.tensors, ids, BATCH, TOKENS);
      assert.equal(logits.length, BATCH * TOKENS * 259);
      assert.ok(logits.every(Number.isFinite));
      const scale = maxAbs(logits);
      t.diagnostic(`max |logit| ${scale.toFixed(3)}`);
      assert.ok(scale > 0.5 && scale < 1e3);
      // Sequence 1 alone gives the same rows as in the batch.
      const alone = hfReferenceLogits(config, ckpt.tensors, ids.subarray(TOKENS), 1, TOKENS);
      assert.ok(maxAbsDiff(alone, logits.subarray(TOKENS * 259)) < 1e-12);
    });
  }

  test('gpt_oss MXFP4: the blocks and scales run as the bf16 experts they dequantise to', async () => {
    const config = tinyConfigs().gpt_oss;
    const { ckpt } = await tiny(config, { seed: 8, mxfp4: true });
    const ids = idsFor(BATCH * TOKENS, 4);
    const quantized = hfReferenceLogits(config, ckpt.tensors, ids, BATCH, TOKENS);
    // The same model with gate_up_proj / down_proj dequantised into bf16 tensors [E, in, out].
    const plain: HfTensors = new Map();
    for (const [name, t] of ckpt.tensors) {
      const m = /^(.*)_(blocks|scales)$/.exec(name);
      if (!m) plain.set(name, t);
      else if (m[2] === 'blocks') plain.set(m[1], dequantMxfp4_64(t, ckpt.tensors.get(`${m[1]}_scales`)!));
    }
    assert.deepEqual(plain.get('model.layers.0.mlp.experts.gate_up_proj')!.shape, [8, 64, 128]);
    assert.deepEqual(plain.get('model.layers.0.mlp.experts.down_proj')!.shape, [8, 64, 64]);
    assert.deepEqual(hfReferenceLogits(config, plain, ids, BATCH, TOKENS), quantized);
    assert.ok(quantized.every(Number.isFinite) && maxAbs(quantized) > 0.5);
  });

  test('gpt_oss: the sliding window of 4 changes rows from position 4 on, not before', async () => {
    const config = tinyConfigs().gpt_oss;
    const { ckpt } = await tiny(config, { seed: 9 });
    const ids = idsFor(TOKENS, 6);
    const windowed = hfReferenceLogits(config, ckpt.tensors, ids, 1, TOKENS);
    const full = hfReferenceLogits({ ...config, sliding_window: 64 }, ckpt.tensors, ids, 1, TOKENS);
    assert.ok(maxAbsDiff(windowed.subarray(0, 4 * 259), full.subarray(0, 4 * 259)) < 1e-12);
    for (let pos = 4; pos < TOKENS; pos++) assert.ok(maxAbsDiff(windowed.subarray(pos * 259, (pos + 1) * 259), full.subarray(pos * 259, (pos + 1) * 259)) > 1e-6, `position ${pos}`);
  });

  test('qwen3_moe decoder_sparse_step 2: dense layers 0 and 2, and the reference reads exactly the written tensors', async () => {
    const config = { ...tinyConfigs().qwen3_moe, decoder_sparse_step: 2 };
    const { ckpt } = await tiny(config, { seed: 10 });
    assert.ok(ckpt.tensors.has('model.layers.0.mlp.gate_proj.weight') && ckpt.tensors.has('model.layers.1.mlp.gate.weight') && ckpt.tensors.has('model.layers.2.mlp.down_proj.weight'));
    const logits = hfReferenceLogits(config, ckpt.tensors, idsFor(TOKENS), 1, TOKENS);
    assert.ok(logits.every(Number.isFinite));
  });

  test('the reference refuses missing, misshapen and unused tensors', async () => {
    const config = tinyConfigs().mixtral;
    const { ckpt } = await tiny(config, { seed: 12 });
    const ids = idsFor(4);
    const extra: HfTensors = new Map(ckpt.tensors);
    extra.set('model.layers.0.mlp.gate_proj.weight', { shape: [96, 64], values: new Float32Array(96 * 64) });
    assert.throws(() => hfReferenceLogits(config, extra, ids, 1, 4), /never read: model\.layers\.0\.mlp\.gate_proj\.weight/);
    const missing: HfTensors = new Map(ckpt.tensors);
    missing.delete('model.layers.1.block_sparse_moe.experts.3.w2.weight');
    assert.throws(() => hfReferenceLogits(config, missing, ids, 1, 4), /missing tensor model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight/);
    const wrong: HfTensors = new Map(ckpt.tensors);
    wrong.set('lm_head.weight', { shape: [64, 259], values: ckpt.tensors.get('lm_head.weight')!.values });
    assert.throws(() => hfReferenceLogits(config, wrong, ids, 1, 4), /lm_head\.weight has shape \[64, 259\]/);
  });
});
