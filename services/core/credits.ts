// Credits (DESIGN §7): a router may keep only its share of a shard's per-expert budget in flight. A
// dispatch takes credits for its rows and gives them back with the reply; with nothing in flight one
// oversized batch may still go alone, so a batch larger than the share never deadlocks.
interface Waiter { key: string; rows: number; limit: number; resolve: (taken: boolean) => void; timer: NodeJS.Timeout }

export class Credits {
  private readonly inFlight = new Map<string, number>();
  private waiters: Waiter[] = [];

  /** Takes `rows` credits of `key` under `limit` (undefined = unlimited) if they are free now. */
  tryTake(key: string, rows: number, limit: number | undefined): boolean {
    const used = this.inFlight.get(key) ?? 0;
    if (limit !== undefined && used > 0 && used + rows > limit) return false;
    this.inFlight.set(key, used + rows);
    return true;
  }

  /** Like tryTake, waiting for credits until `deadline` (epoch ms); false when it passed first. */
  take(key: string, rows: number, limit: number | undefined, deadline: number): Promise<boolean> {
    if (this.tryTake(key, rows, limit)) return Promise.resolve(true);
    const wait = deadline - Date.now();
    if (!(wait > 0)) return Promise.resolve(false);
    return new Promise((resolve) => {
      const waiter: Waiter = {
        key, rows, limit: limit!, resolve,
        timer: setTimeout(() => {
          this.waiters = this.waiters.filter((w) => w !== waiter);
          resolve(false);
        }, wait),
      };
      this.waiters.push(waiter);
    });
  }

  give(key: string, rows: number): void {
    const left = (this.inFlight.get(key) ?? 0) - rows;
    if (left > 0) this.inFlight.set(key, left);
    else this.inFlight.delete(key);
    const still: Waiter[] = [];
    for (const w of this.waiters) {
      if (w.key === key && this.tryTake(w.key, w.rows, w.limit)) {
        clearTimeout(w.timer);
        w.resolve(true);
      } else still.push(w);
    }
    this.waiters = still;
  }

  /** Rows in flight per key, for metrics. */
  snapshot(): Map<string, number> {
    return new Map(this.inFlight);
  }

  get waiting(): number {
    return this.waiters.length;
  }
}
