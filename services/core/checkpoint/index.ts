// Checkpoint folders in Hugging Face layout: config.json + model.safetensors, or shards
// model-0000i-of-0000N.safetensors + model.safetensors.index.json. Saving is atomic: everything is
// written into a temporary sibling folder, fsynced, then renamed into place.
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, readFile, readdir, rename, rm, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { ConfigError, parseModelConfig, type ModelConfig } from '../config.js';
import { BYTES_PER_ELEMENT, FLOAT_WEIGHT_DTYPES } from '../dtypes.js';
import {
  BYTE_TENSOR_DTYPE, CheckpointError, readSafetensors, readSafetensorsHeader, writeSafetensors,
  type ByteTensorSelector, type StoredTensor, type Tensor, type TensorInfo, type WriteDtype,
} from './safetensors.js';

export {
  BYTE_TENSOR_DTYPE, CheckpointError, isByteTensor, readSafetensors, readSafetensorsHeader, serializeSafetensors, writeSafetensors,
  f16ToF32, f32ToBf16, numElements,
} from './safetensors.js';
export type {
  ByteTensor, ByteTensorSelector, StoredTensor, Tensor, TensorInfo, SafetensorsHeader, SafetensorsContents, ReadOptions, WriteDtype,
} from './safetensors.js';

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

/** `mode` applies when the file is created (e.g. 0o600 for a secret: never readable by others, not even briefly). */
export async function writeFileSynced(path: string, bytes: string | Uint8Array, mode = 0o666): Promise<void> {
  const fh = await open(path, 'w', mode);
  try {
    await fh.writeFile(bytes);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Replaces `path` atomically: temporary file in the same folder, fsync, rename, fsync the folder. */
export async function atomicWriteFile(path: string, bytes: string | Uint8Array, mode?: number): Promise<void> {
  const tmp = `${path}${TMP_MARK}${uniqueSuffix()}`;
  try {
    await writeFileSynced(tmp, bytes, mode);
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
  /** Stored dtype of the weights (default F32); when given, config.json's torch_dtype is set to match. */
  dtype?: WriteDtype;
}

/** Hugging Face's torch_dtype for each dtype the writer stores. */
export const TORCH_DTYPE_OF: Record<WriteDtype, ModelConfig['torch_dtype']> = { F32: 'float32', BF16: 'bfloat16', F16: 'float16' };

export interface SaveResult {
  dir: string;
  files: string[];
}

function shardName(i: number, n: number): string {
  const pad = (x: number) => String(x).padStart(5, '0');
  return `model-${pad(i + 1)}-of-${pad(n)}.safetensors`;
}

/** Hugging Face's greedy split: in order; a tensor bigger than the limit gets a shard of its own. */
function planShards(tensors: Map<string, Tensor>, maxBytes: number, width: number): string[][] {
  const shards: string[][] = [];
  let current: string[] = [];
  let size = 0;
  for (const [name, t] of tensors) {
    const bytes = t.values.length * width;
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
  const dtype = opts.dtype ?? 'F32';
  const width = BYTES_PER_ELEMENT[dtype];
  // An explicit dtype restates torch_dtype; without one the config is written as given (training
  // resumes compare configs, and the loader goes by each tensor's header dtype anyway).
  const config = opts.dtype ? { ...opts.config, torch_dtype: TORCH_DTYPE_OF[opts.dtype] } : opts.config;
  await writeFileSynced(join(tmp, CONFIG_FILE), JSON.stringify(config, null, 2) + '\n');
  files.push(CONFIG_FILE);
  const maxBytes = opts.maxShardBytes ?? DEFAULT_MAX_SHARD_BYTES;
  if (!(maxBytes > 0)) throw new CheckpointError(`maxShardBytes must be > 0, got ${maxBytes}`);
  const shards = planShards(opts.tensors, maxBytes, width);
  if (shards.length <= 1) {
    await writeSafetensors(join(tmp, SINGLE_FILE), opts.tensors, MODEL_FILE_METADATA, dtype);
    files.push(SINGLE_FILE);
  } else {
    const weightMap: Record<string, string> = {};
    let total = 0;
    for (let i = 0; i < shards.length; i++) {
      const file = shardName(i, shards.length);
      const entries = shards[i]!.map((name) => [name, opts.tensors.get(name)!] as [string, Tensor]);
      await writeSafetensors(join(tmp, file), entries, MODEL_FILE_METADATA, dtype);
      // total_size counts the stored bytes (2 per value in bf16), as Hugging Face's index does.
      for (const [name, t] of entries) {
        weightMap[name] = file;
        total += t.values.length * width;
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
  /** Read only these tensors (only their byte ranges are read); expectedTensors are still checked in full. */
  only?: (name: string) => boolean;
  /**
   * Tensors a family keeps as stored bytes (MXFP4 blocks and scales): expected ones must be U8 rather
   * than a float dtype, and they load as ByteTensor.
   */
  byteTensors?: ByteTensorSelector;
}

export interface LoadedCheckpoint<T extends StoredTensor = Tensor> {
  config: ModelConfig;
  tensors: Map<string, T>;
  /** Names of all regular files in the checkpoint folder, sorted. */
  files: string[];
  /** The folder actually read (differs from the argument only when recovering a `dir.old-*` copy). */
  dir: string;
}

/**
 * Reads `names` from the folder's safetensors files, each file opened once for the tensors it holds;
 * those `byteTensors` selects come back as ByteTensor (U8 bytes).
 */
export function readTensorsFrom(folder: string, names: Iterable<string>, fileOf: (name: string) => string, byteTensors: ByteTensorSelector): Promise<Map<string, StoredTensor>>;
export function readTensorsFrom(folder: string, names: Iterable<string>, fileOf: (name: string) => string): Promise<Map<string, Tensor>>;
export async function readTensorsFrom(folder: string, names: Iterable<string>, fileOf: (name: string) => string, byteTensors?: ByteTensorSelector): Promise<Map<string, StoredTensor>> {
  const perFile = new Map<string, string[]>();
  for (const n of names) {
    const f = fileOf(n);
    if (!perFile.has(f)) perFile.set(f, []);
    perFile.get(f)!.push(n);
  }
  const loaded = new Map<string, StoredTensor>();
  for (const [file, fileNames] of perFile) {
    const { tensors } = byteTensors
      ? await readSafetensors(join(folder, file), { names: fileNames, byteTensors })
      : await readSafetensors(join(folder, file), { names: fileNames });
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

export interface TensorLocation {
  /** The safetensors file in the folder holding the tensor. */
  file: string;
  info: TensorInfo;
}

/** What the config and the safetensors headers of a folder say, without any tensor data. */
export interface CheckpointLayout {
  config: ModelConfig;
  /** Names of all regular files in the checkpoint folder, sorted. */
  files: string[];
  /** The folder actually read (differs from the argument only when recovering a `dir.old-*` copy). */
  dir: string;
  /** Every tensor in the folder's weight files, in index (or file) order. */
  tensors: Map<string, TensorLocation>;
}

/** The outcome of examining a folder: everything found wrong, not just the first problem. */
export interface CheckpointExamination {
  dir: string;
  files: string[];
  /** Undefined when config.json is missing or invalid. */
  config?: ModelConfig;
  tensors: Map<string, TensorLocation>;
  /** One sentence per problem; empty when the folder is loadable. */
  problems: string[];
  /** The config's own error, kept so a folder whose only problem is its config throws it unchanged. */
  configError?: Error;
}


/**
 * Checks a checkpoint folder from its config and safetensors headers only (no tensor data is read):
 * config.json valid, every file the index names present and holding what the index says, and, with
 * `expectedTensors`, every expected tensor present with its shape and a float dtype (U8 for those
 * `byteTensors` selects), none unexpected.
 * Collects every problem instead of stopping at the first (`switchyard import` lists them all).
 */
export async function examineCheckpoint(dir: string, opts: Pick<LoadOptions, 'expectedTensors' | 'byteTensors'> = {}): Promise<CheckpointExamination> {
  const folder = await resolveCheckpointDir(resolve(dir));
  const entries = await readdir(folder, { withFileTypes: true }).catch((err: Error) => {
    throw new CheckpointError(`cannot read checkpoint folder ${folder}: ${err.message}`);
  });
  // A Hugging Face cache snapshot holds symlinks into ../../blobs: a link to a file counts as the file.
  const isFile = async (e: (typeof entries)[number]) => e.isFile() || (e.isSymbolicLink() && (await stat(join(folder, e.name)).then((s) => s.isFile(), () => false)));
  const files = (await Promise.all(entries.map(async (e) => ((await isFile(e)) ? e.name : undefined)))).filter((n): n is string => n !== undefined).sort();
  const problems: string[] = [];
  let config: ModelConfig | undefined;
  let configError: Error | undefined;
  if (!files.includes(CONFIG_FILE)) problems.push(`${folder} is not a checkpoint: ${CONFIG_FILE} is missing`);
  else {
    const cfgPath = join(folder, CONFIG_FILE);
    try {
      config = parseModelConfig(await readJsonFile(cfgPath, 'config'), cfgPath);
    } catch (err) {
      if (!(err instanceof ConfigError || err instanceof CheckpointError)) throw err;
      configError = err;
      problems.push(err.message);
    }
  }

  const tensors = new Map<string, TensorLocation>();
  // Tensors the index places in a file that is missing or unreadable: reported with the file, not one by one.
  const unreadable = new Set<string>();
  const readHeader = async (file: string) => {
    try {
      return await readSafetensorsHeader(join(folder, file));
    } catch (err) {
      if (!(err instanceof CheckpointError)) throw err;
      problems.push(err.message);
      return undefined;
    }
  };
  if (files.includes(INDEX_FILE)) {
    let indexMap: Map<string, string> | undefined;
    try {
      indexMap = await readWeightMap(join(folder, INDEX_FILE));
    } catch (err) {
      if (!(err instanceof CheckpointError)) throw err;
      problems.push(err.message);
    }
    const byFile = new Map<string, string[]>();
    for (const [name, file] of indexMap ?? []) {
      if (!byFile.has(file)) byFile.set(file, []);
      byFile.get(file)!.push(name);
    }
    const absentFiles = [...byFile.keys()].filter((f) => !files.includes(f));
    if (absentFiles.length)
      problems.push(`${join(folder, INDEX_FILE)} names ${absentFiles.join(', ')}, which ${absentFiles.length === 1 ? 'is' : 'are'} not in ${folder}`);
    const headers = new Map<string, Awaited<ReturnType<typeof readHeader>>>();
    for (const file of byFile.keys()) if (files.includes(file)) headers.set(file, await readHeader(file));
    // Index order, whatever the file grouping.
    for (const [name, file] of indexMap ?? []) {
      const info = headers.get(file)?.tensors.get(name);
      if (info) tensors.set(name, { file, info });
      else unreadable.add(name);
    }
    for (const [file, header] of headers) {
      const absent = header ? byFile.get(file)!.filter((n) => !header.tensors.has(n)) : [];
      if (absent.length) problems.push(`${join(folder, INDEX_FILE)} maps tensors to ${file} that it does not contain: ${absent.join(', ')}`);
    }
  } else if (files.includes(SINGLE_FILE)) {
    const header = await readHeader(SINGLE_FILE);
    for (const [n, info] of header?.tensors ?? []) tensors.set(n, { file: SINGLE_FILE, info });
  } else {
    problems.push(`${folder} is not a checkpoint: neither ${SINGLE_FILE} nor ${INDEX_FILE} is present`);
  }

  const expectedTensors = typeof opts.expectedTensors === 'function' ? (config ? opts.expectedTensors(config) : undefined) : opts.expectedTensors;
  if (expectedTensors) {
    // One problem per kind, each naming the tensors (and both shapes), so a listing reads one per line.
    const found: string[] = [];
    const expected = [...expectedTensors].filter(([n]) => !unreadable.has(n));
    const missing = expected.filter(([n]) => !tensors.has(n)).map(([n, s]) => `${n} ${shapeText(s)}`);
    const misshaped = expected
      .filter(([n, s]) => tensors.has(n) && !sameShape(tensors.get(n)!.info.shape, s))
      .map(([n, s]) => `${n}: expected ${shapeText(s)}, found ${shapeText(tensors.get(n)!.info.shape)}`);
    const unexpected = [...tensors.keys()].filter((n) => !expectedTensors.has(n)).map((n) => `${n} ${shapeText(tensors.get(n)!.info.shape)}`);
    const isBytes = opts.byteTensors ?? (() => false);
    const badDtype = [...tensors].filter(([n, t]) => expectedTensors.has(n) && !(FLOAT_WEIGHT_DTYPES as readonly string[]).includes(t.info.dtype) && !isBytes(n)).map(([n, t]) => `${n}: ${t.info.dtype}`);
    const badBytes = [...tensors].filter(([n, t]) => expectedTensors.has(n) && isBytes(n) && t.info.dtype !== BYTE_TENSOR_DTYPE).map(([n, t]) => `${n}: ${t.info.dtype}`);
    if (missing.length) found.push(`${missing.length} missing tensor(s): ${missing.join('; ')}`);
    if (misshaped.length) found.push(`${misshaped.length} tensor(s) with the wrong shape: ${misshaped.join('; ')}`);
    if (unexpected.length) found.push(`${unexpected.length} unexpected tensor(s): ${unexpected.join('; ')}`);
    if (badDtype.length) found.push(`${badDtype.length} tensor(s) in an unsupported dtype (supported: ${FLOAT_WEIGHT_DTYPES.join(', ')}): ${badDtype.join('; ')}`);
    if (badBytes.length) found.push(`${badBytes.length} tensor(s) not in ${BYTE_TENSOR_DTYPE}, as quantized blocks and scales must be: ${badBytes.join('; ')}`);
    for (const f of found) problems.push(`checkpoint ${folder} does not match the expected tensors: ${f}`);
  }
  return { dir: folder, files, config, tensors, problems, configError };
}

/** examineCheckpoint that throws when anything is wrong (a ConfigError when the config is the only problem). */
export async function inspectCheckpoint(dir: string, opts: Pick<LoadOptions, 'expectedTensors' | 'byteTensors'> = {}): Promise<CheckpointLayout> {
  const found = await examineCheckpoint(dir, opts);
  if (found.problems.length === 1 && found.configError) throw found.configError;
  if (found.problems.length === 1) throw new CheckpointError(found.problems[0]!);
  if (found.problems.length > 1) throw new CheckpointError(`${found.problems.length} problems with checkpoint ${found.dir}: ${found.problems.join(' | ')}`);
  return { config: found.config!, files: found.files, dir: found.dir, tensors: found.tensors };
}

/**
 * Loads a checkpoint folder. With `expectedTensors`, the whole folder is checked from its headers
 * (even when `only` selects a part), so no service starts on a partly broken checkpoint.
 */
export function loadCheckpoint(dir: string, opts: LoadOptions & { byteTensors: ByteTensorSelector }): Promise<LoadedCheckpoint<StoredTensor>>;
export function loadCheckpoint(dir: string, opts?: LoadOptions & { byteTensors?: undefined }): Promise<LoadedCheckpoint>;
export async function loadCheckpoint(dir: string, opts: LoadOptions = {}): Promise<LoadedCheckpoint<StoredTensor>> {
  const layout = await inspectCheckpoint(dir, opts);
  const only = opts.only ?? (() => true);
  const selected = [...layout.tensors.keys()].filter(only);
  const fileOf = (n: string) => layout.tensors.get(n)!.file;
  const loaded = opts.byteTensors ? await readTensorsFrom(layout.dir, selected, fileOf, opts.byteTensors) : await readTensorsFrom(layout.dir, selected, fileOf);
  // Keep the file's / index's order, independent of the file grouping.
  const tensors = new Map<string, StoredTensor>(selected.map((n) => [n, loaded.get(n)!]));
  return { config: layout.config, tensors, files: layout.files, dir: layout.dir };
}
