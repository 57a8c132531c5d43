// Waiting for a stream that refused a write, without leaving listeners behind: a `once` listener per
// event outlives the wait whenever another event ends it, and on a stream that lives for many writes
// those pile up (MaxListenersExceededWarning).
import type { EventEmitter } from 'node:events';

/** Resolves on the stream's next 'drain', 'close' or 'error', whichever comes first, and then removes all three listeners. */
export function writableAgain(stream: EventEmitter): Promise<void> {
  return new Promise<void>((resolve) => {
    const done = () => {
      for (const event of ['drain', 'close', 'error']) stream.off(event, done);
      resolve();
    };
    for (const event of ['drain', 'close', 'error']) stream.on(event, done);
  });
}
