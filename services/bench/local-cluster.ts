// The cluster the serving-side suites measure: `model` saved to a temporary folder and served by a local
// `switchyard up` cluster (coordinator, two shards, `routers` routers); everything is removed afterwards.
// withSavedModel + withClusterOn start several clusters on one saved checkpoint (e.g. one per
// --micro-batches value).
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { preset } from '../core/config.js';
import { saveModel } from '../core/checkpoint/model.js';
import { MixtralModel } from '../core/model/model.js';
import { Cluster } from '../cli/cluster.js';

/** Seconds the checkpoint took to save and the cluster to start (load it and become ready), when asked for. */
export interface ClusterTimings { saveSeconds?: number; upSeconds?: number }

/** What the bench may vary in a cluster besides its checkpoint (Cluster's options of the same names). */
export interface LocalClusterOptions {
  routers: number;
  /** Routers' ping-pong micro-batches (unset: the router's default). */
  microBatches?: number;
  /** More `serve router` / `serve expert` flags. */
  routerArgs?: string[];
  shardArgs?: string[];
}

/** `model` saved into a temporary folder for `fn` (the checkpoint's path; the folder is removed after). */
export async function withSavedModel<T>(suite: string, model: MixtralModel, fn: (checkpoint: string, dir: string) => Promise<T>, timings?: ClusterTimings): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), `switchyard-bench-${suite}-`));
  try {
    const t0 = performance.now();
    await saveModel(join(dir, 'model'), model);
    if (timings) timings.saveSeconds = (performance.now() - t0) / 1000;
    return await fn(join(dir, 'model'), dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A local cluster (2 shards) serving `checkpoint` for `fn`, stopped afterwards; its logs go to `logDir`. */
export async function withClusterOn<T>(checkpoint: string, logDir: string, options: LocalClusterOptions, fn: (cluster: Cluster) => Promise<T>, timings?: ClusterTimings): Promise<T> {
  const cluster = new Cluster({
    checkpoint, shards: 2, routers: options.routers, host: '127.0.0.1', port: 0, logDir, log: () => undefined,
    microBatches: options.microBatches, routerArgs: options.routerArgs, shardArgs: options.shardArgs,
  });
  try {
    const t0 = performance.now();
    await cluster.up();
    if (timings) timings.upSeconds = (performance.now() - t0) / 1000;
    return await fn(cluster);
  } finally {
    await cluster.stop();
  }
}

export async function withLocalCluster<T>(
  suite: string, model: MixtralModel, routers: number, fn: (cluster: Cluster) => Promise<T>, timings?: ClusterTimings, options: Omit<LocalClusterOptions, 'routers'> = {},
): Promise<T> {
  return withSavedModel(suite, model, (checkpoint, dir) => withClusterOn(checkpoint, join(dir, 'logs'), { ...options, routers }, fn, timings), timings);
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
