// Admission for calls that do not go through the continuous batcher (Open Inference `infer`): at most
// `concurrency` run at once, at most `queue` wait, and a waiter whose deadline passes leaves with 503.
import { OverloadError } from '../core/overload.js';

interface Waiter { resolve: () => void; reject: (err: Error) => void; timer?: NodeJS.Timeout }

export class Limiter {
  private running = 0;
  private waiters: Waiter[] = [];
  private closing = false;

  constructor(readonly concurrency: number, readonly queue: number) {}

  get depth(): { waiting: number; running: number } {
    return { waiting: this.waiters.length, running: this.running };
  }

  /** Runs `fn` when a place is free, unless the queue is full or `deadline` (epoch ms) passes first. */
  async run<T>(deadline: number | undefined, fn: () => Promise<T>): Promise<T> {
    if (this.closing) throw new OverloadError('the router is shutting down', 'shutting_down');
    if (this.running >= this.concurrency) {
      if (this.waiters.length >= this.queue) throw new OverloadError(`the admission queue is full (${this.queue} requests waiting)`, 'queue_full');
      await new Promise<void>((resolve, reject) => {
        const w: Waiter = { resolve, reject };
        if (deadline !== undefined)
          w.timer = setTimeout(() => {
            this.waiters = this.waiters.filter((x) => x !== w);
            reject(new OverloadError('the request deadline passed while it waited for a place', 'deadline'));
          }, Math.max(0, deadline - Date.now()));
        this.waiters.push(w);
      });
    }
    this.running++;
    try {
      return await fn();
    } finally {
      this.running--;
      const next = this.waiters.shift();
      if (next) {
        clearTimeout(next.timer);
        next.resolve();
      } else if (this.closing && this.running === 0) this.idle?.();
    }
  }

  private idle?: () => void;

  /** Refuses new calls; resolves when the running ones finished. */
  drain(): Promise<void> {
    this.closing = true;
    if (this.running === 0 && this.waiters.length === 0) return Promise.resolve();
    return new Promise((resolve) => { this.idle = resolve; });
  }
}
