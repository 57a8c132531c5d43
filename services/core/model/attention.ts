// Causal self-attention (optionally within a sliding window) with grouped KV heads and rotary embedding,
// forward and hand-written backward.
// Query heads that share a KV head are stacked along the row axis ([B·kvHeads, group·T, headDim]), so one
// batched matMul serves the whole group without repeating K and V.
import * as tf from '@tensorflow/tfjs-core';
import { batchMatMul, mm, mmTA, scoped, swapLast, type T2 } from './tensors.js';
import type { Rope } from './rope.js';
import type { QkvCache, QkvParams, QkvTransform } from './qkv.js';

export interface AttentionShape {
  batch: number;
  /** New tokens per sequence in this call. */
  tokens: number;
  /** Tokens already in the KV cache (all sequences alike). */
  past: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  /** Sliding window: the query at position i sees keys j with i − window < j ≤ i (undefined = all j ≤ i). */
  window?: number;
}

export interface AttentionWeights {
  /** [hidden, (heads + 2·kvHeads)·headDim]: q, k, v projections side by side. */
  wqkv: T2;
  /** [heads·headDim, hidden]. */
  wo: T2;
  /** o_proj's bias [hidden], when the family has one. */
  bo?: tf.Tensor1D;
  /** GPT-OSS: a learned logit per query head [heads] that joins each softmax denominator (inference only). */
  sinks?: tf.Tensor1D;
  /** The family's step between projection and RoPE (biases, q/k norms, clamp), when it has one. */
  qkv?: { transform: QkvTransform; params: QkvParams };
}

export interface KvCache {
  /** [batch·kvHeads, past, headDim] each. */
  k: tf.Tensor3D;
  v: tf.Tensor3D;
}

export interface AttentionCache {
  shape: AttentionShape;
  h: T2;
  q: tf.Tensor3D;
  k: tf.Tensor3D;
  v: tf.Tensor3D;
  probs: tf.Tensor3D;
  context: T2;
  cos: tf.Tensor3D;
  sin: tf.Tensor3D;
  post?: QkvCache;
  /** Set when the forward had sinks (no backward for them). */
  sinks?: boolean;
}

function causalMask(groupRows: number, tokens: number, past: number, window?: number): T2 {
  const keys = past + tokens;
  const m = new Float32Array(groupRows * tokens * keys);
  for (let g = 0; g < groupRows; g++)
    for (let t = 0; t < tokens; t++) {
      const row = (g * tokens + t) * keys;
      const position = past + t;
      for (let j = position + 1; j < keys; j++) m[row + j] = -1e30;
      if (window !== undefined) for (let j = 0; j <= position - window; j++) m[row + j] = -1e30;
    }
  return tf.tensor2d(m, [groupRows * tokens, keys]);
}

function positionsFor(batch: number, tokens: number, past: number): Int32Array {
  const pos = new Int32Array(batch * tokens);
  for (let b = 0; b < batch; b++) for (let t = 0; t < tokens; t++) pos[b * tokens + t] = past + t;
  return pos;
}

/** [B·T, heads·hd] → [B·kv, group·T, hd] */
function toGrouped(x: tf.Tensor, s: AttentionShape, heads: number): tf.Tensor3D {
  const kv = s.kvHeads;
  const group = heads / kv;
  const x5 = tf.reshape(x, [s.batch, s.tokens, kv, group, s.headDim]);
  return tf.reshape(tf.transpose(x5, [0, 2, 3, 1, 4]), [s.batch * kv, group * s.tokens, s.headDim]);
}

/** inverse of toGrouped */
function fromGrouped(x: tf.Tensor, s: AttentionShape, heads: number): T2 {
  const kv = s.kvHeads;
  const group = heads / kv;
  const x5 = tf.reshape(x, [s.batch, kv, group, s.tokens, s.headDim]);
  return tf.reshape(tf.transpose(x5, [0, 3, 1, 2, 4]), [s.batch * s.tokens, heads * s.headDim]);
}

// Full-size masks for the training/prefill shapes, reused across calls: a same-shape add is faster on
// wasm than a broadcast one, and the shapes repeat every step.
const maskCache = new Map<string, tf.Tensor3D>();
const MASK_CACHE_ENTRIES = 4;

function maskFor(s: AttentionShape, group: number): tf.Tensor | undefined {
  const windowCuts = s.window !== undefined && s.past + s.tokens > s.window;
  if (s.tokens === 1 && !windowCuts) return undefined; // one new query sees every cached key
  if (s.past > 0) return causalMask(group, s.tokens, s.past, windowCuts ? s.window : undefined);
  const key = `${s.batch * s.kvHeads}x${group}x${s.tokens}x${windowCuts ? s.window : 'all'}`;
  let mask = maskCache.get(key);
  if (!mask) {
    if (maskCache.size >= MASK_CACHE_ENTRIES) {
      const [oldest, t] = maskCache.entries().next().value as [string, tf.Tensor3D];
      maskCache.delete(oldest);
      t.dispose();
    }
    mask = tf.tidy(() => tf.keep(tf.tile(tf.expandDims(causalMask(group, s.tokens, 0, windowCuts ? s.window : undefined), 0), [s.batch * s.kvHeads, 1, 1]) as tf.Tensor3D));
    maskCache.set(key, mask);
  }
  return mask;
}

/** The q, k and v column blocks of wqkv (small weight slices; activations are never split). */
function qkvBlocks(wqkv: T2, s: AttentionShape, axis: 0 | 1): T2[] {
  const qWidth = s.heads * s.headDim;
  const kvWidth = s.kvHeads * s.headDim;
  return tf.split(wqkv, [qWidth, kvWidth, kvWidth], axis) as T2[];
}

export function attentionForward(
  h: T2, w: AttentionWeights, s: AttentionShape, rope: Rope, kvCache?: KvCache, keepCache = true,
): { y: T2; cache?: AttentionCache; kv: KvCache } {
  return scoped(() => {
    const { cos, sin } = rope.tables(positionsFor(s.batch, s.tokens, s.past));
    // The 1/sqrt(head_dim) score scale is folded into q, the smallest operand of the scores.
    const scale = 1 / Math.sqrt(s.headDim);
    let projected: T2[];
    let post: QkvCache | undefined;
    if (w.qkv) {
      // The family's transform needs whole rows of q|k|v: one projection, then split.
      const out = w.qkv.transform.forward(mm(h, w.wqkv), w.qkv.params, keepCache);
      post = out.cache;
      projected = qkvBlocks(out.y, s, 1);
    } else projected = qkvBlocks(w.wqkv, s, 1).map((part) => mm(h, part));
    const q = toGrouped(tf.mul(rope.apply(projected[0], s.heads, cos, sin), scale), s, s.heads);
    const kNew = toGrouped(rope.apply(projected[1], s.kvHeads, cos, sin), s, s.kvHeads);
    const vNew = toGrouped(projected[2], s, s.kvHeads);
    const k = kvCache ? (tf.concat([kvCache.k, kNew], 1) as tf.Tensor3D) : kNew;
    const v = kvCache ? (tf.concat([kvCache.v, vNew], 1) as tf.Tensor3D) : vNew;
    const group = s.heads / s.kvHeads;
    // Only the small [.., T, headDim] operands are ever transposed; the [.., T, T] ones never are.
    const raw = batchMatMul(q, swapLast(k));
    const scoresMask = maskFor(s, group);
    const scores = scoresMask ? tf.add(raw, scoresMask) as tf.Tensor3D : raw;
    const probs = w.sinks ? softmaxWithSinks(scores, w.sinks, s) : tf.softmax(scores) as tf.Tensor3D;
    const context = fromGrouped(batchMatMul(probs, v), s, s.heads);
    const y = w.bo ? tf.add(mm(context, w.wo), w.bo) as T2 : mm(context, w.wo);
    const cache: AttentionCache | undefined = keepCache
      ? { shape: s, h: h.clone(), q, k, v, probs, context, cos, sin, ...(post ? { post } : {}), ...(w.sinks ? { sinks: true } : {}) }
      : undefined;
    return { y, cache, kv: { k, v } };
  });
}

/** softmax over [scores | the row's head's sink], the sink's column dropped ([B·kv, group·T, keys] rows). */
function softmaxWithSinks(scores: tf.Tensor3D, sinks: tf.Tensor1D, s: AttentionShape): tf.Tensor3D {
  const [n, rows, keys] = scores.shape;
  const group = s.heads / s.kvHeads;
  // Row g·T + t of batch entry b·kv + h belongs to query head h·group + g.
  const head = new Int32Array(n * rows);
  for (let i = 0; i < n; i++) for (let r = 0; r < rows; r++) head[i * rows + r] = (i % s.kvHeads) * group + Math.floor(r / s.tokens);
  const column = tf.reshape(tf.gather(sinks, tf.tensor1d(head, 'int32')), [n, rows, 1]);
  return tf.slice(tf.softmax(tf.concat([scores, column], 2)), [0, 0, 0], [n, rows, keys]) as tf.Tensor3D;
}

export interface AttentionGradients {
  dh: T2;
  dWqkv: T2;
  dWo: T2;
  /** With an o_proj bias. */
  dBo?: tf.Tensor1D;
  /** With a q|k|v transform: its weights' gradients. */
  dQkv?: QkvParams;
}

/**
 * Backward for a training call (no past); wT are the transposed weights ([out, in]), `qkv` the forward's
 * transform, `oBias` whether o_proj had a bias.
 */
export function attentionBackward(
  dy: T2, cache: AttentionCache, wT: { wqkvT: T2; woT: T2; qkv?: { transform: QkvTransform; params: QkvParams }; oBias?: boolean }, rope: Rope,
): AttentionGradients {
  return scoped(() => {
    const s = cache.shape;
    if (s.past !== 0) throw new Error('attention backward supports training calls without a KV cache');
    if (cache.sinks) throw new Error('attention sinks have no backward (GPT-OSS is served, not trained)');
    const dWo = mmTA(cache.context, dy);
    const dContext = toGrouped(mm(dy, wT.woT), s, s.heads);
    const scale = 1 / Math.sqrt(s.headDim);
    const dProbs = batchMatMul(dContext, swapLast(cache.v));
    const dV = swapLast(batchMatMul(swapLast(dContext), cache.probs));
    // softmax backward: P ⊙ (dP − Σ dP⊙P)
    const dScores = tf.mul(cache.probs, tf.sub(dProbs, tf.sum(tf.mul(dProbs, cache.probs), -1, true))) as tf.Tensor3D;
    // cache.q already carries the scale, so dK needs none; dq gets it on the small [rows, width] tensor.
    const dQ = batchMatMul(dScores, cache.k);
    const dK = swapLast(batchMatMul(swapLast(cache.q), dScores));
    const dq = rope.backward(tf.mul(fromGrouped(dQ, s, s.heads), scale) as T2, s.heads, cache.cos, cache.sin);
    const dk = rope.backward(fromGrouped(dK, s, s.kvHeads), s.kvHeads, cache.cos, cache.sin);
    const dv = fromGrouped(dV, s, s.kvHeads);
    const hT = tf.transpose(cache.h);
    const dBo = wT.oBias ? { dBo: tf.sum(dy, 0) as tf.Tensor1D } : {};
    if (wT.qkv) {
      const g = wT.qkv.transform.backward(tf.concat([dq, dk, dv], 1) as T2, cache.post ?? {}, wT.qkv.params);
      return {
        dh: mm(g.dqkv, wT.wqkvT), dWqkv: mm(hT, g.dqkv), dWo, ...dBo,
        dQkv: { ...(g.dBias ? { bias: g.dBias } : {}), ...(g.dQNorm ? { qNorm: g.dQNorm } : {}), ...(g.dKNorm ? { kNorm: g.dKNorm } : {}) },
      };
    }
    const dWqkv = tf.concat([mm(hT, dq), mm(hT, dk), mm(hT, dv)], 1) as T2;
    const [wqT, wkT, wvT] = qkvBlocks(wT.wqkvT, s, 0);
    const dh = tf.addN([mm(dq, wqT), mm(dk, wkT), mm(dv, wvT)]) as T2;
    return { dh, dWqkv, dWo, ...dBo };
  });
}
