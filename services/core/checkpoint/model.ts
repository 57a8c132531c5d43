// A model checkpoint in Hugging Face layout, plus (for training) the optimizer moments and the trainer's
// state in the same atomically written folder, so a resumed run continues bit for bit.
import { inspectCheckpoint, loadCheckpoint, readTensorsFrom, saveCheckpoint, serializeSafetensors, type CheckpointLayout, type StoredTensor, type WriteDtype } from './index.js';
import { loadOptimizerMoments } from './cluster.js';
import { PUBLISHED_LAYOUT } from '../model/hf.js';
import { familyOf } from '../model/family.js';
import { MixtralModel } from '../model/model.js';
import { ExpertSet, type ExpertTransport } from '../model/experts.js';
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import type { AdamW } from '../optim/adamw.js';

export const TRAINER_STATE_FILE = 'trainer_state.json';
export const OPTIMIZER_FILE = 'optimizer.safetensors';

export interface TrainingSnapshot {
  state: Record<string, unknown>;
  optimizers: Record<string, AdamW>;
}

/** How the weights are stored: training checkpoints keep the F32 default so a resume is bit for bit. */
export interface ModelSaveOptions { dtype?: WriteDtype; maxShardBytes?: number }

export async function saveModel(dir: string, model: MixtralModel, training?: TrainingSnapshot, options: ModelSaveOptions = {}): Promise<void> {
  const extraFiles: Record<string, string | Uint8Array> = {};
  if (training) {
    const moments = new Map();
    const steps: Record<string, number> = {};
    for (const [group, opt] of Object.entries(training.optimizers)) {
      steps[group] = opt.step;
      for (const [name, t] of opt.exportState()) moments.set(`${group}.${name}`, t);
    }
    extraFiles[OPTIMIZER_FILE] = serializeSafetensors(moments);
    extraFiles[TRAINER_STATE_FILE] = JSON.stringify({ ...training.state, optimizer_steps: steps }, null, 2);
  }
  await saveCheckpoint(dir, { config: model.config, tensors: model.toHf(), extraFiles, ...options });
}

/**
 * Checks a model folder from config.json and the safetensors headers (no tensor data): every service
 * calls this before it serves or registers, so none runs on a partly broken checkpoint.
 */
export async function inspectModel(dir: string): Promise<CheckpointLayout> {
  return inspectCheckpoint(dir, PUBLISHED_LAYOUT);
}

/** Loads a checkpoint into an in-process model; tensors are checked against the config first. */
export async function loadModel(dir: string): Promise<MixtralModel> {
  const { config, tensors } = await loadCheckpoint(dir, PUBLISHED_LAYOUT);
  return MixtralModel.fromHf(config, tensors);
}

/** A checked layout: the caller's inspection of the folder, or a new one when given a path. */
async function layoutOf(source: string | CheckpointLayout): Promise<CheckpointLayout> {
  return typeof source === 'string' ? inspectModel(source) : source;
}

/** Reads the named tensors' data, by the layout's file for each (each file's header is parsed once more to read). */
function readTensors(layout: CheckpointLayout, names: string[]): Promise<Map<string, StoredTensor>> {
  return readTensorsFrom(layout.dir, names, (n) => layout.tensors.get(n)!.file, PUBLISHED_LAYOUT.byteTensors);
}

/**
 * The experts one shard holds, reading only their byte ranges (a shard's memory is proportional to
 * its experts). `source`: the folder, or its inspectModel layout when the caller already has one (the
 * headers are then not read again).
 */
export async function loadExpertSet(source: string | CheckpointLayout, keys: Array<{ layer: number; expert: number }>): Promise<ExpertSet> {
  const layout = await layoutOf(source);
  const family = familyOf(layout.config);
  for (const { layer, expert } of keys)
    if (!family.isMoe(layer) || expert < 0 || expert >= family.experts)
      throw new RangeError(`expert (layer ${layer}, expert ${expert}) does not exist in ${layout.dir} (MoE layers ${family.moeLayers.join(', ')} × ${family.experts} experts)`);
  const experts = new ExpertSet(layout.config.hidden_size, family.expertIntermediate, family.expertActivation);
  // Layer by layer: fused experts (GPT-OSS) share their layer's tensors, read once and dropped before
  // the next layer's, so a shard never holds more than one layer's fused tensors besides its experts.
  for (const layer of [...new Set(keys.map((k) => k.layer))]) {
    const here = keys.filter((k) => k.layer === layer);
    const tensors = await readTensors(layout, [...new Set(here.flatMap(({ expert }) => family.names.expertTensors(layer, expert)))]);
    for (const { expert } of here) experts.addFromHf(tensors, layer, expert, family);
  }
  return experts;
}

/** The router's part of a checkpoint (everything but the experts), reaching experts through `transport`. */
export async function loadDenseModel(source: string | CheckpointLayout, transport: ExpertTransport): Promise<MixtralModel> {
  const layout = await layoutOf(source);
  const { isExpertTensor } = familyOf(layout.config).names;
  const tensors = await readTensors(layout, [...layout.tensors.keys()].filter((name) => !isExpertTensor(name)));
  const model = new MixtralModel(layout.config, transport);
  model.loadDense(tensors);
  return model;
}

export type TrainerStateFile = Record<string, unknown> & { step: number; optimizer_steps: Record<string, number> };

export async function readTrainerState(dir: string): Promise<TrainerStateFile> {
  return JSON.parse(await readFile(join(dir, TRAINER_STATE_FILE), 'utf8')) as TrainerStateFile;
}

/** Trainer state and optimizer moments of a training checkpoint (throws when the folder has none). */
export async function loadTrainingSnapshot(dir: string, optimizers: Record<string, AdamW>): Promise<Record<string, unknown>> {
  const state = await readTrainerState(dir);
  const tensors = await loadOptimizerMoments(dir, (name) => Object.keys(optimizers).some((group) => name.startsWith(`${group}.`)));
  for (const [group, opt] of Object.entries(optimizers)) {
    const prefix = `${group}.`;
    const own = new Map([...tensors].filter(([n]) => n.startsWith(prefix)).map(([n, t]) => [n.slice(prefix.length), t]));
    opt.importState(state.optimizer_steps[group] ?? 0, own);
  }
  return state;
}
