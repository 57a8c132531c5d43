// Small tensor helpers shared by the layer modules. Weights are kept in [in, out] layout so the forward
// pass is a plain matMul; on wasm a transpose flag would leave the fast XNNPACK path (DESIGN §8).
import * as tf from '@tensorflow/tfjs-core';

export type T2 = tf.Tensor2D;

export const mm = (a: tf.Tensor, b: tf.Tensor): T2 => tf.matMul(a as T2, b as T2);

/**
 * aᵀ·b with explicit transposes (the fast path on wasm): transposes a, or computes (bᵀ·a)ᵀ when
 * transposing b and the [cols(a), cols(b)] result moves fewer elements than transposing a.
 */
export function mmTA(a: tf.Tensor, b: tf.Tensor): T2 {
  const [rows, aCols] = a.shape as [number, number];
  const bCols = b.shape[1] as number;
  if (rows * bCols + aCols * bCols < rows * aCols) {
    const bT = tf.transpose(b as T2);
    const prod = tf.matMul(bT, a as T2);
    const out = tf.transpose(prod) as T2;
    bT.dispose();
    prod.dispose();
    return out;
  }
  const aT = tf.transpose(a as T2);
  const out = tf.matMul(aT, b as T2) as T2;
  aT.dispose();
  return out;
}

/** Disposes every tensor reachable in a (possibly nested) container; disposing a tensor twice is harmless. */
export function disposeAll(container: unknown): void {
  if (container instanceof tf.Tensor) container.dispose();
  // Host rows (routing logits, expert outputs) hold no tensors: not walked value by value.
  else if (ArrayBuffer.isView(container)) return;
  else if (Array.isArray(container)) for (const c of container) disposeAll(c);
  else if (container instanceof Map) for (const c of container.values()) disposeAll(c);
  else if (container && typeof container === 'object') for (const c of Object.values(container)) disposeAll(c);
}

/** Transposes a row-major [rows, cols] matrix held in a typed array. */
export function transposeRows(values: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(values.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = values[r * cols + c];
  return out;
}

/**
 * tf.tidy for results that mix tensors with plain fields (shapes, numbers): every tensor reachable in
 * the result survives, everything else created inside is freed.
 */
export function scoped<R>(fn: () => R): R {
  return tf.tidy(fn as unknown as () => tf.TensorContainer) as unknown as R;
}

/**
 * Batched a·b over the leading axis. On wasm tfjs's BatchMatMul kernel misses XNNPACK (~3 GFLOP/s);
 * slicing in JS and issuing one 2-D matMul per batch entry measured 4–7x faster (DESIGN §8).
 */
export function batchMatMul(a: tf.Tensor3D, b: tf.Tensor3D): tf.Tensor3D {
  const [n, rows, inner] = a.shape;
  const [nb, innerB, cols] = b.shape;
  if (n !== nb || inner !== innerB) throw new Error(`batchMatMul shapes [${a.shape}] · [${b.shape}] do not match`);
  if (tf.getBackend() !== 'wasm') return tf.matMul(a, b);
  const av = a.dataSync() as Float32Array;
  const bv = b.dataSync() as Float32Array;
  const outs: tf.Tensor2D[] = [];
  for (let i = 0; i < n; i++) {
    const x = tf.tensor2d(av.subarray(i * rows * inner, (i + 1) * rows * inner), [rows, inner]);
    const y = tf.tensor2d(bv.subarray(i * inner * cols, (i + 1) * inner * cols), [inner, cols]);
    outs.push(tf.matMul(x, y));
    x.dispose();
    y.dispose();
  }
  const joined = tf.concat(outs, 0);
  tf.dispose(outs);
  const out = tf.reshape(joined, [n, rows, cols]) as tf.Tensor3D;
  joined.dispose();
  return out;
}

/** Swaps the last two axes of a rank-3 tensor. */
export const swapLast = (x: tf.Tensor3D): tf.Tensor3D => tf.transpose(x, [0, 2, 1]);

/** a += b elementwise (float32, as the backend's add rounds). */
export function addInto(a: Float32Array, b: Float32Array): void {
  if (a.length !== b.length) throw new RangeError(`addInto: ${a.length} vs ${b.length} values`);
  for (let i = 0; i < a.length; i++) a[i] += b[i];
}
