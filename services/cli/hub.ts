// Models on the Hugging Face Hub: `switchyard pull ORG/NAME[@REVISION]` fills the standard Hugging Face
// cache (the layout Python's huggingface_hub and @huggingface/hub share), and `--model ORG/NAME[@REV]`
// (up, generate, import, serve --checkpoint) resolves a name to its cached snapshot folder.
//
// @huggingface/hub does the Hub protocol: revision → commit (modelInfo), the file listing with LFS
// sha256 and sizes (listFiles), the resolve → CDN redirect, ETag and X-Linked-Size (fileDownloadInfo /
// downloadFile, including Xet-stored files), ranged reads (WebBlob.slice), the cache paths
// (getHFHubCachePath, getRepoFolderName) and the relative snapshot symlinks as Python makes them. What it
// lacks is written here: only the files serving needs (its snapshotDownload takes the whole repository),
// resuming a `.incomplete` blob with a Range request (its downloadFileToCacheDir starts over), checking
// sizes and hashes (LFS sha256, git blob sha1) before a blob enters the cache, and a progress bar.
import { createHash, type Hash } from 'node:crypto';
import { existsSync, statSync, createReadStream } from 'node:fs';
import { lstat, mkdir, open, readFile, readlink, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { dirname, join, relative, resolve } from 'node:path';
import { DownloadProgress } from './progress.js';
import { downloadFile, getHFHubCachePath, getRepoFolderName, listFiles, modelInfo, type ListFileEntry } from '@huggingface/hub';
import { ConfigError } from '../core/config.js';

export const DEFAULT_HUB_URL = 'https://huggingface.co';
const COMMIT = /^[0-9a-f]{40}$/;
/** ORG/NAME[@REVISION], as on the Hub (a revision may itself contain '/', e.g. refs/pr/1). */
const HUB_NAME = /^([A-Za-z0-9][\w.-]*)\/([A-Za-z0-9][\w.-]*)(?:@(.+))?$/;

/** Besides the weights: what serving reads from a model folder, each when the repository has it. */
export const PULLED_FILES = [
  'config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja',
];
const INDEX_FILE = 'model.safetensors.index.json';
const SINGLE_FILE = 'model.safetensors';

export interface HubName { repo: string; revision: string; spec: string }

export function parseHubName(spec: string): HubName | undefined {
  const m = spec.match(HUB_NAME);
  if (!m) return undefined;
  return { repo: `${m[1]}/${m[2]}`, revision: m[3] ?? 'main', spec };
}

/** $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (the library's rule, as Python's). */
export function hubCacheDir(): string {
  return resolve(getHFHubCachePath());
}

export function hubEndpoint(): string {
  return (process.env.HF_ENDPOINT || DEFAULT_HUB_URL).replace(/\/+$/, '');
}

function hubToken(): string | undefined {
  return process.env.HF_TOKEN || undefined;
}

/** models--ORG--NAME in the cache. */
export function repoCacheDir(repo: string, cacheDir = hubCacheDir()): string {
  return join(cacheDir, getRepoFolderName({ type: 'model', name: repo }));
}

/** The cached snapshot folder of a name, or undefined when the revision or its snapshot is not cached. */
export async function cachedSnapshot(name: HubName, cacheDir = hubCacheDir()): Promise<string | undefined> {
  const storage = repoCacheDir(name.repo, cacheDir);
  let commit = name.revision;
  if (!COMMIT.test(commit)) {
    try {
      commit = (await readFile(join(storage, 'refs', name.revision), 'utf8')).trim();
    } catch {
      return undefined;
    }
  }
  const snapshot = join(storage, 'snapshots', commit);
  return existsSync(join(snapshot, 'config.json')) ? snapshot : undefined;
}

/**
 * A --model / --checkpoint / import value: an existing folder is itself; ORG/NAME[@REV] is its cached
 * snapshot (pulled first with `pull`), an error naming the cache when it is not there; anything else is
 * returned resolved, for the caller's own "no config.json there" message.
 */
export async function resolveModelDir(spec: string, options: { pull?: boolean; flag?: string; log?: (line: string) => void } = {}): Promise<string> {
  const flag = options.flag ?? '--model';
  if (existsSync(spec) && statSync(spec).isDirectory()) return resolve(spec);
  const name = parseHubName(spec);
  if (!name) {
    if (options.pull) throw new ConfigError(`${flag} ${spec} --pull: not a Hugging Face name (ORG/NAME[@REVISION])`);
    return resolve(spec);
  }
  if (options.pull) return (await pullModel(name, { log: options.log })).snapshot;
  const snapshot = await cachedSnapshot(name);
  if (snapshot) return snapshot;
  throw new ConfigError(
    `${flag} ${spec}: neither a folder nor a cached Hugging Face model (no ${name.revision} snapshot of ${name.repo} in ${hubCacheDir()}); ` +
    `run 'switchyard pull ${spec}' or add --pull`,
  );
}

/** The served model's name for a cache snapshot folder (…/models--ORG--NAME/snapshots/<commit>): ORG/NAME. */
export function hubNameOfSnapshot(dir: string): string | undefined {
  const m = resolve(dir).match(/(?:^|[\\/])models--([^\\/]+?)--([^\\/]+)[\\/]snapshots[\\/][0-9a-f]{40}$/);
  return m ? `${m[1]}/${m[2]}` : undefined;
}

export class PullError extends Error {
  override name = 'ConfigError'; // reported as a known failure by the CLI (exit 2, no stack)
}

interface Wanted { path: string; size: number; etag: string; sha256?: string; gitSha1?: string }

function wanted(entry: ListFileEntry): Wanted {
  // The blob name, as @huggingface/hub's downloadFileToCacheDir names it (and Python: the LFS sha256,
  // else the git blob id), so either client finds the other's blobs.
  const etag = entry.lfs?.oid ?? entry.xetHash ?? entry.oid;
  if (!etag) throw new PullError(`${entry.path}: the Hub listing gives no id for it`);
  return { path: entry.path, size: entry.lfs?.size ?? entry.size, etag, sha256: entry.lfs?.oid, gitSha1: entry.lfs ? undefined : entry.oid };
}

export interface PullResult { repo: string; revision: string; commit: string; snapshot: string; files: string[]; downloadedBytes: number }

export interface PullOptions {
  cacheDir?: string; hubUrl?: string; token?: string;
  log?: (line: string) => void;
  /** Draw a progress bar (default: when stderr is a TTY); else one line per file. */
  bar?: boolean;
}

/** Downloads what serving needs of a model repository into the Hugging Face cache; returns its snapshot folder. */
export async function pullModel(name: HubName, options: PullOptions = {}): Promise<PullResult> {
  const log = options.log ?? ((line: string) => process.stderr.write(line + '\n'));
  const cacheDir = resolve(options.cacheDir ?? hubCacheDir());
  const hubUrl = (options.hubUrl ?? hubEndpoint()).replace(/\/+$/, '');
  const accessToken = options.token ?? hubToken();
  const repo = { type: 'model' as const, name: name.repo };
  const common = { hubUrl, ...(accessToken ? { accessToken } : {}) };
  const failed = (what: string, err: unknown): never => {
    if (err instanceof PullError) throw err;
    const e = err as Error & { statusCode?: number };
    const hint = e.statusCode === 401 || e.statusCode === 403 ? ' (a gated or private model needs HF_TOKEN)' : e.statusCode === 404 ? ' (no such repository or revision)' : '';
    throw new PullError(`pull ${name.spec}: ${what} at ${hubUrl} failed: ${e.message}${hint}`);
  };

  let commit: string;
  try {
    commit = (await modelInfo({ ...common, name: name.repo, revision: name.revision, additionalFields: ['sha'] })).sha as string;
  } catch (err) {
    return failed(`resolving ${name.revision}`, err);
  }
  if (!commit || !COMMIT.test(commit)) throw new PullError(`pull ${name.spec}: the Hub answered no commit for ${name.revision}`);

  const listing = new Map<string, ListFileEntry>();
  try {
    for await (const entry of listFiles({ ...common, repo, revision: commit, recursive: true, expand: true })) {
      if (entry.type === 'file') listing.set(entry.path, entry);
    }
  } catch (err) {
    return failed('listing the files', err);
  }

  const storage = join(cacheDir, getRepoFolderName(repo));
  const snapshot = join(storage, 'snapshots', commit);
  const fetchOne = (file: Wanted, bar: DownloadProgress) => fetchToCache({ repo, common, commit, storage, snapshot, file, bar, log });

  if (!listing.has('config.json')) throw new PullError(`pull ${name.spec}: the repository has no config.json at ${commit.slice(0, 12)}`);
  const first = PULLED_FILES.filter((f) => listing.has(f)).map((f) => wanted(listing.get(f)!));
  let weights: Wanted[];
  if (listing.has(INDEX_FILE)) {
    first.push(wanted(listing.get(INDEX_FILE)!));
    weights = []; // named by the index, read once it is here
  } else if (listing.has(SINGLE_FILE)) {
    weights = [wanted(listing.get(SINGLE_FILE)!)];
  } else {
    throw new PullError(`pull ${name.spec}: the repository has neither ${SINGLE_FILE} nor ${INDEX_FILE} (only .safetensors weights are served)`);
  }

  const bar = new DownloadProgress(options.bar ?? process.stderr.isTTY === true, log);
  let downloaded = 0;
  try {
    bar.add(first.reduce((a, f) => a + f.size, 0));
    for (const f of first) downloaded += await fetchOne(f, bar);
    if (listing.has(INDEX_FILE)) {
      const index = JSON.parse(await readFile(join(snapshot, INDEX_FILE), 'utf8')) as { weight_map?: Record<string, string> };
      const shards = [...new Set(Object.values(index.weight_map ?? {}))].sort();
      if (!shards.length) throw new PullError(`pull ${name.spec}: ${INDEX_FILE} names no weight files`);
      for (const s of shards) {
        if (!listing.has(s)) throw new PullError(`pull ${name.spec}: ${INDEX_FILE} names ${s}, which the repository does not have`);
        weights.push(wanted(listing.get(s)!));
      }
    }
    bar.add(weights.reduce((a, f) => a + f.size, 0));
    for (const f of weights) downloaded += await fetchOne(f, bar);
  } finally {
    bar.stop();
  }

  if (name.revision !== commit) {
    await mkdir(dirname(join(storage, 'refs', name.revision)), { recursive: true });
    await writeFile(join(storage, 'refs', name.revision), commit);
  }
  return { repo: name.repo, revision: name.revision, commit, snapshot, files: [...first, ...weights].map((f) => f.path), downloadedBytes: downloaded };
}

/**
 * Points `path` at a snapshot with a relative symlink (replaced atomically when it is already a link), so
 * services configured with a fixed folder (/models/default in compose and k8s) serve the pulled model.
 * A real folder there (a trained model) is not replaced.
 */
export async function linkSnapshot(path: string, snapshot: string): Promise<void> {
  const target = resolve(path);
  const existing = await lstat(target).catch(() => undefined);
  if (existing && !existing.isSymbolicLink()) throw new PullError(`--link ${path}: there is a ${existing.isDirectory() ? 'folder' : 'file'} there, not a link; move it away or link elsewhere`);
  await mkdir(dirname(target), { recursive: true });
  const staging = `${target}.link-${process.pid}`;
  await rm(staging, { force: true });
  await symlink(relative(dirname(target), snapshot), staging);
  await rename(staging, target);
}

async function size(path: string): Promise<number | undefined> {
  try {
    return (await stat(path)).size;
  } catch {
    return undefined;
  }
}

/** The symlink snapshots/<commit>/<file> → ../../blobs/<etag>, relative as Python and the library make it. */
async function link(blob: string, pointer: string): Promise<void> {
  await mkdir(dirname(pointer), { recursive: true });
  const target = relative(dirname(pointer), blob);
  try {
    if ((await lstat(pointer)).isSymbolicLink() && (await readlink(pointer)) === target) return;
    await rm(pointer, { force: true });
  } catch {
    // not there yet
  }
  await symlink(target, pointer);
}

function gitBlobHasher(total: number): Hash {
  return createHash('sha1').update(`blob ${total}\0`);
}

/** One file into blobs/ (resuming its .incomplete), checked, then linked into the snapshot; returns the bytes fetched. */
async function fetchToCache(a: {
  repo: { type: 'model'; name: string }; common: { hubUrl: string; accessToken?: string }; commit: string;
  storage: string; snapshot: string; file: Wanted; bar: DownloadProgress; log: (line: string) => void;
}): Promise<number> {
  const { file, bar } = a;
  const blob = join(a.storage, 'blobs', file.etag);
  const pointer = join(a.snapshot, file.path);
  const have = await size(blob);
  if (have !== undefined) {
    // Blobs enter the cache only checked; a size that no longer matches is a damaged cache.
    if (have !== file.size) throw new PullError(`${file.path}: the cached blob ${blob} has ${have} bytes, the Hub lists ${file.size}; delete it and pull again`);
    await link(blob, pointer);
    bar.advance(file.size, file.path);
    bar.line(`${file.path}: cached (${file.size} bytes)`);
    return 0;
  }
  await mkdir(dirname(blob), { recursive: true });
  const incomplete = `${blob}.incomplete`;
  let offset = (await size(incomplete)) ?? 0;
  if (offset > file.size) {
    await rm(incomplete, { force: true });
    offset = 0;
  }
  // The hashes cover the whole file: what an earlier pull left first, then what arrives.
  const sha256 = file.sha256 ? createHash('sha256') : undefined;
  const sha1 = file.gitSha1 ? gitBlobHasher(file.size) : undefined;
  if (offset > 0) {
    for await (const chunk of createReadStream(incomplete, { end: offset - 1 })) {
      sha256?.update(chunk as Buffer);
      sha1?.update(chunk as Buffer);
    }
    bar.line(`${file.path}: resuming at byte ${offset} of ${file.size}`);
  }
  bar.advance(offset, file.path);
  let fetched = 0;
  if (offset < file.size) {
    let source: Blob | null;
    try {
      source = await downloadFile({ ...a.common, repo: a.repo, path: file.path, revision: a.commit });
    } catch (err) {
      throw new PullError(`${file.path}: ${(err as Error).message}`);
    }
    if (!source) throw new PullError(`${file.path}: the Hub has no such file at ${a.commit}`);
    if (source.size !== file.size) throw new PullError(`${file.path}: the Hub serves ${source.size} bytes, its listing says ${file.size}`);
    // A slice from `offset` is fetched with Range: bytes=offset-(size-1).
    const body = (offset > 0 ? source.slice(offset) : source).stream() as ReadableStream<Uint8Array>;
    const out = await open(incomplete, 'a');
    try {
      // Each chunk is on disk before the next is read, so a cut connection leaves every byte that came.
      for await (const chunk of body) {
        if (offset + fetched + chunk.byteLength > file.size) throw new PullError(`${file.path}: the Hub sent more than the ${file.size} bytes listed`);
        await out.write(chunk);
        sha256?.update(chunk);
        sha1?.update(chunk);
        fetched += chunk.byteLength;
        bar.advance(chunk.byteLength, file.path);
      }
    } catch (err) {
      if (err instanceof PullError) throw err;
      throw new PullError(`${file.path}: the download broke after ${offset + fetched} of ${file.size} bytes (${(err as Error).message}); pull again to resume`);
    } finally {
      await out.close();
    }
  }
  const got = (await size(incomplete)) ?? 0;
  if (got !== file.size) throw new PullError(`${file.path}: got ${got} of the ${file.size} bytes listed; pull again to resume`);
  const mismatch = sha256 && sha256.digest('hex') !== file.sha256 ? `sha256 is not the LFS oid ${file.sha256}`
    : sha1 && sha1.digest('hex') !== file.gitSha1 ? `git blob id is not ${file.gitSha1}` : undefined;
  if (mismatch) {
    await rm(incomplete, { force: true });
    throw new PullError(`${file.path}: corrupted download refused (${mismatch}); removed it, pull again to fetch it anew`);
  }
  await rename(incomplete, blob);
  await link(blob, pointer);
  if (fetched) bar.line(`${file.path}: ${offset ? 'resumed, ' : ''}${offset + fetched} bytes${file.sha256 ? ', sha256 checked' : file.gitSha1 ? ', git blob id checked' : ''}`);
  return fetched;
}
