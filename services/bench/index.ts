// `switchyard bench [suite...] [--quick]`: every suite prints a table and writes bench-results/<suite>.json.
import { computeSuite } from './compute.js';
import { moeLayerSuite, wireSuite } from './moe.js';
import { servingSuite } from './serving.js';
import { allreduceSuite } from './allreduce.js';
import { trainingSuite } from './training.js';
import { loadSuite } from './load.js';
import { peerSuite } from './peer.js';
import { elasticSuite } from './elastic.js';
import { speedupGuard } from './report.js';

const SUITES: Record<string, (quick: boolean) => Promise<void>> = {
  compute: computeSuite,
  wire: wireSuite,
  'moe-layer': moeLayerSuite,
  serving: servingSuite,
  allreduce: allreduceSuite,
  training: trainingSuite,
  load: loadSuite,
  peer: peerSuite,
  elastic: elasticSuite,
};

export async function runBench(names: string[], opts: { quick: boolean }): Promise<void> {
  const chosen = names.length ? names : Object.keys(SUITES);
  const unknown = chosen.filter((n) => !SUITES[n]);
  if (unknown.length) {
    const err = new RangeError(`unknown bench suite(s): ${unknown.join(', ')} (known: ${Object.keys(SUITES).join(', ')})`);
    throw err;
  }
  speedupGuard.strict = !opts.quick;
  for (const name of chosen) await SUITES[name](opts.quick);
}

/** Every suite, in the order `bench` runs them. */
export const BENCH_SUITES = Object.keys(SUITES);
