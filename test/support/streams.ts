// Watching long-lived streams in tests: writes they refused (backpressure) and listener-leak warnings.

/** Counts the writes `stream` refuses from now on (write() returning false: the caller must wait for drain). */
export function countRefusedWrites(stream: { write: (...args: never[]) => boolean }): { readonly refused: number } {
  const counter = { refused: 0 };
  const write = stream.write.bind(stream) as (...args: unknown[]) => boolean;
  (stream as unknown as { write: (...args: unknown[]) => boolean }).write = (...args) => {
    const ok = write(...args);
    if (!ok) counter.refused++;
    return ok;
  };
  return counter;
}

/** Collects MaxListenersExceededWarning messages of this process until `stop()`. */
export function watchListenerWarnings(): { messages(): Promise<string[]>; stop(): void } {
  const warnings: Error[] = [];
  const onWarning = (w: Error) => warnings.push(w);
  process.on('warning', onWarning);
  return {
    messages: async () => {
      await new Promise((resolve) => setImmediate(resolve)); // warnings are emitted on the next tick
      return warnings.filter((w) => w.name === 'MaxListenersExceededWarning').map((w) => w.message);
    },
    stop: () => process.off('warning', onWarning),
  };
}
