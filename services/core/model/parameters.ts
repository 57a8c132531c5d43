// Named parameters with their accumulated gradients. Dense weights (router) and experts (shards) each
// keep one table; the optimizer and checkpoints work on tables, whatever process holds them.
import * as tf from '@tensorflow/tfjs-core';

export class ParameterTable {
  private readonly values = new Map<string, tf.Tensor>();
  private readonly grads = new Map<string, tf.Tensor>();
  /** Bumped on every value change, so derived tensors (transposed copies) know when to refresh. */
  version = 0;

  define(name: string, value: tf.Tensor): void {
    if (this.values.has(name)) throw new Error(`parameter ${name} defined twice`);
    this.values.set(name, tf.keep(value));
    this.version++;
  }

  has(name: string): boolean {
    return this.values.has(name);
  }

  get<R extends tf.Rank = tf.Rank>(name: string): tf.Tensor<R> {
    const v = this.values.get(name);
    if (!v) throw new Error(`unknown parameter ${name}`);
    return v as tf.Tensor<R>;
  }

  names(): string[] {
    return [...this.values.keys()];
  }

  /** Replaces a value (the old tensor is disposed). */
  set(name: string, value: tf.Tensor): void {
    const old = this.values.get(name);
    if (!old) throw new Error(`unknown parameter ${name}`);
    if (old !== value) old.dispose();
    this.values.set(name, tf.keep(value));
    this.version++;
  }

  /** Adds to the gradient of `name`; takes ownership of `grad`. */
  accumulate(name: string, grad: tf.Tensor): void {
    if (!this.values.has(name)) throw new Error(`gradient for unknown parameter ${name}`);
    const prev = this.grads.get(name);
    if (prev) {
      this.grads.set(name, tf.keep(tf.add(prev, grad)));
      prev.dispose();
      grad.dispose();
    } else this.grads.set(name, tf.keep(grad));
  }

  /** The gradient, or zeros when nothing reached the parameter this step. */
  gradOrZeros(name: string): tf.Tensor {
    return this.grads.get(name) ?? tf.zerosLike(this.get(name));
  }

  hasGrad(name: string): boolean {
    return this.grads.has(name);
  }

  clearGrads(): void {
    for (const g of this.grads.values()) g.dispose();
    this.grads.clear();
  }

  dispose(): void {
    this.clearGrads();
    for (const v of this.values.values()) v.dispose();
    this.values.clear();
  }
}
