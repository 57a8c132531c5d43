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

export class ComputeTurns {
  private held: boolean;
  private readonly waiting: Array<() => void> = [];
  /** The first failure of any lane: the others stop when they next get the turn. */
  private failure?: { error: unknown };

  /** `held`: the caller holds the turn from the start (a pass without lanes). */
  constructor(held = false) {
    this.held = held;
  }

  async acquire(): Promise<void> {
    if (!this.held) this.held = true;
    else await new Promise<void>((resolve) => this.waiting.push(resolve));
    if (this.failure) throw new LaneStopped('a sibling micro-batch failed');
  }

  release(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.held = false;
  }

  fail(error: unknown): void {
    if (!(error instanceof LaneStopped)) this.failure ??= { error };
  }

  /**
   * While `reply` (rows just sent to the experts) is on its way: the sends reach the sockets, `meanwhile`
   * runs (router work that needs no reply, e.g. a shared-expert MLP), and the other lanes take their
   * turns. Resumes holding the turn.
   */
  async away<T>(reply: Promise<T>, meanwhile?: () => void): Promise<T> {
    reply.catch(() => undefined); // handled below; not an unhandled rejection while this lane waits
    await flushWrites();
    let meanwhileFailed: { error: unknown } | undefined;
    try {
      meanwhile?.();
    } catch (error) {
      meanwhileFailed = { error };
    }
    this.release();
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
    const turns = new ComputeTurns();
    const settled = await Promise.allSettled(Array.from({ length: lanes }, async (_, lane) => {
      await turns.acquire();
      try {
        return await body(lane, turns);
      } catch (error) {
        turns.fail(error);
        throw error;
      } finally {
        turns.release();
      }
    }));
    if (turns.failure) {
      for (const s of settled) if (s.status === 'fulfilled') discard?.(s.value);
      throw turns.failure.error;
    }
    return settled.map((s) => (s as PromiseFulfilledResult<T>).value);
  }
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
