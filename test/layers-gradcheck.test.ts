// Per-layer numerical checks: each layer's float32 forward against the float64 reference, and its
// hand-written backward of L = Σ dy ⊙ y (random fixed dy, plus the gate's aux and z terms for MoE) against
// float64 central differences of the same L computed with test/support/reference64.ts.
import { before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../services/core/backend.js';
import { gateSettingsSchema } from '../services/core/config.js';
import { Rng } from '../services/core/data/random.js';
import { attentionBackward, attentionForward, type AttentionShape } from '../services/core/model/attention.js';
import { expertBackward, expertForward, transposeExpert } from '../services/core/model/expert.js';
import { ExpertSet, InProcessTransport, expertParamName } from '../services/core/model/experts.js';
import { crossEntropy } from '../services/core/model/model.js';
import { MoeLayer } from '../services/core/model/moe.js';
import { rmsNormBackward, rmsNormForward } from '../services/core/model/rmsnorm.js';
import { Rope } from '../services/core/model/rope.js';
import type { RopeScaling } from '../services/core/config.js';
import { disposeAll, mm, mmTA, type T2 } from '../services/core/model/tensors.js';
import {
  attention64, centralDiff, crossEntropy64, expert64, matmul64, maxAbs, maxAbsDiff, moe64, relErr, rmsNorm64, rope64, ropeFreq64,
  sampleIndices, toF64, type Expert64, type RefPolicy,
} from './support/reference64.js';

const GRAD_TOL = 1e-3;
const FWD_TOL = 1e-4;
/** Tensors up to this size are checked entry by entry; larger ones on a random subset. */
const FULL_CHECK = 256;
const SUBSET = 48;

before(async () => {
  await initBackend();
});

function randn(rng: Rng, n: number, std = 1, mean = 0): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = mean + std * rng.normal();
  return out;
}

const host = (t: tf.Tensor): Float32Array => t.dataSync() as Float32Array;

/** Forward check: max |y32 − y64| ≤ FWD_TOL · max|y64|. Returns the relative error. */
function checkForward(t: TestContext, label: string, y32: ArrayLike<number>, y64: ArrayLike<number>): number {
  const scale = maxAbs(y64);
  const err = maxAbsDiff(y32, y64) / Math.max(scale, 1e-12);
  t.diagnostic(`${label}: forward max|Δ|/max|y| = ${err.toExponential(2)} (scale ${scale.toExponential(2)})`);
  assert.ok(err <= FWD_TOL, `${label}: forward relative max error ${err} > ${FWD_TOL}`);
  return err;
}

/**
 * Gradient check of one tensor: analytic (float32) vs central differences of `loss` with respect to the
 * float64 copy `x64` (perturbed in place and restored), on every entry or a random subset.
 */
function checkGrad(
  t: TestContext, label: string, analytic: ArrayLike<number>, x64: Float64Array, loss: () => number, rng: Rng,
  indices?: number[],
): number {
  assert.equal(analytic.length, x64.length, `${label}: gradient has ${analytic.length} entries, parameter ${x64.length}`);
  const idx = indices ?? sampleIndices(() => rng.next(), x64.length, x64.length <= FULL_CHECK ? x64.length : SUBSET);
  const a = idx.map((i) => analytic[i]);
  const n = idx.map((i) => centralDiff(loss, x64, i));
  const err = relErr(a, n);
  t.diagnostic(`${label}: grad rel err ${err.toExponential(2)} over ${idx.length}/${x64.length} entries`);
  assert.ok(err <= GRAD_TOL, `${label}: gradient relative error ${err} > ${GRAD_TOL}`);
  return err;
}

const dot64 = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
};

describe('RMSNorm', () => {
  test('forward and backward (x, weight) vs float64', (t) => {
    const rng = new Rng(101);
    const N = 6, D = 12, eps = 1e-5;
    const x = randn(rng, N * D, 1.5);
    const w = randn(rng, D, 0.3, 1);
    const dy = randn(rng, N * D);
    const xT = tf.tensor2d(x, [N, D]);
    const wT = tf.tensor1d(w);
    const dyT = tf.tensor2d(dy, [N, D]);
    const { y, cache } = rmsNormForward(xT, wT, eps);
    const { dx, dWeight } = rmsNormBackward(dyT, cache, wT);
    const x64 = toF64(x), w64 = toF64(w), dy64 = toF64(dy);
    checkForward(t, 'rmsnorm', host(y), rmsNorm64(x64, N, D, w64, eps));
    const L = () => dot64(dy64, rmsNorm64(x64, N, D, w64, eps));
    checkGrad(t, 'rmsnorm dx', host(dx), x64, L, rng);
    checkGrad(t, 'rmsnorm dWeight', host(dWeight), w64, L, rng);
    disposeAll([xT, wT, dyT, y, cache, dx, dWeight]);
  });
});

// Scaled rotary embeddings (rope_scaling): YaRN changes the frequencies and multiplies cos and sin by its
// attention factor, so both the rotation and the scale must reach the gradients.
const YARN: RopeScaling = { rope_type: 'yarn', factor: 4, beta_fast: 32, beta_slow: 1, truncate: true };
const YARN_MAX_POSITIONS = 32;

describe('rotary embedding', () => {
  for (const scaling of [null, YARN])
    test(`apply (positions with an offset) and backward vs float64 rotate-half${scaling ? ' (yarn ×4)' : ''}`, (t) => {
      const rng = new Rng(102);
      const rows = 5, heads = 3, hd = 8, theta = 50;
      const positions = Int32Array.from({ length: rows }, (_, i) => 7 + 2 * i);
      const rope = new Rope(hd, theta, scaling, YARN_MAX_POSITIONS);
      const freq = scaling ? ropeFreq64(hd, theta, scaling, YARN_MAX_POSITIONS) : undefined;
      const x = randn(rng, rows * heads * hd);
      const dy = randn(rng, rows * heads * hd);
      const xT = tf.tensor2d(x, [rows, heads * hd]);
      const dyT = tf.tensor2d(dy, [rows, heads * hd]);
      const { cos, sin } = rope.tables(positions);
      const y = rope.apply(xT, heads, cos, sin);
      const dx = rope.backward(dyT, heads, cos, sin);
      const x64 = toF64(x), dy64 = toF64(dy);
      checkForward(t, 'rope', host(y), rope64(x64, rows, heads, hd, positions, theta, freq));
      checkGrad(t, 'rope dx', host(dx), x64, () => dot64(dy64, rope64(x64, rows, heads, hd, positions, theta, freq)), rng);
      disposeAll([xT, dyT, cos, sin, y, dx]);
    });
});

describe('attention (GQA, rope, causal)', () => {
  const B = 2, T = 5, H = 4, KV = 2, hd = 8, D = 16, theta = 100;
  const width = (H + 2 * KV) * hd;
  const rng = new Rng(103);
  const h = randn(rng, B * T * D);
  const wqkv = randn(rng, D * width, 1.2 / Math.sqrt(D));
  const wo = randn(rng, H * hd * D, 1 / Math.sqrt(H * hd));
  const dy = randn(rng, B * T * D);
  const plainRef = { batch: B, tokens: T, heads: H, kvHeads: KV, headDim: hd, hidden: D, theta };

  for (const scaling of [null, YARN]) {
    test(`forward and backward (h, wqkv per q/k/v block, wo) vs float64${scaling ? ' with a scaled rope (yarn ×4)' : ''}`, (t) => {
      const rope = new Rope(hd, theta, scaling, YARN_MAX_POSITIONS);
      const ref = scaling ? { ...plainRef, rope: ropeFreq64(hd, theta, scaling, YARN_MAX_POSITIONS) } : plainRef;
      const shape: AttentionShape = { batch: B, tokens: T, past: 0, heads: H, kvHeads: KV, headDim: hd };
      const hT = tf.tensor2d(h, [B * T, D]);
      const w = { wqkv: tf.tensor2d(wqkv, [D, width]), wo: tf.tensor2d(wo, [H * hd, D]) };
      const wT = { wqkvT: tf.transpose(w.wqkv), woT: tf.transpose(w.wo) };
      const dyT = tf.tensor2d(dy, [B * T, D]);
      const fwd = attentionForward(hT, w, shape, rope, undefined, true);
      const back = attentionBackward(dyT, fwd.cache!, wT, rope);
      const h64 = toF64(h), wqkv64 = toF64(wqkv), wo64 = toF64(wo), dy64 = toF64(dy);
      checkForward(t, 'attention', host(fwd.y), attention64(h64, wqkv64, wo64, ref));
      const L = () => dot64(dy64, attention64(h64, wqkv64, wo64, ref));
      checkGrad(t, 'attention dh', host(back.dh), h64, L, rng);
      checkGrad(t, 'attention dWo', host(back.dWo), wo64, L, rng, [...Array(wo64.length).keys()]);
      // every entry of wqkv, judged per block so a wrong q, k or v gradient cannot hide behind the others
      const dWqkv = host(back.dWqkv);
      const blocks: Array<[string, number, number]> = [['q', 0, H * hd], ['k', H * hd, (H + KV) * hd], ['v', (H + KV) * hd, width]];
      for (const [name, c0, c1] of blocks) {
        const idx: number[] = [];
        for (let r = 0; r < D; r++) for (let c = c0; c < c1; c++) idx.push(r * width + c);
        checkGrad(t, `attention dWqkv[${name}]`, dWqkv, wqkv64, L, rng, idx);
      }
      disposeAll([hT, w, wT, dyT, fwd, back]);
    });

    test(`forward with a KV cache (past 3, 2 new tokens) equals the full causal forward${scaling ? ' (yarn ×4)' : ''}`, (t) => {
      const rope = new Rope(hd, theta, scaling, YARN_MAX_POSITIONS);
      const ref = scaling ? { ...plainRef, rope: ropeFreq64(hd, theta, scaling, YARN_MAX_POSITIONS) } : plainRef;
      const P = 3, N = T - P;
      const rowsOf = (from: number, to: number): Float32Array => {
        const out = new Float32Array(B * (to - from) * D);
        for (let b = 0; b < B; b++) out.set(h.subarray((b * T + from) * D, (b * T + to) * D), b * (to - from) * D);
        return out;
      };
      const w = { wqkv: tf.tensor2d(wqkv, [D, width]), wo: tf.tensor2d(wo, [H * hd, D]) };
      const hPrefix = tf.tensor2d(rowsOf(0, P), [B * P, D]);
      const hRest = tf.tensor2d(rowsOf(P, T), [B * N, D]);
      const first = attentionForward(hPrefix, w, { batch: B, tokens: P, past: 0, heads: H, kvHeads: KV, headDim: hd }, rope, undefined, false);
      const second = attentionForward(hRest, w, { batch: B, tokens: N, past: P, heads: H, kvHeads: KV, headDim: hd }, rope, first.kv, false);
      const full = attention64(toF64(h), toF64(wqkv), toF64(wo), ref);
      const expected = new Float64Array(B * N * D);
      for (let b = 0; b < B; b++) expected.set(full.subarray((b * T + P) * D, (b * T + T) * D), b * N * D);
      checkForward(t, 'attention with KV cache', host(second.y), expected);
      disposeAll([w, hPrefix, hRest, first, second]);
    });
  }
});

describe('SwiGLU expert', () => {
  test('forward and backward (x, w1t, w3t, w2t) vs float64', (t) => {
    const rng = new Rng(104);
    const N = 7, D = 12, I = 20;
    const x = randn(rng, N * D);
    const w1t = randn(rng, D * I, 1 / Math.sqrt(D));
    const w3t = randn(rng, D * I, 1 / Math.sqrt(D));
    const w2t = randn(rng, I * D, 1 / Math.sqrt(I));
    const dy = randn(rng, N * D);
    const xT = tf.tensor2d(x, [N, D]);
    const w = { w1t: tf.tensor2d(w1t, [D, I]), w3t: tf.tensor2d(w3t, [D, I]), w2t: tf.tensor2d(w2t, [I, D]) };
    const dyT = tf.tensor2d(dy, [N, D]);
    const { y, cache } = expertForward(xT, w, true);
    const wT = transposeExpert(w);
    const g = expertBackward(dyT, cache!, wT);
    const x64 = toF64(x), dy64 = toF64(dy);
    const w64: Expert64 = { w1t: toF64(w1t), w3t: toF64(w3t), w2t: toF64(w2t) };
    checkForward(t, 'expert', host(y), expert64(x64, N, D, I, w64));
    const L = () => dot64(dy64, expert64(x64, N, D, I, w64));
    checkGrad(t, 'expert dx', host(g.dx), x64, L, rng);
    checkGrad(t, 'expert dW1t', host(g.dW1t), w64.w1t, L, rng);
    checkGrad(t, 'expert dW3t', host(g.dW3t), w64.w3t, L, rng);
    checkGrad(t, 'expert dW2t', host(g.dW2t), w64.w2t, L, rng);
    disposeAll([xT, w, dyT, y, cache, wT, g]);
  });
});

describe('MoE layer (gate, routing, experts, combine, aux and z losses)', () => {
  interface Case {
    policy: RefPolicy;
    k: number;
    capacityFactor: number;
    groupTokens: number;
    expectDrops: boolean;
    seed: number;
    /** an expert made unattractive to every token, so it receives no rows */
    idleExpert?: number;
  }
  const cases: Case[] = [
    { policy: 'mixtral', k: 2, capacityFactor: 1, groupTokens: 0, expectDrops: false, seed: 201 },
    { policy: 'mixtral', k: 2, capacityFactor: 1, groupTokens: 4, expectDrops: false, seed: 204, idleExpert: 2 },
    { policy: 'switch', k: 1, capacityFactor: 1, groupTokens: 0, expectDrops: true, seed: 202 },
    { policy: 'gshard', k: 2, capacityFactor: 0.5, groupTokens: 6, expectDrops: true, seed: 203 },
  ];
  const S = 12, D = 8, I = 12, E = 4, auxCoef = 0.3, zCoef = 0.1;

  for (const c of cases) {
    const title = `${c.policy} k=${c.k}, group ${c.groupTokens || S}` + (c.expectDrops ? `, capacity factor ${c.capacityFactor} (drops)` : '') +
      (c.idleExpert !== undefined ? `, expert ${c.idleExpert} idle` : '');
    test(title, async (t) => {
      const rng = new Rng(c.seed);
      const h = randn(rng, S * D);
      const gate = randn(rng, D * E, 1.5 / Math.sqrt(D));
      const dy = randn(rng, S * D);
      if (c.idleExpert !== undefined) {
        for (let s = 0; s < S; s++) h[s * D] = 3 + 0.1 * rng.normal();
        gate[c.idleExpert] = -3;
      }
      const experts = new ExpertSet(D, I);
      const ew: Array<{ w1t: Float32Array; w3t: Float32Array; w2t: Float32Array }> = [];
      for (let e = 0; e < E; e++) {
        const w = { w1t: randn(rng, D * I, 1 / Math.sqrt(D)), w3t: randn(rng, D * I, 1 / Math.sqrt(D)), w2t: randn(rng, I * D, 1 / Math.sqrt(I)) };
        ew.push(w);
        experts.add(0, e, { w1t: tf.tensor2d(w.w1t, [D, I]), w3t: tf.tensor2d(w.w3t, [D, I]), w2t: tf.tensor2d(w.w2t, [I, D]) });
      }
      const settings = gateSettingsSchema.parse({
        policy: c.policy, capacity_factor: c.capacityFactor, eval_capacity_factor: c.capacityFactor, min_capacity: 0,
        aux_loss_coef: auxCoef, z_loss_coef: zCoef,
        // the float64 reference keeps the first tokens (Random Token Selection is tested in gating.test.ts)
        ...(c.policy === 'switch' ? { use_rts: false } : {}),
      });
      const layer = new MoeLayer(0, D, E, c.k, settings, new InProcessTransport(experts));
      const hT = tf.tensor2d(h, [S, D]);
      const gateT = tf.tensor2d(gate, [D, E]);
      const gateWT = tf.transpose(gateT) as T2;
      const dyT = tf.tensor2d(dy, [S, D]);
      const fwd = await layer.forward(hT, gateT, { passId: 'gc', train: true, groupTokens: c.groupTokens });
      const back = await layer.backward(dyT, fwd.cache!, gateWT, auxCoef, zCoef);

      // the model's routing decisions, token-major over all groups
      const choices = new Int32Array(S * c.k);
      let off = 0;
      for (const p of fwd.stats.plans) {
        choices.set(p.expert, off);
        off += p.expert.length;
      }
      const h64 = toF64(h), gate64 = toF64(gate), dy64 = toF64(dy);
      const e64: Expert64[] = ew.map((w) => ({ w1t: toF64(w.w1t), w3t: toF64(w.w3t), w2t: toF64(w.w2t) }));
      const opts = {
        policy: c.policy, k: c.k, experts: E, hidden: D, inter: I, capacityFactor: c.capacityFactor, minCapacity: 0,
        dropTokens: true, groupTokens: c.groupTokens,
      };
      const free = moe64(h64, S, gate64, (e) => e64[e], opts);
      assert.deepEqual([...free.choices], [...choices], 'reference top-k choices differ from the model plan');
      const forced = moe64(h64, S, gate64, (e) => e64[e], opts, choices);
      assert.equal(fwd.stats.droppedChoices, forced.dropped, 'dropped choices');
      assert.deepEqual([...fwd.stats.countsAfterDrop], [...forced.rowsPerExpert], 'rows per expert after dropping');
      if (c.expectDrops) assert.ok(forced.dropped > 0, 'this case is meant to drop some choices');
      else assert.equal(forced.dropped, 0);
      if (c.idleExpert !== undefined) assert.equal(forced.rowsPerExpert[c.idleExpert], 0, 'the idle expert must get no rows');
      let partial = 0;
      for (let s = 0; s < S; s++) {
        let keptHere = 0;
        for (let j = 0; j < c.k; j++) keptHere += forced.kept[s * c.k + j];
        if (keptHere > 0 && keptHere < c.k) partial++;
      }
      if (c.policy === 'gshard') assert.ok(partial > 0, 'some token should keep only one of its two choices');
      checkForward(t, `moe ${c.policy} y`, host(fwd.y), forced.y);
      assert.ok(Math.abs(fwd.stats.auxLoss - forced.auxLoss) <= 1e-5 * Math.abs(forced.auxLoss), `aux ${fwd.stats.auxLoss} vs ${forced.auxLoss}`);
      assert.ok(Math.abs(fwd.stats.zLoss - forced.zLoss) <= 1e-5 * Math.abs(forced.zLoss), `z ${fwd.stats.zLoss} vs ${forced.zLoss}`);
      t.diagnostic(`dropped ${forced.dropped}/${S * c.k} choices (${partial} tokens partly kept); rows per expert ${[...forced.rowsPerExpert]}`);

      const L = () => {
        const r = moe64(h64, S, gate64, (e) => e64[e], opts, choices);
        return dot64(dy64, r.y) + auxCoef * r.auxLoss + zCoef * r.zLoss;
      };
      checkGrad(t, `moe ${c.policy} dh`, host(back.dh), h64, L, rng);
      checkGrad(t, `moe ${c.policy} dGate`, host(back.dGate), gate64, L, rng);
      for (let e = 0; e < E; e++)
        for (const part of ['w1t', 'w3t', 'w2t'] as const) {
          const name = expertParamName(0, e, part);
          const had = experts.params.hasGrad(name);
          const g = experts.params.gradOrZeros(name);
          const a = host(g).slice();
          if (!had) g.dispose();
          if (forced.rowsPerExpert[e] === 0) assert.ok(a.every((v) => v === 0), `${name}: expert without rows must get a zero gradient`);
          checkGrad(t, `moe ${c.policy} ${name}`, a, e64[e][part], L, rng);
        }

      // the auxiliary terms alone (dy = 0): their gradient is small beside Σ dy ⊙ y, so check it apart
      experts.params.clearGrads();
      const zeroDy = tf.zerosLike(dyT) as T2;
      const fwd2 = await layer.forward(hT, gateT, { passId: 'gc-aux', train: true, groupTokens: c.groupTokens });
      const back2 = await layer.backward(zeroDy, fwd2.cache!, gateWT, auxCoef, zCoef);
      const Laux = () => {
        const r = moe64(h64, S, gate64, (e) => e64[e], opts, choices);
        return auxCoef * r.auxLoss + zCoef * r.zLoss;
      };
      checkGrad(t, `moe ${c.policy} aux+z only: dh`, host(back2.dh), h64, Laux, rng);
      checkGrad(t, `moe ${c.policy} aux+z only: dGate`, host(back2.dGate), gate64, Laux, rng);
      for (const name of experts.params.names())
        if (experts.params.hasGrad(name))
          assert.ok(host(experts.params.gradOrZeros(name)).every((v) => v === 0), `${name}: dy = 0 must give a zero expert gradient`);
      disposeAll([hT, gateT, gateWT, dyT, zeroDy, fwd.y, back, fwd2.y, back2]);
      experts.dispose();
    });
  }
});

describe('LM head + cross-entropy', () => {
  test('loss and gradients (hidden, lm_head) vs float64; gradScale scales dLogits', (t) => {
    const rng = new Rng(105);
    const N = 6, D = 8, V = 11;
    const hidden = randn(rng, N * D);
    const lm = randn(rng, D * V, 1 / Math.sqrt(D) * 2);
    const targets = Int32Array.from({ length: N }, () => rng.nextInt(V));
    const hT = tf.tensor2d(hidden, [N, D]);
    const lmT = tf.tensor2d(lm, [D, V]);
    const lmTT = tf.transpose(lmT);
    const logits = mm(hT, lmT);
    const ce = crossEntropy(logits, targets);
    const dLm = mmTA(hT, ce.dLogits);
    const dHidden = mm(ce.dLogits, lmTT);
    const h64 = toF64(hidden), lm64 = toF64(lm);
    const L = () => crossEntropy64(matmul64(h64, lm64, N, D, V), N, V, targets);
    checkForward(t, 'logits', host(logits), matmul64(h64, lm64, N, D, V));
    const loss = ce.loss.dataSync()[0];
    assert.ok(Math.abs(loss - L()) <= 1e-5 * L(), `cross-entropy ${loss} vs reference ${L()}`);
    checkGrad(t, 'ce dHidden', host(dHidden), h64, L, rng);
    checkGrad(t, 'ce dLmHead', host(dLm), lm64, L, rng);
    const scaled = crossEntropy(logits, targets, 0.25);
    const d1 = host(ce.dLogits), d2 = host(scaled.dLogits);
    assert.ok(maxAbsDiff(d2, Array.from(d1, (v) => 0.25 * v)) <= 1e-7 * maxAbs(d1), 'gradScale must scale dLogits');
    disposeAll([hT, lmT, lmTT, logits, ce, dLm, dHidden, scaled]);
  });
});
