// The coordinator's side of AllReduce: per (reduction, chunk) it adds every contributor's values and, once
// all have arrived, writes the one sum to each of them. Every contributor receives the same bytes, so
// replicas that apply the same update stay bit-identical whatever the arrival order.
import * as grpc from '@grpc/grpc-js';
import { fromWireTensor, toWireTensor, WireError } from '../core/wire/tensor.js';
import type { ReduceChunk } from '../generated/switchyard/v1/ReduceChunk.js';
import type { ReduceChunk__Output } from '../generated/switchyard/v1/ReduceChunk.js';

/** Where sums are written: a contributor's AllReduce stream. */
export interface ReduceSink {
  write(chunk: ReduceChunk): boolean;
  emit(event: 'error', err: Partial<grpc.StatusObject>): boolean;
}

interface PendingChunk {
  sum: Float32Array;
  contributors: number;
  chunks: number;
  sinks: ReduceSink[];
}

export class ReduceHub {
  private readonly pending = new Map<string, PendingChunk>();
  /** Bytes received and sent, for metrics. */
  bytesIn = 0;
  bytesOut = 0;

  /** Adds one contribution; throws WireError on a chunk that contradicts earlier ones. */
  add(chunk: ReduceChunk__Output, sink: ReduceSink): void {
    if (!chunk.reduction) throw new WireError('reduction name is empty');
    if (!(chunk.contributors >= 1)) throw new WireError(`reduction ${chunk.reduction}: contributors must be ≥ 1`);
    if (!(chunk.chunk < chunk.chunks)) throw new WireError(`reduction ${chunk.reduction}: chunk ${chunk.chunk} of ${chunk.chunks}`);
    const { values } = fromWireTensor(chunk.values, `reduction ${chunk.reduction} chunk ${chunk.chunk}`);
    this.bytesIn += chunk.values?.data.byteLength ?? 0;
    const key = `${chunk.reduction}#${chunk.chunk}`;
    let p = this.pending.get(key);
    if (!p) {
      // The decoded values belong to this message alone, so the first contribution becomes the sum.
      p = { sum: values, contributors: chunk.contributors, chunks: chunk.chunks, sinks: [sink] };
      this.pending.set(key, p);
    } else {
      if (p.contributors !== chunk.contributors || p.chunks !== chunk.chunks || p.sum.length !== values.length)
        throw new WireError(`reduction ${chunk.reduction} chunk ${chunk.chunk}: contributors/chunks/length disagree with an earlier contribution`);
      if (p.sinks.includes(sink)) throw new WireError(`reduction ${chunk.reduction} chunk ${chunk.chunk} contributed twice on one stream`);
      const sum = p.sum;
      for (let i = 0; i < sum.length; i++) sum[i] += values[i];
      p.sinks.push(sink);
    }
    if (p.sinks.length < p.contributors) return;
    this.pending.delete(key);
    const reply: ReduceChunk = { reduction: chunk.reduction, contributors: p.contributors, chunk: chunk.chunk, chunks: p.chunks, values: toWireTensor(p.sum, [p.sum.length]) };
    for (const s of p.sinks) {
      s.write(reply);
      this.bytesOut += p.sum.byteLength;
    }
  }

  /** Fails every unfinished reduction whose name starts with `prefix` (an aborted training attempt). */
  drop(prefix: string, reason: string): void {
    for (const [key, p] of this.pending) {
      if (!key.startsWith(prefix)) continue;
      this.pending.delete(key);
      for (const s of p.sinks) s.emit('error', { code: grpc.status.ABORTED, details: reason });
    }
  }

  /** A contributor's stream closed: the reductions it joined can never complete correctly, so they fail. */
  forget(sink: ReduceSink): void {
    for (const [key, p] of this.pending) {
      if (!p.sinks.includes(sink)) continue;
      this.pending.delete(key);
      for (const s of p.sinks) if (s !== sink) s.emit('error', { code: grpc.status.ABORTED, details: `a contributor of ${key} left before it completed` });
    }
  }

  get pendingChunks(): number {
    return this.pending.size;
  }
}
