// Single-process training: seeded batches from a byte corpus, forward/backward through the model with
// in-process experts, global-norm clipping, AdamW with warmup + cosine, periodic validation,
// metrics.jsonl and atomic checkpoints that `resume` continues bit for bit.
import { familyOf } from '../model/family.js';
import { appendFile, mkdir, readFile, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { ConfigError, type ModelConfig, type TrainSettings } from '../config.js';
import { BatchSampler, loadCorpus, splitCorpus, type Batch, type BatchSamplerState } from '../data/corpus.js';
import { Rng } from '../data/random.js';
import { MixtralModel } from '../model/model.js';
import { assertTrainable } from '../model/family.js';
import { adamWSettings, AdamW, clipFactor, gradSquareSum } from '../optim/adamw.js';
import { learningRate } from '../optim/schedule.js';
import { loadModel, loadTrainingSnapshot, saveModel } from '../checkpoint/model.js';

export interface TrainRunOptions {
  model: ModelConfig;
  train: TrainSettings;
  /** UTF-8 file or folder; default: Moby Dick. */
  dataPath?: string;
  outDir: string;
  resume?: boolean;
  /** Called after every step (progress bars, logs). */
  onStep?: (report: StepReport) => void;
  /** Stop after this step as if interrupted (tests of resume). */
  stopAfterStep?: number;
}

export interface StepReport {
  step: number;
  steps: number;
  loss: number;
  crossEntropy: number;
  auxLoss: number;
  lr: number;
  tokensPerSecond: number;
  validationLoss?: number;
  elapsedSeconds: number;
}

export interface TrainSummary {
  steps: number;
  tokens: number;
  wallSeconds: number;
  tokensPerSecond: number;
  finalLoss: number;
  validationLoss: number;
  checkpointDir: string;
  dataSource: string;
}

export interface StepNumbers {
  step: number;
  loss: number;
  crossEntropy: number;
  auxLoss: number;
  zLoss: number;
  /** Routing choices dropped over the global batch and all layers. */
  droppedChoices: number;
  lr: number;
  gradNorm: number;
  tokens: number;
  stepSeconds: number;
  elapsedSeconds: number;
  validationLoss?: number;
}

/** One metrics.jsonl line: the same fields for single-process and distributed runs. */
export function metricsRecord(model: ModelConfig, t: TrainSettings, n: StepNumbers, extra: Record<string, number> = {}): Record<string, number> & MetricsRecord {
  const tokensPerStep = t.batch_sequences * t.seq_len;
  return {
    step: n.step, loss: n.loss, ce_loss: n.crossEntropy, aux_loss: n.auxLoss, z_loss: n.zLoss,
    lr: n.lr, grad_norm: n.gradNorm, tokens: n.tokens, tokens_per_s: tokensPerStep / n.stepSeconds,
    dropped_fraction: n.droppedChoices / (tokensPerStep * model.num_experts_per_tok * familyOf(model).moeLayers.length),
    elapsed_s: n.elapsedSeconds,
    ...extra,
    ...(n.validationLoss !== undefined ? { val_loss: n.validationLoss } : {}),
  };
}

export const checkpointDirOf = (outDir: string): string => join(outDir, 'checkpoint');
export const metricsFileOf = (outDir: string): string => join(outDir, 'metrics.jsonl');

export interface TrainerState {
  step: number;
  tokens: number;
  elapsed_seconds: number;
  sampler: BatchSamplerState;
  noise_rng: number[];
  train_settings: TrainSettings;
  data_source: string;
}

/** Fixed validation batches, the same for every run on the same corpus and settings. */
export function validationBatches(validation: Uint8Array, t: TrainSettings): Batch[] {
  const sampler = new BatchSampler(validation, t.seq_len, t.batch_sequences, t.seed ^ 0x5eed);
  return Array.from({ length: t.eval_batches }, () => sampler.next());
}

export async function validationLoss(model: MixtralModel, batches: Batch[], t: TrainSettings): Promise<number> {
  let total = 0;
  for (const b of batches) total += await model.evalLoss(b.inputs, b.targets, t.batch_sequences, t.seq_len);
  return total / batches.length;
}

export interface MetricsRecord { step: number; loss: number; val_loss?: number }

/** Keeps metrics lines up to `step` so a resumed run appends where the checkpoint left off; returns them. */
export async function truncateMetrics(path: string, step: number): Promise<MetricsRecord[]> {
  if (!existsSync(path)) return [];
  const kept = (await readFile(path, 'utf8')).split('\n').filter((line) => line.trim()).map((line) => JSON.parse(line) as MetricsRecord).filter((r) => r.step <= step);
  await writeFile(path, kept.map((r) => JSON.stringify(r) + '\n').join(''));
  return kept;
}

/**
 * What every trainer (single process, distributed routers) refuses before it starts: a family or option
 * the backward does not cover, sequences longer than the model's context.
 */
export function checkTrainRun(model: ModelConfig, t: TrainSettings): void {
  assertTrainable(model);
  if (t.seq_len > model.max_position_embeddings)
    throw new ConfigError(`train.seq_len ${t.seq_len} exceeds the model's max_position_embeddings ${model.max_position_embeddings}`);
}

export async function train(opts: TrainRunOptions): Promise<TrainSummary> {
  const t = opts.train;
  checkTrainRun(opts.model, t);
  const corpus = await loadCorpus(opts.dataPath);
  const { train: trainBytes, validation } = splitCorpus(corpus.bytes, t.validation_fraction);
  const evalBatches = validationBatches(validation, t);
  const ckptDir = checkpointDirOf(opts.outDir);
  const metricsPath = metricsFileOf(opts.outDir);
  await mkdir(opts.outDir, { recursive: true });

  let model: MixtralModel;
  let sampler: BatchSampler;
  let noise: Rng;
  let step = 0;
  let tokens = 0;
  let elapsedBefore = 0;
  let previous: MetricsRecord[] = [];
  const resuming = opts.resume === true && existsSync(join(ckptDir, 'config.json'));
  if (opts.resume && !resuming) throw new ConfigError(`--resume: no checkpoint in ${ckptDir}`);
  if (resuming) {
    model = await loadModel(ckptDir);
    if (JSON.stringify(model.config) !== JSON.stringify(opts.model))
      throw new ConfigError(`--resume: the checkpoint in ${ckptDir} has a different model configuration than requested (same --config as the run it continues?)`);
  } else {
    model = MixtralModel.initialize(opts.model, t.seed);
  }
  const adamSettings = adamWSettings(t);
  const optimizers = { dense: new AdamW(model.dense, adamSettings), experts: new AdamW(model.localExperts!.params, adamSettings) };
  if (resuming) {
    const state = (await loadTrainingSnapshot(ckptDir, optimizers)) as unknown as TrainerState;
    step = state.step;
    tokens = state.tokens;
    elapsedBefore = state.elapsed_seconds;
    sampler = BatchSampler.restore(trainBytes, state.sampler);
    noise = Rng.fromState(state.noise_rng);
    previous = await truncateMetrics(metricsPath, step);
  } else {
    sampler = new BatchSampler(trainBytes, t.seq_len, t.batch_sequences, t.seed);
    noise = new Rng(t.seed + 1);
    await writeFile(metricsPath, '');
  }

  const snapshot = (elapsed: number) => ({
    state: {
      step, tokens, elapsed_seconds: elapsed, sampler: sampler.state(), noise_rng: noise.state(),
      train_settings: t, data_source: corpus.source,
    } satisfies TrainerState as unknown as Record<string, unknown>,
    optimizers,
  });

  const started = performance.now();
  const elapsed = () => elapsedBefore + (performance.now() - started) / 1000;
  // A resumed run that has nothing left to do still reports where it stands.
  let lastLoss = previous.at(-1)?.loss ?? NaN;
  let lastValidation = previous.findLast((r) => r.val_loss !== undefined)?.val_loss ?? NaN;
  const tokensPerStep = t.batch_sequences * t.seq_len;
  const random = () => noise.next();
  try {
    while (step < t.steps) {
      const stepStart = performance.now();
      step++;
      const batch = sampler.next();
      const result = await model.lossAndGradients(batch.inputs, batch.targets, t.batch_sequences, t.seq_len, {
        passId: `step${step}`, train: true, groupTokens: t.routing_group_tokens, random,
        // counter-based, keyed by (seed, step): resume needs no extra state
        rts: { seed: t.seed, step, firstToken: 0 },
      });
      if (!Number.isFinite(result.loss)) throw new Error(`loss became ${result.loss} at step ${step}; lower the learning rate`);
      const gradNorm = Math.sqrt(gradSquareSum(model.dense) + gradSquareSum(model.localExperts!.params));
      const scale = clipFactor(gradNorm, t.grad_clip);
      const lr = learningRate(t, step);
      optimizers.dense.apply(lr, scale);
      optimizers.experts.apply(lr, scale);
      model.dense.clearGrads();
      model.localExperts!.params.clearGrads();
      model.updateBalance(result.layerStats.map((l) => l.countsBeforeDrop));
      tokens += tokensPerStep;
      lastLoss = result.loss;
      const stepSeconds = (performance.now() - stepStart) / 1000;
      let validationLossValue: number | undefined;
      if (step % t.eval_interval === 0 || step === t.steps) {
        validationLossValue = await validationLoss(model, evalBatches, t);
        lastValidation = validationLossValue;
      }
      const record = metricsRecord(model.config, t, {
        step, loss: result.loss, crossEntropy: result.crossEntropy, auxLoss: result.auxLoss, zLoss: result.zLoss,
        droppedChoices: result.layerStats.reduce((s, l) => s + l.droppedChoices, 0),
        lr, gradNorm, tokens, stepSeconds, elapsedSeconds: elapsed(), validationLoss: validationLossValue,
      });
      await appendFile(metricsPath, JSON.stringify(record) + '\n');
      opts.onStep?.({
        step, steps: t.steps, loss: result.loss, crossEntropy: result.crossEntropy, auxLoss: result.auxLoss, lr,
        tokensPerSecond: record.tokens_per_s, validationLoss: validationLossValue, elapsedSeconds: record.elapsed_s,
      });
      if (step % t.checkpoint_interval === 0 || step === t.steps) await saveModel(ckptDir, model, snapshot(elapsed()));
      if (opts.stopAfterStep !== undefined && step >= opts.stopAfterStep) break;
    }
    const wall = elapsed();
    return {
      steps: step, tokens, wallSeconds: wall, tokensPerSecond: tokens / Math.max(wall, 1e-9),
      finalLoss: lastLoss, validationLoss: lastValidation, checkpointDir: ckptDir, dataSource: corpus.source,
    };
  } finally {
    optimizers.dense.dispose();
    optimizers.experts.dispose();
    model.dispose();
  }
}
