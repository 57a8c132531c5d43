// ExpertTransport over gRPC: one long-lived Exchange stream per shard; each forward/backward call sends
// every shard its row batches — in one message, or in several when one would exceed the message-size
// limit (`maxMessageBytes`; a piece too big alone is cut into row ranges) — and waits for the replies. Serving also
// keeps per-shard health (a broken stream marks a shard down at once; a health probe brings it back),
// spends credits per row in flight, and moves rows of a lost shard to the expert's other replicas.
import * as grpc from '@grpc/grpc-js';
import { withinPass, type CallContext, type ExpertTransport, type RowBatch } from '../model/experts.js';
import { Credits } from '../credits.js';
import { OverloadError, type OverflowPolicy, type Unserved } from '../overload.js';
import { HealthProbe } from './health-probe.js';
import type { ExpertReply__Output } from '../../generated/switchyard/v1/ExpertReply.js';
import type { ExpertRequest } from '../../generated/switchyard/v1/ExpertRequest.js';
import type { ExpertServiceClient } from '../../generated/switchyard/v1/ExpertService.js';
import type { RowKind } from '../../generated/switchyard/v1/RowKind.js';
import { channelOptions, loadProtos, MAX_MESSAGE_BYTES } from './protos.js';
import { channelCredentials } from './credentials.js';
import { fromWireTensor, toWireTensor } from './tensor.js';
import type { FloatDtype } from '../dtypes.js';
import { expertKeyText, type ExpertKey } from '../placement.js';
import { batchCapacity, checkMaxMessageBytes, fittingRequestIds, planMessages, rowBytes } from './message-size.js';

/** Where each (layer, expert) is served: the addresses (host:port) of every shard holding a replica. */
export type PlacementLookup = (layer: number, expert: number) => string[];

/** Rows [rowStart, rowStart + rowCount) of batch `batch` go to `address`. */
interface Piece { batch: number; address: string; rowStart: number; rowCount: number }

/**
 * One message to a shard: row ranges of several batches (at most one per batch). A training pass split
 * over several messages to one shard names each message's rows as a sub-pass `<pass>/part<k>`, so the
 * shard keeps each part's activations apart and the backward, sent as the same messages, finds them.
 */
interface Message { address: string; passId: string; requestIds: string[]; pieces: Piece[] }

/** The training attempt and weights version the rows of the current step need (shards hold rows back until then). */
export interface TrainingTag { generation: number; weightsStep: number }

export class ExpertCallError extends Error {
  override name = 'ExpertCallError';
  /** NOT_FOUND: the experts the shard named as not held (none from older shards). */
  constructor(readonly shard: string, readonly code: number, message: string, readonly missing: ExpertKey[] = []) {
    super(`shard ${shard}: ${message}`);
  }
}

/**
 * A shard's reply error RESOURCE_EXHAUSTED: the shard is fine but refuses these rows now (this router is
 * over its credits there, or the shard's queue is full). Serving treats the rows as at capacity.
 */
export class ShardAtCapacityError extends ExpertCallError {
  override name = 'ShardAtCapacityError';
}

/** Pause before `wait` sends rows a shard refused again: the n-th retry waits 5, 10, then 20 ms. */
const capacityBackoffMs = (retry: number): number => Math.min(20, 5 * 2 ** retry);

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
  /**
   * Senders waiting for the stream to take writes again. The stream carries one 'drain' listener for its
   * whole life that wakes them all: a listener per blocked write would be left behind whenever the reply
   * came first, piling up on the long-lived stream (MaxListenersExceededWarning).
   */
  private readonly blocked = new Set<() => void>();

  constructor(readonly address: string, private readonly timeoutMs: number, maxMessageBytes: number) {
    const protos = loadProtos();
    this.client = new protos.switchyard.v1.ExpertService(address, channelCredentials(), channelOptions(maxMessageBytes));
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
      this.wakeBlocked();
      for (const [id, p] of this.pending) {
        clearTimeout(p.timer);
        p.reject(new ExpertCallError(this.address, (err as grpc.ServiceError).code ?? grpc.status.UNAVAILABLE, err.message));
        this.pending.delete(id);
      }
    };
    call.on('error', fail);
    call.on('end', () => fail(new Error('stream ended')));
    call.on('drain', () => this.wakeBlocked());
    this.call = call;
    return call;
  }

  private wakeBlocked(): void {
    for (const wake of this.blocked) wake();
    this.blocked.clear();
  }

  /** Until the stream takes writes again ('drain'), or `reply` settles (a failed stream never drains). */
  private async writable(reply: Promise<unknown>): Promise<void> {
    let wake!: () => void;
    const woken = new Promise<void>((resolve) => { wake = resolve; });
    this.blocked.add(wake);
    try {
      await Promise.race([woken, reply.then(() => undefined, () => undefined)]);
    } finally {
      this.blocked.delete(wake);
    }
  }

  /** Sends one request; `timeoutMs` (default: the transport's) bounds the wait for its reply. */
  async send(request: Omit<ExpertRequest, 'messageId'>, timeoutMs = this.timeoutMs): Promise<ExpertReply__Output> {
    const messageId = String(this.nextId++);
    const call = this.stream();
    const reply = new Promise<ExpertReply__Output>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(messageId);
        reject(new ExpertCallError(this.address, grpc.status.DEADLINE_EXCEEDED, `no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(messageId, { resolve, reject, timer });
    });
    // Honour backpressure: wait for 'drain' when the stream's buffer is full — or for the reply to settle
    // (a stream that fails never drains, and fails every pending reply instead). Adds no listener to the stream.
    if (!call.write({ ...request, messageId })) await this.writable(reply);
    return reply;
  }

  /** The open stream, if any. */
  get current(): grpc.ClientDuplexStream<ExpertRequest, ExpertReply__Output> | undefined {
    return this.call;
  }

  close(): void {
    this.call?.end();
    this.client.close();
  }
}

export interface ServingOptions {
  /** Per-message reply timeout when the call carries no deadline. */
  timeoutMs?: number;
  wireDtype?: FloatDtype;
  overflow?: OverflowPolicy;
  /** Credits per (shard, expert) for this router (undefined = unlimited). */
  creditLimit?: (address: string, layer: number, expert: number) => number | undefined;
  /** Counted per expert: rows that could not be served as routed, by reason. */
  onUnserved?: (layer: number, expert: number, rows: number, reason: 'shard_down' | 'at_capacity') => void;
  /** Seen per message: shard, payload bytes and seconds to the reply. */
  onDispatch?: (address: string, bytes: number, seconds: number) => void;
  /**
   * Largest message to or from a shard (default MAX_MESSAGE_BYTES); shards must accept as much. What a
   * call sends one shard is split into messages below it (their estimated size bounds the encoded one).
   */
  maxMessageBytes?: number;
}

/** Errors that mean the shard (not the request) is the problem: try the expert's other replicas. */
const SHARD_LOST = new Set<number>([grpc.status.UNAVAILABLE, grpc.status.CANCELLED, grpc.status.UNKNOWN, grpc.status.INTERNAL]);
/**
 * NOT_FOUND: the shard is fine but no longer holds some experts of the message (they moved; this router's
 * placement is a moment behind). Those experts skip that shard this long; its other experts stay in use.
 */
const NOT_HELD_MS = 1_000;

export class GrpcExpertTransport implements ExpertTransport {
  private readonly shards = new Map<string, ShardStream>();
  /** Messages sent per shard, for tests and metrics. */
  readonly messagesSent = new Map<string, number>();
  /** Set by a training router for the step in flight; undefined when serving. */
  training?: TrainingTag;
  readonly overflow: OverflowPolicy;
  readonly remote = true;
  readonly credits = new Credits();
  readonly health: HealthProbe;
  /** The messages of each training forward in flight: its backward is sent as exactly the same messages. */
  private readonly trainSplits = new Map<string, Message[]>();
  private turn = 0;
  private readonly timeoutMs: number;
  /** `address|layer/expert` → until when the shard is not asked for that expert (NOT_FOUND). */
  private readonly notHeld = new Map<string, number>();
  readonly wireDtype: FloatDtype;
  readonly maxMessageBytes: number;

  constructor(private readonly placement: PlacementLookup, readonly hidden: number, private readonly options: ServingOptions = {}) {
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.wireDtype = options.wireDtype ?? 'F32';
    this.maxMessageBytes = checkMaxMessageBytes(options.maxMessageBytes ?? MAX_MESSAGE_BYTES, hidden, this.wireDtype);
    this.overflow = options.overflow ?? 'drop';
    this.health = new HealthProbe();
  }

  /** The open stream to a shard, if any (tests watch its listeners). */
  streamTo(address: string): grpc.ClientDuplexStream<ExpertRequest, ExpertReply__Output> | undefined {
    return this.shards.get(address)?.current;
  }

  private shard(address: string): ShardStream {
    let s = this.shards.get(address);
    if (!s) {
      s = new ShardStream(address, this.timeoutMs, this.maxMessageBytes);
      this.shards.set(address, s);
    }
    return s;
  }

  /**
   * Splits each batch over the live replicas of its expert: contiguous, nearly equal row ranges.
   * Inference rotates which replica gets the larger share (and single rows), so replicas share the load.
   * Batches without a live holder get no piece.
   */
  private split(batches: RowBatch[], indices: number[] = batches.map((_, i) => i), live = false): Piece[] {
    const pieces: Piece[] = [];
    for (const i of indices) {
      const b = batches[i];
      const all = this.placement(b.layer, b.expert);
      const owners = live ? all.filter((a) => !this.health.isDown(a) && !this.skips(a, b)) : all;
      if (owners.length === 0) {
        if (live) continue;
        throw new ExpertCallError('-', grpc.status.UNAVAILABLE, `no shard holds expert (layer ${b.layer}, expert ${b.expert})`);
      }
      const parts = Math.min(owners.length, Math.max(b.rowCount, 1));
      const first = this.training ? 0 : this.turn++ % owners.length;
      let start = 0;
      for (let p = 0; p < parts; p++) {
        const rows = Math.floor(b.rowCount / parts) + (p < b.rowCount % parts ? 1 : 0);
        pieces.push({ batch: i, address: owners[(first + p) % owners.length], rowStart: start, rowCount: rows });
        start += rows;
      }
    }
    return pieces;
  }

  /**
   * Groups pieces by shard and packs each shard's into messages under the size limit (row ranges of a
   * piece where a message fills up). `subPasses` (training) names the messages of a shard that gets more
   * than one `<pass>/part<k>`; inference keeps the pass id (a shard keeps nothing of it).
   */
  private pack(passId: string, pieces: Piece[], subPasses: boolean, requestIds: readonly string[]): Message[] {
    const perRow = rowBytes(this.hidden, this.wireDtype);
    const ids = fittingRequestIds(requestIds, this.maxMessageBytes, passId, perRow);
    const capacity = batchCapacity(this.maxMessageBytes, passId, ids);
    const byShard = new Map<string, Piece[]>();
    for (const p of pieces) {
      if (!byShard.has(p.address)) byShard.set(p.address, []);
      byShard.get(p.address)!.push(p);
    }
    const messages: Message[] = [];
    for (const [address, mine] of byShard) {
      let plan;
      try {
        plan = planMessages(mine.map((p) => p.rowCount), perRow, capacity);
      } catch (err) {
        throw new ExpertCallError(address, grpc.status.RESOURCE_EXHAUSTED, `pass ${passId}: ${(err as Error).message} (maxMessageBytes ${this.maxMessageBytes})`);
      }
      plan.forEach((chunks, k) => messages.push({
        address, passId: subPasses && plan.length > 1 ? `${passId}/part${k}` : passId, requestIds: ids,
        pieces: chunks.map((c) => ({ batch: mine[c.piece].batch, address, rowStart: mine[c.piece].rowStart + c.rowOffset, rowCount: c.rowCount })),
      }));
    }
    return messages;
  }

  /** Sends each shard its pieces (in as many messages as the size limit needs); fills `out` per batch. */
  private sendPieces(passId: string, batches: RowBatch[], kind: RowKind, pieces: Piece[], out: Array<Float32Array | undefined>, context?: CallContext): Promise<void> {
    return this.sendMessages(batches, kind, this.pack(passId, pieces, false, context?.requestIds ?? []), out, context);
  }

  /**
   * Sends the messages (all at once: each shard's stream takes them in order) and fills `out` per batch
   * from the replies. Settles only when every message has its answer, so a failure leaves no reply still
   * on its way to `out` and the caller's credits cover rows until they are back; then throws the first
   * failure.
   */
  private async sendMessages(batches: RowBatch[], kind: RowKind, messages: Message[], out: Array<Float32Array | undefined>, context?: CallContext): Promise<void> {
    const D = this.hidden;
    const tag = this.training;
    const timeout = context?.deadline !== undefined ? Math.max(1, Math.min(this.timeoutMs, context.deadline - Date.now())) : this.timeoutMs;
    const results = await Promise.allSettled(messages.map(async ({ address, passId, requestIds, pieces: mine }) => {
      this.messagesSent.set(address, (this.messagesSent.get(address) ?? 0) + 1);
      const started = performance.now();
      let bytes = 0;
      const reply = await this.shard(address).send({
        passId, kind, requestIds,
        trainGeneration: String(tag?.generation ?? 0), weightsStep: String(tag?.weightsStep ?? 0),
        batches: mine.map((p) => {
          const b = batches[p.batch];
          const rows = toWireTensor(b.rows.subarray(p.rowStart * D, (p.rowStart + p.rowCount) * D), [p.rowCount, D], this.wireDtype);
          bytes += rows.data!.length;
          return { layer: b.layer, expert: b.expert, rows };
        }),
      }, timeout);
      if (reply.error) {
        // Only a reply can say "at capacity": RESOURCE_EXHAUSTED as the stream's status is a message over the size limit.
        const Failure = reply.error.code === grpc.status.RESOURCE_EXHAUSTED ? ShardAtCapacityError : ExpertCallError;
        throw new Failure(address, reply.error.code, reply.error.message, reply.error.missing);
      }
      if (reply.batches.length !== mine.length) throw new ExpertCallError(address, grpc.status.INTERNAL, `${reply.batches.length} batches for ${mine.length} sent`);
      this.options.onDispatch?.(address, bytes, (performance.now() - started) / 1000);
      mine.forEach((p, j) => {
        const values = fromWireTensor(reply.batches[j].rows, `reply batch ${j}`, [p.rowCount, D]).values;
        if (p.rowCount === batches[p.batch].rowCount) out[p.batch] = values;
        else {
          out[p.batch] ??= new Float32Array(batches[p.batch].rowCount * D);
          out[p.batch]!.set(values, p.rowStart * D);
        }
      });
    }));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  async forward(passId: string, batches: RowBatch[], train: boolean, context?: CallContext): Promise<Float32Array[]> {
    const messages = this.pack(passId, this.split(batches), train, context?.requestIds ?? []);
    // A training backward must reach the replicas that saw each row's forward, as the same messages.
    if (train) this.trainSplits.set(passId, messages);
    const out: Array<Float32Array | undefined> = new Array(batches.length);
    await this.sendMessages(batches, train ? 'ROW_KIND_FORWARD_TRAIN' : 'ROW_KIND_FORWARD', messages, out, context);
    return out as Float32Array[];
  }

  async backward(passId: string, batches: RowBatch[], context?: CallContext): Promise<Float32Array[]> {
    const messages = this.trainSplits.get(passId);
    this.trainSplits.delete(passId);
    if (!messages) throw new Error(`backward of pass ${passId} without its training forward`);
    const out: Array<Float32Array | undefined> = new Array(batches.length);
    await this.sendMessages(batches, 'ROW_KIND_BACKWARD', messages, out, context);
    return out as Float32Array[];
  }

  /**
   * Inference: every batch goes to live replicas of its expert, within this router's credits. A shard
   * that fails is marked down and its batches go to the remaining replicas; what no replica can take
   * comes back unserved (the MoE block applies the overflow policy), never as a failed call. A shard
   * that refuses a message (RESOURCE_EXHAUSTED) stays up and its batches are at capacity; with `wait`
   * and a deadline they go again after a short pause while the deadline allows.
   */
  async serve(passId: string, batches: RowBatch[], context?: CallContext): Promise<Array<Float32Array | Unserved>> {
    const out: Array<Float32Array | undefined> = new Array(batches.length);
    const unserved = new Map<number, 'shard_down' | 'at_capacity'>();
    const waitDeadline = this.overflow === 'wait' ? context?.deadline : undefined;
    let todo = batches.map((_, i) => i);
    // Rounds that lost a shard are bounded; rounds that only retry refused rows are bounded by the deadline.
    for (let failovers = 0, capacityRetries = 0; todo.length > 0 && failovers < 4;) {
      if (context?.deadline !== undefined && Date.now() >= context.deadline) throw new OverloadError('the request deadline passed while its rows were with the experts', 'deadline');
      for (const i of todo) unserved.delete(i);
      const pieces = this.split(batches, todo, true);
      for (const i of todo) if (!pieces.some((p) => p.batch === i)) unserved.set(i, 'shard_down');
      const granted = await this.takeCredits(batches, pieces, context?.deadline);
      for (const p of pieces) if (!granted.has(p.batch)) unserved.set(p.batch, 'at_capacity');
      const sendable = pieces.filter((p) => granted.has(p.batch));
      const failed = new Set<number>();
      const refused = new Set<number>();
      await Promise.all([...new Set(sendable.map((p) => p.address))].map(async (address) => {
        const mine = sendable.filter((p) => p.address === address);
        try {
          await this.sendPieces(passId, batches, 'ROW_KIND_FORWARD', mine, out, context);
        } catch (err) {
          // Not a lost shard: it stays up, and nothing it holds is skipped.
          if (err instanceof ShardAtCapacityError) {
            for (const p of mine) refused.add(p.batch);
            return;
          }
          const code = (err as ExpertCallError).code;
          if (code === grpc.status.DEADLINE_EXCEEDED && context?.deadline !== undefined && Date.now() >= context.deadline - 1)
            throw new OverloadError('the request deadline passed while its rows were with the experts', 'deadline');
          if (code === grpc.status.NOT_FOUND) {
            // The shard refused the whole message: only the experts it names skip it, the others go again.
            const named = new Set((err as ExpertCallError).missing.map(expertKeyText));
            const lacking = named.size ? mine.filter((p) => named.has(expertKeyText(batches[p.batch]))) : mine; // older shards name none
            for (const p of lacking) this.notHeld.set(creditKey(address, batches[p.batch]), Date.now() + NOT_HELD_MS);
          } else {
            if (!SHARD_LOST.has(code) && code !== grpc.status.DEADLINE_EXCEEDED) throw err;
            this.health.markDown(address, (err as Error).message);
          }
          for (const p of mine) failed.add(p.batch);
        } finally {
          for (const p of mine) this.credits.give(creditKey(address, batches[p.batch]), p.rowCount);
        }
      }));
      for (const i of failed) out[i] = undefined;
      for (const i of refused) {
        out[i] = undefined;
        if (!failed.has(i)) unserved.set(i, 'at_capacity');
      }
      if (failed.size > 0) failovers++;
      const pause = capacityBackoffMs(capacityRetries);
      const retryRefused = refused.size > 0 && waitDeadline !== undefined && Date.now() + pause < waitDeadline;
      todo = [...new Set([...failed, ...(retryRefused ? refused : [])])];
      if (retryRefused) {
        capacityRetries++;
        await new Promise((resolve) => setTimeout(resolve, pause));
      }
    }
    for (const i of todo) if (!unserved.has(i)) unserved.set(i, 'shard_down');
    return batches.map((b, i) => {
      const reason = out[i] === undefined ? unserved.get(i) ?? 'shard_down' : undefined;
      if (!reason) return out[i]!;
      this.options.onUnserved?.(b.layer, b.expert, b.rowCount, reason);
      return { unserved: reason === 'shard_down' ? `no live shard holds expert ${expertKeyText(b)}` : `expert ${expertKeyText(b)} is at capacity` };
    });
  }

  /** Called with every new placement: forgets NOT_FOUND marks that ran out (experts that moved for good). */
  placementChanged(): void {
    const now = Date.now();
    for (const [key, until] of this.notHeld) if (until <= now) this.notHeld.delete(key);
  }

  private skips(address: string, b: RowBatch): boolean {
    const key = creditKey(address, b);
    const until = this.notHeld.get(key);
    if (until === undefined) return false;
    if (until > Date.now()) return true;
    this.notHeld.delete(key);
    return false;
  }

  /** Takes credits for whole batches (all pieces or none); returns the batches that got them. */
  private async takeCredits(batches: RowBatch[], pieces: Piece[], deadline?: number): Promise<Set<number>> {
    const granted = new Set<number>();
    const byBatch = new Map<number, Piece[]>();
    for (const p of pieces) byBatch.set(p.batch, [...(byBatch.get(p.batch) ?? []), p]);
    await Promise.all([...byBatch].map(async ([i, mine]) => {
      const taken: Piece[] = [];
      // One order for every caller (by shard), so two waiting requests never hold each other's credits.
      for (const p of [...mine].sort((a, b) => (a.address < b.address ? -1 : a.address > b.address ? 1 : 0))) {
        const key = creditKey(p.address, batches[i]);
        const limit = this.options.creditLimit?.(p.address, batches[i].layer, batches[i].expert);
        const ok = this.overflow === 'wait' && deadline !== undefined
          ? await this.credits.take(key, p.rowCount, limit, deadline)
          : this.credits.tryTake(key, p.rowCount, limit);
        if (!ok) break;
        taken.push(p);
      }
      if (taken.length === mine.length) granted.add(i);
      else for (const p of taken) this.credits.give(creditKey(p.address, batches[i]), p.rowCount);
    }));
    return granted;
  }

  /**
   * A failed training step: forgets its row splits. The shards free the pass's activations when the
   * attempt aborts (the router's failure aborts it), so nothing is sent.
   */
  dropPass(passId: string): void {
    for (const key of this.trainSplits.keys()) if (withinPass(key, passId)) this.trainSplits.delete(key);
  }

  /** Forgets the row splits of passes that will get no backward (an aborted training step). */
  forgetPasses(): void {
    this.trainSplits.clear();
  }

  close(): void {
    for (const s of this.shards.values()) s.close();
    this.shards.clear();
    this.health.close();
  }
}

const creditKey = (address: string, b: RowBatch): string => `${address}|${expertKeyText(b)}`;
