// Refusals that mean "not now": a full admission queue, a deadline that passed, experts out of reach.
// The HTTP API answers them with 503 and Retry-After (DESIGN §7); nothing else should.
export type OverloadReason = 'queue_full' | 'deadline' | 'unavailable' | 'at_capacity' | 'shutting_down';

export class OverloadError extends Error {
  override name = 'OverloadError';
  constructor(message: string, readonly reason: OverloadReason, readonly retryAfterSeconds = 1) {
    super(message);
  }
}

/** What an expert holder could not compute, and why (its rows then follow the overflow policy). */
export interface Unserved { unserved: string }

export const isUnserved = (x: unknown): x is Unserved => typeof x === 'object' && x !== null && 'unserved' in x;

/**
 * When rows cannot reach their expert (out of credits, or no live shard holds it): `drop` them to the
 * residual path, `reroute` them to the token's next-best reachable expert, `wait` for credits until the
 * request's deadline (then drop), or `reject` the request with 503.
 */
export const OVERFLOW_POLICIES = ['drop', 'reroute', 'wait', 'reject'] as const;
export type OverflowPolicy = (typeof OVERFLOW_POLICIES)[number];
