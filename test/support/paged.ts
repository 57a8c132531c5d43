// Drives MixtralModel.step directly for model-level tests: a KV store and one growing block table per
// sequence, without the scheduler's admission or prefix caching.
import { headDim } from '../../services/core/config.js';
import { KvStore } from '../../services/core/model/kv-store.js';
import type { MixtralModel } from '../../services/core/model/model.js';

export class PagedDecoder {
  readonly store: KvStore;
  private nextBlock = 0;
  private readonly seqs = new Map<number, { past: number; blocks: number[] }>();

  constructor(readonly model: MixtralModel, readonly blockTokens = 16, tokens = 4096) {
    const c = model.config;
    this.store = new KvStore({ layers: c.num_hidden_layers, kvHeads: c.num_key_value_heads, headDim: headDim(c), blockTokens, blocks: Math.ceil(tokens / blockTokens) });
  }

  /** Past tokens of sequence `seq`. */
  past(seq: number): number {
    return this.seqs.get(seq)?.past ?? 0;
  }

  /** Feeds each sequence its new ids in one step; the last id's logits per sequence. Past advances only on success. */
  async step(items: Array<{ seq: number; ids: Int32Array }>, passId = 'paged'): Promise<Float32Array[]> {
    const states = items.map(({ seq, ids }) => {
      const s = this.seqs.get(seq) ?? { past: 0, blocks: [] };
      this.seqs.set(seq, s);
      while (s.blocks.length * this.blockTokens < s.past + ids.length) {
        if (this.nextBlock >= this.store.blocks) throw new RangeError('PagedDecoder: out of KV blocks');
        s.blocks.push(this.nextBlock++);
      }
      return s;
    });
    const out = await this.model.step(items.map(({ ids }, i) => ({ ids, past: states[i].past, blocks: states[i].blocks, logits: true })), this.store, passId);
    items.forEach(({ ids }, i) => { states[i].past += ids.length; });
    return out.map((o) => o.logits!);
  }
}
