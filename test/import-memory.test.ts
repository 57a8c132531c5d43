// Memory honesty: `switchyard import` prints what each service holds on the backend and refuses, naming
// the numbers, a model whose router or shards cannot fit a wasm process (4 GiB). The checkpoints are
// header-only: sparse safetensors files with the full published layout (bf16) and no data written.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseModelConfig, preset, type ModelConfig } from '../services/core/config.js';
import { modelTensorShapes } from '../services/core/model/hf.js';
import { memoryPlan, routerWorkBytes, shardWorkBytes, WASM_HEAP_BYTES } from '../services/core/checkpoint/memory.js';
import { runCli } from './support/cli.js';

let root: string;
before(async () => { root = await mkdtemp(join(tmpdir(), 'switchyard-memory-')); });
after(async () => { await rm(root, { recursive: true, force: true }); });

/** A model folder whose model.safetensors declares every tensor (bf16) and is sparse: only the header is written. */
async function headerOnlyCheckpoint(name: string, raw: Record<string, unknown>): Promise<{ dir: string; config: ModelConfig }> {
  const config = parseModelConfig({ ...raw, torch_dtype: 'bfloat16' });
  const dir = join(root, name);
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'config.json'), JSON.stringify({ ...raw, torch_dtype: 'bfloat16' }));
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const [tensor, shape] of modelTensorShapes(config)) {
    const bytes = 2 * shape.reduce((a, b) => a * b, 1);
    header[tensor] = { dtype: 'BF16', shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = Buffer.from(JSON.stringify(header));
  json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
  const fh = await open(join(dir, 'model.safetensors'), 'w');
  try {
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(BigInt(json.length));
    await fh.write(Buffer.concat([length, json]), 0, 8 + json.length, 0);
    await fh.truncate(8 + json.length + offset); // a hole: no data blocks
  } finally {
    await fh.close();
  }
  return { dir, config };
}

const base = { ...preset('tiny').model, model_type: 'mixtral' };

test('the plan: float32 weights plus one step of work per service; wasm refuses what passes 4 GiB, naming the numbers', () => {
  const config = parseModelConfig({ ...base, hidden_size: 1024, intermediate_size: 4096, num_attention_heads: 8, num_key_value_heads: 4 });
  const fits = memoryPlan(config, 1e9, [2e9, 2e9], 'wasm');
  assert.deepEqual(fits.problems, []);
  assert.equal(fits.limitBytes, WASM_HEAP_BYTES);
  assert.equal(fits.services[0].backendBytes, 1e9 + routerWorkBytes(config));
  assert.equal(fits.services[1].backendBytes, 2e9 + shardWorkBytes(config));
  // 4 bytes per element of each step tensor: the shard's rows in and out plus three intermediate tensors.
  assert.equal(shardWorkBytes(config), 4 * 8192 * (2 * 1024 + 3 * 4096));
  const tooBig = memoryPlan(config, 5e9, [3e9, 6e9], 'wasm');
  assert.equal(tooBig.problems.length, 2);
  assert.match(tooBig.problems[0], /a router needs 5\.\d\d GB \(5\.00 GB of dense weights/);
  assert.match(tooBig.problems[1], /1 of 2 expert shard\(s\) need more, up to 6\.\d\d GB \(spread:1\/2: 6\.00 GB of experts/);
  assert.match(tooBig.problems[1], /at least 3 shards \(--shards 3\)/);
  // A native backend has no such per-process limit here (a GPU's size is the deployer's to check).
  assert.deepEqual(memoryPlan(config, 5e9, [3e9, 6e9], 'tensorflow-gpu').problems, []);
});

test('switchyard import refuses experts that cannot fit a wasm shard, says how many shards would, and accepts that many', { timeout: 120_000 }, async () => {
  // 16 layers × 8 experts × 3 × 2048 × 8192: 25.8 GB of experts as float32 (12.9 GB stored, all of it a hole).
  const { dir } = await headerOnlyCheckpoint('wide-experts', { ...base, hidden_size: 2048, intermediate_size: 8192, num_hidden_layers: 16, num_attention_heads: 16, num_key_value_heads: 8, num_local_experts: 8 });
  const env = { SWITCHYARD_BACKEND: 'wasm' };
  const refused = await runCli(['import', dir, '--shards', '2'], env);
  assert.equal(refused.code, 1, refused.stdout);
  assert.match(refused.stderr, /cannot be served \(1 problem\)/);
  assert.match(refused.stderr, /2 of 2 expert shard\(s\) need more, up to 13\.\d\d GB \(spread:\d\/2: 12\.88 GB of experts as float32 \+ 0\.94 GB/);
  assert.match(refused.stderr, /at least 8 shards \(--shards 8\)/);
  assert.match(refused.stdout, /cannot be served as planned/);
  const json = JSON.parse((await runCli(['import', dir, '--shards', '2', '--json'], env)).stdout) as { ok: boolean; problems: string[]; memory: { backend: string } };
  assert.equal(json.ok, false);
  assert.equal(json.memory.backend, 'wasm');
  const fits = await runCli(['import', dir, '--shards', '8'], env);
  assert.equal(fits.code, 0, fits.stderr);
  assert.match(fits.stdout, /memory\s+on the wasm backend, at most 4\.29 GB per process/);
  assert.match(fits.stdout, /spread:7\/8\s+4\.\d\d GB \(3\.22 GB \+ 940 MB\)/);
  // Sized for GPUs from a machine without one: no wasm limit applies.
  const gpu = await runCli(['import', dir, '--shards', '2', '--backend', 'tensorflow-gpu'], env);
  assert.equal(gpu.code, 0, gpu.stderr);
  assert.match(gpu.stdout, /on the tensorflow-gpu backend \(weights/);
  const bad = await runCli(['import', dir, '--backend', 'tpu']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /'tpu' is not one of/);
});

test('switchyard import refuses a dense part that cannot fit a wasm router, whatever the shards', { timeout: 120_000 }, async () => {
  // hidden 16384 over 32 layers: 4 × 16384² attention weights per layer, 137.5 GB as float32.
  const { dir } = await headerOnlyCheckpoint('wide-dense', { ...base, hidden_size: 16384, intermediate_size: 16, num_hidden_layers: 32, num_attention_heads: 128, num_key_value_heads: 128, num_local_experts: 4 });
  const refused = await runCli(['import', dir, '--shards', '64'], { SWITCHYARD_BACKEND: 'wasm' });
  assert.equal(refused.code, 1, refused.stdout);
  assert.match(refused.stderr, /a router needs 138\.\d\d GB \(137\.\d\d GB of dense weights as float32 \+ [\d.]+ GB for a 2048-token step\): the dense part cannot be split/);
});
