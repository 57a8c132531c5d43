// Rotary position embedding in Hugging Face's rotate-half layout: the first and second halves of each
// head form the pairs, inv_freq[i] = theta^(-2i/headDim).
import * as tf from '@tensorflow/tfjs-core';
import { scoped, type T2 } from './tensors.js';

export class Rope {
  /** rotate_half as a constant matrix, so applying it is one fast matMul instead of slice/neg/concat. */
  private readonly rotate: T2;
  private readonly rotateT: T2;
  private readonly invFreq: Float64Array;

  constructor(readonly headDim: number, theta: number) {
    const half = headDim / 2;
    this.invFreq = new Float64Array(half);
    for (let i = 0; i < half; i++) this.invFreq[i] = 1 / Math.pow(theta, (2 * i) / headDim);
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
        const c = Math.cos(angle);
        const s = Math.sin(angle);
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
        cos[r * half + i] = Math.cos(angle);
        sin[r * half + i] = Math.sin(angle);
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
