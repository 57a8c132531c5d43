// AdamW with decoupled weight decay (Loshchilov & Hutter; torch.optim.AdamW's update order), applied to
// one ParameterTable. Every holder of parameters (router, shard) runs its own instance on its own table.
import * as tf from '@tensorflow/tfjs-core';
import type { ParameterTable } from '../model/parameters.js';
import type { HostTensor } from '../model/hf.js';
import type { TrainSettings } from '../config.js';

export interface AdamWSettings {
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
}

/** The optimizer settings of a training run's config (every trainer, router and shard uses these). */
export function adamWSettings(t: TrainSettings): AdamWSettings {
  return { beta1: t.beta1, beta2: t.beta2, eps: t.adam_eps, weightDecay: t.weight_decay };
}

/** Decay matrices only: norm gains are scale parameters that decay would pull towards zero. */
export const decays = (value: tf.Tensor): boolean => value.rank >= 2;

export class AdamW {
  /** Completed steps. */
  step = 0;
  private readonly moments = new Map<string, { m: tf.Tensor; v: tf.Tensor }>();

  constructor(readonly table: ParameterTable, readonly settings: AdamWSettings) {}

  /**
   * One step with learning rate `lr`; gradients are multiplied by `gradScale` (the clipping factor).
   * Parameters with no gradient this step step with a zero gradient (their moments decay, weight decay applies).
   */
  apply(lr: number, gradScale = 1): void {
    const { beta1, beta2, eps, weightDecay } = this.settings;
    this.step++;
    const c1 = 1 - Math.pow(beta1, this.step);
    const c2 = 1 - Math.pow(beta2, this.step);
    for (const name of this.table.names()) {
      const p = this.table.get(name);
      const prev = this.moments.get(name) ?? { m: tf.keep(tf.zerosLike(p)), v: tf.keep(tf.zerosLike(p)) };
      const next = tf.tidy(() => {
        const g = this.table.hasGrad(name) ? tf.mul(this.table.gradOrZeros(name), gradScale) : tf.zerosLike(p);
        const m = tf.add(tf.mul(prev.m, beta1), tf.mul(g, 1 - beta1));
        const v = tf.add(tf.mul(prev.v, beta2), tf.mul(tf.square(g), 1 - beta2));
        const update = tf.div(tf.div(m, c1), tf.add(tf.sqrt(tf.div(v, c2)), eps));
        const decayed = decays(p) && weightDecay > 0 ? tf.mul(p, 1 - lr * weightDecay) : p;
        return { p: tf.sub(decayed, tf.mul(update, lr)), m, v };
      });
      prev.m.dispose();
      prev.v.dispose();
      this.moments.set(name, { m: tf.keep(next.m), v: tf.keep(next.v) });
      this.table.set(name, next.p);
    }
  }

  /** Moments as host tensors named `{param}.exp_avg` / `{param}.exp_avg_sq` (torch's names). */
  exportState(): Map<string, HostTensor> {
    const out = new Map<string, HostTensor>();
    for (const [name, { m, v }] of this.moments) {
      out.set(`${name}.exp_avg`, { shape: [...m.shape], values: m.dataSync() as Float32Array });
      out.set(`${name}.exp_avg_sq`, { shape: [...v.shape], values: v.dataSync() as Float32Array });
    }
    return out;
  }

  importState(step: number, tensors: Map<string, HostTensor>): void {
    this.step = step;
    for (const name of this.table.names()) {
      const m = tensors.get(`${name}.exp_avg`);
      const v = tensors.get(`${name}.exp_avg_sq`);
      if (!m || !v) {
        if (step > 0) throw new Error(`optimizer state has no moments for ${name}`);
        continue;
      }
      this.moments.get(name)?.m.dispose();
      this.moments.get(name)?.v.dispose();
      this.moments.set(name, { m: tf.keep(tf.tensor(m.values, m.shape)), v: tf.keep(tf.tensor(v.values, v.shape)) });
    }
  }

  dispose(): void {
    for (const { m, v } of this.moments.values()) {
      m.dispose();
      v.dispose();
    }
    this.moments.clear();
  }
}

/** Σ‖g‖² over a table's gradients, for global-norm clipping across tables (and, later, across processes). */
export function gradSquareSum(table: ParameterTable, names: string[] = table.names()): number {
  let total = 0;
  for (const name of names) {
    if (!table.hasGrad(name)) continue;
    const s = tf.tidy(() => tf.sum(tf.square(table.gradOrZeros(name))));
    total += s.dataSync()[0];
    s.dispose();
  }
  return total;
}

/** Factor that scales gradients of global norm `norm` down to `maxNorm` (1 when within, or clipping off). */
export function clipFactor(norm: number, maxNorm: number): number {
  if (!(maxNorm > 0) || norm <= maxNorm) return 1;
  return maxNorm / (norm + 1e-6);
}
