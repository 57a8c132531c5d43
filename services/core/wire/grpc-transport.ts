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

/** Where each (layer, expert) is served: the addresses (host:port) of every shard holding a replica. */
export type PlacementLookup = (layer: number, expert: number) => string[];

/** Rows [rowStart, rowStart + rowCount) of batch `batch` go to `address`. */
interface Piece { batch: number; address: string; rowStart: number; rowCount: number }

/** The training attempt and weights version the rows of the current step need (shards hold rows back until then). */
export interface TrainingTag { generation: number; weightsStep: number }

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
  /** Set by a training router for the step in flight; undefined when serving. */
  training?: TrainingTag;
  private readonly trainSplits = new Map<string, Piece[]>();
  private turn = 0;

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

  /**
   * Splits each batch over the replicas of its expert: contiguous, nearly equal row ranges. Inference
   * rotates which replica gets the larger share (and single rows), so replicas share the load.
   */
  private split(batches: RowBatch[]): Piece[] {
    const pieces: Piece[] = [];
    batches.forEach((b, i) => {
      const owners = this.placement(b.layer, b.expert);
      if (owners.length === 0) throw new ExpertCallError('-', grpc.status.UNAVAILABLE, `no shard holds expert (layer ${b.layer}, expert ${b.expert})`);
      const parts = Math.min(owners.length, Math.max(b.rowCount, 1));
      const first = this.training ? 0 : this.turn++ % owners.length;
      let start = 0;
      for (let p = 0; p < parts; p++) {
        const rows = Math.floor(b.rowCount / parts) + (p < b.rowCount % parts ? 1 : 0);
        pieces.push({ batch: i, address: owners[(first + p) % owners.length], rowStart: start, rowCount: rows });
        start += rows;
      }
    });
    return pieces;
  }

  private async exchange(passId: string, batches: RowBatch[], kind: RowKind, pieces: Piece[], context?: CallContext): Promise<Float32Array[]> {
    const D = this.hidden;
    const byShard = new Map<string, Piece[]>();
    for (const p of pieces) {
      if (!byShard.has(p.address)) byShard.set(p.address, []);
      byShard.get(p.address)!.push(p);
    }
    const results = batches.map((b, i) => (pieces.filter((p) => p.batch === i).length === 1 ? undefined : new Float32Array(b.rowCount * D)));
    const whole: Array<Float32Array | undefined> = new Array(batches.length);
    const tag = this.training;
    await Promise.all([...byShard].map(async ([address, mine]) => {
      this.messagesSent.set(address, (this.messagesSent.get(address) ?? 0) + 1);
      const reply = await this.shard(address).send({
        passId, kind, requestIds: context?.requestIds ?? [],
        trainGeneration: String(tag?.generation ?? 0), weightsStep: String(tag?.weightsStep ?? 0),
        batches: mine.map((p) => {
          const b = batches[p.batch];
          return { layer: b.layer, expert: b.expert, rows: toWireTensor(b.rows.subarray(p.rowStart * D, (p.rowStart + p.rowCount) * D), [p.rowCount, D], this.wireDtype) };
        }),
      });
      if (reply.error) throw new ExpertCallError(address, reply.error.code, reply.error.message);
      if (reply.batches.length !== mine.length) throw new ExpertCallError(address, grpc.status.INTERNAL, `${reply.batches.length} batches for ${mine.length} sent`);
      mine.forEach((p, j) => {
        const values = fromWireTensor(reply.batches[j].rows, `reply batch ${j}`, [p.rowCount, D]).values;
        const out = results[p.batch];
        if (out) out.set(values, p.rowStart * D);
        else whole[p.batch] = values;
      });
    }));
    return batches.map((_, i) => results[i] ?? whole[i]!);
  }

  forward(passId: string, batches: RowBatch[], train: boolean, context?: CallContext): Promise<Float32Array[]> {
    const pieces = this.split(batches);
    // A training backward must reach the replicas that saw each row's forward.
    if (train) this.trainSplits.set(passId, pieces);
    return this.exchange(passId, batches, train ? 'ROW_KIND_FORWARD_TRAIN' : 'ROW_KIND_FORWARD', pieces, context);
  }

  backward(passId: string, batches: RowBatch[], context?: CallContext): Promise<Float32Array[]> {
    const pieces = this.trainSplits.get(passId);
    this.trainSplits.delete(passId);
    if (!pieces) throw new Error(`backward of pass ${passId} without its training forward`);
    return this.exchange(passId, batches, 'ROW_KIND_BACKWARD', pieces, context);
  }

  /** Forgets the row splits of passes that will get no backward (an aborted training step). */
  forgetPasses(): void {
    this.trainSplits.clear();
  }

  close(): void {
    for (const s of this.shards.values()) s.close();
    this.shards.clear();
  }
}
