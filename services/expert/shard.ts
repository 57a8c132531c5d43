// An expert shard's request handling: decode the row batches of one ExpertRequest, compute them with
// the shard's ExpertSet, encode the reply. Transport-free, so it is tested without a network.
import { status } from '@grpc/grpc-js';
import { MissingPassError, type ExpertSet, type RowBatch } from '../core/model/experts.js';
import { fromWireTensor, toWireTensor, WireError } from '../core/wire/tensor.js';
import type { FloatDtype } from '../core/dtypes.js';
import type { ExpertReply } from '../generated/switchyard/v1/ExpertReply.js';
import type { ExpertRequest__Output } from '../generated/switchyard/v1/ExpertRequest.js';

class ShardError extends Error {
  constructor(readonly code: status, message: string) {
    super(message);
  }
}

export class ExpertShard {
  /** Rows computed per (layer/expert) since start, for metrics and tests. */
  readonly rowsServed = new Map<string, number>();
  messagesServed = 0;

  /** `log` receives one record per served message (pass, kind, rows, request ids). */
  constructor(readonly experts: ExpertSet, private readonly log?: (record: Record<string, unknown>) => void) {}

  handle(request: ExpertRequest__Output): ExpertReply {
    try {
      const { batches, dtype } = this.decode(request);
      let outputs: Float32Array[];
      if (request.kind === 'ROW_KIND_FORWARD' || request.kind === 'ROW_KIND_FORWARD_TRAIN') {
        const train = request.kind === 'ROW_KIND_FORWARD_TRAIN';
        outputs = batches.map((b) => this.experts.forwardRows(request.passId, b, train));
      } else if (request.kind === 'ROW_KIND_BACKWARD') {
        outputs = batches.map((b) => this.experts.backwardRows(request.passId, b));
      } else {
        throw new ShardError(status.INVALID_ARGUMENT, `unsupported row kind ${request.kind}`);
      }
      this.messagesServed++;
      this.log?.({
        msg: 'rows served', pass: request.passId, kind: request.kind, request_ids: request.requestIds,
        batches: batches.map((b) => `${b.layer}/${b.expert}:${b.rowCount}`).join(' '),
      });
      for (const b of batches) {
        const key = `${b.layer}/${b.expert}`;
        this.rowsServed.set(key, (this.rowsServed.get(key) ?? 0) + b.rowCount);
      }
      return {
        messageId: request.messageId,
        // Replies use the dtype the request came in.
        batches: batches.map((b, i) => ({ layer: b.layer, expert: b.expert, rows: toWireTensor(outputs[i], [b.rowCount, this.experts.hidden], dtype) })),
        credits: batches.map((b) => ({ layer: b.layer, expert: b.expert, rows: b.rowCount })),
      };
    } catch (err) {
      const code = err instanceof ShardError || err instanceof WireError ? err.code
        : err instanceof MissingPassError ? status.FAILED_PRECONDITION
        : err instanceof RangeError ? status.INVALID_ARGUMENT : status.INTERNAL;
      return { messageId: request.messageId, error: { code, message: (err as Error).message } };
    }
  }

  private decode(request: ExpertRequest__Output): { batches: RowBatch[]; dtype: FloatDtype } {
    if (!request.passId) throw new ShardError(status.INVALID_ARGUMENT, 'pass_id is empty');
    const seen = new Set<string>();
    let dtype: FloatDtype = 'F32';
    const batches = request.batches.map((b, i) => {
      const key = `${b.layer}/${b.expert}`;
      if (seen.has(key)) throw new ShardError(status.INVALID_ARGUMENT, `two batches for (layer ${b.layer}, expert ${b.expert})`);
      seen.add(key);
      if (!this.experts.holds(b.layer, b.expert)) throw new ShardError(status.NOT_FOUND, `expert (layer ${b.layer}, expert ${b.expert}) is not held by this shard`);
      const decoded = fromWireTensor(b.rows, `batches[${i}].rows`, [null, this.experts.hidden]);
      dtype = decoded.dtype;
      return { layer: b.layer, expert: b.expert, rowCount: decoded.shape[0], rows: decoded.values };
    });
    return { batches, dtype };
  }
}
