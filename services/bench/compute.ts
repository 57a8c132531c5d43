// compute suite: the backend's own matmul rate on the expert shapes, and the SwiGLU expert's forward and
// hand-written backward as ratios of it (targets 0.8x and 0.6x, DESIGN §13).
import * as tf from '@tensorflow/tfjs-core';
import { backendInfo } from '../core/backend.js';
import { Rng } from '../core/data/random.js';
import { expertBackward, expertForward, transposeExpert } from '../core/model/expert.js';
import { batchMatMul, disposeAll, type T2 } from '../core/model/tensors.js';
import { report, timeMedian, type BenchRow } from './report.js';

function randomMatrix(rng: Rng, rows: number, cols: number, std: number): T2 {
  const v = new Float32Array(rows * cols);
  for (let i = 0; i < v.length; i++) v[i] = rng.normal() * std;
  return tf.tensor2d(v, [rows, cols]);
}

const sync = (t: tf.Tensor) => t.dataSync();

export async function computeSuite(quick: boolean): Promise<void> {
  const rng = new Rng(7);
  const reps = quick ? 3 : 7;
  const shapes = quick
    ? [{ tokens: 2048, hidden: 512, intermediate: 2048 }]
    : [{ tokens: 2048, hidden: 512, intermediate: 2048 }, { tokens: 4096, hidden: 128, intermediate: 256 }];
  const rows: BenchRow[] = [];
  for (const { tokens: N, hidden: D, intermediate: H } of shapes) {
    const tag = `N=${N} D=${D} H=${H}`;
    const x = randomMatrix(rng, N, D, 1);
    const w = { w1t: randomMatrix(rng, D, H, 0.02), w3t: randomMatrix(rng, D, H, 0.02), w2t: randomMatrix(rng, H, D, 0.02) };
    const wT = transposeExpert(w);
    const dy = randomMatrix(rng, N, D, 1);
    // The ceiling: the same backend's plain matMul on the expert's dominant shape.
    const mmSeconds = timeMedian(reps, () => {
      const y = tf.matMul(x, w.w1t);
      sync(y);
      y.dispose();
    });
    const mmRate = (2 * N * D * H) / mmSeconds / 1e9;
    const fwdSeconds = timeMedian(reps, () => {
      const { y } = expertForward(x, w, false);
      sync(y);
      y.dispose();
    });
    const fwdRate = (6 * N * D * H) / fwdSeconds / 1e9;
    const { y, cache } = expertForward(x, w, true);
    y.dispose();
    const bwdSeconds = timeMedian(reps, () => {
      const g = expertBackward(dy, cache!, wT);
      sync(g.dx);
      sync(g.dW2t);
      disposeAll(g);
    });
    const bwdRate = (12 * N * D * H) / bwdSeconds / 1e9;
    disposeAll([x, w, wT, dy, cache]);
    rows.push({ name: `matmul ${N}x${D}x${H}`, value: mmRate, unit: 'GFLOP/s' });
    rows.push({ name: `expert forward (${tag})`, value: fwdRate, unit: 'GFLOP/s', anchor: mmRate, ratio: fwdRate / mmRate, target: '>= 0.8', met: fwdRate / mmRate >= 0.8 });
    rows.push({ name: `expert backward (${tag})`, value: bwdRate, unit: 'GFLOP/s', anchor: mmRate, ratio: bwdRate / mmRate, target: '>= 0.6', met: bwdRate / mmRate >= 0.6 });
  }
  // Attention's batched matMul: tfjs's own kernel versus one 2-D matMul per batch entry.
  const [n, r, k, c] = [64, 256, 32, 128];
  const a = tf.randomNormal([n, r, k]) as tf.Tensor3D;
  const b = tf.randomNormal([n, k, c]) as tf.Tensor3D;
  const flops = 2 * n * r * k * c;
  const native = timeMedian(reps, () => { const o = tf.matMul(a, b); sync(o); o.dispose(); });
  const sliced = timeMedian(reps, () => { const o = batchMatMul(a, b); sync(o); o.dispose(); });
  disposeAll([a, b]);
  rows.push({ name: `tf.matMul batched ${n}x(${r}x${k}x${c})`, value: flops / native / 1e9, unit: 'GFLOP/s' });
  rows.push({ name: `batchMatMul (per-entry 2-D)`, value: flops / sliced / 1e9, unit: 'GFLOP/s', anchor: flops / native / 1e9, ratio: native / sliced });
  const info = backendInfo();
  await report('compute', rows, { backend: info.choice, threads: info.threads, simd: info.simd, reps, quick });
}
