// The safetensors format, hand-written (no well-kept npm library exists):
//   u64 little-endian header length N | N bytes of JSON header (space-padded) | data
// Header: { name: { dtype, shape, data_offsets: [begin, end] }, "__metadata__": { string: string } },
// offsets relative to the start of the data section. Reading validates everything and reads only the
// byte ranges of the selected tensors, so a shard can load its experts from a large file.
import { open, type FileHandle } from 'node:fs/promises';
import { decodeFloats, encodeFloats, READABLE_DTYPES, type FloatDtype, type ReadableDtype } from '../dtypes.js';

/** Re-exported for callers that convert single values. */
export { f16ToF32, f32ToBf16 } from '../dtypes.js';

export class CheckpointError extends Error {
  override name = 'CheckpointError';
}

export interface Tensor {
  shape: number[];
  values: Float32Array;
}

/** A tensor kept as its stored bytes, not converted to float: U8 data such as MXFP4 blocks and scales. */
export interface ByteTensor {
  shape: number[];
  bytes: Uint8Array;
}

/** What a read that selects byte tensors gives: float tensors as usual, the selected U8 ones as bytes. */
export type StoredTensor = Tensor | ByteTensor;

export const isByteTensor = (t: StoredTensor): t is ByteTensor => 'bytes' in t;

/** The one stored dtype read (and written) as bytes. */
export const BYTE_TENSOR_DTYPE = 'U8';

/** Picks, by name, the tensors to read as bytes: each must be stored as U8. */
export type ByteTensorSelector = (name: string) => boolean;

export interface TensorInfo {
  dtype: string;
  shape: number[];
  /** Absolute byte range in the file (begin inclusive, end exclusive). */
  begin: number;
  end: number;
}

export interface SafetensorsHeader {
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
  /** Absolute file offset of the data section. */
  dataStart: number;
}

const DTYPE_BYTES: Record<string, number> = {
  BOOL: 1, U8: 1, I8: 1, F8_E4M3: 1, F8_E5M2: 1,
  U16: 2, I16: 2, F16: 2, BF16: 2,
  U32: 4, I32: 4, F32: 4,
  U64: 8, I64: 8, F64: 8,
};
/** Dtypes a checkpoint is written in. */
export type WriteDtype = FloatDtype;

const MAX_HEADER_BYTES = 100_000_000; // same guard as the reference implementation

export function numElements(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

// ---------------------------------------------------------------- reading

function isNonNegInt(x: unknown): x is number {
  return typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
}

/** Validates a parsed header against the data section length; `file` is only for messages. */
function validateHeader(raw: unknown, dataStart: number, dataLength: number, file: string): SafetensorsHeader {
  const fail = (msg: string): never => {
    throw new CheckpointError(`${file}: invalid safetensors file: ${msg}`);
  };
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) fail('header is not a JSON object');
  const tensors = new Map<string, TensorInfo>();
  let metadata: Record<string, string> = {};
  const ranges: { name: string; begin: number; end: number }[] = [];
  for (const [name, entry] of Object.entries(raw as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) fail('__metadata__ is not an object');
      for (const [k, v] of Object.entries(entry as Record<string, unknown>))
        if (typeof v !== 'string') fail(`__metadata__.${k} is not a string`);
      metadata = { ...(entry as Record<string, string>) };
      continue;
    }
    if (typeof entry !== 'object' || entry === null) fail(`tensor '${name}': entry is not an object`);
    const e = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof e.dtype !== 'string' || !(e.dtype in DTYPE_BYTES)) fail(`tensor '${name}': unknown dtype ${JSON.stringify(e.dtype)}`);
    if (!Array.isArray(e.shape) || !e.shape.every(isNonNegInt)) fail(`tensor '${name}': shape ${JSON.stringify(e.shape)} is not a list of non-negative integers`);
    const off = e.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !isNonNegInt(off[0]) || !isNonNegInt(off[1]) || off[0] > off[1])
      fail(`tensor '${name}': data_offsets ${JSON.stringify(off)} are not [begin, end] with 0 <= begin <= end`);
    const dtype = e.dtype as string;
    const shape = e.shape as number[];
    const [begin, end] = off as [number, number];
    const expected = numElements(shape) * DTYPE_BYTES[dtype]!;
    if (end - begin !== expected)
      fail(`tensor '${name}': data_offsets [${begin}, ${end}] span ${end - begin} bytes but ${dtype} ${JSON.stringify(shape)} needs ${expected}`);
    if (end > dataLength) fail(`tensor '${name}': data_offsets [${begin}, ${end}] are beyond the data section (${dataLength} bytes)`);
    ranges.push({ name, begin, end });
    tensors.set(name, { dtype, shape: [...shape], begin: dataStart + begin, end: dataStart + end });
  }
  // Like the reference implementation: tensors tile the data section exactly, no overlap, no hole.
  ranges.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let cursor = 0;
  for (const r of ranges) {
    if (r.begin < cursor) fail(`tensor '${r.name}' [${r.begin}, ${r.end}] overlaps the previous tensor (which ends at ${cursor})`);
    if (r.begin > cursor) fail(`gap in the data section before tensor '${r.name}' (bytes ${cursor}..${r.begin} belong to no tensor)`);
    cursor = r.end;
  }
  if (cursor !== dataLength)
    fail(`data section is ${dataLength} bytes but the tensors cover ${cursor} (file truncated or has trailing bytes)`);
  return { tensors, metadata, dataStart };
}

async function readExactly(fh: FileHandle, length: number, position: number, file: string): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(out, done, length - done, position + done);
    if (bytesRead === 0) throw new CheckpointError(`${file}: unexpected end of file at byte ${position + done}`);
    done += bytesRead;
  }
  return out;
}

async function readHeaderFrom(fh: FileHandle, file: string): Promise<SafetensorsHeader> {
  const size = (await fh.stat()).size;
  if (size < 8) throw new CheckpointError(`${file}: invalid safetensors file: ${size} bytes is shorter than the 8-byte header length`);
  const lenBytes = await readExactly(fh, 8, 0, file);
  const n = new DataView(lenBytes.buffer).getBigUint64(0, true);
  if (n > BigInt(size - 8)) throw new CheckpointError(`${file}: invalid safetensors file: header length ${n} is beyond the file (${size} bytes)`);
  if (n > BigInt(MAX_HEADER_BYTES)) throw new CheckpointError(`${file}: invalid safetensors file: header length ${n} exceeds ${MAX_HEADER_BYTES}`);
  const headerLen = Number(n);
  const headerBytes = await readExactly(fh, headerLen, 8, file);
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(headerBytes));
  } catch (err) {
    throw new CheckpointError(`${file}: invalid safetensors file: header is not valid JSON (${(err as Error).message})`);
  }
  return validateHeader(raw, 8 + headerLen, size - 8 - headerLen, file);
}

/** Reads and validates only the header of a safetensors file. */
export async function readSafetensorsHeader(file: string): Promise<SafetensorsHeader> {
  const fh = await openForRead(file);
  try {
    return await readHeaderFrom(fh, file);
  } finally {
    await fh.close();
  }
}

async function openForRead(file: string): Promise<FileHandle> {
  try {
    return await open(file, 'r');
  } catch (err) {
    throw new CheckpointError(`${file}: cannot open safetensors file: ${(err as Error).message}`);
  }
}

export interface ReadOptions {
  /** Read only tensors for which this returns true (only their byte ranges are read). */
  only?: (name: string) => boolean;
  /** Read exactly these tensors; a name that is absent is an error. */
  names?: Iterable<string>;
}

export interface SafetensorsContents<T extends StoredTensor = Tensor> {
  tensors: Map<string, T>;
  metadata: Record<string, string>;
  /** Header of every tensor in the file, read or not. */
  header: Map<string, TensorInfo>;
}

/**
 * Reads (selected) tensors of a safetensors file as Float32Array, reading only their byte ranges. U8
 * tensors are refused unless `byteTensors` selects them; those come back as ByteTensor (their bytes).
 */
export function readSafetensors(file: string, options: ReadOptions & { byteTensors: ByteTensorSelector }): Promise<SafetensorsContents<StoredTensor>>;
export function readSafetensors(file: string, options?: ReadOptions & { byteTensors?: undefined }): Promise<SafetensorsContents>;
export async function readSafetensors(file: string, options: ReadOptions & { byteTensors?: ByteTensorSelector } = {}): Promise<SafetensorsContents<StoredTensor>> {
  const fh = await openForRead(file);
  try {
    const header = await readHeaderFrom(fh, file);
    let names: string[];
    if (options.names) {
      names = [...options.names];
      const absent = names.filter((n) => !header.tensors.has(n));
      if (absent.length) throw new CheckpointError(`${file}: tensors not in file: ${absent.join(', ')}`);
    } else {
      names = [...header.tensors.keys()];
    }
    if (options.only) names = names.filter(options.only);
    const tensors = new Map<string, StoredTensor>();
    for (const name of names) {
      const info = header.tensors.get(name)!;
      if (options.byteTensors?.(name)) {
        if (info.dtype !== BYTE_TENSOR_DTYPE)
          throw new CheckpointError(`${file}: tensor '${name}' is read as bytes, so it must be stored as ${BYTE_TENSOR_DTYPE}, not ${info.dtype}`);
        tensors.set(name, { shape: [...info.shape], bytes: await readExactly(fh, info.end - info.begin, info.begin, file) });
        continue;
      }
      if (!(READABLE_DTYPES as readonly string[]).includes(info.dtype))
        throw new CheckpointError(`${file}: tensor '${name}' has dtype ${info.dtype}, which is not supported (supported: ${READABLE_DTYPES.join(', ')})`);
      const bytes = await readExactly(fh, info.end - info.begin, info.begin, file);
      tensors.set(name, { shape: [...info.shape], values: decodeFloats(info.dtype as ReadableDtype, bytes, numElements(info.shape)) });
    }
    return { tensors, metadata: header.metadata, header: header.tensors };
  } finally {
    await fh.close();
  }
}

// ---------------------------------------------------------------- writing

/** Tensors to write: float ones in the file's dtype, ByteTensors as U8. */
export type TensorSource = Map<string, StoredTensor> | Iterable<[string, StoredTensor]>;

function checkTensor(name: string, t: StoredTensor, where: string): void {
  if (name === '' || name === '__metadata__') throw new CheckpointError(`${where}: invalid tensor name '${name}'`);
  if (!t.shape.every(isNonNegInt)) throw new CheckpointError(`${where}: tensor '${name}' has invalid shape ${JSON.stringify(t.shape)}`);
  const n = numElements(t.shape);
  const count = isByteTensor(t) ? t.bytes.length : t.values.length;
  if (count !== n)
    throw new CheckpointError(`${where}: tensor '${name}' has ${count} values but shape ${JSON.stringify(t.shape)} needs ${n}`);
}

/** Builds the header bytes (length prefix + space-padded JSON) and the data section size. */
function buildHeader(
  entries: [string, StoredTensor][], metadata: Record<string, string> | undefined, dtype: WriteDtype, where: string,
): { prefix: Uint8Array; dataBytes: number } {
  const width = dtype === 'F32' ? 4 : 2;
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length) {
    for (const [k, v] of Object.entries(metadata))
      if (typeof v !== 'string') throw new CheckpointError(`${where}: metadata value for '${k}' is not a string`);
    header.__metadata__ = metadata;
  }
  let offset = 0;
  const seen = new Set<string>();
  for (const [name, t] of entries) {
    checkTensor(name, t, where);
    if (seen.has(name)) throw new CheckpointError(`${where}: duplicate tensor name '${name}'`);
    seen.add(name);
    const size = isByteTensor(t) ? t.bytes.length : t.values.length * width;
    header[name] = { dtype: isByteTensor(t) ? BYTE_TENSOR_DTYPE : dtype, shape: t.shape, data_offsets: [offset, offset + size] };
    offset += size;
  }
  let json = JSON.stringify(header);
  let jsonBytes = Buffer.from(json, 'utf8');
  const padded = Math.ceil(jsonBytes.length / 8) * 8;
  if (padded !== jsonBytes.length) {
    json += ' '.repeat(padded - jsonBytes.length);
    jsonBytes = Buffer.from(json, 'utf8');
  }
  const prefix = new Uint8Array(8 + jsonBytes.length);
  new DataView(prefix.buffer).setBigUint64(0, BigInt(jsonBytes.length), true);
  prefix.set(jsonBytes, 8);
  return { prefix, dataBytes: offset };
}

function encodeTensor(t: StoredTensor, dtype: WriteDtype): Uint8Array {
  return isByteTensor(t) ? t.bytes : encodeFloats(t.values, dtype);
}

async function writeAll(fh: FileHandle, bytes: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < bytes.length) {
    const { bytesWritten } = await fh.write(bytes, done, bytes.length - done, position + done);
    done += bytesWritten;
  }
}

/** The whole file in memory (for small files, e.g. as an `extraFiles` entry of saveCheckpoint). */
export function serializeSafetensors(
  tensors: TensorSource, metadata?: Record<string, string>, dtype: WriteDtype = 'F32',
): Buffer {
  const entries = [...tensors];
  const { prefix, dataBytes } = buildHeader(entries, metadata, dtype, 'safetensors');
  const out = Buffer.alloc(prefix.length + dataBytes);
  out.set(prefix, 0);
  let pos = prefix.length;
  for (const [, t] of entries) {
    const bytes = encodeTensor(t, dtype);
    out.set(bytes, pos);
    pos += bytes.length;
  }
  return out;
}

/**
 * Writes a safetensors file tensor by tensor and fsyncs it. Not atomic by itself: write into a
 * temporary path and rename (saveCheckpoint and atomicWriteFile in ./index.js do that).
 */
export async function writeSafetensors(
  file: string, tensors: TensorSource, metadata?: Record<string, string>, dtype: WriteDtype = 'F32',
): Promise<number> {
  const entries = [...tensors];
  const { prefix, dataBytes } = buildHeader(entries, metadata, dtype, file);
  const fh = await open(file, 'w');
  try {
    await writeAll(fh, prefix, 0);
    let pos = prefix.length;
    for (const [, t] of entries) {
      const bytes = encodeTensor(t, dtype);
      await writeAll(fh, bytes, pos);
      pos += bytes.length;
    }
    await fh.sync();
    return prefix.length + dataBytes;
  } finally {
    await fh.close();
  }
}
