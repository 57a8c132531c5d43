// compute suite: the SwiGLU expert's forward and hand-written backward as ratios of the backend's own
// plain matMul rate on exactly the shapes each pass multiplies (targets 0.8x and 0.6x, DESIGN §13).
import * as tf from '@tensorflow/tfjs-core';
import { backendInfo } from '../core/backend.js';
import { Rng } from '../core/data/random.js';
import { expertBackward, expertForward, swigluBackward, transposeExpert } from '../core/model/expert.js';
import { batchMatMul, disposeAll, type T2 } from '../core/model/tensors.js';
import { report, timeMedian, type BenchRow } from './report.js';

function randomMatrix(rng: Rng, rows: number, cols: number, std: number): T2 {
  const v = new Float32Array(rows * cols);
  for (let i = 0; i < v.length; i++) v[i] = rng.normal() * std;
  return tf.tensor2d(v, [rows, cols]);
}

const sync = (t: tf.Tensor) => t.dataSync();

/**
 * One call runs every product in `pairs` as plain matMuls. Like the expert passes it reads back only its
 * last [N, D] result (kernels run synchronously; reading every product would time copies, not math).
 */
const plainMatMuls = (pairs: Array<[T2, T2]>) => () => {
  pairs.forEach(([a, b], i) => {
    const y = tf.matMul(a, b);
    if (i === pairs.length - 1) sync(y);
    y.dispose();
  });
};

async function expertRows(rng: Rng, reps: number, N: number, D: number, H: number): Promise<BenchRow[]> {
  const tag = `N=${N} D=${D} H=${H}`;
  const x = randomMatrix(rng, N, D, 1);
  const w = { w1t: randomMatrix(rng, D, H, 0.02), w3t: randomMatrix(rng, D, H, 0.02), w2t: randomMatrix(rng, H, D, 0.02) };
  const wT = transposeExpert(w);
  const dy = randomMatrix(rng, N, D, 1);
  const g = randomMatrix(rng, N, H, 1);
  const gT = randomMatrix(rng, H, N, 1);
  const xT = randomMatrix(rng, D, N, 1);
  // Ceilings: the forward multiplies x·w1, x·w3, g·w2; the backward dy·w2ᵀ, gᵀ·dy, xᵀ·da, xᵀ·db, da·w1ᵀ, db·w3ᵀ.
  const forwardFlops = 6 * N * D * H;
  const backwardFlops = 12 * N * D * H;
  const forwardCeiling = forwardFlops / await timeMedian(reps, plainMatMuls([[x, w.w1t], [x, w.w3t], [g, w.w2t]])) / 1e9;
  const backwardCeiling = backwardFlops / await timeMedian(reps, plainMatMuls([[gT, dy], [dy, wT.w2], [xT, g], [xT, g], [g, wT.w1], [g, wT.w3]])) / 1e9;
  const forward = forwardFlops / await timeMedian(reps, () => {
    const { y } = expertForward(x, w, false);
    sync(y);
    y.dispose();
  }) / 1e9;
  const { y, cache } = expertForward(x, w, true);
  y.dispose();
  const backwardSeconds = await timeMedian(reps, () => {
    const grads = expertBackward(dy, cache!, wT);
    sync(grads.dx);
    sync(grads.dW2t);
    disposeAll(grads);
  });
  const backward = backwardFlops / backwardSeconds / 1e9;
  // Where the backward's time goes beyond its six matMuls: the elementwise SwiGLU derivative over
  // [N, H] and the transpose of x (the profile behind the ratio, e.g. with more wasm threads).
  const c = cache!;
  const dg = tf.matMul(dy, wT.w2) as tf.Tensor2D;
  const elementwise = await timeMedian(reps, () => {
    const out = swigluBackward(dg, c);
    sync(out.da);
    disposeAll(out);
  });
  const transpose = await timeMedian(reps, () => { const t = tf.transpose(c.x); sync(t); t.dispose(); });
  dg.dispose();
  disposeAll([x, w, wT, dy, g, gT, xT, cache]);
  return [
    { name: `matMul, forward shapes (${tag})`, value: forwardCeiling, unit: 'GFLOP/s' },
    { name: `expert forward (${tag})`, value: forward, unit: 'GFLOP/s', anchor: forwardCeiling, ratio: forward / forwardCeiling, target: '>= 0.8', met: forward / forwardCeiling >= 0.8 },
    { name: `matMul, backward shapes (${tag})`, value: backwardCeiling, unit: 'GFLOP/s' },
    { name: `expert backward (${tag})`, value: backward, unit: 'GFLOP/s', anchor: backwardCeiling, ratio: backward / backwardCeiling, target: '>= 0.6', met: backward / backwardCeiling >= 0.6 },
    { name: `  backward profile: SwiGLU derivative (elementwise, ${N}x${H})`, value: elementwise * 1000, unit: 'ms', anchor: backwardSeconds * 1000, ratio: elementwise / backwardSeconds },
    { name: `  backward profile: transpose of x (${N}x${D})`, value: transpose * 1000, unit: 'ms', anchor: backwardSeconds * 1000, ratio: transpose / backwardSeconds },
  ];
}

export async function computeSuite(quick: boolean): Promise<void> {
  const rng = new Rng(7);
  const reps = quick ? 5 : 7;
  // DESIGN §8's shape, and the small model's expert shape (not in --quick).
  const shapes = quick ? [[2048, 512, 2048]] : [[2048, 512, 2048], [4096, 128, 256]];
  const rows: BenchRow[] = [];
  for (const [N, D, H] of shapes) rows.push(...(await expertRows(rng, reps, N, D, H)));
  // Attention's batched matMul: tfjs's own kernel versus one 2-D matMul per batch entry.
  const [n, r, k, c] = [64, 256, 32, 128];
  const a = tf.randomNormal([n, r, k]) as tf.Tensor3D;
  const b = tf.randomNormal([n, k, c]) as tf.Tensor3D;
  const flops = 2 * n * r * k * c;
  const native = await timeMedian(reps, () => { const o = tf.matMul(a, b); sync(o); o.dispose(); });
  const sliced = await timeMedian(reps, () => { const o = batchMatMul(a, b); sync(o); o.dispose(); });
  disposeAll([a, b]);
  rows.push({ name: `tf.matMul batched ${n}x(${r}x${k}x${c})`, value: flops / native / 1e9, unit: 'GFLOP/s' });
  rows.push({ name: 'batchMatMul (per-entry 2-D)', value: flops / sliced / 1e9, unit: 'GFLOP/s', anchor: flops / native / 1e9, ratio: native / sliced });
  const info = backendInfo();
  await report('compute', rows, { backend: info.choice, threads: info.threads, simd: info.simd, reps, quick });
}
