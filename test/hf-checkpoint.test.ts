// Hugging Face checkpoints as published: the real Mixtral config keys, head_dim, tied embeddings,
// sliding windows, a bf16 model sharded into several files with an index served by a real two-shard
// cluster, `switchyard import`, and the errors every service gives before serving a broken folder.
import { PagedDecoder } from './support/paged.js';
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { cp, mkdtemp, readFile, readdir, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { attentionWindow, ConfigError, parseModelConfig, preset, type MixtralConfig, type ModelConfig } from '../services/core/config.js';
import { readSafetensors, readSafetensorsHeader, writeSafetensors } from '../services/core/checkpoint/index.js';
import { loadModel, saveModel } from '../services/core/checkpoint/model.js';
import { train } from '../services/core/train/trainer.js';
import { modelTensorShapes } from '../services/core/model/hf.js';
import { MixtralModel } from '../services/core/model/model.js';
import { choicesOf } from './support/routing.js';
import { disposeAll } from '../services/core/model/tensors.js';
import { spreadExperts } from '../services/core/placement.js';
import { maxAbs, maxAbsDiff, referenceForward, referenceLogits, toF64, type Params64 } from './support/reference64.js';
import { runCli } from './support/cli.js';
import { startCluster, type TestCluster } from './support/cluster.js';

await initBackend();
const tiny = preset('tiny').model;
const root = await mkdtemp(join(tmpdir(), 'switchyard-hf-'));
after(() => rm(root, { recursive: true, force: true }));

/** mistralai/Mixtral-8x7B-v0.1 config.json as published (transformers 4.36). */
const MIXTRAL_8X7B = {
  architectures: ['MixtralForCausalLM'], attention_dropout: 0.0, bos_token_id: 1, eos_token_id: 2, hidden_act: 'silu',
  hidden_size: 4096, initializer_range: 0.02, intermediate_size: 14336, max_position_embeddings: 32768, model_type: 'mixtral',
  num_attention_heads: 32, num_experts_per_tok: 2, num_hidden_layers: 32, num_key_value_heads: 8, num_local_experts: 8,
  output_router_logits: false, rms_norm_eps: 1e-5, rope_theta: 1e6, router_aux_loss_coef: 0.02, router_jitter_noise: 0.0,
  sliding_window: null, tie_word_embeddings: false, torch_dtype: 'bfloat16', transformers_version: '4.36.0.dev0', use_cache: true,
  vocab_size: 32000,
};

/** Float64 copies of every parameter in the model's compute layout (the reference's input). */
function params64Of(model: MixtralModel): Params64 {
  const out: Params64 = new Map();
  for (const table of [model.dense, model.localExperts!.params]) for (const name of table.names()) out.set(name, toF64(table.get(name).dataSync()));
  if (model.config.tie_word_embeddings) {
    // The reference has an explicit LM head: the embedding's transpose.
    const { vocab_size: V, hidden_size: D } = model.config;
    const embed = out.get('embed')!;
    const head = new Float64Array(D * V);
    for (let v = 0; v < V; v++) for (let d = 0; d < D; d++) head[d * V + v] = embed[v * D + d];
    out.set('lm_head', head);
  }
  return out;
}


const idsFor = (n: number, salt = 11) => Int32Array.from({ length: n }, (_, i) => (i * 37 + salt) % 256);

/** Model logits and the float64 reference's logits under the model's own routing. */
async function againstReference(model: MixtralModel, ids: Int32Array, batch: number, tokens: number): Promise<{ logits: Float32Array; reference: Float64Array }> {
  const out = await model.forward(ids, batch, tokens, { passId: 'ref', train: false });
  const logits = (out.logits.dataSync() as Float32Array).slice();
  const choices = choicesOf(out.stats);
  disposeAll([out.logits, out.hidden, out.kv]);
  return { logits, reference: referenceLogits(params64Of(model), model.config as MixtralConfig, ids, batch, tokens, choices) };
}

/** Decodes token by token with the KV cache (prefill `prompt`), through forward() and the paged serving step; worst gap to full recomputation. */
async function kvCacheGap(model: MixtralModel, seq: Int32Array, prompt: number): Promise<number> {
  const V = model.config.vocab_size;
  let worst = 0;
  const first = await model.forward(seq.subarray(0, prompt), 1, prompt, { passId: 'prefill', train: false });
  let kv = first.kv;
  const paged = new PagedDecoder(model, 4);
  await paged.step([{ seq: 0, ids: seq.subarray(0, prompt) }], 'paged-prefill');
  disposeAll([first.logits, first.hidden]);
  for (let past = prompt; past < seq.length; past++) {
    const full = await model.logits(seq.subarray(0, past + 1), 1, past + 1);
    const want = full.subarray(past * V, (past + 1) * V);
    const out = await model.forward(seq.subarray(past, past + 1), 1, 1, { passId: `d${past}`, train: false }, kv, past);
    disposeAll(kv);
    kv = out.kv;
    worst = Math.max(worst, maxAbsDiff(out.logits.dataSync() as Float32Array, want));
    disposeAll([out.logits, out.hidden]);
    const [step] = await paged.step([{ seq: 0, ids: seq.subarray(past, past + 1) }], `b${past}`);
    worst = Math.max(worst, maxAbsDiff(step, want));
  }
  disposeAll(kv);
  return worst;
}

describe('configs as published', () => {
  test('Mixtral-8x7B config.json parses (with and without head_dim) and gives the published shapes and 46.7 B parameters', () => {
    for (const raw of [MIXTRAL_8X7B, { ...MIXTRAL_8X7B, head_dim: 128, transformers_version: '4.46.0' }]) {
      const c = parseModelConfig(raw, 'Mixtral-8x7B config.json');
      const shapes = modelTensorShapes(c);
      assert.deepEqual(shapes.get('model.layers.0.self_attn.q_proj.weight'), [4096, 4096]);
      assert.deepEqual(shapes.get('model.layers.0.self_attn.k_proj.weight'), [1024, 4096]);
      assert.deepEqual(shapes.get('model.layers.31.block_sparse_moe.experts.7.w1.weight'), [14336, 4096]);
      assert.deepEqual(shapes.get('lm_head.weight'), [32000, 4096]);
      let total = 0;
      for (const s of shapes.values()) total += s.reduce((a, b) => a * b, 1);
      assert.equal(total, 46_702_792_704);
    }
  });

  test('unsupported keys are refused naming the key; no-op and supported values are accepted', () => {
    const refused = (raw: object, message: RegExp) =>
      assert.throws(() => parseModelConfig(raw), (e: Error) => e instanceof ConfigError && message.test(e.message), String(message));
    refused({ ...MIXTRAL_8X7B, model_type: 'llama' }, /model_type 'llama' is not supported \(supported: mixtral, deepseek, qwen2_moe, qwen3_moe, olmoe, gpt_oss\)/);
    refused({ ...MIXTRAL_8X7B, rope_scaling: { type: 'longrope', short_factor: [1], long_factor: [1] } }, /rope_scaling: rope_scaling type "longrope" is not supported \(supported: default, linear, dynamic, yarn, llama3\)/);
    refused({ ...MIXTRAL_8X7B, rope_scaling: { type: 'linear' } }, /rope_scaling type 'linear' is missing factor/);
    refused({ ...MIXTRAL_8X7B, torch_dtype: 'int8' }, /torch_dtype/);
    refused({ ...MIXTRAL_8X7B, sliding_window: 0 }, /sliding_window/);
    for (const ok of [{ rope_scaling: null }, { rope_scaling: { type: 'linear', factor: 2 } }, { rope_scaling: { rope_type: 'yarn', factor: 4, original_max_position_embeddings: 8192 } }, { sliding_window: 4096 }, { sliding_window: 32768 }, { torch_dtype: 'float16' }, { tie_word_embeddings: true }])
      assert.doesNotThrow(() => parseModelConfig({ ...MIXTRAL_8X7B, ...ok }), JSON.stringify(ok));
  });

  test('head_dim ≠ hidden_size / num_attention_heads is honoured (shapes, attention, rope, KV cache)', async (t) => {
    const c = parseModelConfig({ ...tiny, head_dim: 12, initializer_range: 0.2 });
    const model = MixtralModel.initialize(c, 5);
    const shapes = modelTensorShapes(c);
    assert.deepEqual(shapes.get('model.layers.0.self_attn.q_proj.weight'), [48, 32]);
    assert.deepEqual(shapes.get('model.layers.0.self_attn.k_proj.weight'), [24, 32]);
    assert.deepEqual(shapes.get('model.layers.0.self_attn.o_proj.weight'), [32, 48]);
    const { logits, reference } = await againstReference(model, idsFor(2 * 8), 2, 8);
    const err = maxAbsDiff(logits, reference);
    t.diagnostic(`head_dim 12: max |logits − reference| = ${err.toExponential(2)} (max |logit| ${maxAbs(reference).toFixed(2)})`);
    assert.ok(err <= 1e-4, `logits differ from the float64 reference by ${err}`);
    const dir = join(root, 'head-dim');
    await saveModel(dir, model);
    const loaded = await loadModel(dir);
    assert.ok(maxAbsDiff(await loaded.logits(idsFor(8), 1, 8), await model.logits(idsFor(8), 1, 8)) <= 1e-6);
    assert.ok((await kvCacheGap(model, idsFor(10, 3), 4)) <= 1e-5);
    model.dispose();
    loaded.dispose();
  });
});

describe('tie_word_embeddings', () => {
  test('the LM head is the embedding: no lm_head.weight stored, logits = reference with lm_head = embeddingᵀ, round trip', async () => {
    const c = parseModelConfig({ ...tiny, tie_word_embeddings: true, initializer_range: 0.2 });
    const model = MixtralModel.initialize(c, 9);
    assert.ok(!model.dense.names().includes('lm_head'));
    const hf = model.toHf();
    assert.ok(!hf.has('lm_head.weight') && hf.has('model.embed_tokens.weight'));
    assert.ok(!modelTensorShapes(c).has('lm_head.weight'));
    const { logits, reference } = await againstReference(model, idsFor(2 * 6), 2, 6);
    assert.ok(maxAbsDiff(logits, reference) <= 1e-4, `tied logits differ from embedding-head reference by ${maxAbsDiff(logits, reference)}`);
    const dir = join(root, 'tied');
    await saveModel(dir, model, undefined, { dtype: 'BF16' });
    const header = await readSafetensorsHeader(join(dir, 'model.safetensors'));
    assert.ok(!header.tensors.has('lm_head.weight'));
    const loaded = await loadModel(dir);
    assert.ok(loaded.config.tie_word_embeddings);
    // Same model up to bf16 rounding of the weights.
    const a = await model.logits(idsFor(6), 1, 6);
    const b = await loaded.logits(idsFor(6), 1, 6);
    assert.ok(maxAbsDiff(a, b) <= 0.05 * maxAbs(a), `bf16 round trip of a tied model: ${maxAbsDiff(a, b)}`);
    assert.ok((await kvCacheGap(loaded, idsFor(8, 5), 3)) <= 1e-5);
    model.dispose();
    loaded.dispose();
  });

  test('training a tied model is refused with a clear message', async () => {
    const c = parseModelConfig({ ...tiny, tie_word_embeddings: true });
    const expected = /tie_word_embeddings: true is supported for inference only; training with tied embeddings is not implemented/;
    await assert.rejects(train({ model: c, train: preset('tiny').train, outDir: join(root, 'tied-train') }), expected);
    const model = MixtralModel.initialize(c, 1);
    await assert.rejects(model.lossAndGradients(idsFor(4), idsFor(4, 12), 1, 4, { passId: 'x', train: true }), expected);
    model.dispose();
  });
});

describe('sliding_window', () => {
  const windowed = (w: number | null): ModelConfig => parseModelConfig({ ...tiny, sliding_window: w, initializer_range: 0.3 });

  test('query i attends keys i − window < j ≤ i: full forward equals the float64 reference, and the window changes the logits', async (t) => {
    const model = MixtralModel.initialize(windowed(4), 17);
    const ids = idsFor(2 * 12, 7);
    const { logits, reference } = await againstReference(model, ids, 2, 12);
    const err = maxAbsDiff(logits, reference);
    t.diagnostic(`window 4: max |logits − reference| = ${err.toExponential(2)}`);
    assert.ok(err <= 1e-4, `windowed logits differ from the reference by ${err}`);
    // The same weights without a window: equal while every key is inside the window, different after.
    const full = MixtralModel.fromHf(windowed(null), model.toHf());
    const unwindowed = await full.logits(ids, 2, 12);
    const V = tiny.vocab_size;
    const firstRows = (x: ArrayLike<number>, b: number, rows: number) => Array.from({ length: rows * V }, (_, i) => x[(b * 12) * V + i]);
    assert.ok(maxAbsDiff(firstRows(logits, 0, 4), firstRows(unwindowed, 0, 4)) <= 1e-5, 'positions 0..3 see all keys either way');
    assert.ok(maxAbsDiff(logits, unwindowed) > 1e-3, 'the window must change later positions');
    // The reference without the window agrees with the unwindowed model (so the test can tell them apart).
    const free = referenceForward(params64Of(full), full.config as MixtralConfig, ids, 2, 12, { train: false });
    assert.ok(maxAbsDiff(unwindowed, free.logits) <= 1e-4);
    model.dispose();
    full.dispose();
  });

  test('the KV-cache generation path applies the window (forward with cache and decodeBatch equal full recomputation)', async (t) => {
    const model = MixtralModel.initialize(windowed(3), 23);
    const gap = await kvCacheGap(model, idsFor(12, 9), 2);
    t.diagnostic(`window 3, prefill 2, decode 10: max |decode − full| = ${gap.toExponential(2)}`);
    assert.ok(gap <= 1e-5, `KV-cache logits differ from full recomputation by ${gap}`);
    model.dispose();
  });

  test('a window of at least max_position_embeddings cuts nothing: attention runs without one', () => {
    // No sequence is longer than max_position_embeddings, so such a window (or null) means no mask band.
    assert.equal(attentionWindow(windowed(tiny.max_position_embeddings)), undefined);
    assert.equal(attentionWindow(windowed(10 * tiny.max_position_embeddings)), undefined);
    assert.equal(attentionWindow(windowed(null)), undefined);
    assert.equal(attentionWindow(windowed(tiny.max_position_embeddings - 1)), tiny.max_position_embeddings - 1);
  });
});

describe('a bf16 checkpoint in the published layout', () => {
  const published = join(root, 'mixtral-tiny');
  // Published keys beyond what the model needs, as transformers writes them; larger init than the
  // preset's so logits are O(1) and attention is far from uniform.
  const config = parseModelConfig({
    ...tiny, architectures: ['MixtralForCausalLM'], attention_dropout: 0.0, hidden_act: 'silu', initializer_range: 0.1,
    output_router_logits: false, rope_theta: 1e6, router_aux_loss_coef: 0.02, router_jitter_noise: 0.0, sliding_window: null,
    tie_word_embeddings: false, torch_dtype: 'bfloat16', transformers_version: '4.36.0.dev0', use_cache: true,
  });
  let original: MixtralModel;
  let shardFiles: string[];
  let cluster: TestCluster | undefined;

  before(async () => {
    original = MixtralModel.initialize(config, 21);
    await saveModel(published, original, undefined, { dtype: 'BF16', maxShardBytes: 40_000 });
    shardFiles = (await readdir(published)).filter((f) => /^model-\d{5}-of-\d{5}\.safetensors$/.test(f)).sort();
  });
  after(async () => {
    await cluster?.stop();
    original?.dispose();
  });

  test('files: ≥ 3 bf16 shards, an index whose total_size is the real stored byte total, config with torch_dtype bfloat16', async () => {
    assert.ok(shardFiles.length >= 3, `expected ≥ 3 shard files, got ${shardFiles.join(', ')}`);
    const files = await readdir(published);
    assert.ok(!files.includes('model.safetensors'));
    const index = JSON.parse(await readFile(join(published, 'model.safetensors.index.json'), 'utf8')) as { metadata: { total_size: number }; weight_map: Record<string, string> };
    let stored = 0;
    let elements = 0;
    for (const f of shardFiles) {
      const h = await readSafetensorsHeader(join(published, f));
      for (const [name, info] of h.tensors) {
        assert.equal(info.dtype, 'BF16', name);
        assert.equal(index.weight_map[name], f);
        stored += info.end - info.begin;
        elements += info.shape.reduce((a, b) => a * b, 1);
      }
    }
    assert.equal(index.metadata.total_size, stored);
    assert.equal(stored, 2 * elements);
    const written = JSON.parse(await readFile(join(published, 'config.json'), 'utf8')) as Record<string, unknown>;
    assert.equal(written.torch_dtype, 'bfloat16');
    assert.equal(written.router_jitter_noise, 0);
    assert.equal(written.transformers_version, '4.36.0.dev0');
  });

  test('a two-shard cluster serves it: logits equal the in-process bf16 model, and the float32 original within bf16 tolerance', async (t) => {
    cluster = await startCluster(published, ['spread:0/2', 'spread:1/2'], [[]]);
    const B = 2;
    const T = 24;
    const ids = idsFor(B * T);
    const res = await fetch(`${cluster.routers[0].base}/v2/models/mixtral-tiny/infer`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [B, T], data: [...ids] }], outputs: [{ name: 'logits' }, { name: 'routing_experts' }] }),
    });
    assert.equal(res.status, 200, await res.clone().text());
    const body = (await res.json()) as { outputs: Array<{ name: string; shape: number[]; data: number[] }> };
    const served = Float32Array.from(body.outputs[0].data);
    const servedRouting = body.outputs[1].data;
    const V = config.vocab_size;
    const k = config.num_experts_per_tok;
    assert.deepEqual(body.outputs[0].shape, [B, T, V]);

    // 1. The cluster computes exactly the stored bf16 weights (converted to float32).
    const bf16 = await loadModel(published);
    const inProcess = await bf16.logits(ids, B, T);
    bf16.dispose();
    const scale = maxAbs(inProcess);
    const clusterGap = maxAbsDiff(served, inProcess);
    t.diagnostic(`cluster vs in-process bf16 model: max |Δ| = ${clusterGap.toExponential(2)} (max |logit| ${scale.toFixed(2)})`);
    assert.ok(clusterGap <= 1e-5 * Math.max(1, scale), `cluster logits differ from the in-process bf16 model by ${clusterGap}`);

    // 2. Against the float32 original: bf16 keeps 8 significant bits, so each weight carries a relative
    // rounding error ≤ 2^-9 (uniform, RMS 2^-9/√3 ≈ 1.1e-3). Independent errors add in quadrature along
    // the ~14 rounded matrices a logit depends on here (embedding, per layer q|k|v, o, gate, w1, w3, w2,
    // LM head): ≈ 1.1e-3·√14 ≈ 4e-3 relative RMS error, measured 3–8e-3 across seeds and init scales.
    // The bound is 2e-2 on positions whose routing bf16 did not change; a token whose top-k choice flips
    // (a near tie in the gate) gets a different expert's output, so those positions are only counted.
    const f32 = await original.logitsWithRouting(ids, B, T);
    const f32Routing = choicesOf(f32.routing);
    let diff2 = 0;
    let ref2 = 0;
    let flipped = 0;
    let sameArgmax = 0;
    for (let row = 0; row < B * T; row++) {
      let routingSame = true;
      for (let l = 0; l < config.num_hidden_layers; l++) {
        const a = [...f32Routing[l].subarray(row * k, row * k + k)].sort();
        const b = servedRouting.slice((l * B * T + row) * k, (l * B * T + row + 1) * k).sort();
        if (a.join() !== b.join()) routingSame = false;
      }
      let am = 0;
      let bm = 0;
      for (let v = 0; v < V; v++) {
        if (f32.logits[row * V + v] > f32.logits[row * V + am]) am = v;
        if (served[row * V + v] > served[row * V + bm]) bm = v;
      }
      if (am === bm) sameArgmax++;
      if (!routingSame) {
        flipped++;
        continue;
      }
      for (let v = 0; v < V; v++) {
        diff2 += (served[row * V + v] - f32.logits[row * V + v]) ** 2;
        ref2 += f32.logits[row * V + v] ** 2;
      }
    }
    const rel = Math.sqrt(diff2 / ref2);
    t.diagnostic(`bf16 cluster vs float32 original: relative L2 error ${rel.toExponential(2)} over ${B * T - flipped} positions with unchanged routing; ` +
      `${flipped} of ${B * T} positions with a routing flip; argmax identical at ${sameArgmax} of ${B * T}`);
    assert.ok(rel <= 2e-2, `relative logit error ${rel} exceeds the bf16 bound 2e-2`);
    assert.ok(flipped <= 0.2 * B * T, `${flipped} of ${B * T} positions changed routing`);
    assert.ok(sameArgmax >= 0.9 * B * T, `argmax identical at only ${sameArgmax} of ${B * T} positions`);
    // Proof the bf16 bytes were read: float32 weights would agree to ~1e-7 relative.
    assert.ok(rel >= 1e-4, `logits equal the float32 original (relative error ${rel}): bf16 rounding is missing`);
  });

  test('switchyard import summarises the folder from config and headers', async () => {
    const r = await runCli(['import', published, '--shards', '2', '--json']);
    assert.equal(r.code, 0, r.stderr);
    const s = JSON.parse(r.stdout) as Record<string, unknown> & {
      parameters: { total: number; perExpert: number; allExperts: number; dense: number };
      files: Array<{ name: string; bytes: number }>; shards: Array<{ shard: number; experts: number; bytes: { stored: number; float32: number } }>;
      dense: { stored: number; float32: number };
    };
    const c = config;
    const D = c.hidden_size;
    const I = c.intermediate_size;
    const L = c.num_hidden_layers;
    const E = c.num_local_experts;
    const V = c.vocab_size;
    const kvWidth = c.num_key_value_heads * (D / c.num_attention_heads);
    const denseParams = 2 * V * D + D + L * (2 * D * D + 2 * kvWidth * D + 2 * D + E * D);
    assert.equal(s.ok, true);
    assert.equal(s.modelType, 'mixtral');
    assert.equal(s.layers, L);
    assert.equal(s.experts, E);
    assert.equal(s.expertsPerToken, c.num_experts_per_tok);
    assert.equal(s.hiddenSize, D);
    assert.equal(s.intermediateSize, I);
    assert.equal(s.parameters.perExpert, 3 * D * I);
    assert.equal(s.parameters.allExperts, L * E * 3 * D * I);
    assert.equal(s.parameters.dense, denseParams);
    assert.equal(s.parameters.total, denseParams + L * E * 3 * D * I);
    assert.deepEqual(s.dtypes, ['BF16']);
    assert.equal(s.torchDtype, 'bfloat16');
    assert.deepEqual(s.files.map((f) => f.name), shardFiles);
    assert.deepEqual(s.dense, { stored: 2 * denseParams, float32: 4 * denseParams });
    const spread = spreadExperts(L, E, 2);
    assert.deepEqual(s.shards, spread.map((keys, i) => ({ shard: i, experts: keys.length, bytes: { stored: keys.length * 3 * D * I * 2, float32: keys.length * 3 * D * I * 4 } })));
    assert.deepEqual(s.tokenizer, { ids: V });
    const text = await runCli(['import', published, '--shards', '3']);
    assert.equal(text.code, 0, text.stderr);
    for (const line of [/model type\s+mixtral/, new RegExp(`layers\\s+${L}\\n`), new RegExp(`${E} per layer, k = 2 per token`),
      new RegExp(`\\(${denseParams + L * E * 3 * D * I}\\)`), /tensors BF16 \(converted to float32 for compute\)/,
      new RegExp(`${shardFiles.length} weight file\\(s\\)`), /spread:2\/3 {2}\d+ experts/, /tokenizer\s+byte vocabulary\n/])
      assert.match(text.stdout, line);
    // A tokenizer.json the router would refuse at start is refused by import too.
    await writeFile(join(published, 'tokenizer.json'), '{}');
    const broken = await runCli(['import', published]);
    await unlink(join(published, 'tokenizer.json'));
    assert.equal(broken.code, 1, broken.stdout);
    assert.match(broken.stderr, /cannot be served \(1 problem\):\n {2}- invalid .*tokenizer\.json: no "model" object/);
  });

  describe('broken folders are refused by import and by every service before it serves', () => {
    async function brokenCopy(name: string, breakIt: (dir: string) => Promise<void>): Promise<string> {
      const dir = join(root, name);
      await cp(published, dir, { recursive: true });
      await breakIt(dir);
      return dir;
    }
    /** Runs a service that must refuse to start: non-zero exit, the message on stderr, never listening. */
    async function refusedService(args: string[], message: RegExp): Promise<void> {
      const r = await runCli(args, {}, undefined, 90_000);
      assert.notEqual(r.code, 0, `${args.join(' ')} exited 0: ${r.stdout}`);
      assert.match(r.stderr, message);
      assert.doesNotMatch(r.stdout, /listening|ready at/);
    }
    async function refusedImport(dir: string, messages: RegExp[]): Promise<void> {
      const r = await runCli(['import', dir]);
      assert.equal(r.code, 1, r.stdout + r.stderr);
      assert.match(r.stderr, /cannot be served/);
      for (const m of messages) assert.match(r.stderr, m);
      const json = await runCli(['import', dir, '--json']);
      assert.equal(json.code, 1);
      const parsed = JSON.parse(json.stdout) as { ok: boolean; problems: string[] };
      assert.equal(parsed.ok, false);
      assert.equal(parsed.problems.length, messages.length, parsed.problems.join('\n'));
    }
    const expertArgs = (dir: string) => ['serve', 'expert', '--checkpoint', dir, '--experts', 'spread:0/2', '--port', '0', '--coordinator', '127.0.0.1:1', '--shard-id', 's0'];

    test('unknown model_type', async () => {
      const dir = await brokenCopy('llama', async (d) => {
        const cfg = JSON.parse(await readFile(join(d, 'config.json'), 'utf8')) as Record<string, unknown>;
        await writeFile(join(d, 'config.json'), JSON.stringify({ ...cfg, model_type: 'llama' }));
      });
      const message = /model_type 'llama' is not supported \(supported: mixtral, deepseek, qwen2_moe, qwen3_moe, olmoe, gpt_oss\)/;
      await refusedImport(dir, [message]);
      await refusedService(expertArgs(dir), message);
    });

    test('a shard file named in the index is missing', async () => {
      const dir = await brokenCopy('missing-file', (d) => unlink(join(d, shardFiles[1])));
      const message = new RegExp(`names ${shardFiles[1].replace(/\./g, '\\.')}, which is not in`);
      await refusedImport(dir, [message]);
      await refusedService(expertArgs(dir), message);
      await refusedService(['serve', 'router', '--checkpoint', dir, '--coordinator', '127.0.0.1:1', '--port', '0'], message);
    });

    test('a tensor with the wrong shape (a dense one: expert shards check the whole folder too) and a missing tensor', async () => {
      const kName = 'model.layers.0.self_attn.k_proj.weight';
      const wName = 'model.layers.1.block_sparse_moe.experts.3.w2.weight';
      const dir = await brokenCopy('misshaped', async (d) => {
        const index = JSON.parse(await readFile(join(d, 'model.safetensors.index.json'), 'utf8')) as { weight_map: Record<string, string> };
        for (const file of new Set([index.weight_map[kName], index.weight_map[wName]])) {
          const { tensors } = await readSafetensors(join(d, file));
          if (tensors.has(kName)) tensors.set(kName, { shape: [8, 32], values: new Float32Array(8 * 32) });
          tensors.delete(wName);
          await writeSafetensors(join(d, file), tensors, { format: 'pt' }, 'BF16');
        }
        delete index.weight_map[wName];
        await writeFile(join(d, 'model.safetensors.index.json'), JSON.stringify(index));
      });
      const shape = /model\.layers\.0\.self_attn\.k_proj\.weight: expected \[16, 32\], found \[8, 32\]/;
      const missing = /1 missing tensor\(s\): model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight \[32, 64\]/;
      await refusedImport(dir, [shape, missing]);
      // Shard 0 of 2 holds neither broken tensor (the k_proj is dense; expert 3 of layer 1 is shard 1's), yet refuses the folder.
      assert.ok(!spreadExperts(config.num_hidden_layers, config.num_local_experts, 2)[0].some((k) => k.layer === 1 && k.expert === 3));
      await refusedService(expertArgs(dir), shape);
      await refusedService(['up', '--model', dir, '--port', '0'], missing);
    });
  });
});
