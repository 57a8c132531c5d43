// Ping-pong micro-batches (MegaScale-Infer, DeepSeek-V3 two-batch overlap): a pass's sequences are split
// into lanes that run the layers concurrently on the router's one thread. A lane computes while it holds
// the turn; when it sends rows to the experts it lets the sends reach the sockets first (one event-loop
// turn: grpc-js hands the bytes to the HTTP/2 session, which writes them from a native immediate), then
// gives the turn to the next lane, which computes its attention and gate while the shards work on the
// first lane's rows.

/** Resolves after the writes queued so far have been handed to the sockets (Node flushes HTTP/2 sessions from a native immediate, which runs before this one). */
export const flushWrites = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** A sibling lane failed: this lane stops at its next turn (the pass fails with the sibling's error). */
class LaneStopped extends Error {
  override name = 'LaneStopped';
}

/** What a lane did on the router's thread, for tests and profiles: epoch ms with sub-ms precision. */
export interface LaneSpan { lane: number; kind: 'compute' | 'meanwhile'; start: number; end: number }

/** Set to watch every lane's spans (tests prove the overlap with it). */
export const pipelineTrace: { onSpan?: (span: LaneSpan) => void } = {};

const epochMs = (): number => performance.timeOrigin + performance.now();

/** The one turn of a pass: who computes now, who waits, and the first failure. */
class Turn {
  held = false;
  readonly waiting: Array<() => void> = [];
  failure?: { error: unknown };
}

/** One lane's hold on its pass's turn. */
export class ComputeTurns {
  private since = 0;

  /** `held`: a pass without lanes, holding its turn from the start. */
  constructor(held = false, private readonly turn = new Turn(), readonly lane = 0) {
    if (held) {
      turn.held = true;
      this.since = epochMs();
    }
  }

  async acquire(): Promise<void> {
    if (!this.turn.held) this.turn.held = true;
    else await new Promise<void>((resolve) => this.turn.waiting.push(resolve));
    if (pipelineTrace.onSpan) this.since = epochMs();
    if (this.turn.failure) throw new LaneStopped('a sibling micro-batch failed');
  }

  release(): void {
    this.span('compute', this.since);
    this.handOver();
  }

  private handOver(): void {
    const next = this.turn.waiting.shift();
    if (next) next();
    else this.turn.held = false;
  }

  private span(kind: LaneSpan['kind'], start: number): void {
    if (pipelineTrace.onSpan) pipelineTrace.onSpan({ lane: this.lane, kind, start, end: epochMs() });
  }

  /**
   * While `reply` (rows just sent to the experts) is on its way: the sends reach the sockets (`flush`;
   * experts in this process have nothing to flush), `meanwhile` runs (router work that needs no reply,
   * e.g. a shared-expert MLP), and the other lanes take their turns. Resumes holding the turn.
   */
  async away<T>(reply: Promise<T>, meanwhile?: () => void, flush = true): Promise<T> {
    reply.catch(() => undefined); // handled below; not an unhandled rejection while this lane waits
    this.span('compute', this.since);
    if (flush) await flushWrites();
    let meanwhileFailed: { error: unknown } | undefined;
    if (meanwhile) {
      const start = epochMs();
      try {
        meanwhile();
      } catch (error) {
        meanwhileFailed = { error };
      }
      this.span('meanwhile', start);
    }
    this.handOver();
    let value: T;
    try {
      value = await reply;
    } finally {
      await this.acquire();
    }
    if (meanwhileFailed) throw meanwhileFailed.error;
    return value;
  }

  /**
   * Runs `lanes` bodies concurrently, each holding the turn whenever it computes. Settles when every lane
   * has (so a failure leaves nothing running); throws the first lane's failure, after handing the
   * results of the lanes that did finish to `discard` (to free them).
   */
  static async run<T>(lanes: number, body: (lane: number, turns: ComputeTurns) => Promise<T>, discard?: (result: T) => void): Promise<T[]> {
    const turn = new Turn();
    const settled = await Promise.allSettled(Array.from({ length: lanes }, async (_, lane) => {
      const turns = new ComputeTurns(false, turn, lane);
      await turns.acquire();
      try {
        return await body(lane, turns);
      } catch (error) {
        if (!(error instanceof LaneStopped)) turn.failure ??= { error };
        throw error;
      } finally {
        turns.release();
      }
    }));
    if (turn.failure) {
      for (const s of settled) if (s.status === 'fulfilled') discard?.(s.value);
      throw turn.failure.error;
    }
    return settled.map((s) => (s as PromiseFulfilledResult<T>).value);
  }
}

/**
 * Lanes worth using for `rows` rows routed to `k` of `experts` experts: at most `lanes`, and each bringing
 * every expert about `minExpertRows` rows on average (0: always `lanes`).
 */
export function lanesFor(rows: number, lanes: number, experts: number, k: number, minExpertRows: number): number {
  if (lanes <= 1) return 1;
  if (minExpertRows <= 0) return lanes;
  const perExpert = (rows * k) / Math.max(1, experts);
  return Math.max(1, Math.min(lanes, Math.floor(perExpert / minExpertRows)));
}

/**
 * Splits `units` contiguous units (sequences, or groups of them) into at most `lanes` contiguous ranges of
 * nearly equal weight; `weight(u)` is a unit's row count. Returns [start, end) unit ranges, none empty.
 */
export function splitLanes(units: number, lanes: number, weight: (unit: number) => number = () => 1): Array<[number, number]> {
  const count = Math.max(1, Math.min(lanes, units));
  if (count === 1) return [[0, units]];
  let total = 0;
  for (let u = 0; u < units; u++) total += weight(u);
  const ranges: Array<[number, number]> = [];
  let start = 0;
  let acc = 0;
  for (let u = 0; u < units; u++) {
    acc += weight(u);
    const lanesLeft = count - ranges.length - 1;
    const unitsLeft = units - u - 1;
    // Cut after this unit once its lane has its share, keeping a unit for every lane still to come.
    if (lanesLeft > 0 && (acc >= (total * (ranges.length + 1)) / count || unitsLeft === lanesLeft) && unitsLeft >= lanesLeft) {
      ranges.push([start, u + 1]);
      start = u + 1;
    }
  }
  ranges.push([start, units]);
  return ranges.filter(([a, b]) => b > a);
}
