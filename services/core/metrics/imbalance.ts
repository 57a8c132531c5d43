// Load imbalance over a set of loads (experts of a layer, shards of a placement): the one definition the
// router's view, the coordinator's planner and the elastic benchmark share.

/** max / mean (1 = balanced; 0 when nothing is loaded). */
export function maxOverMean(loads: Iterable<number>): number {
  const values = [...loads];
  const mean = values.reduce((a, b) => a + b, 0) / Math.max(1, values.length);
  return mean > 0 ? Math.max(...values) / mean : 0;
}

/** Coefficient of variation: population standard deviation / mean (0 = balanced or nothing loaded). */
export function coefficientOfVariation(loads: Iterable<number>): number {
  const values = [...loads];
  const mean = values.reduce((a, b) => a + b, 0) / Math.max(1, values.length);
  if (!(mean > 0)) return 0;
  const variance = values.reduce((s, x) => s + (x - mean) ** 2, 0) / values.length;
  return Math.sqrt(variance) / mean;
}
