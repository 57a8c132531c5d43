// RMSNorm as Hugging Face Mixtral computes it: x · rsqrt(mean(x²) + eps) · w.
import * as tf from '@tensorflow/tfjs-core';
import { scoped, type T2 } from './tensors.js';

export interface RmsNormCache { x: T2; inv: T2 }

export function rmsNormForward(x: T2, weight: tf.Tensor1D, eps: number): { y: T2; cache: RmsNormCache } {
  return scoped(() => {
    const inv = tf.rsqrt(tf.add(tf.mean(tf.square(x), -1, true), eps)) as T2;
    const y = tf.mul(tf.mul(x, inv), weight) as T2;
    return { y, cache: { x: tf.keep(x.clone()), inv } };
  });
}

export function rmsNormBackward(dy: T2, cache: RmsNormCache, weight: tf.Tensor1D): { dx: T2; dWeight: tf.Tensor1D } {
  return scoped(() => {
    const { x, inv } = cache;
    const normed = tf.mul(x, inv);
    const dWeight = tf.sum(tf.mul(dy, normed), 0) as tf.Tensor1D;
    const g = tf.mul(dy, weight);
    // d/dx of x·r with r = (mean(x²)+eps)^-1/2:  r·g − x·r³·mean(g·x)
    const proj = tf.mean(tf.mul(g, x), -1, true);
    const dx = tf.sub(tf.mul(g, inv), tf.mul(tf.mul(x, tf.pow(inv, 3)), proj)) as T2;
    return { dx, dWeight };
  });
}

/**
 * The same norm over host rows [rows, width] (the serving step keeps its residual stream on the host),
 * rounded as the tensor version rounds: (x · inv) then · w, each to float32.
 */
export function rmsNormRows(x: Float32Array, width: number, weight: Float32Array, eps: number): Float32Array {
  const out = new Float32Array(x.length);
  for (let o = 0; o < x.length; o += width) {
    let sum = 0;
    for (let d = 0; d < width; d++) sum += x[o + d] * x[o + d];
    const inv = Math.fround(1 / Math.sqrt(Math.fround(Math.fround(sum / width) + eps)));
    for (let d = 0; d < width; d++) out[o + d] = Math.fround(x[o + d] * inv) * weight[d];
  }
  return out;
}
