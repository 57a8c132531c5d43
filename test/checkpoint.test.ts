import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, parseModelConfig, preset, type ModelConfig } from '../services/core/config.js';
import {
  CheckpointError, f32ToBf16, readSafetensors, readSafetensorsHeader, serializeSafetensors, writeSafetensors,
  type Tensor,
} from '../services/core/checkpoint/safetensors.js';
import {
  atomicWriteFile, listCheckpoints, loadCheckpoint, saveCheckpoint,
} from '../services/core/checkpoint/index.js';
import { modelTensorShapes } from '../services/core/model/hf.js';

let root: string;
before(() => {
  root = mkdtempSync(join(tmpdir(), 'switchyard-ckpt-'));
});
after(() => {
  rmSync(root, { recursive: true, force: true });
});
let counter = 0;
const fresh = (name: string) => join(root, `${counter++}-${name}`);

function seq(n: number, scale = 1, offset = 0): Float32Array {
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = Math.fround(Math.sin(i * 0.37 + offset) * scale);
  return v;
}

/** A safetensors file from a literal header object and data bytes. */
function rawFile(path: string, header: unknown, data: Uint8Array, headerText?: string): void {
  const json = Buffer.from(headerText ?? JSON.stringify(header), 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(path, Buffer.concat([len, json, data]));
}

function u16le(values: number[]): Uint8Array {
  const b = Buffer.alloc(values.length * 2);
  values.forEach((v, i) => b.writeUInt16LE(v, 2 * i));
  return b;
}

async function assertCheckpointError(p: Promise<unknown>, file: string, pattern: RegExp): Promise<void> {
  await assert.rejects(p, (err: Error) => {
    assert.equal(err.name, 'CheckpointError');
    assert.ok(err instanceof CheckpointError);
    assert.ok(err.message.includes(file), `message should name ${file}: ${err.message}`);
    assert.match(err.message, pattern);
    return true;
  });
}

describe('safetensors', () => {
  test('F32 round trip of 1-D, 2-D and 3-D tensors with metadata', async () => {
    const file = fresh('a.safetensors');
    const tensors = new Map<string, Tensor>([
      ['one', { shape: [5], values: seq(5) }],
      ['two', { shape: [3, 4], values: seq(12, 2) }],
      ['three', { shape: [2, 3, 4], values: seq(24, 3, 1) }],
      ['empty', { shape: [0, 4], values: new Float32Array(0) }],
    ]);
    const size = await writeSafetensors(file, tensors, { format: 'pt', note: 'hello' });
    const bytes = readFileSync(file);
    assert.equal(bytes.length, size);
    const headerLen = Number(bytes.readBigUInt64LE(0));
    assert.equal(headerLen % 8, 0, 'header padded to a multiple of 8');
    assert.doesNotThrow(() => JSON.parse(bytes.subarray(8, 8 + headerLen).toString('utf8')));

    const back = await readSafetensors(file);
    assert.deepEqual(back.metadata, { format: 'pt', note: 'hello' });
    assert.deepEqual([...back.tensors.keys()].sort(), [...tensors.keys()].sort());
    for (const [name, t] of tensors) {
      assert.deepEqual(back.tensors.get(name)!.shape, t.shape, name);
      assert.deepEqual(back.tensors.get(name)!.values, t.values, name);
    }
    // The in-memory serialisation is the same file.
    assert.deepEqual(serializeSafetensors(tensors, { format: 'pt', note: 'hello' }), bytes);
  });

  test('reading a subset reads only those byte ranges', async () => {
    const file = fresh('subset.safetensors');
    const keep = { shape: [2, 3], values: seq(6) };
    await writeSafetensors(file, [
      ['before', { shape: [100], values: seq(100) }],
      ['keep', keep],
      ['after', { shape: [50, 2], values: seq(100) }],
    ]);
    // Replace the other tensors' bytes with garbage (the NaN pattern 0xff...), leaving the header valid.
    const header = await readSafetensorsHeader(file);
    const bytes = readFileSync(file);
    for (const n of ['before', 'after']) bytes.fill(0xff, header.tensors.get(n)!.begin, header.tensors.get(n)!.end);
    writeFileSync(file, bytes);

    // Record every read the file handle makes.
    const probe = await open(file, 'r');
    const proto = Object.getPrototypeOf(probe) as { read: (...args: unknown[]) => Promise<unknown> };
    await probe.close();
    const original = proto.read;
    const reads: [number, number][] = [];
    proto.read = function (this: unknown, ...args: unknown[]) {
      reads.push([args[3] as number, args[2] as number]); // (buffer, offset, length, position)
      return original.apply(this, args);
    };
    let got;
    try {
      got = await readSafetensors(file, { only: (n) => n === 'keep' });
    } finally {
      proto.read = original;
    }
    assert.deepEqual([...got.tensors.keys()], ['keep']);
    assert.deepEqual(got.tensors.get('keep')!.values, keep.values);
    const info = header.tensors.get('keep')!;
    const dataReads = reads.filter(([pos]) => pos >= header.dataStart);
    assert.deepEqual(dataReads, [[info.begin, info.end - info.begin]], 'only the selected range is read');
    assert.ok(reads.every(([pos, len]) => pos + len <= header.dataStart || (pos >= info.begin && pos + len <= info.end)));
    // The garbage really is garbage.
    const all = await readSafetensors(file);
    assert.ok(Number.isNaN(all.tensors.get('before')!.values[0]));
  });

  test('F16, BF16, I32 and I64 decode to the known values', async () => {
    const file = fresh('dtypes.safetensors');
    const f16 = u16le([0x3c00, 0xc100, 0x7bff, 0x0001, 0x0400, 0x7c00, 0x8000]);
    const bf16 = u16le([0x3f80, 0xc020, 0x4780, 0x0001, 0xff80]);
    const i32 = Buffer.alloc(8);
    i32.writeInt32LE(-7, 0);
    i32.writeInt32LE(123456, 4);
    const i64 = Buffer.alloc(16);
    i64.writeBigInt64LE(-3n, 0);
    i64.writeBigInt64LE(1n << 40n, 8);
    const parts = [f16, bf16, i32, i64];
    const offsets: number[] = [0];
    for (const p of parts) offsets.push(offsets[offsets.length - 1]! + p.length);
    rawFile(file, {
      half: { dtype: 'F16', shape: [7], data_offsets: [offsets[0], offsets[1]] },
      brain: { dtype: 'BF16', shape: [5], data_offsets: [offsets[1], offsets[2]] },
      ints: { dtype: 'I32', shape: [2], data_offsets: [offsets[2], offsets[3]] },
      longs: { dtype: 'I64', shape: [2, 1], data_offsets: [offsets[3], offsets[4]] },
    }, Buffer.concat(parts));
    const { tensors } = await readSafetensors(file);
    assert.deepEqual([...tensors.get('half')!.values], [1, -2.5, 65504, 2 ** -24, 2 ** -14, Infinity, -0]);
    assert.deepEqual([...tensors.get('brain')!.values], [1, -2.5, 65536, Math.fround(2 ** -133), -Infinity]);
    assert.deepEqual([...tensors.get('ints')!.values], [-7, 123456]);
    assert.deepEqual([...tensors.get('longs')!.values], [-3, 2 ** 40]);
    assert.deepEqual(tensors.get('longs')!.shape, [2, 1]);
  });

  test('BF16 writing rounds to nearest even', async () => {
    assert.equal(f32ToBf16(1), 0x3f80);
    assert.equal(f32ToBf16(-2.5), 0xc020);
    assert.equal(f32ToBf16(1 + 2 ** -8), 0x3f80); // tie → even
    assert.equal(f32ToBf16(1 + 3 * 2 ** -8), 0x3f82); // tie → even (up)
    assert.ok(Number.isNaN(new Float32Array(new Uint32Array([f32ToBf16(NaN) << 16]).buffer)[0]));
    const file = fresh('bf16.safetensors');
    await writeSafetensors(file, [['x', { shape: [4], values: new Float32Array([1, -2.5, 65536, 1 + 2 ** -9]) }]], undefined, 'BF16');
    const header = await readSafetensorsHeader(file);
    assert.equal(header.tensors.get('x')!.dtype, 'BF16');
    assert.deepEqual([...(await readSafetensors(file)).tensors.get('x')!.values], [1, -2.5, 65536, 1]);
  });

  test('damaged files give a CheckpointError naming the file', async () => {
    const good = fresh('good.safetensors');
    await writeSafetensors(good, [['a', { shape: [4], values: seq(4) }], ['b', { shape: [2, 2], values: seq(4) }]]);
    const bytes = readFileSync(good);

    const truncated = fresh('truncated.safetensors');
    writeFileSync(truncated, bytes.subarray(0, bytes.length - 3));
    await assertCheckpointError(readSafetensors(truncated), truncated, /data section|truncated/);

    const tiny = fresh('tiny.safetensors');
    writeFileSync(tiny, Buffer.from([1, 2, 3]));
    await assertCheckpointError(readSafetensors(tiny), tiny, /shorter than/);

    const longHeader = fresh('longheader.safetensors');
    const lh = Buffer.from(bytes);
    lh.writeBigUInt64LE(BigInt(bytes.length));
    writeFileSync(longHeader, lh);
    await assertCheckpointError(readSafetensors(longHeader), longHeader, /beyond the file/);

    const badJson = fresh('badjson.safetensors');
    rawFile(badJson, null, Buffer.alloc(16), '{"a": {"dtype": "F32", ');
    await assertCheckpointError(readSafetensors(badJson), badJson, /not valid JSON/);

    const data = Buffer.alloc(32);
    const cases: [string, unknown, RegExp][] = [
      ['overlap', {
        a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] },
        b: { dtype: 'F32', shape: [4], data_offsets: [8, 24] },
      }, /overlaps/],
      ['outofrange', { a: { dtype: 'F32', shape: [10], data_offsets: [0, 40] } }, /beyond the data section/],
      ['wrongsize', { a: { dtype: 'F32', shape: [3], data_offsets: [0, 32] } }, /needs 12/],
      ['hole', {
        a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] },
        b: { dtype: 'F32', shape: [2], data_offsets: [24, 32] },
      }, /gap/],
      ['reversed', { a: { dtype: 'F32', shape: [0], data_offsets: [32, 0] } }, /data_offsets/],
      ['baddtype', { a: { dtype: 'Q4', shape: [8], data_offsets: [0, 32] } }, /unknown dtype/],
      ['badshape', { a: { dtype: 'F32', shape: [-8], data_offsets: [0, 32] } }, /shape/],
      ['badmeta', { __metadata__: { n: 3 }, a: { dtype: 'F32', shape: [8], data_offsets: [0, 32] } }, /__metadata__/],
      ['array', [1, 2], /not a JSON object/],
    ];
    for (const [name, header, pattern] of cases) {
      const file = fresh(`${name}.safetensors`);
      rawFile(file, header, data);
      await assertCheckpointError(readSafetensors(file), file, pattern);
    }
    const missing = join(root, 'no-such.safetensors');
    await assertCheckpointError(readSafetensors(missing), missing, /cannot open/);
  });
});

describe('checkpoint folders', () => {
  const config: ModelConfig = preset('tiny').model;
  const shapes = modelTensorShapes(config);

  function weights(offset = 0): Map<string, Tensor> {
    const m = new Map<string, Tensor>();
    let k = 0;
    for (const [name, shape] of shapes) m.set(name, { shape, values: seq(shape.reduce((a, b) => a * b, 1), 0.1, offset + k++) });
    return m;
  }

  function assertSameTensors(got: Map<string, Tensor>, want: Map<string, Tensor>): void {
    assert.deepEqual([...got.keys()].sort(), [...want.keys()].sort());
    for (const [n, t] of want) {
      assert.deepEqual(got.get(n)!.shape, t.shape, n);
      assert.deepEqual(got.get(n)!.values, t.values, n);
    }
  }

  test('modelTensorShapes follows the Hugging Face names and [out, in] shapes', () => {
    const c = parseModelConfig({
      hidden_size: 64, intermediate_size: 96, num_hidden_layers: 3, num_attention_heads: 8, num_key_value_heads: 2,
      num_local_experts: 5, num_experts_per_tok: 2, vocab_size: 100, max_position_embeddings: 32,
    });
    const s = modelTensorShapes(c);
    assert.equal(s.size, 2 + 3 * (7 + 5 * 3) + 1);
    assert.deepEqual(s.get('model.embed_tokens.weight'), [100, 64]);
    assert.deepEqual(s.get('model.layers.2.self_attn.q_proj.weight'), [64, 64]);
    assert.deepEqual(s.get('model.layers.2.self_attn.k_proj.weight'), [16, 64]);
    assert.deepEqual(s.get('model.layers.2.self_attn.v_proj.weight'), [16, 64]);
    assert.deepEqual(s.get('model.layers.0.self_attn.o_proj.weight'), [64, 64]);
    assert.deepEqual(s.get('model.layers.1.block_sparse_moe.gate.weight'), [5, 64]);
    assert.deepEqual(s.get('model.layers.1.block_sparse_moe.experts.4.w1.weight'), [96, 64]);
    assert.deepEqual(s.get('model.layers.1.block_sparse_moe.experts.4.w3.weight'), [96, 64]);
    assert.deepEqual(s.get('model.layers.1.block_sparse_moe.experts.4.w2.weight'), [64, 96]);
    assert.deepEqual(s.get('model.layers.0.input_layernorm.weight'), [64]);
    assert.deepEqual(s.get('model.layers.0.post_attention_layernorm.weight'), [64]);
    assert.deepEqual(s.get('model.norm.weight'), [64]);
    assert.deepEqual(s.get('lm_head.weight'), [100, 64]);
    // Explicit head_dim wins over hidden/heads.
    const d = modelTensorShapes({ ...c, head_dim: 4 });
    assert.deepEqual(d.get('model.layers.0.self_attn.q_proj.weight'), [32, 64]);
    assert.deepEqual(d.get('model.layers.0.self_attn.o_proj.weight'), [64, 32]);
    assert.deepEqual(d.get('model.layers.0.self_attn.k_proj.weight'), [8, 64]);
  });

  test('single-file round trip with extra files', async () => {
    const dir = fresh('single');
    const w = weights();
    const optimizer = serializeSafetensors([['m.lm_head.weight', { shape: [2], values: new Float32Array([1, 2]) }]], { step: '7' });
    const res = await saveCheckpoint(dir, {
      config, tensors: w, extraFiles: { 'trainer_state.json': '{"step": 7}\n', 'optimizer.safetensors': optimizer },
    });
    assert.deepEqual(res.files, ['config.json', 'model.safetensors', 'optimizer.safetensors', 'trainer_state.json']);
    assert.deepEqual(readdirSync(dir).sort(), res.files);
    assert.deepEqual(readdirSync(root).filter((n) => n.includes('.tmp-') || n.includes('.old-')), []);
    const reparsed = parseModelConfig(JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')));
    assert.deepEqual(reparsed, config);
    assert.deepEqual((await readSafetensorsHeader(join(dir, 'model.safetensors'))).metadata, { format: 'pt' });

    const loaded = await loadCheckpoint(dir, { expectedTensors: shapes });
    assert.deepEqual(loaded.config, config);
    assert.deepEqual(loaded.files, res.files);
    assertSameTensors(loaded.tensors, w);
    const opt = await readSafetensors(join(dir, 'optimizer.safetensors'));
    assert.deepEqual([...opt.tensors.get('m.lm_head.weight')!.values], [1, 2]);
    assert.equal(opt.metadata.step, '7');
  });

  test('sharded round trip writes Hugging Face shards and index', async () => {
    const dir = fresh('sharded');
    const w = weights(3);
    const max = 40_000;
    const res = await saveCheckpoint(dir, { config, tensors: w, maxShardBytes: max });
    const shards = res.files.filter((f) => f.startsWith('model-'));
    assert.ok(shards.length > 2, `expected several shards, got ${shards.length}`);
    shards.forEach((f, i) => assert.equal(f, `model-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`));
    assert.ok(!res.files.includes('model.safetensors'));
    const index = JSON.parse(readFileSync(join(dir, 'model.safetensors.index.json'), 'utf8'));
    assert.deepEqual(Object.keys(index.weight_map).sort(), [...w.keys()].sort());
    assert.deepEqual(new Set(Object.values(index.weight_map)), new Set(shards));
    let total = 0;
    for (const t of w.values()) total += t.values.length * 4;
    assert.equal(index.metadata.total_size, total);
    for (const f of shards) {
      const h = await readSafetensorsHeader(join(dir, f));
      let bytes = 0;
      for (const [n, info] of h.tensors) {
        assert.equal(index.weight_map[n], f);
        bytes += info.end - info.begin;
      }
      // Greedy packing: a shard only exceeds the limit when it holds a single oversized tensor.
      assert.ok(bytes <= max || h.tensors.size === 1, `${f} holds ${bytes} bytes`);
    }

    const loaded = await loadCheckpoint(dir, { expectedTensors: shapes });
    assertSameTensors(loaded.tensors, w);

    // Expert-shard style partial load: only layer 1's experts 2 and 3.
    const mine = (n: string) => /^model\.layers\.1\.block_sparse_moe\.experts\.[23]\./.test(n);
    const part = await loadCheckpoint(dir, { expectedTensors: shapes, only: mine });
    assert.equal(part.tensors.size, 6);
    for (const [n, t] of part.tensors) assert.deepEqual(t.values, w.get(n)!.values);
  });

  test('expectedTensors reports every missing, misshaped and unexpected tensor at once', async () => {
    const dir = fresh('mismatch');
    const w = weights();
    w.delete('lm_head.weight');
    w.delete('model.layers.1.block_sparse_moe.experts.3.w2.weight');
    w.set('model.norm.weight', { shape: [31], values: seq(31) });
    w.set('model.layers.0.block_sparse_moe.gate.weight', { shape: [32, 4], values: seq(128) });
    w.set('model.layers.0.mlp.bias', { shape: [3], values: seq(3) });
    await saveCheckpoint(dir, { config, tensors: w });
    await assert.rejects(loadCheckpoint(dir, { expectedTensors: shapes }), (err: Error) => {
      assert.ok(err instanceof CheckpointError);
      const m = err.message;
      assert.ok(m.includes(dir), m);
      for (const s of [
        'lm_head.weight [259, 32]',
        'model.layers.1.block_sparse_moe.experts.3.w2.weight [32, 64]',
        'model.norm.weight: expected [32], found [31]',
        'model.layers.0.block_sparse_moe.gate.weight: expected [4, 32], found [32, 4]',
        'model.layers.0.mlp.bias [3]',
        '2 missing', '2 tensor(s) with the wrong shape', '1 unexpected',
      ]) assert.ok(m.includes(s), `message lacks '${s}': ${m}`);
      return true;
    });
    // Without expectations it loads what is there.
    assert.equal((await loadCheckpoint(dir)).tensors.size, w.size);
  });

  test('saving again replaces atomically; leftovers of a crashed save are ignored', async () => {
    const parent = fresh('runs');
    const dir = join(parent, 'step-1');
    const v1 = weights(1);
    const v2 = weights(2);
    await saveCheckpoint(dir, { config, tensors: v1, extraFiles: { 'old-only.txt': 'x' } });
    await saveCheckpoint(dir, { config, tensors: v2 });
    assert.deepEqual(readdirSync(parent), ['step-1']);
    const second = await loadCheckpoint(dir);
    assertSameTensors(second.tensors, v2);
    assert.ok(!second.files.includes('old-only.txt'), 'the folder is replaced, not merged');

    // A save that crashed while writing: a half-written temporary sibling.
    const crashed = `${dir}.tmp-99999-deadbeef`;
    mkdirSync(crashed);
    writeFileSync(join(crashed, 'config.json'), JSON.stringify(config));
    writeFileSync(join(crashed, 'model.safetensors'), Buffer.from([1, 2, 3]));
    assertSameTensors((await loadCheckpoint(dir, { expectedTensors: shapes })).tensors, v2);
    assert.deepEqual(await listCheckpoints(parent), ['step-1']);

    // A save that crashed between its two renames: only the old copy, moved aside, exists.
    const aside = `${dir}.old-99999-cafe`;
    renameSync(dir, aside);
    const recovered = await loadCheckpoint(dir);
    assert.equal(recovered.dir, aside);
    assertSameTensors(recovered.tensors, v2);
    // The next save puts a complete checkpoint in place and clears the stale aside copy.
    await saveCheckpoint(dir, { config, tensors: v1 });
    assertSameTensors((await loadCheckpoint(dir)).tensors, v1);
    assert.ok(!existsSync(aside));
    assert.ok(existsSync(crashed), 'another writer\'s temporary folder is not touched');
  });

  test('atomicWriteFile replaces a file and leaves no temporary file', async () => {
    const dir = fresh('atomic');
    mkdirSync(dir);
    const file = join(dir, 'trainer_state.json');
    await atomicWriteFile(file, '{"step": 1}');
    await atomicWriteFile(file, Buffer.from('{"step": 2}'));
    assert.equal(readFileSync(file, 'utf8'), '{"step": 2}');
    assert.deepEqual(readdirSync(dir), ['trainer_state.json']);
  });

  test('an invalid config.json gives a ConfigError naming the file', async () => {
    const dir = fresh('badconfig');
    await saveCheckpoint(dir, { config, tensors: weights() });
    const cfgPath = join(dir, 'config.json');
    writeFileSync(cfgPath, JSON.stringify({ ...config, hidden_size: 30, num_attention_heads: 4 }));
    await assert.rejects(loadCheckpoint(dir), (err: Error) => {
      assert.ok(err instanceof ConfigError, err.name);
      assert.ok(err.message.includes(cfgPath), err.message);
      assert.match(err.message, /hidden_size 30 is not divisible by num_attention_heads 4/);
      return true;
    });
    writeFileSync(cfgPath, '{ not json');
    await assert.rejects(loadCheckpoint(dir), (err: Error) => err instanceof ConfigError && err.message.includes(cfgPath));
  });

  test('missing pieces give CheckpointErrors naming the folder', async () => {
    const dir = fresh('pieces');
    await saveCheckpoint(dir, { config, tensors: weights(), maxShardBytes: 40_000 });
    const shard = readdirSync(dir).find((f) => f.startsWith('model-00002'))!;
    rmSync(join(dir, shard));
    await assertCheckpointError(loadCheckpoint(dir), dir, new RegExp(shard));
    rmSync(join(dir, 'model.safetensors.index.json'));
    await assertCheckpointError(loadCheckpoint(dir), dir, /neither model\.safetensors nor/);
    rmSync(join(dir, 'config.json'));
    await assertCheckpointError(loadCheckpoint(dir), dir, /config\.json is missing/);
    const none = join(root, 'nowhere');
    await assertCheckpointError(loadCheckpoint(none), none, /does not exist/);
    await assert.rejects(
      saveCheckpoint(fresh('bad-extra'), { config, tensors: weights(), extraFiles: { '../escape.txt': 'x' } }),
      CheckpointError,
    );
  });
});
