// Checkpoints of a distributed run (DESIGN §4): every owner writes its own tensors and optimizer moments
// into one staging folder; the coordinator then writes the indexes and the trainer state and commits the
// folder by rename only once every part is durable. The result is an ordinary Hugging Face sharded
// checkpoint (model.safetensors.index.json) plus an optimizer index, loadable by any process.
import { join } from 'node:path';
import { existsSync } from 'node:fs';
import {
  CheckpointError, CONFIG_FILE, INDEX_FILE, commitStaged, fsyncDir, inspectCheckpoint, readSafetensors, readSafetensorsHeader,
  readTensorsFrom, readWeightMap, writeFileSynced, writeSafetensors, type Tensor,
} from './index.js';
import { OPTIMIZER_FILE, TRAINER_STATE_FILE, readTrainerState } from './model.js';
import { PUBLISHED_LAYOUT } from '../model/hf.js';
import type { ModelConfig } from '../config.js';

export const OPTIMIZER_INDEX_FILE = 'optimizer.safetensors.index.json';

export interface CheckpointPartFiles {
  file: string;
  tensors: string[];
  optimizerFile: string;
  optimizerTensors: string[];
}

/** File names a member's part uses: derived from its member id, so parts never collide. */
function partNames(memberId: string): { file: string; optimizerFile: string } {
  const safe = memberId.replace(/[^A-Za-z0-9_.-]/g, '_');
  return { file: `model-${safe}.safetensors`, optimizerFile: `optimizer-${safe}.safetensors` };
}

/** Writes (and fsyncs) one member's weights and optimizer moments into the staging folder. */
export async function writeCheckpointPart(
  staging: string, memberId: string, tensors: Map<string, Tensor>, moments: Map<string, Tensor>, config?: ModelConfig,
): Promise<CheckpointPartFiles> {
  const { file, optimizerFile } = partNames(memberId);
  await writeSafetensors(join(staging, file), tensors, { format: 'pt' });
  await writeSafetensors(join(staging, optimizerFile), moments);
  if (config) await writeFileSynced(join(staging, CONFIG_FILE), JSON.stringify(config, null, 2) + '\n');
  return { file, tensors: [...tensors.keys()], optimizerFile, optimizerTensors: [...moments.keys()] };
}

interface WeightIndex { metadata: { total_size: number }; weight_map: Record<string, string> }

async function indexOf(staging: string, entries: Array<{ file: string; names: string[] }>, what: string): Promise<WeightIndex> {
  const map: Record<string, string> = {};
  let total = 0;
  for (const { file, names } of entries) {
    const header = await readSafetensorsHeader(join(staging, file));
    for (const name of names) {
      const info = header.tensors.get(name);
      if (!info) throw new CheckpointError(`checkpoint part ${file} lacks ${what} tensor ${name}`);
      if (map[name] !== undefined) throw new CheckpointError(`${what} tensor ${name} is in both ${map[name]} and ${file}`);
      map[name] = file;
      total += info.end - info.begin;
    }
  }
  const sorted = Object.fromEntries(Object.keys(map).sort().map((k) => [k, map[k]!]));
  return { metadata: { total_size: total }, weight_map: sorted };
}

/**
 * Completes a staged checkpoint: checks every part, writes both indexes and the trainer state, checks the
 * whole model (every tensor of the config, right shapes — the check every service runs before loading),
 * fsyncs and renames the folder into place, so a committed checkpoint always loads.
 */
export async function commitClusterCheckpoint(staging: string, target: string, parts: CheckpointPartFiles[], trainerStateJson: string): Promise<void> {
  if (!existsSync(join(staging, CONFIG_FILE))) throw new CheckpointError(`staged checkpoint ${staging} has no ${CONFIG_FILE}`);
  const weights = await indexOf(staging, parts.map((p) => ({ file: p.file, names: p.tensors })), 'model');
  const moments = await indexOf(staging, parts.map((p) => ({ file: p.optimizerFile, names: p.optimizerTensors })), 'optimizer');
  await writeFileSynced(join(staging, INDEX_FILE), JSON.stringify(weights, null, 2) + '\n');
  await writeFileSynced(join(staging, OPTIMIZER_INDEX_FILE), JSON.stringify(moments, null, 2) + '\n');
  await writeFileSynced(join(staging, TRAINER_STATE_FILE), trainerStateJson);
  await inspectCheckpoint(staging, PUBLISHED_LAYOUT);
  await fsyncDir(staging);
  await commitStaged(staging, target);
}

/**
 * Optimizer moments named `{group}.{param}.exp_avg(_sq)` selected by `wanted`, from either layout: a
 * single optimizer.safetensors (single-process runs) or the optimizer index of a distributed run.
 */
export async function loadOptimizerMoments(dir: string, wanted: (name: string) => boolean): Promise<Map<string, Tensor>> {
  const indexPath = join(dir, OPTIMIZER_INDEX_FILE);
  if (!existsSync(indexPath)) {
    const { tensors } = await readSafetensors(join(dir, OPTIMIZER_FILE));
    return new Map([...tensors].filter(([name]) => wanted(name)));
  }
  const weightMap = await readWeightMap(indexPath);
  return readTensorsFrom(dir, [...weightMap.keys()].filter(wanted), (name) => weightMap.get(name)!);
}

/** The step a committed checkpoint was written after (0 for a checkpoint without trainer state). */
export async function checkpointStep(dir: string): Promise<number> {
  if (!existsSync(join(dir, TRAINER_STATE_FILE))) return 0;
  return (await readTrainerState(dir)).step ?? 0;
}
