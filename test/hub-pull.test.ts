// `switchyard pull` and `--model ORG/NAME` against a stand-in for the Hugging Face Hub on 127.0.0.1: the
// endpoints @huggingface/hub calls (revision → commit with siblings, the recursive expanded tree with LFS
// sha256 and sizes, resolve/<rev>/<file> with a 302 to a CDN path for LFS files, Range requests, ETag,
// X-Repo-Commit, X-Linked-Etag and X-Linked-Size as the Hub sends them), serving a tiny sharded checkpoint.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { existsSync } from 'node:fs';
import { lstat, mkdir, mkdtemp, readFile, readdir, readlink, rm, stat, writeFile } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { parseModelConfig, preset } from '../services/core/config.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { MixtralModel } from '../services/core/model/model.js';
import { runCli } from './support/cli.js';

const REPO = 'acme/tiny-moe';
const TOKEN = 'hf_switchyard_test_token';
const COMMIT = createHash('sha1').update('acme/tiny-moe@main').digest('hex');

interface RepoFile { path: string; data: Buffer; gitSha1: string; sha256: string; lfs: boolean }
interface Seen { method: string; url: string; auth?: string; range?: string }

const root = await mkdtemp(join(tmpdir(), 'switchyard-hub-'));
after(() => rm(root, { recursive: true, force: true }));

/** The Hub stand-in; `cut` cuts the next whole-file CDN answer of a file after half its bytes, `corrupt` flips a byte of it. */
class FakeHub {
  readonly seen: Seen[] = [];
  readonly cut = new Set<string>();
  readonly corrupt = new Set<string>();
  private server!: Server;
  url = '';
  constructor(private readonly files: Map<string, RepoFile>) {}

  async start(): Promise<void> {
    this.server = createServer((req, res) => this.handle(req, res));
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((r) => this.server.close(() => r()));
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url!, this.url);
    this.seen.push({ method: req.method!, url: url.pathname, auth: req.headers.authorization, range: req.headers.range });
    const json = (status: number, body: unknown, headers: Record<string, string> = {}) => {
      res.writeHead(status, { 'content-type': 'application/json', ...headers }).end(JSON.stringify(body));
    };
    const notFound = (code: string) => json(404, { error: `${code}` }, { 'x-error-code': code });
    let m: RegExpMatchArray | null;
    if ((m = url.pathname.match(/^\/api\/models\/([^/]+\/[^/]+)\/revision\/([^/]+)$/))) {
      if (m[1] !== REPO) return notFound('RepoNotFound');
      const rev = decodeURIComponent(m[2]);
      if (rev !== 'main' && rev !== COMMIT) return notFound('RevisionNotFound');
      return json(200, {
        _id: '0123456789abcdef01234567', id: REPO, modelId: REPO, sha: COMMIT, private: false, gated: false, downloads: 0, likes: 0,
        lastModified: '2026-12-01T00:00:00.000Z', pipeline_tag: 'text-generation', tags: ['safetensors', 'mixtral'],
        siblings: [...this.files.keys()].map((rfilename) => ({ rfilename })),
      });
    }
    if ((m = url.pathname.match(/^\/api\/models\/([^/]+\/[^/]+)\/tree\/([^/]+)$/))) {
      if (m[1] !== REPO) return notFound('RepoNotFound');
      if (decodeURIComponent(m[2]) !== COMMIT && m[2] !== 'main') return notFound('RevisionNotFound');
      return json(200, [...this.files.values()].map((f) => ({
        type: 'file', oid: f.gitSha1, size: f.data.length, path: f.path,
        ...(f.lfs ? { lfs: { oid: f.sha256, size: f.data.length, pointerSize: 134 } } : {}),
      })));
    }
    if ((m = url.pathname.match(/^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/))) {
      const f = this.files.get(decodeURIComponent(m[3]));
      if (m[1] !== REPO || !f) return notFound('EntryNotFound');
      const common = { 'x-repo-commit': COMMIT, 'access-control-expose-headers': 'X-Repo-Commit,X-Linked-Etag,X-Linked-Size,ETag' };
      if (f.lfs) {
        // The Hub answers LFS files with a redirect to its CDN, naming the blob in X-Linked-Etag.
        res.writeHead(302, {
          ...common, location: `/cdn/${f.sha256}?file=${encodeURIComponent(f.path)}`, etag: `"${f.gitSha1}"`,
          'x-linked-etag': `"${f.sha256}"`, 'x-linked-size': String(f.data.length), 'content-length': '0',
        }).end();
        return;
      }
      return this.send(req, res, f, { ...common, etag: `"${f.gitSha1}"` });
    }
    if ((m = url.pathname.match(/^\/cdn\/([0-9a-f]{64})$/))) {
      const f = [...this.files.values()].find((x) => x.sha256 === m![1] && x.lfs);
      if (!f) return notFound('EntryNotFound');
      return this.send(req, res, f, { etag: `"${f.sha256}"` });
    }
    notFound('NotFound');
  }

  /** A file body, honouring Range: bytes=A-B (206 with Content-Range) as the Hub and its CDN do. */
  private send(req: IncomingMessage, res: ServerResponse, f: RepoFile, headers: Record<string, string>): void {
    let data = f.data;
    if (this.corrupt.has(f.path)) {
      data = Buffer.from(data);
      data[data.length - 1] ^= 0xff;
    }
    const range = req.headers.range?.match(/^bytes=(\d+)-(\d*)$/);
    const base = { ...headers, 'accept-ranges': 'bytes', 'content-type': 'application/octet-stream' };
    if (range) {
      const start = Number(range[1]);
      const end = range[2] ? Math.min(Number(range[2]), data.length - 1) : data.length - 1;
      res.writeHead(206, { ...base, 'content-range': `bytes ${start}-${end}/${data.length}`, 'content-length': String(end - start + 1) });
      res.end(data.subarray(start, end + 1));
      return;
    }
    if (this.cut.delete(f.path)) {
      // The connection dies half-way through the file.
      res.writeHead(200, { ...base, 'content-length': String(data.length) });
      res.write(data.subarray(0, data.length >> 1), () => setTimeout(() => res.socket?.destroy(), 50));
      return;
    }
    res.writeHead(200, { ...base, 'content-length': String(data.length) }).end(data);
  }
}

const gitSha1 = (data: Buffer) => createHash('sha1').update(`blob ${data.length}\0`).update(data).digest('hex');
const sha256 = (data: Buffer) => createHash('sha256').update(data).digest('hex');

describe('switchyard pull from a Hugging Face Hub stand-in', () => {
  let hub: FakeHub;
  let files: Map<string, RepoFile>;
  let shards: string[];
  const cache = join(root, 'hf-cache');
  const env = () => ({ HF_ENDPOINT: hub.url, HF_HUB_CACHE: cache, HF_TOKEN: TOKEN, HF_HOME: join(root, 'unused-home') });
  const storage = join(cache, 'models--acme--tiny-moe');
  const snapshot = join(storage, 'snapshots', COMMIT);

  before(async () => {
    await initBackend();
    const dir = join(root, 'published');
    const model = MixtralModel.initialize(parseModelConfig({ ...preset('tiny').model, initializer_range: 0.2 }), 7);
    await saveModel(dir, model, undefined, { maxShardBytes: 40_000 });
    model.dispose();
    await writeFile(join(dir, 'generation_config.json'), JSON.stringify({ bos_token_id: 1, eos_token_id: 2 }));
    await writeFile(join(dir, 'README.md'), '# tiny-moe\nnot needed for serving\n');
    await writeFile(join(dir, 'pytorch_model.bin'), 'weights in another format: never pulled');
    files = new Map();
    for (const path of await readdir(dir)) {
      const data = await readFile(join(dir, path));
      files.set(path, { path, data, gitSha1: gitSha1(data), sha256: sha256(data), lfs: /\.(safetensors|bin)$/.test(path) });
    }
    shards = [...files.keys()].filter((p) => p.endsWith('.safetensors')).sort();
    assert.ok(shards.length >= 2 && files.has('model.safetensors.index.json'), `a sharded checkpoint: ${[...files.keys()].join(', ')}`);
    hub = new FakeHub(files);
    await hub.start();
  });
  after(() => hub?.close());

  test('an interrupted pull resumes with a Range request; the cache has the Hugging Face layout; HF_TOKEN is sent', async () => {
    const big = shards[shards.length - 1];
    const bigFile = files.get(big)!;
    hub.cut.add(big);
    const broken = await runCli(['pull', REPO], env());
    assert.notEqual(broken.code, 0, broken.stdout);
    assert.match(broken.stderr, new RegExp(`${big.replace(/\./g, '\\.')}: the download broke after \\d+ of ${bigFile.data.length} bytes.*pull again to resume`));
    const partial = join(storage, 'blobs', `${bigFile.sha256}.incomplete`);
    const kept = (await stat(partial)).size;
    assert.ok(kept > 0 && kept < bigFile.data.length, `kept ${kept} bytes`);

    hub.seen.length = 0;
    const r = await runCli(['pull', REPO], env());
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), snapshot);
    assert.match(r.stderr, new RegExp(`${big.replace(/\./g, '\\.')}: resuming at byte ${kept} of ${bigFile.data.length}`));
    const ranged = hub.seen.filter((s) => s.url === `/cdn/${bigFile.sha256}` && s.range === `bytes=${kept}-${bigFile.data.length - 1}`);
    assert.equal(ranged.length, 1, JSON.stringify(hub.seen.filter((s) => s.url.startsWith('/cdn/'))));
    // Every request to the Hub's own endpoints carried the token.
    for (const s of hub.seen.filter((x) => !x.url.startsWith('/cdn/'))) assert.equal(s.auth, `Bearer ${TOKEN}`, s.url);
    assert.ok(hub.seen.some((s) => s.url.startsWith('/api/models/acme/tiny-moe/revision/main')));

    // refs/main → the commit; snapshots/<commit>/<file> → ../../blobs/<etag> (LFS sha256, else git blob id).
    assert.equal(await readFile(join(storage, 'refs', 'main'), 'utf8'), COMMIT);
    const pulled = (await readdir(snapshot)).sort();
    const expected = [...files.keys()].filter((p) => p !== 'README.md' && p !== 'pytorch_model.bin').sort();
    assert.deepEqual(pulled, expected);
    for (const path of pulled) {
      const f = files.get(path)!;
      const pointer = join(snapshot, path);
      assert.ok((await lstat(pointer)).isSymbolicLink(), path);
      assert.equal(await readlink(pointer), join('..', '..', 'blobs', f.lfs ? f.sha256 : f.gitSha1));
      assert.deepEqual(await readFile(pointer), f.data, path);
    }
    assert.equal((await readdir(join(storage, 'blobs'))).filter((b) => b.endsWith('.incomplete')).length, 0);

    // A second pull finds everything cached and downloads nothing.
    hub.seen.length = 0;
    const again = await runCli(['pull', REPO], env());
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stderr, /0 bytes downloaded/);
    assert.equal(hub.seen.filter((s) => s.url.startsWith('/cdn/') || s.url.includes('/resolve/')).length, 0);
  });

  test('import ORG/NAME[@COMMIT] and generate --model ORG/NAME use the cached snapshot', async () => {
    const imported = await runCli(['import', REPO, '--shards', '2'], env());
    assert.equal(imported.code, 0, imported.stderr);
    assert.match(imported.stdout, new RegExp(`${snapshot}: ready to serve`));
    const pinned = await runCli(['import', `${REPO}@${COMMIT}`, '--json'], env());
    assert.equal(pinned.code, 0, pinned.stderr);
    assert.equal(JSON.parse(pinned.stdout).dir, snapshot);
    // --link: the fixed folder compose and k8s serve (/models/default) becomes a relative link to the snapshot.
    const linkPath = join(root, 'models', 'default');
    for (let i = 0; i < 2; i++) {
      const linked = await runCli(['pull', REPO, '--link', linkPath], env());
      assert.equal(linked.code, 0, linked.stderr);
      assert.equal(await readlink(linkPath), join('..', 'hf-cache', 'models--acme--tiny-moe', 'snapshots', COMMIT));
    }
    const viaLink = await runCli(['import', linkPath], env());
    assert.equal(viaLink.code, 0, viaLink.stderr);
    const folder = join(root, 'models', 'trained');
    await mkdir(folder, { recursive: true });
    const kept = await runCli(['pull', REPO, '--link', folder], env());
    assert.equal(kept.code, 2);
    assert.match(kept.stderr, /--link .*trained: there is a folder there, not a link/);
    const gen = await runCli(['generate', '--model', REPO, '--prompt', 'Ahab', '--max-tokens', '4', '--temperature', '0'], env());
    assert.equal(gen.code, 0, gen.stderr);
    assert.ok(gen.stdout.startsWith('Ahab'), gen.stdout);
  });

  test('a name that is not cached is refused clearly, and --pull fetches it', async () => {
    const missing = await runCli(['generate', '--model', 'acme/not-pulled', '--max-tokens', '1'], env());
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /--model acme\/not-pulled: neither a folder nor a cached Hugging Face model \(no main snapshot of acme\/not-pulled in .*hf-cache\); run 'switchyard pull acme\/not-pulled' or add --pull/);
    // Every command that takes a checkpoint folder resolves names the same way, before it starts anything.
    for (const args of [['serve', 'expert', '--checkpoint', 'acme/not-pulled'], ['serve', 'router', '--checkpoint', 'acme/not-pulled', '--coordinator', '127.0.0.1:1'], ['up', '--model', 'acme/not-pulled']]) {
      const r = await runCli(args, env());
      assert.equal(r.code, 2, args.join(' '));
      assert.match(r.stderr, /(--checkpoint|--model) acme\/not-pulled: neither a folder nor a cached Hugging Face model/, args.join(' '));
    }
    const otherRev = await runCli(['import', `${REPO}@v2`], env());
    assert.equal(otherRev.code, 2);
    assert.match(otherRev.stderr, /no v2 snapshot of acme\/tiny-moe/);
    const notOnHub = await runCli(['pull', 'acme/not-there'], env());
    assert.equal(notOnHub.code, 2);
    assert.match(notOnHub.stderr, /pull acme\/not-there: resolving main at .* failed: .*no such repository or revision/);

    const fresh = { ...env(), HF_HUB_CACHE: join(root, 'fresh-cache') };
    const pulled = await runCli(['import', REPO, '--pull'], fresh);
    assert.equal(pulled.code, 0, pulled.stderr);
    assert.match(pulled.stdout, /fresh-cache\/models--acme--tiny-moe\/snapshots\/[0-9a-f]{40}: ready to serve/);
  });

  test('a corrupted file (sha256 not the listed LFS oid) is named, removed and refused', async () => {
    const cache2 = join(root, 'corrupt-cache');
    const victim = shards[0];
    const f = files.get(victim)!;
    hub.corrupt.add(victim);
    try {
      const r = await runCli(['pull', REPO], { ...env(), HF_HUB_CACHE: cache2 });
      assert.equal(r.code, 2, r.stdout);
      assert.match(r.stderr, new RegExp(`${victim.replace(/\./g, '\\.')}: corrupted download refused \\(sha256 is not the LFS oid ${f.sha256}\\)`));
      const blobs = join(cache2, 'models--acme--tiny-moe', 'blobs');
      assert.ok(!existsSync(join(blobs, f.sha256)) && !existsSync(join(blobs, `${f.sha256}.incomplete`)));
      assert.ok(!existsSync(join(cache2, 'models--acme--tiny-moe', 'snapshots', COMMIT, victim)));
      // Nothing half-pulled passes for a model: the ref is written only once every file is in.
      const refused = await runCli(['import', REPO], { ...env(), HF_HUB_CACHE: cache2 });
      assert.equal(refused.code, 2);
    } finally {
      hub.corrupt.delete(victim);
    }
    const healed = await runCli(['pull', REPO], { ...env(), HF_HUB_CACHE: cache2 });
    assert.equal(healed.code, 0, healed.stderr);
  });
});
