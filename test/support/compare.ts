// How far one vector of numbers is from a reference, as the equality tests state their tolerances.
import assert from 'node:assert/strict';

/** Max |a−b| / max |b| (the same length asserted). */
export function relative(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length, 'the same number of values');
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < b.length; i++) {
    diff = Math.max(diff, Math.abs(a[i] - b[i]));
    scale = Math.max(scale, Math.abs(b[i]));
  }
  return diff / Math.max(scale, 1e-30);
}
