// Named parameters with their accumulated gradients. Dense weights (router) and experts (shards) each
// keep one table; the optimizer and checkpoints work on tables, whatever process holds them.
import * as tf from '@tensorflow/tfjs-core';
import { createHash } from 'node:crypto';

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

  /** Removes a parameter and its gradient; returns the value undisposed (the caller owns it). */
  take(name: string): tf.Tensor {
    const v = this.get(name);
    this.values.delete(name);
    this.grads.get(name)?.dispose();
    this.grads.delete(name);
    this.version++;
    return v;
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

  /** Replaces the gradient of `name` (e.g. with its all-reduced sum); takes ownership of `grad`. */
  setGrad(name: string, grad: tf.Tensor): void {
    const value = this.values.get(name);
    if (!value) throw new Error(`gradient for unknown parameter ${name}`);
    if (grad.size !== value.size) throw new RangeError(`gradient for ${name} has ${grad.size} values, the parameter ${value.size}`);
    this.grads.get(name)?.dispose();
    this.grads.set(name, tf.keep(grad.shape.join() === value.shape.join() ? grad : tf.reshape(grad, value.shape)));
  }

  /** All gradients (zeros where none arrived) laid end to end in `names` order, as one host vector. */
  flatGrads(names: string[] = this.names()): Float32Array {
    const total = names.reduce((n, name) => n + this.get(name).size, 0);
    const out = new Float32Array(total);
    let offset = 0;
    for (const name of names) {
      const size = this.get(name).size;
      const g = this.grads.get(name);
      if (g) out.set(g.dataSync() as Float32Array, offset);
      offset += size;
    }
    return out;
  }

  /** Sets every gradient in `names` from a vector laid out as flatGrads lays it out. */
  setFlatGrads(values: Float32Array, names: string[] = this.names()): void {
    let offset = 0;
    for (const name of names) {
      const p = this.get(name);
      this.setGrad(name, tf.tensor(values.slice(offset, offset + p.size), p.shape));
      offset += p.size;
    }
    if (offset !== values.length) throw new RangeError(`gradient vector has ${values.length} values, the parameters ${offset}`);
  }

  /** SHA-256 of the values of `names` (all by default), in order: replicas that must agree compare these. */
  digest(names: string[] = this.names()): string {
    const hash = createHash('sha256');
    for (const name of names) {
      const v = this.get(name).dataSync() as Float32Array;
      hash.update(new Uint8Array(v.buffer, v.byteOffset, v.byteLength));
    }
    return hash.digest('hex');
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
