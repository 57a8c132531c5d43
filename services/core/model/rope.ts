// Rotary position embedding in Hugging Face's rotate-half layout: the first and second halves of each
// head form the pairs, inv_freq[i] = theta^(-2i/headDim), changed by `rope_scaling` (ropeFrequencies).
import * as tf from '@tensorflow/tfjs-core';
import type { RopeScaling } from '../config.js';
import { scoped, type T2 } from './tensors.js';

/** A rotary embedding's inverse frequencies (one per pair) and the factor its cos and sin are multiplied by. */
export interface RopeFrequencies {
  invFreq: Float64Array;
  /** Multiplies cos and sin, so q·k by its square (YaRN's mscale; 1 for the other types). */
  attentionFactor: number;
}

/** YaRN's magnitude correction 0.1·m·ln(s) + 1 (1 when s ≤ 1). */
function yarnMscale(scale: number, m = 1): number {
  return scale <= 1 ? 1 : 0.1 * m * Math.log(scale) + 1;
}

/**
 * Inverse frequencies and attention factor of each `rope_scaling` type, from Hugging Face transformers'
 * definitions (modeling_rope_utils.py), in float64:
 * - none: theta^(-2i/d);
 * - linear: divided by `factor` (positions interpolated);
 * - dynamic (NTK): theta raised to theta·(factor·L/maxPositions − (factor − 1))^(d/(d−2)). transformers takes L =
 *   the current sequence length once it exceeds maxPositions, re-rotating every key; Switchyard stores keys
 *   rotated in its paged cache and shares them between sequences, so a rotation must depend on the position
 *   only: L is fixed at factor·maxPositions, as vLLM's DynamicNTKScalingRotaryEmbedding does (docs/models.md);
 * - yarn: per pair, a ramp between the interpolated (÷factor) and original frequency over the dimensions
 *   whose wavelength makes between beta_fast and beta_slow turns in original_max_position_embeddings
 *   (default maxPositions), ends floored/ceiled unless truncate is false; attention factor
 *   `attention_factor`, else mscale(factor, mscale)/mscale(factor, mscale_all_dim) when both are given,
 *   else mscale(factor);
 * - llama3: wavelengths above original/low_freq_factor divided by factor, below original/high_freq_factor
 *   kept, between them interpolated by (original/wavelength − low)/(high − low).
 */
export function ropeFrequencies(headDim: number, theta: number, scaling: RopeScaling | null = null, maxPositions = 0): RopeFrequencies {
  const half = headDim / 2;
  const plain = (base: number) => Float64Array.from({ length: half }, (_, i) => 1 / Math.pow(base, (2 * i) / headDim));
  if (scaling === null) return { invFreq: plain(theta), attentionFactor: 1 };
  const { factor } = scaling;
  switch (scaling.rope_type) {
    case 'linear':
      return { invFreq: plain(theta).map((f) => f / factor), attentionFactor: 1 };
    case 'dynamic': {
      if (headDim <= 2) throw new RangeError(`rope_scaling 'dynamic' needs head_dim > 2, not ${headDim}`);
      if (!(maxPositions > 0)) throw new RangeError('rope_scaling \'dynamic\' needs max_position_embeddings');
      const length = factor * maxPositions;
      const base = theta * Math.pow((factor * length) / maxPositions - (factor - 1), headDim / (headDim - 2));
      return { invFreq: plain(base), attentionFactor: 1 };
    }
    case 'yarn': {
      const original = scaling.original_max_position_embeddings ?? maxPositions;
      if (!(original > 0)) throw new RangeError('rope_scaling \'yarn\' needs original_max_position_embeddings or max_position_embeddings');
      // The dimension index (of d) whose pair turns `turns` times over `original` positions.
      const dimFor = (turns: number) => (headDim * Math.log(original / (turns * 2 * Math.PI))) / (2 * Math.log(theta));
      let low = dimFor(scaling.beta_fast);
      let high = dimFor(scaling.beta_slow);
      if (scaling.truncate) { low = Math.floor(low); high = Math.ceil(high); }
      low = Math.max(low, 0);
      high = Math.min(high, headDim - 1);
      if (low === high) high += 0.001;
      const invFreq = plain(theta).map((f, i) => {
        // 0 below low (original frequency kept), 1 above high (interpolated).
        const ramp = Math.min(1, Math.max(0, (i - low) / (high - low)));
        return (f / factor) * ramp + f * (1 - ramp);
      });
      const attentionFactor = scaling.attention_factor
        ?? (scaling.mscale && scaling.mscale_all_dim
          ? yarnMscale(factor, scaling.mscale) / yarnMscale(factor, scaling.mscale_all_dim)
          : yarnMscale(factor));
      return { invFreq, attentionFactor };
    }
    case 'llama3': {
      const { low_freq_factor: lowF, high_freq_factor: highF, original_max_position_embeddings: original } = scaling;
      const invFreq = plain(theta).map((f) => {
        const wavelength = (2 * Math.PI) / f;
        if (wavelength < original / highF) return f;
        if (wavelength > original / lowF) return f / factor;
        const smooth = (original / wavelength - lowF) / (highF - lowF);
        return (1 - smooth) * (f / factor) + smooth * f;
      });
      return { invFreq, attentionFactor: 1 };
    }
  }
}

export class Rope {
  /** rotate_half as a constant matrix, so applying it is one fast matMul instead of slice/neg/concat. */
  private readonly rotate: T2;
  private readonly rotateT: T2;
  readonly invFreq: Float64Array;
  /** Multiplies every cos and sin entry (YaRN's attention scaling). */
  readonly attentionFactor: number;

  /** `maxPositions`: the config's max_position_embeddings (dynamic and yarn scaling read it). */
  constructor(readonly headDim: number, theta: number, scaling: RopeScaling | null = null, maxPositions = 0) {
    const half = headDim / 2;
    ({ invFreq: this.invFreq, attentionFactor: this.attentionFactor } = ropeFrequencies(headDim, theta, scaling, maxPositions));
    const r = new Float32Array(headDim * headDim);
    // (x·R)[i] = −x[i+half] for i < half, x[i−half] for i ≥ half.
    for (let i = 0; i < half; i++) {
      r[(i + half) * headDim + i] = -1;
      r[i * headDim + (i + half)] = 1;
    }
    this.rotate = tf.keep(tf.tensor2d(r, [headDim, headDim]));
    this.rotateT = tf.keep(tf.transpose(this.rotate));
  }

  /** cos and sin tables [rows, 1, headDim] for the given per-row positions. */
  tables(positions: Int32Array): { cos: tf.Tensor3D; sin: tf.Tensor3D } {
    const hd = this.headDim;
    const half = hd / 2;
    const cos = new Float32Array(positions.length * hd);
    const sin = new Float32Array(positions.length * hd);
    for (let r = 0; r < positions.length; r++) {
      for (let i = 0; i < half; i++) {
        const angle = positions[r] * this.invFreq[i];
        const c = Math.cos(angle) * this.attentionFactor;
        const s = Math.sin(angle) * this.attentionFactor;
        cos[r * hd + i] = c; cos[r * hd + i + half] = c;
        sin[r * hd + i] = s; sin[r * hd + i + half] = s;
      }
    }
    return { cos: tf.tensor3d(cos, [positions.length, 1, hd]), sin: tf.tensor3d(sin, [positions.length, 1, hd]) };
  }

  /**
   * Host cos and sin tables [positions.length, headDim/2] (the two halves of a head share them), for
   * rotating rows in JS (the serving engine's attention).
   */
  hostTables(positions: ArrayLike<number>): { cos: Float32Array; sin: Float32Array } {
    const half = this.headDim / 2;
    const cos = new Float32Array(positions.length * half);
    const sin = new Float32Array(positions.length * half);
    for (let r = 0; r < positions.length; r++)
      for (let i = 0; i < half; i++) {
        const angle = positions[r] * this.invFreq[i];
        cos[r * half + i] = Math.cos(angle) * this.attentionFactor;
        sin[r * half + i] = Math.sin(angle) * this.attentionFactor;
      }
    return { cos, sin };
  }

  /** x: [rows, heads·headDim] → rotated, same shape. */
  apply(x: T2, heads: number, cos: tf.Tensor3D, sin: tf.Tensor3D): T2 {
    return scoped(() => {
      const rows = x.shape[0];
      const x3 = tf.reshape(x, [rows, heads, this.headDim]);
      const rotated = tf.reshape(tf.matMul(tf.reshape(x, [rows * heads, this.headDim]) as T2, this.rotate), [rows, heads, this.headDim]);
      return tf.reshape(tf.add(tf.mul(x3, cos), tf.mul(rotated, sin)), [rows, heads * this.headDim]) as T2;
    });
  }

  /** Gradient of apply(): the rotation's transpose. */
  backward(dy: T2, heads: number, cos: tf.Tensor3D, sin: tf.Tensor3D): T2 {
    return scoped(() => {
      const rows = dy.shape[0];
      const d3 = tf.reshape(dy, [rows, heads, this.headDim]);
      const viaSin = tf.reshape(tf.mul(d3, sin), [rows * heads, this.headDim]) as T2;
      const back = tf.reshape(tf.matMul(viaSin, this.rotateT), [rows, heads, this.headDim]);
      return tf.reshape(tf.add(tf.mul(d3, cos), back), [rows, heads * this.headDim]) as T2;
    });
  }
}
