// The serving KV cache's block manager (vLLM's BlockSpaceManager with automatic prefix caching): which
// blocks are free, how many sequences share each block, and which full blocks hold which tokens. A full
// block is keyed by a hash of its tokens chained to the hash of every block before it, so equal keys mean
// equal K/V. Blocks no sequence holds keep their contents and key until they are needed again (evicted
// least recently released first).
import { createHash } from 'node:crypto';

export class BlockManager {
  private readonly free: number[] = [];
  private readonly refs: Int32Array;
  private readonly keyOf: Array<string | undefined>;
  private readonly byKey = new Map<string, number>();
  /** Cached blocks nobody holds, least recently released first (Map keeps insertion order). */
  private readonly evictable = new Map<number, true>();

  constructor(readonly blocks: number, readonly blockTokens: number) {
    if (!(Number.isInteger(blocks) && blocks > 0)) throw new RangeError(`the KV cache needs at least one block, got ${blocks}`);
    this.refs = new Int32Array(blocks);
    this.keyOf = new Array(blocks);
    // Popped from the end: block 0 is handed out first.
    for (let b = blocks - 1; b >= 0; b--) this.free.push(b);
  }

  /** Blocks that can be handed out now (free, or cached and held by nobody). */
  get available(): number {
    return this.free.length + this.evictable.size;
  }

  /** Blocks held by at least one sequence. */
  get used(): number {
    return this.blocks - this.available;
  }

  /** Cached (keyed) blocks, held or not. */
  get cached(): number {
    return this.byKey.size;
  }

  /** A block for new K/V (its old key, if any, is forgotten), or undefined when none is left. */
  allocate(): number | undefined {
    let b = this.free.pop();
    if (b === undefined) {
      const oldest = this.evictable.keys().next();
      if (oldest.done) return undefined;
      b = oldest.value;
      this.evictable.delete(b);
      this.forget(b);
    }
    this.refs[b] = 1;
    return b;
  }

  /** Drops one holder of `block`; a block nobody holds becomes free, or evictable if it is cached. */
  release(block: number): void {
    if (block < 0) return; // trimmed by the sliding window already
    if (this.refs[block] <= 0) throw new Error(`KV block ${block} released more often than held`);
    if (--this.refs[block] > 0) return;
    if (this.keyOf[block] !== undefined) this.evictable.set(block, true);
    else this.free.push(block);
  }

  /** The cached block with this key, now held once more by the caller; undefined on a miss. */
  acquire(key: string): number | undefined {
    const b = this.byKey.get(key);
    if (b === undefined) return undefined;
    if (this.refs[b]++ === 0) this.evictable.delete(b);
    return b;
  }

  /** Records that the full block `block` holds the tokens keyed `key` (the first block with a key keeps it). */
  register(block: number, key: string): void {
    if (this.byKey.has(key) || this.keyOf[block] !== undefined) return;
    this.keyOf[block] = key;
    this.byKey.set(key, block);
  }

  /** Forgets every key (the weights changed, so cached K/V no longer match their tokens). */
  clearCache(): void {
    for (const b of this.evictable.keys()) {
      this.forget(b);
      this.free.push(b);
    }
    this.evictable.clear();
    for (const b of [...this.byKey.values()]) this.forget(b);
  }

  private forget(block: number): void {
    const key = this.keyOf[block];
    if (key === undefined) return;
    this.byKey.delete(key);
    this.keyOf[block] = undefined;
  }

  /** The key of a full block of `tokens` that follows the block keyed `parent` ('' for the first). */
  static key(parent: string, tokens: Int32Array): string {
    return createHash('sha256').update(parent).update(new Uint8Array(tokens.buffer, tokens.byteOffset, tokens.byteLength)).digest('base64');
  }
}
