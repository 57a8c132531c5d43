// Where a serving step's time goes: decode steps of `sequences` sequences at a given context, timed whole
// and by part (host attention, feed-forward), against the same step's matMuls run alone (the q|k|v and o
// projections, the gate, every expert's three matMuls with the rows the step routed to it, the LM head).
// The ratio step / matMuls is the engine's overhead factor (issue 15: ≤ 1.5 at 32 sequences on `medium`).
import * as tf from '@tensorflow/tfjs-core';
import { headDim } from '../core/config.js';
import { KvStore } from '../core/model/kv-store.js';
import type { MixtralModel, StepProfile, StepSequence } from '../core/model/model.js';
import { denseNames } from '../core/model/hf.js';
import { median } from './report.js';

export interface StepBreakdown {
  sequences: number;
  context: number;
  stepMs: number;
  matmulsAloneMs: number;
  attentionMs: number;
  feedForwardMs: number;
  /** Logits of every timed step equal those of the untimed reference step (the same ids at the same positions). */
  checked: boolean;
}

const BLOCK_TOKENS = 16;

/**
 * Decode steps at `context` tokens per sequence; `reps` timed steps rewrite the same position each time.
 * `prefill: false` fills the blocks with random K/V instead of computing them (a step's cost does not
 * depend on the values): the context curve's long contexts would otherwise spend minutes in prefill.
 */
export async function stepBreakdown(model: MixtralModel, sequences: number, context: number, reps = 5, prefill = true): Promise<StepBreakdown> {
  const c = model.config;
  if (context >= c.max_position_embeddings) throw new RangeError(`context ${context} leaves no room to decode (max ${c.max_position_embeddings})`);
  const blocksPerSeq = Math.ceil((context + 1) / BLOCK_TOKENS);
  const store = new KvStore({ layers: c.num_hidden_layers, kvHeads: c.num_key_value_heads, headDim: headDim(c), blockTokens: BLOCK_TOKENS, blocks: sequences * blocksPerSeq });
  const tables = Array.from({ length: sequences }, (_, s) => Array.from({ length: blocksPerSeq }, (_, b) => s * blocksPerSeq + b));
  const ids = (s: number, from: number, n: number) => Int32Array.from({ length: n }, (_, j) => 32 + ((s * 31 + (from + j) * 17) % 90));
  if (!prefill) {
    let seed = 1;
    const random = () => ((seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0) / 2 ** 32 - 0.5);
    for (let l = 0; l < c.num_hidden_layers; l++) for (const a of [store.k[l], store.v[l]]) for (let i = 0; i < a.length; i++) a[i] = random();
  }
  // Prefill in chunks of at most 2048 rows, as the scheduler would.
  const perStep = Math.max(1, Math.floor(2048 / context));
  for (let first = 0; prefill && first < sequences; first += perStep) {
    const group = tables.slice(first, first + perStep).map((blocks, i): StepSequence => ({ ids: ids(first + i, 0, context), past: 0, blocks, logits: false }));
    await model.step(group, store, `breakdown-prefill${first}`);
  }
  const decode = (): StepSequence[] => tables.map((blocks, s) => ({ ids: ids(s, context, 1), past: context, blocks, logits: true }));
  // The routing of a decode step: how many rows each expert gets, per MoE layer.
  const rowsPerExpert = new Map<number, Int32Array>();
  const previous = model.onRouting;
  model.onRouting = (layer, stats) => rowsPerExpert.set(layer, stats.countsAfterDrop.slice());
  const reference = await model.step(decode(), store, 'breakdown-reference');
  model.onRouting = previous;
  const steps: number[] = [];
  const profiles: StepProfile[] = [];
  let checked = true;
  for (let r = 0; r < reps; r++) {
    const profile: StepProfile = { qkvMs: 0, attentionMs: 0, feedForwardMs: 0 };
    const t0 = performance.now();
    const out = await model.step(decode(), store, `breakdown${r}`, { profile });
    steps.push(performance.now() - t0);
    profiles.push(profile);
    out.forEach((o, s) => { if (o.logits!.some((v, i) => v !== reference[s].logits![i])) checked = false; });
  }
  const matmulsAloneMs = await matmulsAlone(model, sequences, rowsPerExpert, reps);
  return {
    sequences, context, stepMs: median(steps), matmulsAloneMs,
    attentionMs: median(profiles.map((p) => p.attentionMs)), feedForwardMs: median(profiles.map((p) => p.feedForwardMs)), checked,
  };
}

/** Median ms of the step's matMuls alone (same shapes, the model's own weights), synced once at the end. */
async function matmulsAlone(model: MixtralModel, rows: number, rowsPerExpert: Map<number, Int32Array>, reps: number): Promise<number> {
  const c = model.config;
  const experts = model.localExperts;
  if (!experts) throw new Error('the breakdown needs the experts in-process');
  const D = c.hidden_size;
  const attnWidth = c.num_attention_heads * headDim(c);
  const inputs = new Map<number, tf.Tensor2D>();
  const input = (n: number, width: number) => {
    const key = n * 1e6 + width;
    if (!inputs.has(key)) inputs.set(key, tf.randomNormal([n, width]) as tf.Tensor2D);
    return inputs.get(key)!;
  };
  const once = () => {
    const outs: tf.Tensor[] = [];
    for (let l = 0; l < c.num_hidden_layers; l++) {
      outs.push(tf.matMul(input(rows, D), model.dense.get<tf.Rank.R2>(denseNames.wqkv(l))));
      outs.push(tf.matMul(input(rows, attnWidth), model.dense.get<tf.Rank.R2>(denseNames.wo(l))));
      const counts = rowsPerExpert.get(l);
      if (!counts) continue;
      outs.push(tf.matMul(input(rows, D), model.dense.get<tf.Rank.R2>(denseNames.gate(l))));
      counts.forEach((n, e) => {
        if (n === 0) return;
        const w = experts.weights(l, e);
        outs.push(tf.matMul(input(n, D), w.w1t), tf.matMul(input(n, D), w.w3t), tf.matMul(input(n, w.w2t.shape[0]), w.w2t));
      });
    }
    const head = c.tie_word_embeddings ? undefined : model.dense.get<tf.Rank.R2>(denseNames.lmHead);
    if (head) outs.push(tf.matMul(input(rows, D), head));
    outs[outs.length - 1].dataSync();
    tf.dispose(outs);
  };
  once();
  const times: number[] = [];
  for (let r = 0; r < reps; r++) {
    const t0 = performance.now();
    once();
    times.push(performance.now() - t0);
  }
  tf.dispose([...inputs.values()]);
  return median(times);
}
