// The cluster the serving-side suites measure: `model` saved to a temporary folder and served by a local
// `switchyard up` cluster (coordinator, two shards, `routers` routers); everything is removed afterwards.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { preset } from '../core/config.js';
import { saveModel } from '../core/checkpoint/model.js';
import { MixtralModel } from '../core/model/model.js';
import { Cluster } from '../cli/cluster.js';

/** Seconds the checkpoint took to save and the cluster to start (load it and become ready), when asked for. */
export interface ClusterTimings { saveSeconds?: number; upSeconds?: number }

export async function withLocalCluster<T>(suite: string, model: MixtralModel, routers: number, fn: (cluster: Cluster) => Promise<T>, timings?: ClusterTimings): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), `switchyard-bench-${suite}-`));
  const cluster = new Cluster({ checkpoint: join(dir, 'model'), shards: 2, routers, host: '127.0.0.1', port: 0, logDir: join(dir, 'logs'), log: () => undefined });
  try {
    let t0 = performance.now();
    await saveModel(join(dir, 'model'), model);
    if (timings) timings.saveSeconds = (performance.now() - t0) / 1000;
    t0 = performance.now();
    await cluster.up();
    if (timings) timings.upSeconds = (performance.now() - t0) / 1000;
    return await fn(cluster);
  } finally {
    await cluster.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

/** The same with the `small` model's random weights (seed 4) and one router. */
export async function withSmallCluster<T>(suite: string, fn: (cluster: Cluster) => Promise<T>): Promise<T> {
  const model = MixtralModel.initialize(preset('small').model, 4);
  try {
    return await withLocalCluster(suite, model, 1, fn);
  } finally {
    model.dispose();
  }
}
