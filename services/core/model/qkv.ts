// What a family does between the fused q|k|v projection and RoPE (family.ts AttentionVariant): add the
// projection biases (Qwen2-MoE), RMSNorm q and k per head (Qwen3-MoE) or over the whole projection
// (OLMoE), then clamp q, k and v (OLMoE clip_qkv; transformers clamps after the norms). Forward and
// hand-written backward on tensors for training and full forwards, and the same forward over host rows
// for the serving step, whose residual stream stays on the host.
import * as tf from '@tensorflow/tfjs-core';
import type { AttentionVariant } from './family.js';
import { rmsNormBackward, rmsNormForward, rmsNormRows, type RmsNormCache } from './rmsnorm.js';
import { scoped, type T2 } from './tensors.js';

export interface QkvLayout { heads: number; kvHeads: number; headDim: number }

/** A layer's parameters of the transform (those its variant uses). */
export interface QkvParams<T = tf.Tensor1D> { bias?: T; qNorm?: T; kNorm?: T }

export interface QkvCache { q?: RmsNormCache; k?: RmsNormCache; inside?: T2 }

export interface QkvGradients { dqkv: T2; dBias?: tf.Tensor1D; dQNorm?: tf.Tensor1D; dKNorm?: tf.Tensor1D }

export class QkvTransform {
  /** Whether the variant changes the projection at all (Llama attention: no). */
  readonly active: boolean;
  private readonly widths: [number, number, number];

  constructor(readonly variant: AttentionVariant, readonly layout: QkvLayout, readonly eps: number) {
    this.active = variant.qkvBias || variant.qkNorm !== 'none' || variant.clip !== undefined;
    const kv = layout.kvHeads * layout.headDim;
    this.widths = [layout.heads * layout.headDim, kv, kv];
  }

  /** The width one norm weight covers: a head, or the whole q (k) projection. */
  private normWidth(which: 'q' | 'k'): number {
    if (this.variant.qkNorm === 'head') return this.layout.headDim;
    return which === 'q' ? this.widths[0] : this.widths[1];
  }

  forward(qkv: T2, p: QkvParams, keepCache: boolean): { y: T2; cache?: QkvCache } {
    return scoped(() => {
      const v = this.variant;
      const rows = qkv.shape[0];
      let x: T2 = v.qkvBias ? tf.add(qkv, need(p.bias, 'bias')) : qkv;
      const cache: QkvCache = {};
      if (v.qkNorm !== 'none') {
        const [q, k, rest] = tf.split(x, this.widths, 1) as T2[];
        const norm = (t: T2, w: tf.Tensor1D, which: 'q' | 'k') => {
          const width = this.normWidth(which);
          const n = rmsNormForward(tf.reshape(t, [-1, width]), w, this.eps);
          if (keepCache) cache[which] = n.cache;
          return tf.reshape(n.y, [rows, -1]) as T2;
        };
        x = tf.concat([norm(q, need(p.qNorm, 'qNorm'), 'q'), norm(k, need(p.kNorm, 'kNorm'), 'k'), rest], 1) as T2;
      }
      if (v.clip !== undefined) {
        // torch.clamp passes the gradient where min ≤ x ≤ max.
        if (keepCache) cache.inside = tf.cast(tf.lessEqual(tf.abs(x), v.clip), 'float32') as T2;
        x = tf.clipByValue(x, -v.clip, v.clip);
      }
      return keepCache ? { y: x, cache } : { y: x };
    });
  }

  /** From dL/d(transformed q|k|v) to dL/d(projection) and the transform's own weight gradients. */
  backward(dy: T2, cache: QkvCache, p: QkvParams): QkvGradients {
    return scoped(() => {
      const v = this.variant;
      const rows = dy.shape[0];
      let d: T2 = cache.inside ? tf.mul(dy, cache.inside) : dy;
      const out: Partial<QkvGradients> = {};
      if (v.qkNorm !== 'none') {
        const [dq, dk, rest] = tf.split(d, this.widths, 1) as T2[];
        const back = (t: T2, c: RmsNormCache, w: tf.Tensor1D, which: 'q' | 'k') => {
          const g = rmsNormBackward(tf.reshape(t, [-1, this.normWidth(which)]), c, w);
          if (which === 'q') out.dQNorm = g.dWeight;
          else out.dKNorm = g.dWeight;
          return tf.reshape(g.dx, [rows, -1]);
        };
        d = tf.concat([back(dq, cache.q!, need(p.qNorm, 'qNorm'), 'q'), back(dk, cache.k!, need(p.kNorm, 'kNorm'), 'k'), rest], 1) as T2;
      }
      if (v.qkvBias) out.dBias = tf.sum(d, 0) as tf.Tensor1D;
      return { ...out, dqkv: d } as QkvGradients;
    });
  }

  /** The forward over host rows [rows, q|k|v width], in place, rounded to float32 as the tensor version. */
  rows(qkv: Float32Array, p: QkvParams<Float32Array>): void {
    const v = this.variant;
    const width = this.widths[0] + 2 * this.widths[1];
    const rows = qkv.length / width;
    if (v.qkvBias) {
      const bias = need(p.bias, 'bias');
      for (let o = 0; o < qkv.length; o += width) for (let c = 0; c < width; c++) qkv[o + c] += bias[c];
    }
    if (v.qkNorm !== 'none') {
      let from = 0;
      for (const [which, weight] of [['q', need(p.qNorm, 'qNorm')], ['k', need(p.kNorm, 'kNorm')]] as const) {
        const part = this.widths[which === 'q' ? 0 : 1];
        const gathered = new Float32Array(rows * part);
        for (let r = 0; r < rows; r++) gathered.set(qkv.subarray(r * width + from, r * width + from + part), r * part);
        const normed = rmsNormRows(gathered, this.normWidth(which), weight, this.eps);
        for (let r = 0; r < rows; r++) qkv.set(normed.subarray(r * part, (r + 1) * part), r * width + from);
        from += part;
      }
    }
    if (v.clip !== undefined) {
      const c = v.clip;
      for (let i = 0; i < qkv.length; i++) qkv[i] = Math.min(c, Math.max(-c, qkv[i]));
    }
  }
}

function need<T>(t: T | undefined, what: string): T {
  if (t === undefined) throw new Error(`the attention variant needs its ${what} weight`);
  return t;
}
