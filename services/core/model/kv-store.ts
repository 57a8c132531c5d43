// The serving KV cache's storage: fixed-size blocks allocated once, written in place. Which block belongs
// to which sequence is the router's business (services/router/kv-blocks.ts); this module only holds the
// numbers. Host memory (typed arrays), because attention over a decode step reads it from JS: moving K/V
// into the backend per step would cost more than the arithmetic (docs/performance.md).

export interface KvStoreShape {
  layers: number;
  kvHeads: number;
  headDim: number;
  /** Tokens per block. */
  blockTokens: number;
  blocks: number;
}

export class KvStore {
  readonly layers: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly blockTokens: number;
  readonly blocks: number;
  /** Per layer, [blocks, kvHeads, blockTokens, headDim]: one head's rows of a block are contiguous. */
  readonly k: Float32Array[];
  readonly v: Float32Array[];

  constructor(s: KvStoreShape) {
    for (const [name, n] of Object.entries(s)) if (!(Number.isInteger(n) && n > 0)) throw new RangeError(`KV store ${name} must be a positive integer, got ${n}`);
    this.layers = s.layers;
    this.kvHeads = s.kvHeads;
    this.headDim = s.headDim;
    this.blockTokens = s.blockTokens;
    this.blocks = s.blocks;
    const floats = s.blocks * s.kvHeads * s.blockTokens * s.headDim;
    // Untouched pages cost nothing until written: the pool is sized at start without being paid for.
    this.k = Array.from({ length: s.layers }, () => new Float32Array(floats));
    this.v = Array.from({ length: s.layers }, () => new Float32Array(floats));
  }

  /** Bytes one cached token takes over all layers (K and V). */
  static bytesPerToken(layers: number, kvHeads: number, headDim: number): number {
    return layers * 2 * kvHeads * headDim * 4;
  }

  /** Offset of (block, kvHead, slot) in a layer's array. */
  offset(block: number, kvHead: number, slot: number): number {
    return ((block * this.kvHeads + kvHead) * this.blockTokens + slot) * this.headDim;
  }
}
