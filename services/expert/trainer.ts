// An expert shard's part of distributed training: it accumulates weight gradients from every router's
// backward rows; once the coordinator confirms all routers' backward arrived, it all-reduces the
// gradients of replicated experts with their other holders, reports its share of the gradient norm and
// applies AdamW to its experts (an expert that got no rows steps with a zero gradient, as in one process).
import { ConfigError, parseTrainSettings, type TrainSettings } from '../core/config.js';
import { loadOptimizerMoments, writeCheckpointPart } from '../core/checkpoint/cluster.js';
import { inspectModel, loadExpertSet, readTrainerState } from '../core/checkpoint/model.js';
import { expertToHf, type HostTensor } from '../core/model/hf.js';
import { assertTrainable, familyOf, type FamilyNames } from '../core/model/family.js';
import { adamWSettings, AdamW, clipFactor, gradSquareSum } from '../core/optim/adamw.js';
import { learningRate } from '../core/optim/schedule.js';
import { recordAllReduce, trainingMetricGroup, trainingMetrics } from '../core/metrics/training.js';
import { expertKeyText, type ExpertKey } from '../core/placement.js';
import { attemptPasses, StepAborted, type TrainLink } from '../core/wire/train-link.js';
import { fromWirePlacement } from '../core/wire/coordinator-link.js';
import type { ExpertShard } from './shard.js';
import { StepGate } from './shard.js';
import { testDelay } from '../core/test-delay.js';

/**
 * SWITCHYARD_TEST_CHECKPOINT_DELAY_MS holds a written part back before it is reported, widening the
 * window in which a crash hits a half-written checkpoint (the crash-safety test uses it).
 */
const slowCheckpointForTests = testDelay('SWITCHYARD_TEST_CHECKPOINT_DELAY_MS');

export interface ShardTrainingOptions {
  link: TrainLink;
  memberId: string;
  shard: ExpertShard;
  /** The experts this shard registered with; each attempt's JOIN may place others here. */
  keys: ExpertKey[];
  /** Told what the shard holds after every (re)load, e.g. to report it to the coordinator. */
  onHoldings?: (keys: ExpertKey[]) => void;
  log: (record: Record<string, unknown>) => void;
  chunkFloats?: number;
}

interface ReplicaInfo { key: ExpertKey; holders: string[] }


/** Runs the shard's side of every training attempt until the run's last step; the shard keeps serving after. */
export async function runShardTraining(o: ShardTrainingOptions): Promise<void> {
  trainingMetricGroup.register(); // only training shards export the training series
  const gate = new StepGate();
  o.shard.gate = gate;
  let generation = 0;
  let optimizer: AdamW | undefined;
  for (;;) {
    gate.begin(generation + 1); // rows of the next attempt wait for its weights; the ended attempt's are refused
    // The ended attempt's passes get no backward: free what their training forwards saved here now, not
    // at the reload, which waits until every member has rejoined (a restarted one may take minutes).
    o.shard.experts.dropPass(attemptPasses(generation));
    const join = await o.link.sync({ phase: 'TRAIN_PHASE_JOIN', generation: String(generation) });
    if (join.aborted) {
      o.log({ msg: 'cannot join yet', reason: join.abortReason });
      await new Promise((r) => setTimeout(r, 500));
      continue;
    }
    generation = Number(join.generation);
    gate.begin(generation);
    const resumeStep = Number(join.resumeStep);
    const t = parseTrainSettings(JSON.parse(join.trainSettingsJson), 'training settings from the coordinator');
    const dir = join.checkpointDir;
    // Reload from the committed checkpoint: a restarted shard and a surviving one continue alike.
    const state = await readTrainerState(dir);
    if (state.step !== resumeStep) throw new ConfigError(`checkpoint ${dir} is at step ${state.step}, the coordinator resumes at ${resumeStep}`);
    const layout = await inspectModel(dir);
    assertTrainable(layout.config);
    // The coordinator's placement for this attempt (it changes only between attempts, at step boundaries).
    const keys = join.placement
      ? fromWirePlacement(join.placement).entries.filter((e) => e.shardIds.includes(o.memberId)).map((e) => ({ layer: e.layer, expert: e.expert }))
      : o.keys;
    const experts = await loadExpertSet(layout, keys);
    optimizer?.dispose();
    const previous = o.shard.experts;
    o.shard.experts = experts;
    previous.dispose();
    optimizer = new AdamW(experts.params, adamWSettings(t));
    const own = new Set(experts.params.names().flatMap((n) => [`experts.${n}.exp_avg`, `experts.${n}.exp_avg_sq`]));
    const moments = await loadOptimizerMoments(dir, (name) => own.has(name));
    optimizer.importState(state.optimizer_steps.experts ?? 0, new Map([...moments].map(([n, v]) => [n.slice('experts.'.length), v])));
    o.onHoldings?.(keys);
    const held = new Set(keys.map(expertKeyText));
    const replicas: ReplicaInfo[] = join.replicas
      .filter((r) => held.has(expertKeyText(r)))
      .map((r) => ({ key: { layer: r.layer, expert: r.expert }, holders: [...r.shardIds] }));
    const replicaOf = new Map(replicas.map((r) => [expertKeyText(r.key), r]));
    // The first holder of a replicated expert accounts for it in the norm and writes it to checkpoints.
    const primary = keys.filter((k) => (replicaOf.get(expertKeyText(k))?.holders[0] ?? o.memberId) === o.memberId);
    gate.ready(resumeStep);
    o.log({ msg: 'training attempt', generation, resume_step: resumeStep, experts: keys.length, replicated: replicas.map((r) => expertKeyText(r.key)) });
    try {
      await runSteps(o, t, generation, resumeStep, optimizer, replicas, primary, familyOf(layout.config).names);
      o.log({ msg: 'training finished', step: t.steps });
      return;
    } catch (err) {
      if (!(err instanceof StepAborted)) throw err;
      trainingMetrics.aborts.inc();
      o.log({ msg: 'step aborted; rejoining to resume from the last checkpoint', generation, reason: err.message });
    }
  }
}

async function runSteps(
  o: ShardTrainingOptions, t: TrainSettings, generation: number, resumeStep: number, optimizer: AdamW, replicas: ReplicaInfo[], primary: ExpertKey[],
  familyNames: FamilyNames,
): Promise<void> {
  const experts = o.shard.experts;
  const gate = o.shard.gate!;
  const servedBefore = new Map(o.shard.rowsServed);
  const digests = () => replicas.map((r) => ({ layer: r.key.layer, expert: r.key.expert, digest: experts.digest(r.key.layer, r.key.expert) }));
  for (let step = resumeStep + 1; step <= t.steps; step++) {
    await o.link.barrier(generation, step, 'TRAIN_PHASE_BACKWARD_DONE');
    // Every router's backward rows are in: sum replicated experts' gradients across their holders.
    if (replicas.length) {
      const reduced = await o.link.allReduce(replicas.map((r) => ({
        name: `g${generation}/s${step}/expert/${expertKeyText(r.key)}`, contributors: r.holders.length,
        values: experts.params.flatGrads(experts.paramNames(r.key.layer, r.key.expert)),
      })), o.chunkFloats).catch((err: Error) => { throw new StepAborted(err.message); });
      recordAllReduce('experts', reduced.stats.seconds, reduced.stats.bytesSent);
      replicas.forEach((r, i) => experts.params.setFlatGrads(reduced.sums[i], experts.paramNames(r.key.layer, r.key.expert)));
    }
    const squares = gradSquareSum(experts.params, primary.flatMap((k) => experts.paramNames(k.layer, k.expert)));
    const commit = await o.link.barrier(generation, step, 'TRAIN_PHASE_COMMIT', { gradSquareSum: squares, digests: digests() });
    optimizer.apply(learningRate(t, step), clipFactor(commit.gradNorm, t.grad_clip));
    experts.params.clearGrads();
    gate.ready(step);
    // Rows (forward + backward) each replicated expert computed here this step: replicas share the work.
    const replicaRows = Object.fromEntries(replicas.map((r) => {
      const k = expertKeyText(r.key);
      const rows = (o.shard.rowsServed.get(k) ?? 0) - (servedBefore.get(k) ?? 0);
      servedBefore.set(k, o.shard.rowsServed.get(k) ?? 0);
      return [k, rows];
    }));
    o.log({ msg: 'step applied', step, generation, replicas: Object.fromEntries(digests().map((d) => [expertKeyText(d), d.digest])), replica_rows: replicaRows });
    if (commit.checkpoint) {
      const written = performance.now();
      const tensors = new Map<string, HostTensor>();
      const names = new Set<string>();
      for (const k of primary) {
        const w = experts.weights(k.layer, k.expert);
        const host = (x: typeof w.w1t): HostTensor => ({ shape: [...x.shape], values: x.dataSync() as Float32Array });
        expertToHf(familyNames, tensors, k.layer, k.expert, { w1t: host(w.w1t), w3t: host(w.w3t), w2t: host(w.w2t) });
        for (const n of experts.paramNames(k.layer, k.expert)) names.add(n);
      }
      const moments = new Map([...optimizer.exportState()].filter(([n]) => names.has(n.replace(/\.exp_avg(_sq)?$/, ''))).map(([n, v]) => [`experts.${n}`, v]));
      const part = await writeCheckpointPart(commit.stagingDir, o.memberId, tensors, moments);
      await slowCheckpointForTests();
      trainingMetrics.checkpointSeconds.observe((performance.now() - written) / 1000);
      await o.link.barrier(generation, step, 'TRAIN_PHASE_CHECKPOINT', { parts: [part] });
    }
  }
}
