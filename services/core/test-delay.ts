// Pauses that tests ask a service process for through an environment variable (milliseconds), to widen a
// window they want to act in. Read once at module load: a service's environment is fixed at spawn.

/** A pause of `$envName` ms, or a no-op when it is unset or not positive. */
export function testDelay(envName: string): () => Promise<void> {
  const ms = Number(process.env[envName] ?? 0);
  return ms > 0 ? () => new Promise((resolve) => setTimeout(resolve, ms)) : async () => {};
}
