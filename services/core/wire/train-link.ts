// A training member's calls to the coordinator: the step protocol (TrainSync, a long poll retried until
// the barrier answers) and AllReduce (chunked, pipelined buckets on one stream per reduction set).
import * as grpc from '@grpc/grpc-js';
import type { CoordinatorClient } from '../../generated/switchyard/v1/Coordinator.js';
import type { ReduceChunk } from '../../generated/switchyard/v1/ReduceChunk.js';
import type { ReduceChunk__Output } from '../../generated/switchyard/v1/ReduceChunk.js';
import type { TrainSyncRequest } from '../../generated/switchyard/v1/TrainSyncRequest.js';
import type { TrainSyncReply__Output } from '../../generated/switchyard/v1/TrainSyncReply.js';
import { CHANNEL_OPTIONS, loadProtos } from './protos.js';
import { channelCredentials } from './credentials.js';
import { fromWireTensor, toWireTensor } from './tensor.js';
import { writableAgain } from './backpressure.js';

/** Default all-reduce chunk: 1 MiB of float32. */
export const DEFAULT_CHUNK_FLOATS = 256 * 1024;

/** A long poll is re-sent after this long; the barrier keeps the member's arrival. */
const POLL_MS = 20_000;
const RETRY_MS = 200;

export interface Reduction {
  /** Same name at every contributor, e.g. "g2/s17/dense". */
  name: string;
  contributors: number;
  values: Float32Array;
}

export interface ReduceStats { seconds: number; bytesSent: number; bytesReceived: number }

export class AllReduceError extends Error {
  override name = 'AllReduceError';
}

/** Scope of every training pass of an attempt: a shard drops the whole attempt's passes when it aborts. */
export const attemptPasses = (generation: number): string => `g${generation}`;

/** The pass of one router's step (its layers are sub-passes `…/L<l>`, within attemptPasses(generation)). */
export const trainingPassId = (generation: number, router: number, step: number): string => `${attemptPasses(generation)}/r${router}/s${step}`;

/** The run aborted the step in flight (a member failed): rejoin and resume from the last checkpoint. */
export class StepAborted extends Error {
  override name = 'StepAborted';
}

export type BarrierPhase = 'TRAIN_PHASE_BACKWARD_DONE' | 'TRAIN_PHASE_COMMIT' | 'TRAIN_PHASE_CHECKPOINT';

export class TrainLink {
  readonly client: CoordinatorClient;
  private closed = false;
  /** Calls in flight: closing the channel lets them run on (a 20 s long poll), so close() cancels them. */
  private readonly calls = new Set<{ cancel(): void }>();

  constructor(readonly address: string, readonly memberId: string) {
    const protos = loadProtos();
    this.client = new protos.switchyard.v1.Coordinator(address, channelCredentials(), CHANNEL_OPTIONS);
  }

  /**
   * One TrainSync call, repeated while it times out or the coordinator is unreachable or not ready for
   * this member yet (it registers in the background). Other errors are thrown.
   */
  async sync(request: Omit<TrainSyncRequest, 'memberId'>): Promise<TrainSyncReply__Output> {
    for (;;) {
      if (this.closed) throw new Error('training link closed');
      try {
        return await new Promise<TrainSyncReply__Output>((resolve, reject) => {
          const call = this.client.TrainSync({ ...request, memberId: this.memberId }, { deadline: new Date(Date.now() + POLL_MS) }, (err, reply) => {
            this.calls.delete(call);
            if (err) reject(err);
            else resolve(reply!);
          });
          this.calls.add(call);
        });
      } catch (err) {
        if (this.closed) throw new Error('training link closed');
        const code = (err as grpc.ServiceError).code;
        if (code !== grpc.status.DEADLINE_EXCEEDED && code !== grpc.status.UNAVAILABLE && code !== grpc.status.FAILED_PRECONDITION) throw err;
        if (code !== grpc.status.DEADLINE_EXCEEDED) await new Promise((r) => setTimeout(r, RETRY_MS));
      }
    }
  }

  /** Waits at one step barrier; an aborted attempt becomes StepAborted. */
  async barrier(generation: number, step: number, phase: BarrierPhase, extra: Partial<TrainSyncRequest> = {}): Promise<TrainSyncReply__Output> {
    const reply = await this.sync({ ...extra, phase, generation: String(generation), step: String(step) });
    if (reply.aborted) throw new StepAborted(`step ${step} aborted: ${reply.abortReason}`);
    return reply;
  }

  /**
   * Sums every reduction across its contributors. All chunks go out on one stream (honouring its
   * backpressure) while sums come back, so sending and receiving overlap.
   */
  allReduce(reductions: Reduction[], chunkFloats = DEFAULT_CHUNK_FLOATS, timeoutMs = 120_000): Promise<{ sums: Float32Array[]; stats: ReduceStats }> {
    const started = performance.now();
    const sums = reductions.map((r) => new Float32Array(r.values.length));
    const chunksOf = (r: Reduction) => Math.max(1, Math.ceil(r.values.length / chunkFloats));
    let outstanding = reductions.reduce((n, r) => n + chunksOf(r), 0);
    const byName = new Map(reductions.map((r, i) => [r.name, i]));
    let bytesSent = 0;
    let bytesReceived = 0;
    return new Promise((resolve, reject) => {
      if (outstanding === 0) return resolve({ sums, stats: { seconds: 0, bytesSent, bytesReceived } });
      const call = this.client.AllReduce({ deadline: new Date(Date.now() + timeoutMs) });
      this.calls.add(call);
      call.on('status', () => this.calls.delete(call)); // every call ends with a status, whatever its outcome
      let settled = false;
      const fail = (err: Error) => {
        if (settled) return;
        settled = true;
        call.cancel();
        reject(new AllReduceError(`all-reduce failed: ${err.message}`));
      };
      call.on('data', (chunk: ReduceChunk__Output) => {
        const i = byName.get(chunk.reduction);
        if (i === undefined) return fail(new Error(`sum for unknown reduction ${chunk.reduction}`));
        try {
          const { values } = fromWireTensor(chunk.values, `sum of ${chunk.reduction}`);
          sums[i].set(values, chunk.chunk * chunkFloats);
          bytesReceived += values.byteLength;
        } catch (err) {
          return fail(err as Error); // a malformed sum fails this reduction, not the process
        }
        if (--outstanding === 0 && !settled) {
          settled = true;
          call.end();
          resolve({ sums, stats: { seconds: (performance.now() - started) / 1000, bytesSent, bytesReceived } });
        }
      });
      call.on('error', fail);
      call.on('end', () => fail(new Error('the coordinator ended the stream early')));
      void (async () => {
        for (const r of reductions) {
          const chunks = chunksOf(r);
          for (let c = 0; c < chunks && !settled; c++) {
            const part = r.values.subarray(c * chunkFloats, Math.min(r.values.length, (c + 1) * chunkFloats));
            const message: ReduceChunk = { reduction: r.name, contributors: r.contributors, chunk: c, chunks, values: toWireTensor(part, [part.length]) };
            bytesSent += part.byteLength;
            // A failed call never drains: its close or error ends the wait too (and `settled` the loop).
            if (!call.write(message)) await writableAgain(call);
          }
        }
      })();
    });
  }

  close(): void {
    this.closed = true;
    for (const call of this.calls) call.cancel();
    this.client.close();
  }
}
