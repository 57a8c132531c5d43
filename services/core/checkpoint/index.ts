// Checkpoint folders in Hugging Face layout: config.json + model.safetensors, or shards
// model-0000i-of-0000N.safetensors + model.safetensors.index.json. Saving is atomic: everything is
// written into a temporary sibling folder, fsynced, then renamed into place.
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, readFile, readdir, rename, rm, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { ConfigError, parseModelConfig, type ModelConfig } from '../config.js';
import {
  CheckpointError, readSafetensors, readSafetensorsHeader, writeSafetensors,
  type Tensor, type TensorInfo,
} from './safetensors.js';

export {
  CheckpointError, readSafetensors, readSafetensorsHeader, serializeSafetensors, writeSafetensors,
  f16ToF32, f32ToBf16, numElements,
} from './safetensors.js';
export type { Tensor, TensorInfo, SafetensorsHeader, SafetensorsContents, ReadOptions, WriteDtype } from './safetensors.js';

export const CONFIG_FILE = 'config.json';
export const SINGLE_FILE = 'model.safetensors';
export const INDEX_FILE = 'model.safetensors.index.json';
/** Hugging Face's default max_shard_size ("5GB"). */
export const DEFAULT_MAX_SHARD_BYTES = 5_000_000_000;
/** Metadata Hugging Face transformers expects in model safetensors files. */
const MODEL_FILE_METADATA = { format: 'pt' };

const TMP_MARK = '.tmp-';
const OLD_MARK = '.old-';

function uniqueSuffix(): string {
  return `${process.pid}-${randomBytes(6).toString('hex')}`;
}

function errno(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException | undefined)?.code;
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (err) {
    if (errno(err) === 'ENOENT') return false;
    throw err;
  }
}

/** fsyncs a directory so renames/creations in it are durable (no-op where the OS refuses). */
export async function fsyncDir(dir: string): Promise<void> {
  let fh;
  try {
    fh = await open(dir, fsConstants.O_RDONLY);
  } catch (err) {
    if (['EISDIR', 'EPERM', 'EACCES'].includes(errno(err) ?? '')) return; // e.g. Windows
    throw err;
  }
  try {
    await fh.sync();
  } catch (err) {
    if (!['EINVAL', 'EPERM', 'EBADF', 'ENOTSUP'].includes(errno(err) ?? '')) throw err;
  } finally {
    await fh.close();
  }
}

export async function writeFileSynced(path: string, bytes: string | Uint8Array): Promise<void> {
  const fh = await open(path, 'w');
  try {
    await fh.writeFile(bytes);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Replaces `path` atomically: temporary file in the same folder, fsync, rename, fsync the folder. */
export async function atomicWriteFile(path: string, bytes: string | Uint8Array): Promise<void> {
  const tmp = `${path}${TMP_MARK}${uniqueSuffix()}`;
  try {
    await writeFileSynced(tmp, bytes);
    await rename(tmp, path);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
  await fsyncDir(dirname(resolve(path)));
}

// ---------------------------------------------------------------- saving

export interface SaveOptions {
  config: ModelConfig;
  tensors: Map<string, Tensor>;
  /** Other files for the same folder, by file name (e.g. trainer_state.json, optimizer.safetensors). */
  extraFiles?: Record<string, string | Uint8Array>;
  /** Above this many tensor bytes the weights are sharded (default 5 GB, like Hugging Face). */
  maxShardBytes?: number;
}

export interface SaveResult {
  dir: string;
  files: string[];
}

function shardName(i: number, n: number): string {
  const pad = (x: number) => String(x).padStart(5, '0');
  return `model-${pad(i + 1)}-of-${pad(n)}.safetensors`;
}

/** Hugging Face's greedy split: in order; a tensor bigger than the limit gets a shard of its own. */
function planShards(tensors: Map<string, Tensor>, maxBytes: number): string[][] {
  const shards: string[][] = [];
  let current: string[] = [];
  let size = 0;
  for (const [name, t] of tensors) {
    const bytes = t.values.length * 4;
    if (bytes > maxBytes) {
      shards.push([name]);
    } else if (size + bytes > maxBytes) {
      shards.push(current);
      current = [name];
      size = bytes;
    } else {
      current.push(name);
      size += bytes;
    }
  }
  if (current.length) shards.push(current);
  return shards.filter((s) => s.length > 0);
}

function checkExtraName(name: string): void {
  const reserved = name === CONFIG_FILE || name === SINGLE_FILE || name === INDEX_FILE || /^model-\d{5}-of-\d{5}\.safetensors$/.test(name);
  if (reserved || name === '' || name === '.' || name === '..' || name !== basename(name) || name.includes('\\') || name.includes(TMP_MARK))
    throw new CheckpointError(`invalid extra checkpoint file name '${name}' (must be a plain file name not used by the model files)`);
}

async function writeFolderContents(tmp: string, opts: SaveOptions): Promise<string[]> {
  const files: string[] = [];
  await writeFileSynced(join(tmp, CONFIG_FILE), JSON.stringify(opts.config, null, 2) + '\n');
  files.push(CONFIG_FILE);
  const maxBytes = opts.maxShardBytes ?? DEFAULT_MAX_SHARD_BYTES;
  if (!(maxBytes > 0)) throw new CheckpointError(`maxShardBytes must be > 0, got ${maxBytes}`);
  const shards = planShards(opts.tensors, maxBytes);
  if (shards.length <= 1) {
    await writeSafetensors(join(tmp, SINGLE_FILE), opts.tensors, MODEL_FILE_METADATA);
    files.push(SINGLE_FILE);
  } else {
    const weightMap: Record<string, string> = {};
    let total = 0;
    for (let i = 0; i < shards.length; i++) {
      const file = shardName(i, shards.length);
      const entries = shards[i]!.map((name) => [name, opts.tensors.get(name)!] as [string, Tensor]);
      await writeSafetensors(join(tmp, file), entries, MODEL_FILE_METADATA);
      for (const [name, t] of entries) {
        weightMap[name] = file;
        total += t.values.length * 4;
      }
      files.push(file);
    }
    const sorted = Object.fromEntries(Object.keys(weightMap).sort().map((k) => [k, weightMap[k]!]));
    const index = { metadata: { total_size: total }, weight_map: sorted };
    await writeFileSynced(join(tmp, INDEX_FILE), JSON.stringify(index, null, 2) + '\n');
    files.push(INDEX_FILE);
  }
  for (const [name, content] of Object.entries(opts.extraFiles ?? {})) {
    checkExtraName(name);
    await writeFileSynced(join(tmp, name), content);
    files.push(name);
  }
  return files;
}

/**
 * Writes a checkpoint folder atomically. A crash at any moment leaves `dir` holding either the old or
 * the new complete checkpoint (or, only between two renames, the old one under `dir.old-*`, which
 * loadCheckpoint falls back to), never a half-written one.
 */
export async function saveCheckpoint(dir: string, opts: SaveOptions): Promise<SaveResult> {
  const target = resolve(dir);
  const parent = dirname(target);
  parseModelConfig(opts.config, `config for checkpoint ${target}`); // never write an invalid config
  await mkdir(parent, { recursive: true });
  const tmp = `${target}${TMP_MARK}${uniqueSuffix()}`;
  let files: string[];
  try {
    await mkdir(tmp);
    files = await writeFolderContents(tmp, opts);
    await fsyncDir(tmp);
  } catch (err) {
    await rm(tmp, { recursive: true, force: true }).catch(() => undefined);
    throw err;
  }
  await commitStaged(tmp, target);
  return { dir: target, files: files.sort() };
}

/**
 * Puts a complete, fsynced staging folder in place of `target` by renames only: a crash at any moment
 * leaves either the old or the new checkpoint loadable.
 */
export async function commitStaged(tmp: string, target: string): Promise<void> {
  const parent = dirname(target);
  if (await exists(target)) {
    const aside = `${target}${OLD_MARK}${uniqueSuffix()}`;
    await rename(target, aside);
    try {
      await rename(tmp, target);
    } catch (err) {
      await rename(aside, target).catch(() => undefined);
      await rm(tmp, { recursive: true, force: true }).catch(() => undefined);
      throw err;
    }
    await fsyncDir(parent);
    await rm(aside, { recursive: true, force: true });
  } else {
    await rename(tmp, target);
    await fsyncDir(parent);
  }
  // Leftovers of an earlier save of this folder that crashed between its two renames.
  for (const stale of await asideCopies(target)) await rm(stale, { recursive: true, force: true });
}

/** Staging folders of `target` left by saves that never committed (a crash mid-write). */
export async function removeStaleStaging(target: string): Promise<void> {
  const prefix = basename(target) + TMP_MARK;
  const entries = await readdir(dirname(target), { withFileTypes: true }).catch(() => []);
  for (const e of entries) if (e.isDirectory() && e.name.startsWith(prefix)) await rm(join(dirname(target), e.name), { recursive: true, force: true });
}

/** The staging folder every member of a distributed run writes its part of one checkpoint into. */
export function stagingDirOf(target: string, generation: number, step: number): string {
  return `${resolve(target)}${TMP_MARK}g${generation}-s${step}`;
}

/** `dir.old-*` siblings (a previous complete checkpoint moved aside during a save). */
async function asideCopies(target: string): Promise<string[]> {
  const prefix = basename(target) + OLD_MARK;
  const entries = await readdir(dirname(target), { withFileTypes: true }).catch(() => []);
  return entries.filter((e) => e.isDirectory() && e.name.startsWith(prefix)).map((e) => join(dirname(target), e.name));
}

/** Checkpoint folders directly under `parent` (leftover `*.tmp-*` / `*.old-*` folders are ignored), sorted. */
export async function listCheckpoints(parent: string): Promise<string[]> {
  const entries = await readdir(parent, { withFileTypes: true }).catch((err) => {
    if (errno(err) === 'ENOENT') return [];
    throw err;
  });
  const out: string[] = [];
  for (const e of entries) {
    if (!e.isDirectory() || e.name.includes(TMP_MARK) || e.name.includes(OLD_MARK)) continue;
    if (await exists(join(parent, e.name, CONFIG_FILE))) out.push(e.name);
  }
  return out.sort();
}

// ---------------------------------------------------------------- loading

export interface LoadOptions {
  /** Expected names and shapes (e.g. modelTensorShapes from model/hf.ts), or a function of the loaded config giving them; every mismatch is reported at once. */
  expectedTensors?: Map<string, number[]> | ((config: ModelConfig) => Map<string, number[]>);
  /** Read only these tensors (only their byte ranges are read). Also restricts expectedTensors. */
  only?: (name: string) => boolean;
}

export interface LoadedCheckpoint {
  config: ModelConfig;
  tensors: Map<string, Tensor>;
  /** Names of all regular files in the checkpoint folder, sorted. */
  files: string[];
  /** The folder actually read (differs from the argument only when recovering a `dir.old-*` copy). */
  dir: string;
}

/** Reads `names` from the folder's safetensors files, each file opened once for the tensors it holds. */
export async function readTensorsFrom(folder: string, names: Iterable<string>, fileOf: (name: string) => string): Promise<Map<string, Tensor>> {
  const perFile = new Map<string, string[]>();
  for (const n of names) {
    const f = fileOf(n);
    if (!perFile.has(f)) perFile.set(f, []);
    perFile.get(f)!.push(n);
  }
  const loaded = new Map<string, Tensor>();
  for (const [file, fileNames] of perFile) {
    const { tensors } = await readSafetensors(join(folder, file), { names: fileNames });
    for (const [n, t] of tensors) loaded.set(n, t);
  }
  return loaded;
}

async function readJsonFile(path: string, kind: 'config' | 'checkpoint'): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new CheckpointError(`cannot read ${path}: ${(err as Error).message}`);
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    const msg = `invalid ${path}: not valid JSON (${(err as Error).message})`;
    throw kind === 'config' ? new ConfigError(msg) : new CheckpointError(msg);
  }
}

function isPlainFileName(name: string): boolean {
  return name !== '' && name !== '.' && name !== '..' && name === basename(name) && !name.includes('\\');
}

/** Which tensor lives in which file: from the index if there is one, else model.safetensors. */
async function tensorFiles(dir: string, files: string[]): Promise<Map<string, string> | null> {
  if (!files.includes(INDEX_FILE)) return null;
  return readWeightMap(join(dir, INDEX_FILE));
}

/** The `weight_map` (tensor name → file in the same folder) of a safetensors index file, checked. */
export async function readWeightMap(path: string): Promise<Map<string, string>> {
  const raw = (await readJsonFile(path, 'checkpoint')) as { weight_map?: unknown } | null;
  const wm = raw?.weight_map;
  if (typeof wm !== 'object' || wm === null || Array.isArray(wm)) throw new CheckpointError(`invalid ${path}: no weight_map object`);
  const map = new Map<string, string>();
  for (const [name, file] of Object.entries(wm as Record<string, unknown>)) {
    if (typeof file !== 'string' || !isPlainFileName(file))
      throw new CheckpointError(`invalid ${path}: weight_map['${name}'] is not a file name in the folder: ${JSON.stringify(file)}`);
    map.set(name, file);
  }
  return map;
}

function shapeText(s: readonly number[]): string {
  return `[${s.join(', ')}]`;
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

async function resolveCheckpointDir(target: string): Promise<string> {
  if (await exists(target)) return target;
  const asides = await asideCopies(target);
  for (const a of asides) if (await exists(join(a, CONFIG_FILE))) return a;
  throw new CheckpointError(`checkpoint folder ${target} does not exist`);
}

export async function loadCheckpoint(dir: string, opts: LoadOptions = {}): Promise<LoadedCheckpoint> {
  const folder = await resolveCheckpointDir(resolve(dir));
  const files = (await readdir(folder, { withFileTypes: true })).filter((e) => e.isFile()).map((e) => e.name).sort();
  if (!files.includes(CONFIG_FILE)) throw new CheckpointError(`${folder} is not a checkpoint: ${CONFIG_FILE} is missing`);
  const cfgPath = join(folder, CONFIG_FILE);
  const config = parseModelConfig(await readJsonFile(cfgPath, 'config'), cfgPath);

  // Headers first (cheap), so shape problems are reported before any tensor data is read.
  const location = new Map<string, { file: string; info: TensorInfo }>();
  const indexMap = await tensorFiles(folder, files);
  if (indexMap) {
    const byFile = new Map<string, string[]>();
    for (const [name, file] of indexMap) {
      if (!byFile.has(file)) byFile.set(file, []);
      byFile.get(file)!.push(name);
    }
    for (const [file, names] of byFile) {
      if (!files.includes(file)) throw new CheckpointError(`${join(folder, INDEX_FILE)} names ${file}, which is not in ${folder}`);
      const header = await readSafetensorsHeader(join(folder, file));
      const absent = names.filter((n) => !header.tensors.has(n));
      if (absent.length)
        throw new CheckpointError(`${join(folder, INDEX_FILE)} maps tensors to ${file} that it does not contain: ${absent.join(', ')}`);
      for (const n of names) location.set(n, { file, info: header.tensors.get(n)! });
    }
  } else {
    if (!files.includes(SINGLE_FILE)) throw new CheckpointError(`${folder} is not a checkpoint: neither ${SINGLE_FILE} nor ${INDEX_FILE} is present`);
    const header = await readSafetensorsHeader(join(folder, SINGLE_FILE));
    for (const [n, info] of header.tensors) location.set(n, { file: SINGLE_FILE, info });
  }

  const only = opts.only ?? (() => true);
  const selected = [...location.keys()].filter(only);
  const expectedTensors = typeof opts.expectedTensors === 'function' ? opts.expectedTensors(config) : opts.expectedTensors;
  if (expectedTensors) {
    const problems: string[] = [];
    const expected = [...expectedTensors].filter(([n]) => only(n));
    const missing = expected.filter(([n]) => !location.has(n)).map(([n, s]) => `${n} ${shapeText(s)}`);
    const misshaped = expected
      .filter(([n, s]) => location.has(n) && !sameShape(location.get(n)!.info.shape, s))
      .map(([n, s]) => `${n}: expected ${shapeText(s)}, found ${shapeText(location.get(n)!.info.shape)}`);
    const unexpected = selected.filter((n) => !expectedTensors.has(n)).map((n) => `${n} ${shapeText(location.get(n)!.info.shape)}`);
    if (missing.length) problems.push(`${missing.length} missing tensor(s): ${missing.join('; ')}`);
    if (misshaped.length) problems.push(`${misshaped.length} tensor(s) with the wrong shape: ${misshaped.join('; ')}`);
    if (unexpected.length) problems.push(`${unexpected.length} unexpected tensor(s): ${unexpected.join('; ')}`);
    if (problems.length) throw new CheckpointError(`checkpoint ${folder} does not match the expected tensors: ${problems.join(' | ')}`);
  }

  const loaded = await readTensorsFrom(folder, selected, (n) => location.get(n)!.file);
  // Keep the file's / index's order, independent of the file grouping.
  const tensors = new Map<string, Tensor>(selected.map((n) => [n, loaded.get(n)!]));
  return { config, tensors, files, dir: folder };
}
