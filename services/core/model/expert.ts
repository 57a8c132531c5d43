// The SwiGLU expert, w2(silu(w1·x) ⊙ (w3·x)), forward and hand-written backward. Every service that
// computes experts (in-process transport, expert shards) calls these two functions.
import * as tf from '@tensorflow/tfjs-core';
import { mm, mmTA, scoped, type T2 } from './tensors.js';

/** Weights in compute layout: w1t, w3t [hidden, intermediate]; w2t [intermediate, hidden]. */
export interface ExpertWeights { w1t: T2; w3t: T2; w2t: T2 }
/** The same weights transposed, for the backward pass. */
export interface ExpertWeightsT { w1: T2; w3: T2; w2: T2 }

export interface ExpertCache { x: T2; b: T2; sig: T2; silu: T2; g: T2 }

export function expertForward(x: T2, w: ExpertWeights, keepCache: boolean): { y: T2; cache?: ExpertCache } {
  return scoped(() => {
    const a = mm(x, w.w1t);
    const b = mm(x, w.w3t);
    const sig = tf.sigmoid(a) as T2;
    const silu = tf.mul(a, sig) as T2;
    const g = tf.mul(silu, b) as T2;
    const y = mm(g, w.w2t);
    return keepCache ? { y, cache: { x: x.clone(), b, sig, silu, g } } : { y };
  });
}

export function transposeExpert(w: ExpertWeights): ExpertWeightsT {
  return scoped(() => ({ w1: tf.transpose(w.w1t), w3: tf.transpose(w.w3t), w2: tf.transpose(w.w2t) }));
}

/** The elementwise part of the backward: from dL/dg (g = silu(a)·b) to dL/da and dL/db. */
export function swigluBackward(dg: T2, cache: ExpertCache): { da: T2; db: T2 } {
  return scoped(() => {
    const { b, sig, silu } = cache;
    const db = tf.mul(dg, silu) as T2;
    // silu'(a) = σ(a)·(1 + a·(1 − σ(a))) = σ(a) + silu(a)·(1 − σ(a))
    const dSilu = tf.add(sig, tf.mul(silu, tf.sub(1, sig)));
    return { da: tf.mul(tf.mul(dg, b), dSilu) as T2, db };
  });
}

export function expertBackward(dy: T2, cache: ExpertCache, wT: ExpertWeightsT): { dx: T2; dW1t: T2; dW3t: T2; dW2t: T2 } {
  return scoped(() => {
    const { x, g } = cache;
    const dW2t = mmTA(g, dy);
    const dg = mm(dy, wT.w2);
    const { da, db } = swigluBackward(dg, cache);
    const xT = tf.transpose(x);
    const dW1t = mm(xT, da);
    const dW3t = mm(xT, db);
    const dx = tf.add(mm(da, wT.w1), mm(db, wT.w3)) as T2;
    return { dx, dW1t, dW3t, dW2t };
  });
}
