// A model checkpoint in Hugging Face layout, plus (for training) the optimizer moments and the trainer's
// state in the same atomically written folder, so a resumed run continues bit for bit.
import { inspectCheckpoint, loadCheckpoint, saveCheckpoint, serializeSafetensors, type CheckpointLayout, type WriteDtype } from './index.js';
import { loadOptimizerMoments } from './cluster.js';
import { modelTensorShapes } from '../model/hf.js';
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
  return inspectCheckpoint(dir, { expectedTensors: modelTensorShapes });
}

/** Loads a checkpoint into an in-process model; tensors are checked against the config first. */
export async function loadModel(dir: string): Promise<MixtralModel> {
  const { config, tensors } = await loadCheckpoint(dir, { expectedTensors: modelTensorShapes });
  return MixtralModel.fromHf(config, tensors);
}

/**
 * The experts one shard holds, reading only their byte ranges (a shard's memory is proportional to
 * its experts). Missing or misshaped expert tensors are listed all at once.
 */
export async function loadExpertSet(dir: string, keys: Array<{ layer: number; expert: number }>): Promise<ExpertSet> {
  // The names depend on the family, so the config comes first (a header read only).
  const { config: header } = await loadCheckpoint(dir, { only: () => false });
  const family = familyOf(header);
  const wanted = new Set(keys.map((k) => family.names.expertPrefix(k.layer, k.expert)));
  const only = (name: string) => family.names.isExpertTensor(name) && [...wanted].some((prefix) => name.startsWith(prefix));
  const { config, tensors } = await loadCheckpoint(dir, { expectedTensors: modelTensorShapes, only });
  const experts = new ExpertSet(config.hidden_size, family.expertIntermediate);
  for (const { layer, expert } of keys) {
    if (!family.isMoe(layer) || expert >= family.experts)
      throw new RangeError(`expert (layer ${layer}, expert ${expert}) does not exist in ${dir} (MoE layers ${family.moeLayers.join(', ')} × ${family.experts} experts)`);
    experts.addFromHf(tensors, layer, expert, family.names);
  }
  return experts;
}

/** The router's part of a checkpoint (everything but the experts), reaching experts through `transport`. */
export async function loadDenseModel(dir: string, transport: ExpertTransport): Promise<MixtralModel> {
  const { config: header } = await loadCheckpoint(dir, { only: () => false });
  const { isExpertTensor } = familyOf(header).names;
  const { config, tensors } = await loadCheckpoint(dir, { expectedTensors: modelTensorShapes, only: (name) => !isExpertTensor(name) });
  const model = new MixtralModel(config, transport);
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
