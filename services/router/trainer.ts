// A training router replica (data parallel, DESIGN §2): it takes its slice of every global batch, runs
// forward and backward with the experts on the shards, all-reduces the dense gradients through the
// coordinator and applies the same AdamW step as every other replica. Any failure aborts the step for
// the whole run; the replica then rejoins and continues from the last committed checkpoint.
import { appendFile, mkdir, writeFile } from 'node:fs/promises';
import type { ModelConfig, TrainSettings } from '../core/config.js';
import { ConfigError } from '../core/config.js';
import { loadOptimizerMoments, writeCheckpointPart } from '../core/checkpoint/cluster.js';
import { loadDenseModel, readTrainerState } from '../core/checkpoint/model.js';
import { BatchSampler, loadCorpus, splitCorpus, type Batch } from '../core/data/corpus.js';
import { Rng } from '../core/data/random.js';
import type { MixtralModel } from '../core/model/model.js';
import { familyOf } from '../core/model/family.js';
import { adamWSettings, AdamW, clipFactor, gradSquareSum } from '../core/optim/adamw.js';
import { learningRate } from '../core/optim/schedule.js';
import { recordAllReduce, recordExpertLoad, trainingMetricGroup, trainingMetrics } from '../core/metrics/training.js';
import { expertKeyText, ownerAddresses, unplaced } from '../core/placement.js';
import { fromWirePlacement } from '../core/wire/coordinator-link.js';
import { GrpcExpertTransport } from '../core/wire/grpc-transport.js';
import { StepAborted, trainingPassId, type TrainLink } from '../core/wire/train-link.js';
import { checkTrainRun,
  metricsFileOf, metricsRecord, truncateMetrics, validationBatches, validationLoss, type TrainerState,
} from '../core/train/trainer.js';
import { testDelay } from '../core/test-delay.js';

/** SWITCHYARD_TEST_STEP_DELAY_MS stretches every step, so a test can act on a run in progress (add a shard). */
const slowStepForTests = testDelay('SWITCHYARD_TEST_STEP_DELAY_MS');

export interface RouterTrainingOptions {
  link: TrainLink;
  /** This replica's index among `routers`; replica 0 writes metrics.jsonl, trainer state and validation. */
  index: number;
  routers: number;
  model: ModelConfig;
  train: TrainSettings;
  dataPath?: string;
  outDir: string;
  log: (record: Record<string, unknown>) => void;
  /** Floats per all-reduce chunk. */
  chunkFloats?: number;
  /** Ping-pong micro-batches per pass (default 1); lanes hold whole routing groups. */
  microBatches?: number;
}

export interface RouterTrainingSummary { steps: number; finalLoss: number; validationLoss: number; aborts: number }

/** The sequences of the global batch that replica `index` of `routers` trains on. */
export function replicaSlice(batch: Batch, t: TrainSettings, index: number, routers: number): { inputs: Int32Array; targets: Int32Array; sequences: number } {
  const sequences = t.batch_sequences / routers;
  const from = index * sequences * t.seq_len;
  const to = from + sequences * t.seq_len;
  return { inputs: batch.inputs.subarray(from, to), targets: batch.targets.subarray(from, to), sequences };
}

/**
 * Checks that the global batch and its routing groups split evenly over the replicas, and that the gate's
 * losses are sums of per-replica terms.
 */
export function checkDataParallel(t: TrainSettings, routers: number, model: ModelConfig): void {
  // The whole-batch aux loss would need the per-expert totals of every replica before any backward.
  if (routers > 1 && model.switchyard_gate.aux_loss_scope === 'batch')
    throw new ConfigError(`model.switchyard_gate.aux_loss_scope 'batch' pools the whole batch, which ${routers} router replicas each hold only part of; use 'group' or train with one router`);
  if (t.batch_sequences % routers !== 0)
    throw new ConfigError(`batch_sequences ${t.batch_sequences} does not split over ${routers} routers; choose a multiple`);
  const sliceTokens = (t.batch_sequences / routers) * t.seq_len;
  if (t.routing_group_tokens > 0 && sliceTokens % t.routing_group_tokens !== 0)
    throw new ConfigError(`routing_group_tokens ${t.routing_group_tokens} does not divide a router's ${sliceTokens} tokens; routing groups must not straddle replicas`);
}

/** Per-step numbers every replica contributes to, summed by the all-reduce with the dense gradients. */
function statsVector(c: ModelConfig, r: { crossEntropy: number; auxLoss: number; zLoss: number; layerStats: Array<{ droppedChoices: number; countsBeforeDrop: Int32Array; countsAfterDrop: Int32Array }> }): Float32Array {
  // One entry per MoE layer (dense layers route nothing).
  const L = familyOf(c).moeLayers.length;
  const E = familyOf(c).experts;
  const v = new Float32Array(4 + 2 * L * E);
  v[0] = r.crossEntropy;
  v[1] = r.auxLoss;
  v[2] = r.zLoss;
  v[3] = r.layerStats.reduce((s, l) => s + l.droppedChoices, 0);
  r.layerStats.forEach((l, layer) => {
    v.set(l.countsBeforeDrop, 4 + layer * E);
    v.set(l.countsAfterDrop, 4 + L * E + layer * E);
  });
  return v;
}

export async function runRouterTraining(o: RouterTrainingOptions): Promise<RouterTrainingSummary> {
  trainingMetricGroup.register(); // a training replica exports the training series from its start
  const t = o.train;
  const c = o.model;
  checkDataParallel(t, o.routers, c);
  const corpus = await loadCorpus(o.dataPath);
  const { train: trainBytes, validation } = splitCorpus(corpus.bytes, t.validation_fraction);
  const evalBatches = o.index === 0 ? validationBatches(validation, t) : [];
  const metricsPath = metricsFileOf(o.outDir);
  if (o.index === 0) await mkdir(o.outDir, { recursive: true });
  // Each attempt's placement comes with its JOIN answer (it changes only at step boundaries).
  let owners = new Map<string, string[]>();
  const transport = new GrpcExpertTransport((layer, expert) => owners.get(expertKeyText({ layer, expert })) ?? [], c.hidden_size, { timeoutMs: 120_000 });
  checkTrainRun(c, t);
  const moeLayers = familyOf(c).moeLayers;
  const L = moeLayers.length;
  const E = familyOf(c).experts;
  const tokensPerStep = t.batch_sequences * t.seq_len;
  let generation = 0;
  let aborts = 0;
  let model: MixtralModel | undefined;
  let optimizer: AdamW | undefined;
  let finalLoss = NaN;
  let lastValidation = NaN;
  const release = () => {
    optimizer?.dispose();
    model?.dispose();
    optimizer = undefined;
    model = undefined;
  };
  try {
    for (;;) {
      const join = await o.link.sync({ phase: 'TRAIN_PHASE_JOIN', generation: String(generation), trainSettingsJson: JSON.stringify(t) });
      if (join.aborted) {
        o.log({ msg: 'cannot join yet', reason: join.abortReason });
        await new Promise((r) => setTimeout(r, 500));
        continue;
      }
      generation = Number(join.generation);
      const resumeStep = Number(join.resumeStep);
      const dir = join.checkpointDir;
      transport.forgetPasses();
      release();
      model = await loadDenseModel(dir, transport);
      model.microBatches = o.microBatches ?? 1;
      if (JSON.stringify(model.config) !== JSON.stringify(c))
        throw new ConfigError(`the checkpoint in ${dir} has a different model configuration than this run`);
      optimizer = new AdamW(model.dense, adamWSettings(t));
      const state = (await readTrainerState(dir)) as unknown as TrainerState & { optimizer_steps: Record<string, number> };
      if (state.step !== resumeStep) throw new Error(`checkpoint ${dir} is at step ${state.step}, the coordinator resumes at ${resumeStep}`);
      const moments = await loadOptimizerMoments(dir, (name) => name.startsWith('dense.'));
      optimizer.importState(state.optimizer_steps.dense ?? 0, new Map([...moments].map(([n, v]) => [n.slice('dense.'.length), v])));
      const sampler = BatchSampler.restore(trainBytes, state.sampler);
      let tokens = state.tokens;
      const elapsedBefore = state.elapsed_seconds;
      const started = performance.now();
      const elapsed = () => elapsedBefore + (performance.now() - started) / 1000;
      if (o.index === 0) {
        if (resumeStep === 0) await writeFile(metricsPath, '');
        else await truncateMetrics(metricsPath, resumeStep);
      }
      if (!join.placement) throw new Error('the coordinator sent no placement with the JOIN answer');
      const table = fromWirePlacement(join.placement);
      const missing = unplaced(table, moeLayers, E);
      if (missing.length) throw new Error(`the coordinator's placement leaves ${missing.length} expert(s) without a shard, e.g. (layer ${missing[0].layer}, expert ${missing[0].expert})`);
      owners = ownerAddresses(table);
      o.log({ msg: 'training attempt', generation, resume_step: resumeStep });
      let step = resumeStep;
      try {
        while (step < t.steps) {
          const stepStart = performance.now();
          step++;
          const batch = replicaSlice(sampler.next(), t, o.index, o.routers);
          const noise = new Rng((t.seed * 1_000_003 + o.index * 7_919 + step) >>> 0);
          transport.training = { generation, weightsStep: step - 1 };
          const result = await model.lossAndGradients(batch.inputs, batch.targets, batch.sequences, t.seq_len, {
            passId: trainingPassId(generation, o.index, step), train: true, groupTokens: t.routing_group_tokens, random: () => noise.next(),
            // this replica's tokens start at index·(its slice) of the global batch: the single-process uniforms
            rts: { seed: t.seed, step, firstToken: o.index * batch.sequences * t.seq_len },
          }, 1 / o.routers).catch((err: Error) => { throw new StepAborted(`step ${step}: ${err.message}`); });
          await o.link.barrier(generation, step, 'TRAIN_PHASE_BACKWARD_DONE');

          const names = model.dense.names();
          const local = model.dense.flatGrads(names);
          const stats = statsVector(c, result);
          const reduced = await o.link.allReduce([
            { name: `g${generation}/s${step}/dense`, contributors: o.routers, values: local },
            { name: `g${generation}/s${step}/stats`, contributors: o.routers, values: stats },
          ], o.chunkFloats).catch((err: Error) => { throw new StepAborted(err.message); });
          recordAllReduce('dense', reduced.stats.seconds, reduced.stats.bytesSent);
          model.dense.setFlatGrads(reduced.sums[0], names);
          const sum = reduced.sums[1];
          const denseSquares = gradSquareSum(model.dense);
          const weightsDigest = model.dense.digest();
          const commit = await o.link.barrier(generation, step, 'TRAIN_PHASE_COMMIT', { gradSquareSum: denseSquares, weightsDigest });
          const lr = learningRate(t, step);
          optimizer.apply(lr, clipFactor(commit.gradNorm, t.grad_clip));
          model.dense.clearGrads();
          const countsBefore = Array.from({ length: L }, (_, l) => Int32Array.from(sum.subarray(4 + l * E, 4 + (l + 1) * E)));
          const countsAfter = Array.from({ length: L }, (_, l) => Int32Array.from(sum.subarray(4 + L * E + l * E, 4 + L * E + (l + 1) * E)));
          model.updateBalance(countsBefore);
          o.log({ msg: 'step applied', step, generation, dense_digest: model.dense.digest() });
          tokens += tokensPerStep;
          const R = o.routers;
          const [ce, aux, z] = [sum[0] / R, sum[1] / R, sum[2] / R];
          const loss = ce + c.switchyard_gate.aux_loss_coef * aux + c.switchyard_gate.z_loss_coef * z;
          if (!Number.isFinite(loss)) throw new Error(`loss became ${loss} at step ${step}; lower the learning rate`);
          finalLoss = loss;
          if (o.index === 0) {
            const stepSeconds = (performance.now() - stepStart) / 1000;
            let validationLossValue: number | undefined;
            if (step % t.eval_interval === 0 || step === t.steps) {
              transport.training = { generation, weightsStep: step };
              validationLossValue = await validationLoss(model, evalBatches, t).catch((err: Error) => { throw new StepAborted(`validation after step ${step}: ${err.message}`); });
              lastValidation = validationLossValue;
              trainingMetrics.validationLoss.set(validationLossValue);
            }
            const record = metricsRecord(c, t, {
              step, loss, crossEntropy: ce, auxLoss: aux, zLoss: z, droppedChoices: sum[3], lr, gradNorm: commit.gradNorm,
              tokens, stepSeconds, elapsedSeconds: elapsed(), validationLoss: validationLossValue,
            }, { allreduce_s: reduced.stats.seconds, allreduce_bytes: reduced.stats.bytesSent });
            await appendFile(metricsPath, JSON.stringify(record) + '\n');
            process.stdout.write(`step ${JSON.stringify(record)}\n`);
            trainingMetrics.step.set(step);
            trainingMetrics.loss.set(loss);
            trainingMetrics.tokensPerSecond.set(tokensPerStep / stepSeconds);
            trainingMetrics.tokens.inc(tokensPerStep);
            trainingMetrics.stepSeconds.observe(stepSeconds);
            recordExpertLoad(countsBefore, countsAfter);
          }
          await slowStepForTests();
          if (commit.checkpoint) {
            const parts = [];
            let trainerStateJson = '';
            if (o.index === 0) {
              const written = performance.now();
              const moments = new Map([...optimizer.exportState()].map(([n, v]) => [`dense.${n}`, v]));
              parts.push(await writeCheckpointPart(commit.stagingDir, `router-${o.index}`, model.toHf(), moments, c));
              trainingMetrics.checkpointSeconds.observe((performance.now() - written) / 1000);
              const trainerState: TrainerState & { optimizer_steps: Record<string, number>; routers: number } = {
                step, tokens, elapsed_seconds: elapsed(), sampler: sampler.state(), noise_rng: [], train_settings: t,
                data_source: corpus.source, optimizer_steps: { dense: optimizer.step, experts: optimizer.step }, routers: o.routers,
              };
              trainerStateJson = JSON.stringify(trainerState, null, 2);
            }
            await o.link.barrier(generation, step, 'TRAIN_PHASE_CHECKPOINT', { parts, trainerStateJson });
          }
        }
        return { steps: step, finalLoss, validationLoss: lastValidation, aborts };
      } catch (err) {
        if (!(err instanceof StepAborted)) throw err;
        aborts++;
        trainingMetrics.aborts.inc();
        o.log({ msg: 'step aborted; rejoining to resume from the last checkpoint', generation, step, reason: err.message });
        await o.link.sync({ phase: 'TRAIN_PHASE_ABORT', generation: String(generation), step: String(step), error: err.message });
      }
    }
  } finally {
    release();
    transport.close();
  }
}
