import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BatchSampler, CorpusError, loadCorpus, splitCorpus } from '../services/core/data/corpus.js';
import { Rng } from '../services/core/data/random.js';

let root: string;
before(() => {
  root = mkdtempSync(join(tmpdir(), 'switchyard-corpus-'));
});
after(() => {
  rmSync(root, { recursive: true, force: true });
});

const text = (b: Uint8Array) => new TextDecoder().decode(b);

async function assertCorpusError(p: Promise<unknown>, pattern: RegExp): Promise<void> {
  await assert.rejects(p, (err: Error) => {
    assert.ok(err instanceof CorpusError, `${err.name}: ${err.message}`);
    assert.equal(err.name, 'CorpusError');
    assert.match(err.message, pattern);
    return true;
  });
}

describe('loadCorpus', () => {
  test('default corpus is Moby Dick', async () => {
    const { bytes, source } = await loadCorpus();
    assert.ok(bytes.length > 1_000_000, `${bytes.length} bytes`);
    assert.match(source, /Moby Dick/);
    const s = text(bytes);
    assert.ok(s.startsWith('CONTENTS'), s.slice(0, 40));
    assert.ok(s.includes('Call me Ishmael.'));
  });

  test('a folder is its non-hidden files in sorted path order joined by newlines', async () => {
    const dir = join(root, 'folder');
    mkdirSync(join(dir, 'sub', 'deeper'), { recursive: true });
    mkdirSync(join(dir, '.git'));
    writeFileSync(join(dir, 'b.txt'), 'B');
    writeFileSync(join(dir, 'a.txt'), 'A');
    writeFileSync(join(dir, 'sub', 'deeper', 'd.txt'), 'D');
    writeFileSync(join(dir, 'sub', 'c.txt'), 'C');
    writeFileSync(join(dir, 'sub-x.txt'), 'X');
    writeFileSync(join(dir, '.hidden'), 'H');
    writeFileSync(join(dir, '.git', 'config'), 'G');
    writeFileSync(join(dir, 'é.txt'), 'é');
    const { bytes, source } = await loadCorpus(dir);
    assert.equal(source, dir);
    // '-' (0x2d) sorts before '/' (0x2f); non-ASCII names after ASCII ones.
    assert.equal(text(bytes), 'A\nB\nX\nC\nD\né');
  });

  test('a single file gives its bytes', async () => {
    const file = join(root, 'one.txt');
    writeFileSync(file, 'héllo\nworld\n');
    const { bytes } = await loadCorpus(file);
    assert.deepEqual(Buffer.from(bytes), Buffer.from('héllo\nworld\n'));
  });

  test('invalid UTF-8, empty and missing inputs are CorpusErrors', async () => {
    const bad = join(root, 'bad.bin');
    writeFileSync(bad, Buffer.from([0x68, 0x69, 0x20, 0xc3, 0x28, 0x21]));
    await assertCorpusError(loadCorpus(bad), new RegExp(`${bad}.*not valid UTF-8`));
    const badDir = join(root, 'baddir');
    mkdirSync(badDir);
    writeFileSync(join(badDir, 'ok.txt'), 'fine');
    writeFileSync(join(badDir, 'z.bin'), Buffer.from([0xff, 0xfe, 0x00]));
    await assertCorpusError(loadCorpus(badDir), /z\.bin is not valid UTF-8/);
    const empty = join(root, 'empty.txt');
    writeFileSync(empty, '');
    await assertCorpusError(loadCorpus(empty), /empty/);
    const emptyDir = join(root, 'emptydir');
    mkdirSync(emptyDir);
    await assertCorpusError(loadCorpus(emptyDir), /no \(non-hidden\) files/);
    await assertCorpusError(loadCorpus(join(root, 'missing.txt')), /missing\.txt/);
  });
});

describe('splitCorpus', () => {
  test('the last fraction is validation', () => {
    const bytes = new Uint8Array(1000).map((_, i) => i % 251);
    const { train, validation } = splitCorpus(bytes, 0.1);
    assert.equal(train.length, 900);
    assert.equal(validation.length, 100);
    assert.equal(validation[0], bytes[900]);
    assert.throws(() => splitCorpus(bytes, 1), CorpusError);
    assert.throws(() => splitCorpus(bytes, -0.1), CorpusError);
  });
});

describe('Rng', () => {
  test('is deterministic, restorable and roughly uniform/normal', () => {
    const a = new Rng(42);
    const b = new Rng(42);
    const xs = Array.from({ length: 10 }, () => a.next());
    assert.deepEqual(xs, Array.from({ length: 10 }, () => b.next()));
    assert.notDeepEqual(xs, Array.from({ length: 10 }, () => new Rng(43).next()));
    assert.notDeepEqual(new Rng(1).state(), new Rng(1 + 2 ** 32).state());
    const saved = JSON.parse(JSON.stringify(a.state()));
    const c = Rng.fromState(saved);
    assert.deepEqual(Array.from({ length: 20 }, () => c.nextInt(1000)), Array.from({ length: 20 }, () => a.nextInt(1000)));
    const r = new Rng(7);
    let sum = 0;
    let sq = 0;
    const counts = new Array(10).fill(0);
    const n = 20000;
    for (let i = 0; i < n; i++) {
      const u = r.next();
      assert.ok(u >= 0 && u < 1);
      counts[r.nextInt(10)]++;
      const z = r.normal();
      sum += z;
      sq += z * z;
    }
    assert.ok(Math.abs(sum / n) < 0.05, `mean ${sum / n}`);
    assert.ok(Math.abs(sq / n - 1) < 0.05, `variance ${sq / n}`);
    for (const k of counts) assert.ok(Math.abs(k - n / 10) < 300, `counts ${counts}`);
    assert.throws(() => Rng.fromState([1, 2, 3]), RangeError);
  });
});

describe('BatchSampler', () => {
  const corpus = new TextEncoder().encode('The quick brown fox jumps over the lazy dog. '.repeat(40) + 'ünïcødé ✓');

  test('same seed gives the same batches; targets are inputs shifted by one', () => {
    const a = new BatchSampler(corpus, 16, 4, 123);
    const b = new BatchSampler(corpus, 16, 4, 123);
    const c = new BatchSampler(corpus, 16, 4, 124);
    const ba = a.next();
    assert.deepEqual(ba, b.next());
    assert.notDeepEqual(ba, c.next());
    assert.equal(ba.inputs.length, 64);
    assert.equal(ba.targets.length, 64);
    for (let s = 0; s < 4; s++) {
      const row = ba.inputs.subarray(s * 16, s * 16 + 16);
      const trow = ba.targets.subarray(s * 16, s * 16 + 16);
      for (let t = 0; t < 15; t++) assert.equal(trow[t], row[t + 1]);
      // The window really occurs in the corpus.
      const window = [...row, trow[15]!];
      const hay = Buffer.from(corpus);
      assert.ok(hay.indexOf(Buffer.from(window)) >= 0);
    }
    assert.ok(ba.inputs.every((x) => x >= 0 && x <= 255));
  });

  test('restoring from a serialised state continues identically', () => {
    const a = new BatchSampler(corpus, 8, 3, 9);
    a.next();
    a.next();
    const saved = JSON.parse(JSON.stringify(a.state()));
    const b = BatchSampler.restore(corpus, saved);
    for (let i = 0; i < 5; i++) assert.deepEqual(b.next(), a.next());
    assert.equal(b.count, 7);
    const other = corpus.slice();
    other[0] = 0x41;
    assert.throws(() => BatchSampler.restore(other, saved), CorpusError);
  });

  test('every offset can be drawn, including the last window', () => {
    const small = new Uint8Array([0, 1, 2, 3, 4]);
    const s = new BatchSampler(small, 4, 1, 1);
    const firsts = new Set<number>();
    for (let i = 0; i < 100; i++) {
      const { inputs, targets } = s.next();
      firsts.add(inputs[0]!);
      assert.equal(targets[3], inputs[0]! + 4);
    }
    assert.deepEqual([...firsts].sort(), [0]);
    const s2 = new BatchSampler(small, 3, 1, 1);
    const f2 = new Set<number>();
    for (let i = 0; i < 100; i++) f2.add(s2.next().inputs[0]!);
    assert.deepEqual([...f2].sort(), [0, 1]);
  });

  test('a corpus or split shorter than seqLen+1 is a CorpusError', () => {
    assert.throws(() => new BatchSampler(new Uint8Array(8), 8, 2, 1), CorpusError);
    const { validation } = splitCorpus(corpus, 0.005);
    assert.throws(() => new BatchSampler(validation, 64, 2, 1), /shorter than one window/);
  });
});
