// The SwiGLU expert, w2(silu(w1·x) ⊙ (w3·x)), forward and hand-written backward. Every service that
// computes experts (in-process transport, expert shards) calls these two functions. GPT-OSS experts
// add a bias to each projection and a clamped activation; those run forward only (inference).
import * as tf from '@tensorflow/tfjs-core';
import { mm, mmTA, scoped, type T2 } from './tensors.js';

/** Weights in compute layout: w1t, w3t [hidden, intermediate]; w2t [intermediate, hidden]. */
export interface ExpertWeights { w1t: T2; w3t: T2; w2t: T2 }

/**
 * Per-projection biases (GPT-OSS): b1 on the gate and b3 on the up projection [intermediate], b2 on
 * the output [hidden]. Kept out of ExpertWeights, whose keys are exactly the three matrices (the
 * router-side MLP iterates them).
 */
export interface ExpertBiases { b1?: tf.Tensor1D; b3?: tf.Tensor1D; b2?: tf.Tensor1D }

/** Everything one expert holds: its matrices and whichever biases it has. */
export type ExpertParams = ExpertWeights & ExpertBiases;

export const BIAS_PARTS = ['b1', 'b3', 'b2'] as const;

export const hasBiases = (w: ExpertBiases): boolean => w.b1 !== undefined || w.b3 !== undefined || w.b2 !== undefined;

/**
 * The gated activation between the projections. 'silu': silu(a)·b. 'clamped-swiglu' (GPT-OSS):
 * gate = min(a, limit), up = clamp(b, −limit, limit), (up + 1)·gate·σ(alpha·gate).
 */
export type ExpertActivation = { kind: 'silu' } | { kind: 'clamped-swiglu'; alpha: number; limit: number };

export const SILU: ExpertActivation = Object.freeze({ kind: 'silu' });
// Which one a model's experts use is its family's `expertActivation` (family.ts).

export function sameActivation(a: ExpertActivation, b: ExpertActivation): boolean {
  if (a.kind === 'silu' || b.kind === 'silu') return a.kind === b.kind;
  return a.alpha === b.alpha && a.limit === b.limit;
}

export function describeActivation(a: ExpertActivation): string {
  return a.kind === 'silu' ? 'silu' : `clamped-swiglu (alpha ${a.alpha}, limit ${a.limit})`;
}

/** The same weights transposed, for the backward pass. */
export interface ExpertWeightsT { w1: T2; w3: T2; w2: T2 }

export interface ExpertCache { x: T2; b: T2; sig: T2; silu: T2; g: T2 }

/**
 * y for rows x. Plain SwiGLU (silu, no biases) keeps what backward needs when asked; experts with
 * biases or another activation are forward-only and refuse `keepCache`.
 */
export function expertForward(x: T2, w: ExpertParams, keepCache: boolean, activation: ExpertActivation = SILU): { y: T2; cache?: ExpertCache } {
  if (activation.kind !== 'silu' || hasBiases(w)) {
    if (keepCache) throw new Error(`experts with biases or the ${describeActivation(activation)} activation are not trainable (inference forward only)`);
    return { y: inferenceForward(x, w, activation) };
  }
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

const withBias = (t: T2, bias: tf.Tensor1D | undefined): T2 => (bias ? (tf.add(t, bias) as T2) : t);

function inferenceForward(x: T2, w: ExpertParams, activation: ExpertActivation): T2 {
  return scoped(() => {
    const a = withBias(mm(x, w.w1t), w.b1);
    const b = withBias(mm(x, w.w3t), w.b3);
    let g: T2;
    if (activation.kind === 'silu') g = tf.mul(tf.mul(a, tf.sigmoid(a)), b) as T2;
    else {
      // The gate is clamped from above only, as GPT-OSS was trained (gate·σ(alpha·gate) → 0 below).
      const gate = tf.minimum(a, activation.limit);
      const up = tf.clipByValue(b, -activation.limit, activation.limit);
      const glu = tf.mul(gate, tf.sigmoid(tf.mul(gate, activation.alpha)));
      g = tf.mul(tf.add(up, 1), glu) as T2;
    }
    return withBias(mm(g, w.w2t), w.b2);
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
