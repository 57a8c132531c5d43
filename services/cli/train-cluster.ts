// `switchyard train --routers R --shards S`: a distributed training run on this machine — a coordinator,
// S expert shards and R router replicas as supervised child processes. The run starts from a committed
// checkpoint (step 0 is written here, seeded exactly like a single-process run) and writes the same
// metrics.jsonl; a child that crashes is restarted and the run resumes from the last checkpoint.
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ConfigError, parseModelConfig, type ModelConfig, type TrainSettings } from '../core/config.js';
import { saveModel } from '../core/checkpoint/model.js';
import { BatchSampler, loadCorpus, splitCorpus } from '../core/data/corpus.js';
import { Rng } from '../core/data/random.js';
import { MixtralModel } from '../core/model/model.js';
import { familyOf } from '../core/model/family.js';
import { adamWSettings, AdamW } from '../core/optim/adamw.js';
import { assignmentSpec, spreadExperts, withReplicas, type ExpertKey } from '../core/placement.js';
import { checkTrainRun, checkpointDirOf, metricsFileOf, type MetricsRecord, type StepReport, type TrainSummary, type TrainerState } from '../core/train/trainer.js';
import { checkDataParallel } from '../router/trainer.js';
import { Supervisor } from './supervisor.js';

export interface DistributedTrainOptions {
  model: ModelConfig;
  train: TrainSettings;
  dataPath?: string;
  outDir: string;
  resume?: boolean;
  routers: number;
  shards: number;
  /** Ping-pong micro-batches per router pass (default 1). */
  microBatches?: number;
  /** Experts placed on two shards (hot-expert replication). */
  replicate: ExpertKey[];
  host: string;
  onStep?: (report: StepReport) => void;
  log: (line: string) => void;
}

/** The run's settings as every router reads them (`serve trainer --run DIR`). */
export const RUN_FILE = 'train.json';

export interface RunFile { model: ModelConfig; train: TrainSettings; data?: string }

/** Writes the step-0 checkpoint: the same seeded weights and sampler a single-process run starts from. */
async function writeInitialCheckpoint(dir: string, o: DistributedTrainOptions): Promise<void> {
  const t = o.train;
  const corpus = await loadCorpus(o.dataPath);
  const { train: trainBytes } = splitCorpus(corpus.bytes, t.validation_fraction);
  const model = MixtralModel.initialize(o.model, t.seed);
  const settings = adamWSettings(t);
  const optimizers = { dense: new AdamW(model.dense, settings), experts: new AdamW(model.localExperts!.params, settings) };
  try {
    const state: TrainerState = {
      step: 0, tokens: 0, elapsed_seconds: 0, sampler: new BatchSampler(trainBytes, t.seq_len, t.batch_sequences, t.seed).state(),
      noise_rng: new Rng(t.seed + 1).state(), train_settings: t, data_source: corpus.source,
    };
    await saveModel(dir, model, { state: state as unknown as Record<string, unknown>, optimizers });
  } finally {
    optimizers.dense.dispose();
    optimizers.experts.dispose();
    model.dispose();
  }
}

export async function trainDistributed(o: DistributedTrainOptions): Promise<TrainSummary> {
  const t = o.train;
  checkTrainRun(o.model, t);
  const family = familyOf(o.model);
  const E = family.experts;
  checkDataParallel(t, o.routers, o.model);
  const routed = family.moeLayers.length * E;
  if (o.shards > routed) throw new ConfigError(`--shards ${o.shards}: the model has only ${routed} experts to place`);
  const ckpt = checkpointDirOf(o.outDir);
  if (o.resume) {
    if (!existsSync(join(ckpt, 'config.json'))) throw new ConfigError(`--resume: no checkpoint in ${ckpt}`);
    // Parsed, so keys added since the checkpoint was written take their defaults, as loading it does.
    const saved = parseModelConfig(JSON.parse(await readFile(join(ckpt, 'config.json'), 'utf8')) as unknown);
    if (JSON.stringify(saved) !== JSON.stringify(o.model))
      throw new ConfigError(`--resume: the checkpoint in ${ckpt} has a different model configuration than requested (same --config as the run it continues?)`);
  } else {
    await writeInitialCheckpoint(ckpt, o);
  }
  const run: RunFile = { model: o.model, train: t, ...(o.dataPath ? { data: o.dataPath } : {}) };
  await writeFile(join(o.outDir, RUN_FILE), JSON.stringify(run, null, 2) + '\n');
  const placement = withReplicas(spreadExperts(family.moeLayers, E, o.shards), o.replicate);

  const supervisor = new Supervisor(join(o.outDir, 'logs'), o.log);
  const started = performance.now();
  let doneRouters = 0;
  const finished = new Promise<void>((resolve, reject) => {
    supervisor.onDone = (name) => { if (name.startsWith('router-') && ++doneRouters === o.routers) resolve(); };
    supervisor.onFailure = (_name, why) => reject(new Error(`training failed: ${why}`));
  });
  finished.catch(() => undefined);
  const stopOnSignal = () => { void supervisor.stop().then(() => process.exit(130)); };
  process.once('SIGINT', stopOnSignal);
  process.once('SIGTERM', stopOnSignal);
  try {
    const coordinatorArgs = (port: string) => ['serve', 'coordinator', '--host', o.host, '--port', port, '--lease-ttl-ms', '10000',
      '--train-routers', String(o.routers), '--train-shards', String(o.shards), '--train-checkpoint', ckpt];
    const [, coordinator] = await supervisor.start({ name: 'coordinator', restart: true, ready: /listening on (\S+)/, args: coordinatorArgs('0') });
    // A restarted coordinator comes back on the same port, where every member keeps looking for it.
    supervisor.setArgs('coordinator', coordinatorArgs(coordinator.slice(coordinator.lastIndexOf(':') + 1)));
    await Promise.all(placement.map((keys, i) => supervisor.start({
      name: `shard-${i}`, restart: true, ready: /listening on/,
      args: ['serve', 'expert', '--train', '--checkpoint', ckpt, '--experts', assignmentSpec(keys), '--host', o.host, '--port', '0',
        '--coordinator', coordinator, '--shard-id', `shard-${i}`],
    })));
    await Promise.all(Array.from({ length: o.routers }, (_, i) => supervisor.start({
      name: `router-${i}`, restart: true, ready: /training router/,
      args: ['serve', 'trainer', '--run', o.outDir, '--index', String(i), '--routers', String(o.routers), '--coordinator', coordinator,
        '--micro-batches', String(o.microBatches ?? 1)],
      onLine: (line) => {
        if (!o.onStep || !line.startsWith('step {')) return;
        const r = JSON.parse(line.slice(5)) as Record<string, number>;
        o.onStep({
          step: r.step, steps: t.steps, loss: r.loss, crossEntropy: r.ce_loss, auxLoss: r.aux_loss, lr: r.lr,
          tokensPerSecond: r.tokens_per_s, validationLoss: r.val_loss, elapsedSeconds: r.elapsed_s,
        });
      },
    })));
    o.log(`switchyard: distributed training — coordinator ${coordinator}, ${o.shards} shard(s), ${o.routers} router(s); logs in ${join(o.outDir, 'logs')}`);
    await finished;
  } finally {
    process.off('SIGINT', stopOnSignal);
    process.off('SIGTERM', stopOnSignal);
    await supervisor.stop();
  }
  const records = (await readFile(metricsFileOf(o.outDir), 'utf8')).split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l) as MetricsRecord & { tokens: number; elapsed_s: number });
  const last = records.at(-1);
  const wall = last?.elapsed_s ?? (performance.now() - started) / 1000;
  const tokens = last?.tokens ?? 0;
  return {
    steps: last?.step ?? 0, tokens, wallSeconds: wall, tokensPerSecond: tokens / Math.max(wall, 1e-9), finalLoss: last?.loss ?? NaN,
    validationLoss: records.findLast((r) => r.val_loss !== undefined)?.val_loss ?? NaN, checkpointDir: ckpt, dataSource: o.dataPath ?? 'Moby Dick',
  };
}
