// Attention of one serving step over the paged KV cache (vLLM's PagedAttention, on the host): every
// sequence's new rows are rotated, their K/V written in place into its blocks, and each query reads its
// sequence's blocks where they lie. Decode rows (a few new tokens) run a JS kernel over the blocks, so K/V
// never move per step; prefill chunks gather their keys once and use the backend's matMul, where the
// arithmetic outweighs the copy (docs/performance.md).
import * as tf from '@tensorflow/tfjs-core';
import type { KvStore } from './kv-store.js';
import type { Rope } from './rope.js';
import { mm, type T2 } from './tensors.js';

/** One sequence's part of a step. */
export interface PagedSequence {
  /** Its first row among the step's rows. */
  row: number;
  /** New tokens (rows) it brings to this step. */
  tokens: number;
  /** Tokens already cached: the position of its first new token. */
  past: number;
  /** Block id per block of positions (blocks[i] holds positions [i·B, (i+1)·B)); trimmed blocks may be −1. */
  blocks: ArrayLike<number>;
}

export interface PagedShape {
  heads: number;
  kvHeads: number;
  headDim: number;
  /** The query at position p sees keys j with p − window < j ≤ p (undefined: every j ≤ p). */
  window?: number;
  /** Per layer, overriding `window` (GPT-OSS alternates sliding and full layers). */
  layerWindows?: ReadonlyArray<number | undefined>;
}

// A prompt chunk goes through the backend's matMul instead of the JS kernel when its scores alone take
// this many multiply-adds (tokens × keys × heads × head_dim): below it the JS kernel (≈ 1.5 G/s) finishes
// before the matMul path's per-op costs (≈ 8 backend ops per KV head) are paid.
// Settable (tests force either path on small models to check they agree).
export const pagedAttentionSettings = { matMulChunkMacs: 2_000_000 };

/** The first key position the query at `position` sees. */
const firstKey = (position: number, window?: number): number => (window === undefined ? 0 : Math.max(0, position - window + 1));

/**
 * A step's attention: built once per step (rotation tables and masks are shared by every layer), then
 * `layer()` per layer. Dispose when the step ends.
 */
export class StepAttention {
  private readonly rows: number;
  private readonly cos: Float32Array;
  private readonly sin: Float32Array;
  private readonly positions: Int32Array;
  /** Chunk masks per sequence and window (`${row}/${window}`), built when first needed. */
  private readonly masks = new Map<string, tf.Tensor2D>();
  private readonly q: Float32Array;
  private readonly scores: Float32Array;
  /** Context accumulators of one head quad (double precision, like the softmax sums). */
  private readonly acc: Float64Array;

  constructor(readonly seqs: PagedSequence[], readonly store: KvStore, readonly shape: PagedShape, rope: Rope) {
    const { heads, kvHeads, headDim } = shape;
    if (heads % kvHeads !== 0) throw new RangeError(`heads (${heads}) must be a multiple of kvHeads (${kvHeads})`);
    if (headDim !== store.headDim || kvHeads !== store.kvHeads) throw new RangeError('the KV store does not match the attention shape');
    this.rows = seqs.reduce((n, s) => n + s.tokens, 0);
    this.positions = new Int32Array(this.rows);
    for (const s of seqs) for (let t = 0; t < s.tokens; t++) this.positions[s.row + t] = s.past + t;
    ({ cos: this.cos, sin: this.sin } = rope.hostTables(this.positions));
    this.q = new Float32Array(this.rows * heads * headDim);
    let longest = 0;
    for (const s of seqs) longest = Math.max(longest, s.past + s.tokens);
    // Scores of one query row's head group, padded to 4 heads (the kernel's unroll).
    this.scores = new Float32Array(4 * Math.max(longest, 1));
    this.acc = new Float64Array(4 * headDim);
  }

  private windowOf(layer: number): number | undefined {
    return this.shape.layerWindows ? this.shape.layerWindows[layer] : this.shape.window;
  }

  /**
   * Layer `layer`'s attention: `qkv` is the step's fused projection [rows, (heads + 2·kvHeads)·headDim]
   * (host copy); returns the context rows [rows, heads·headDim] and leaves the rows' K/V in their blocks.
   * `sinks` [heads]: GPT-OSS's learned logit per head that joins every softmax denominator.
   */
  layer(layer: number, qkv: Float32Array, sinks?: Float32Array): Float32Array {
    const { heads, kvHeads, headDim } = this.shape;
    const width = (heads + 2 * kvHeads) * headDim;
    if (qkv.length !== this.rows * width) throw new RangeError(`qkv holds ${qkv.length} values, expected ${this.rows}×${width}`);
    this.rotateAndStore(layer, qkv, width);
    const out = new Float32Array(this.rows * heads * headDim);
    const window = this.windowOf(layer);
    for (const s of this.seqs) {
      if (this.byMatMul(s, window)) this.chunk(layer, s, out, window, sinks);
      else for (let t = 0; t < s.tokens; t++) this.decodeRow(layer, s, s.row + t, out, window, sinks);
    }
    return out;
  }

  /** Whether a sequence's rows go through the matMul path (a long enough prompt chunk). */
  private byMatMul(s: PagedSequence, window: number | undefined): boolean {
    const keys = s.past + s.tokens - firstKey(s.past, window);
    return s.tokens > 1 && s.tokens * keys * this.shape.heads * this.shape.headDim >= pagedAttentionSettings.matMulChunkMacs;
  }

  dispose(): void {
    for (const m of this.masks.values()) m.dispose();
    this.masks.clear();
  }

  private blockOf(s: PagedSequence, position: number): number {
    const b = s.blocks[Math.floor(position / this.store.blockTokens)];
    if (b === undefined || b < 0) throw new RangeError(`position ${position} has no KV block`);
    return b;
  }

  /** Rotary embedding on q (scaled by 1/√headDim, as the training forward folds it in) and k; k and v into the blocks. */
  private rotateAndStore(layer: number, qkv: Float32Array, width: number): void {
    const { heads, kvHeads, headDim } = this.shape;
    const half = headDim / 2;
    const scale = 1 / Math.sqrt(headDim);
    const store = this.store;
    const kStore = store.k[layer];
    const vStore = store.v[layer];
    const B = store.blockTokens;
    for (const s of this.seqs)
      for (let t = 0; t < s.tokens; t++) {
        const r = s.row + t;
        const position = s.past + t;
        const block = this.blockOf(s, position);
        const slot = position % B;
        const base = r * width;
        const c = r * half;
        for (let h = 0; h < heads; h++) {
          const src = base + h * headDim;
          const dst = (r * heads + h) * headDim;
          for (let i = 0; i < half; i++) {
            const x1 = qkv[src + i];
            const x2 = qkv[src + i + half];
            // Rounded to float32 like the training forward's (x·cos + rotate(x)·sin), then scaled.
            this.q[dst + i] = Math.fround(x1 * this.cos[c + i] - x2 * this.sin[c + i]) * scale;
            this.q[dst + i + half] = Math.fround(x2 * this.cos[c + i] + x1 * this.sin[c + i]) * scale;
          }
        }
        for (let g = 0; g < kvHeads; g++) {
          const kSrc = base + (heads + g) * headDim;
          const vSrc = base + (heads + kvHeads + g) * headDim;
          const o = store.offset(block, g, slot);
          for (let i = 0; i < half; i++) {
            const x1 = qkv[kSrc + i];
            const x2 = qkv[kSrc + i + half];
            kStore[o + i] = x1 * this.cos[c + i] - x2 * this.sin[c + i];
            kStore[o + i + half] = x2 * this.cos[c + i] + x1 * this.sin[c + i];
          }
          vStore.set(qkv.subarray(vSrc, vSrc + headDim), o);
        }
      }
  }

  /** One query row against its sequence's blocks, in JS: four query heads of a KV group share each key read. */
  private decodeRow(layer: number, s: PagedSequence, r: number, out: Float32Array, window: number | undefined, sinks?: Float32Array): void {
    const { heads, kvHeads, headDim: hd } = this.shape;
    const group = heads / kvHeads;
    const position = this.positions[r];
    const lo = firstKey(position, window);
    const keys = position - lo + 1;
    const B = this.store.blockTokens;
    const kStore = this.store.k[layer];
    const vStore = this.store.v[layer];
    const q = this.q;
    const sc = this.scores;
    for (let g = 0; g < kvHeads; g++)
      for (let h0 = 0; h0 < group; h0 += 4) {
        const n = Math.min(4, group - h0);
        // Missing heads of a short quad repeat the first one; their results are not stored.
        const qo = (r * heads + g * group + h0) * hd;
        const q0 = qo;
        const q1 = n > 1 ? qo + hd : qo;
        const q2 = n > 2 ? qo + 2 * hd : qo;
        const q3 = n > 3 ? qo + 3 * hd : qo;
        let m0 = -Infinity, m1 = -Infinity, m2 = -Infinity, m3 = -Infinity;
        for (let j = lo; j <= position; j++) {
          const ko = this.store.offset(this.blockOf(s, j), g, j % B);
          let a0 = 0, a1 = 0, a2 = 0, a3 = 0;
          for (let d = 0; d < hd; d++) {
            const k = kStore[ko + d];
            a0 += q[q0 + d] * k;
            a1 += q[q1 + d] * k;
            a2 += q[q2 + d] * k;
            a3 += q[q3 + d] * k;
          }
          const i = j - lo;
          sc[i] = a0; sc[keys + i] = a1; sc[2 * keys + i] = a2; sc[3 * keys + i] = a3;
          if (a0 > m0) m0 = a0;
          if (a1 > m1) m1 = a1;
          if (a2 > m2) m2 = a2;
          if (a3 > m3) m3 = a3;
        }
        let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        if (sinks) {
          // The sink is one more logit in each head's softmax, with no value: it only adds to the sum.
          const h = g * group + h0;
          const k0 = sinks[h], k1 = sinks[n > 1 ? h + 1 : h], k2 = sinks[n > 2 ? h + 2 : h], k3 = sinks[n > 3 ? h + 3 : h];
          m0 = Math.max(m0, k0); m1 = Math.max(m1, k1); m2 = Math.max(m2, k2); m3 = Math.max(m3, k3);
          s0 = Math.exp(k0 - m0); s1 = Math.exp(k1 - m1); s2 = Math.exp(k2 - m2); s3 = Math.exp(k3 - m3);
        }
        for (let i = 0; i < keys; i++) {
          s0 += sc[i] = Math.exp(sc[i] - m0);
          s1 += sc[keys + i] = Math.exp(sc[keys + i] - m1);
          s2 += sc[2 * keys + i] = Math.exp(sc[2 * keys + i] - m2);
          s3 += sc[3 * keys + i] = Math.exp(sc[3 * keys + i] - m3);
        }
        const acc = this.acc;
        acc.fill(0);
        for (let j = lo; j <= position; j++) {
          const vo = this.store.offset(this.blockOf(s, j), g, j % B);
          const i = j - lo;
          const p0 = sc[i], p1 = sc[keys + i], p2 = sc[2 * keys + i], p3 = sc[3 * keys + i];
          for (let d = 0; d < hd; d++) {
            const v = vStore[vo + d];
            acc[d] += p0 * v;
            acc[hd + d] += p1 * v;
            acc[2 * hd + d] += p2 * v;
            acc[3 * hd + d] += p3 * v;
          }
        }
        const sums = [s0, s1, s2, s3];
        for (let h = 0; h < n; h++) {
          const inv = 1 / sums[h];
          for (let d = 0; d < hd; d++) out[qo + h * hd + d] = acc[h * hd + d] * inv;
        }
      }
  }

  /** [group·tokens, keys] additive mask of a chunk: rows head-major, keys from the chunk's first visible one. */
  private chunkMask(s: PagedSequence, window: number | undefined): tf.Tensor2D {
    const key = `${s.row}/${window}`;
    const cached = this.masks.get(key);
    if (cached) return cached;
    const group = this.shape.heads / this.shape.kvHeads;
    const lo = firstKey(s.past, window);
    const keys = s.past + s.tokens - lo;
    const m = new Float32Array(group * s.tokens * keys);
    for (let t = 0; t < s.tokens; t++) {
      const position = s.past + t;
      const first = firstKey(position, window);
      for (let h = 0; h < group; h++) {
        const row = (h * s.tokens + t) * keys;
        for (let j = lo; j < first; j++) m[row + j - lo] = -1e30;
        for (let j = position + 1; j < s.past + s.tokens; j++) m[row + j - lo] = -1e30;
      }
    }
    const mask = tf.tensor2d(m, [group * s.tokens, keys]);
    this.masks.set(key, mask);
    return mask;
  }

  /** A prefill chunk: per KV head, the chunk's queries against its keys gathered from the blocks, by matMul. */
  private chunk(layer: number, s: PagedSequence, out: Float32Array, window: number | undefined, sinks?: Float32Array): void {
    const { heads, kvHeads, headDim: hd } = this.shape;
    const group = heads / kvHeads;
    const T = s.tokens;
    const lo = firstKey(s.past, window);
    const keys = s.past + T - lo;
    const B = this.store.blockTokens;
    const mask = this.chunkMask(s, window);
    for (let g = 0; g < kvHeads; g++) {
      const qg = new Float32Array(group * T * hd);
      for (let h = 0; h < group; h++)
        for (let t = 0; t < T; t++) {
          const src = ((s.row + t) * heads + g * group + h) * hd;
          qg.set(this.q.subarray(src, src + hd), (h * T + t) * hd);
        }
      const kT = new Float32Array(hd * keys);
      const vg = new Float32Array(keys * hd);
      for (let j = lo; j < lo + keys; j++) {
        const o = this.store.offset(this.blockOf(s, j), g, j % B);
        const i = j - lo;
        for (let d = 0; d < hd; d++) kT[d * keys + i] = this.store.k[layer][o + d];
        vg.set(this.store.v[layer].subarray(o, o + hd), i * hd);
      }
      const context = tf.tidy(() => {
        const scores = tf.add(mm(tf.tensor2d(qg, [group * T, hd]), tf.tensor2d(kT, [hd, keys])), mask) as T2;
        const probs = sinks ? withSinks(scores, sinks.subarray(g * group, (g + 1) * group), T) : tf.softmax(scores) as T2;
        return mm(probs, tf.tensor2d(vg, [keys, hd]));
      });
      const values = context.dataSync() as Float32Array;
      context.dispose();
      for (let h = 0; h < group; h++)
        for (let t = 0; t < T; t++) {
          const dst = ((s.row + t) * heads + g * group + h) * hd;
          out.set(values.subarray((h * T + t) * hd, (h * T + t + 1) * hd), dst);
        }
    }
  }
}

/**
 * softmax over [scores | sink] without the sink's column: rows are head-major (row h·tokens + t belongs to
 * head h of `sinks`), each head's sink one extra logit in its rows' denominators.
 */
export function withSinks(scores: T2, sinks: Float32Array, tokens: number): T2 {
  return tf.tidy(() => {
    const [rows, keys] = scores.shape;
    const column = new Float32Array(rows);
    for (let r = 0; r < rows; r++) column[r] = sinks[Math.floor(r / tokens)];
    const probs = tf.softmax(tf.concat([scores, tf.tensor2d(column, [rows, 1])], 1));
    return tf.slice(probs, [0, 0], [rows, keys]) as T2;
  });
}
