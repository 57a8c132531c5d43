// ExpertTransport over gRPC: one long-lived Exchange stream per shard; each forward/backward call sends
// every shard exactly one message with all of its row batches and waits for the replies.
import * as grpc from '@grpc/grpc-js';
import type { CallContext, ExpertTransport, RowBatch } from '../model/experts.js';
import type { ExpertReply__Output } from '../../generated/switchyard/v1/ExpertReply.js';
import type { ExpertRequest } from '../../generated/switchyard/v1/ExpertRequest.js';
import type { ExpertServiceClient } from '../../generated/switchyard/v1/ExpertService.js';
import type { RowKind } from '../../generated/switchyard/v1/RowKind.js';
import { CHANNEL_OPTIONS, loadProtos } from './protos.js';
import { fromWireTensor, toWireTensor } from './tensor.js';
import type { FloatDtype } from '../dtypes.js';

/** Where each (layer, expert) is served: a shard address (host:port). */
export type PlacementLookup = (layer: number, expert: number) => string;

export class ExpertCallError extends Error {
  override name = 'ExpertCallError';
  constructor(readonly shard: string, readonly code: number, message: string) {
    super(`shard ${shard}: ${message}`);
  }
}

interface Pending {
  resolve: (reply: ExpertReply__Output) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

class ShardStream {
  private readonly client: ExpertServiceClient;
  private call?: grpc.ClientDuplexStream<ExpertRequest, ExpertReply__Output>;
  private readonly pending = new Map<string, Pending>();
  private nextId = 1;

  constructor(readonly address: string, private readonly timeoutMs: number) {
    const protos = loadProtos();
    this.client = new protos.switchyard.v1.ExpertService(address, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  }

  private stream(): grpc.ClientDuplexStream<ExpertRequest, ExpertReply__Output> {
    if (this.call) return this.call;
    const call = this.client.Exchange();
    call.on('data', (reply: ExpertReply__Output) => {
      const p = this.pending.get(reply.messageId);
      if (!p) return;
      this.pending.delete(reply.messageId);
      clearTimeout(p.timer);
      p.resolve(reply);
    });
    const fail = (err: Error) => {
      if (this.call === call) this.call = undefined;
      for (const [id, p] of this.pending) {
        clearTimeout(p.timer);
        p.reject(new ExpertCallError(this.address, (err as grpc.ServiceError).code ?? grpc.status.UNAVAILABLE, err.message));
        this.pending.delete(id);
      }
    };
    call.on('error', fail);
    call.on('end', () => fail(new Error('stream ended')));
    this.call = call;
    return call;
  }

  async send(request: Omit<ExpertRequest, 'messageId'>): Promise<ExpertReply__Output> {
    const messageId = String(this.nextId++);
    const call = this.stream();
    const reply = new Promise<ExpertReply__Output>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(messageId);
        reject(new ExpertCallError(this.address, grpc.status.DEADLINE_EXCEEDED, `no reply within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.pending.set(messageId, { resolve, reject, timer });
    });
    // Honour backpressure: wait for 'drain' when the stream's buffer is full.
    if (!call.write({ ...request, messageId })) await new Promise<void>((resolve) => call.once('drain', () => resolve()));
    return reply;
  }

  close(): void {
    this.call?.end();
    this.client.close();
  }
}

export class GrpcExpertTransport implements ExpertTransport {
  private readonly shards = new Map<string, ShardStream>();
  /** Messages sent per shard, for tests and metrics. */
  readonly messagesSent = new Map<string, number>();

  /** `wireDtype` BF16 or F16 halves the bytes of every row batch both ways, at reduced precision. */
  constructor(private readonly placement: PlacementLookup, readonly hidden: number, private readonly timeoutMs = 30_000, readonly wireDtype: FloatDtype = 'F32') {}

  private shard(address: string): ShardStream {
    let s = this.shards.get(address);
    if (!s) {
      s = new ShardStream(address, this.timeoutMs);
      this.shards.set(address, s);
    }
    return s;
  }

  private async exchange(passId: string, batches: RowBatch[], kind: RowKind, context?: CallContext): Promise<Float32Array[]> {
    const byShard = new Map<string, number[]>();
    batches.forEach((b, i) => {
      const address = this.placement(b.layer, b.expert);
      if (!byShard.has(address)) byShard.set(address, []);
      byShard.get(address)!.push(i);
    });
    const results: Float32Array[] = new Array(batches.length);
    await Promise.all([...byShard].map(async ([address, indices]) => {
      this.messagesSent.set(address, (this.messagesSent.get(address) ?? 0) + 1);
      const reply = await this.shard(address).send({
        passId, kind, requestIds: context?.requestIds ?? [],
        batches: indices.map((i) => ({ layer: batches[i].layer, expert: batches[i].expert, rows: toWireTensor(batches[i].rows, [batches[i].rowCount, this.hidden], this.wireDtype) })),
      });
      if (reply.error) throw new ExpertCallError(address, reply.error.code, reply.error.message);
      if (reply.batches.length !== indices.length) throw new ExpertCallError(address, grpc.status.INTERNAL, `${reply.batches.length} batches for ${indices.length} sent`);
      indices.forEach((i, j) => {
        results[i] = fromWireTensor(reply.batches[j].rows, `reply batch ${j}`, [batches[i].rowCount, this.hidden]).values;
      });
    }));
    return results;
  }

  forward(passId: string, batches: RowBatch[], train: boolean, context?: CallContext): Promise<Float32Array[]> {
    return this.exchange(passId, batches, train ? 'ROW_KIND_FORWARD_TRAIN' : 'ROW_KIND_FORWARD', context);
  }

  backward(passId: string, batches: RowBatch[], context?: CallContext): Promise<Float32Array[]> {
    return this.exchange(passId, batches, 'ROW_KIND_BACKWARD', context);
  }

  close(): void {
    for (const s of this.shards.values()) s.close();
    this.shards.clear();
  }
}
