// The families Switchyard reads beside Mixtral and DeepSeek-MoE (Qwen2-MoE, Qwen3-MoE, OLMoE): tiny random
// checkpoints in the published layout (bf16, two safetensors files with an index) pass `switchyard import`
// and are served by a 2-shard cluster with the logits of an independent float64 forward written from
// transformers (test/support/hf-reference64.ts), through both the full forward (OIP infer) and the paged
// serving step (completions' prompt logprobs); each trains with gradients equal to float64 central
// differences of that reference, and distributed training equals one process.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../services/core/backend.js';
import { ConfigError, parseModelConfig } from '../services/core/config.js';
import { familyOf } from '../services/core/model/family.js';
import { denseToHf, expertToHf, type HostTensor } from '../services/core/model/hf.js';
import { MixtralModel } from '../services/core/model/model.js';
import { startCluster, type TestCluster } from './support/cluster.js';
import { runCli } from './support/cli.js';
import { hfReferenceLogits, type HfTensors } from './support/hf-reference64.js';
import { maxAbs, maxAbsDiff } from './support/reference64.js';
import { tinyConfigs, writeTinyHfCheckpoint } from './support/tiny-hf-checkpoint.js';

await initBackend();

/** Served from the published layout: bf16 in two files, GPT-OSS's experts as MXFP4 and as unquantized bf16. */
const SERVED: Array<{ family: string; mxfp4?: boolean }> = [
  { family: 'qwen2_moe' }, { family: 'qwen3_moe' }, { family: 'olmoe' }, { family: 'gpt_oss', mxfp4: true }, { family: 'gpt_oss' },
];
const TRAINED = ['qwen2_moe', 'qwen3_moe', 'olmoe'] as const;
const BATCH = 2;
const TOKENS = 9;

let root: string;
before(async () => { root = await mkdtemp(join(tmpdir(), 'switchyard-families-')); });
after(() => rm(root, { recursive: true, force: true }));

const configOf = (family: string): Record<string, unknown> => {
  const raw = (tinyConfigs() as Record<string, Record<string, unknown>>)[family];
  assert.ok(raw, `a tiny ${family} config`);
  return raw;
};

const idsOf = (n: number, seed: number) => Array.from({ length: n }, (_, i) => (i * 37 + seed * 11 + 5) % 256);

function logSoftmax64(row: ArrayLike<number>): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) max = Math.max(max, row[i]);
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i] - max);
  const out = new Float64Array(row.length);
  for (let i = 0; i < row.length; i++) out[i] = row[i] - max - Math.log(sum);
  return out;
}

for (const { family, mxfp4 } of SERVED) {
  test(`${family}${mxfp4 ? ' (MXFP4 experts)' : ''}: a tiny bf16 sharded checkpoint passes import and a 2-shard cluster serves the float64 reference's logits`, async (t) => {
    const raw = configOf(family);
    const name = mxfp4 ? `${family}-mxfp4` : family;
    const dir = join(root, name);
    const { tensors } = await writeTinyHfCheckpoint(dir, raw, { seed: 17, shards: 2, dtype: 'BF16', mxfp4 });
    const index = JSON.parse(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8')) as { weight_map: Record<string, string> };
    assert.equal(new Set(Object.values(index.weight_map)).size, 2, 'two safetensors files');

    const imported = await runCli(['import', dir]);
    assert.equal(imported.code, 0, imported.stdout + imported.stderr);
    assert.match(imported.stdout, new RegExp(`model type\\s+${family}`));
    assert.match(imported.stdout, /ready to serve/);
    assert.match(imported.stdout, mxfp4 ? /tensors BF16, U8/ : /tensors BF16\b/);

    const ids = idsOf(BATCH * TOKENS, 3);
    // The reference reads the checkpoint as written (MXFP4 bytes included) and its config.json as written.
    const written = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
    const want = hfReferenceLogits(written, tensors as unknown as HfTensors, Int32Array.from(ids), BATCH, TOKENS);
    const scale = maxAbs(want);
    assert.ok(scale > 1, `non-trivial logits (max |logit| ${scale})`);
    let cluster: TestCluster | undefined;
    try {
      cluster = await startCluster(dir, ['spread:0/2', 'spread:1/2'], [[]]);
      const base = cluster.routers[0].base;
      const res = await fetch(`${base}/v2/models/${name}/infer`, {
        method: 'POST', headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [BATCH, TOKENS], data: ids }], outputs: [{ name: 'logits' }] }),
      });
      assert.equal(res.status, 200, await res.clone().text());
      const body = (await res.json()) as { outputs: Array<{ shape: number[]; data: number[] }> };
      const diff = maxAbsDiff(body.outputs[0].data, want);
      t.diagnostic(`${name} infer: max |Δlogit| vs float64 reference ${diff.toExponential(2)} (max |logit| ${scale.toFixed(2)})`);
      assert.ok(diff <= 1e-5 * scale, `infer: max |Δlogit| ${diff} vs ${scale}`);

      // The paged serving step (KV blocks, host attention) scored through completions: the prompt's
      // logprobs equal the reference's log-softmax of the first sequence's logits.
      const prompt = ids.slice(0, TOKENS);
      const scored = await fetch(`${base}/v1/completions`, {
        method: 'POST', headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: name, prompt, max_tokens: 0, echo: true, logprobs: 1 }),
      });
      assert.equal(scored.status, 200, await scored.clone().text());
      const choice = ((await scored.json()) as { choices: Array<{ logprobs: { token_logprobs: Array<number | null> } }> }).choices[0];
      const got = choice.logprobs.token_logprobs;
      assert.equal(got.length, TOKENS);
      assert.equal(got[0], null, 'the first token has no logprob');
      const V = want.length / (BATCH * TOKENS);
      let worst = 0;
      for (let i = 1; i < TOKENS; i++) {
        const ref = logSoftmax64(want.subarray((i - 1) * V, i * V))[prompt[i]];
        worst = Math.max(worst, Math.abs(got[i]! - ref));
      }
      t.diagnostic(`${name} paged step: max |Δ logprob| ${worst.toExponential(2)}`);
      assert.ok(worst <= 1e-4, `prompt logprobs differ by ${worst}`);

      // Greedy decoding past the first KV blocks (and past GPT-OSS's window, where the scheduler may free
      // only what no layer reaches): each generated token is the reference's argmax, with its logprob.
      const long = idsOf(30, 7);
      const gen = await fetch(`${base}/v1/completions`, {
        method: 'POST', headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: name, prompt: long, max_tokens: 12, temperature: 0, logprobs: 0, return_token_ids: true }),
      });
      assert.equal(gen.status, 200, await gen.clone().text());
      const out = ((await gen.json()) as { choices: Array<{ token_ids: number[]; logprobs: { token_logprobs: number[] } }> }).choices[0];
      assert.equal(out.token_ids.length, 12);
      const all = [...long, ...out.token_ids];
      const ref = hfReferenceLogits(written, tensors as unknown as HfTensors, Int32Array.from(all), 1, all.length);
      let worstDecode = 0;
      out.token_ids.forEach((id, i) => {
        const row = logSoftmax64(ref.subarray((long.length - 1 + i) * V, (long.length + i) * V));
        const best = row.reduce((b, v, j) => (v > row[b] ? j : b), 0);
        assert.ok(id === best || row[best] - row[id] <= 1e-4, `token ${i}: ${id}, the reference's argmax is ${best}`);
        worstDecode = Math.max(worstDecode, Math.abs(out.logprobs.token_logprobs[i] - row[id]));
      });
      t.diagnostic(`${name} decode (30 + 12 tokens): max |Δ logprob| ${worstDecode.toExponential(2)}`);
      assert.ok(worstDecode <= 1e-4, `decode logprobs differ by ${worstDecode}`);
      const f = familyOf(parseModelConfig(raw));
      for (const shard of cluster.shards) assert.match(shard.ready.input!, new RegExp(`holding ${(f.moeLayers.length * f.experts) / 2} experts`));
    } finally {
      await cluster?.stop();
    }
  });
}

/** HF-named gradients of a model after lossAndGradients (dense and in-process experts), float64. */
function hfGradients(model: MixtralModel): Map<string, Float64Array> {
  const host = (t: tf.Tensor): HostTensor => ({ shape: [...t.shape], values: t.dataSync() as Float32Array });
  const dense = new Map<string, HostTensor>();
  for (const name of model.dense.names()) dense.set(name, host(model.dense.gradOrZeros(name)));
  // The projections, transposes and splits between layouts are linear: they map gradients as they map weights.
  const out = denseToHf(model.config, dense);
  const experts = model.localExperts!;
  for (const { layer, expert } of experts.keys()) {
    const [w1t, w3t, w2t] = experts.paramNames(layer, expert).map((n) => host(experts.params.gradOrZeros(n)));
    expertToHf(model.family.names, out, layer, expert, { w1t, w3t, w2t });
  }
  return new Map([...out].map(([n, t]) => [n, Float64Array.from(t.values)]));
}

function crossEntropy64(logits: Float64Array, targets: ArrayLike<number>): number {
  const V = logits.length / targets.length;
  let total = 0;
  for (let r = 0; r < targets.length; r++) total -= logSoftmax64(logits.subarray(r * V, (r + 1) * V))[targets[r]];
  return total / targets.length;
}

for (const family of TRAINED) {
  test(`${family}: every parameter's gradient equals float64 central differences of the reference's cross-entropy`, async (t) => {
    // No aux or z loss: the objective is the reference's cross-entropy alone.
    // Training needs an LM head of its own (tied embeddings are inference only).
    const raw = { ...configOf(family), tie_word_embeddings: false, switchyard_gate: { aux_loss_coef: 0, z_loss_coef: 0 } };
    const { tensors } = await writeTinyHfCheckpoint(join(root, `${family}-grad`), raw, { seed: 5, shards: 1, dtype: 'F32' });
    const host = new Map([...tensors].map(([n, t]) => [n, { shape: t.shape, values: Float32Array.from(t.values) }]));
    const model = MixtralModel.fromHf(parseModelConfig(raw), host);
    try {
      const batch = 2;
      const tokens = 6;
      const all = idsOf(batch * (tokens + 1), 9);
      const ids = new Int32Array(batch * tokens);
      const targets = new Int32Array(batch * tokens);
      for (let b = 0; b < batch; b++)
        for (let i = 0; i < tokens; i++) {
          ids[b * tokens + i] = all[b * (tokens + 1) + i];
          targets[b * tokens + i] = all[b * (tokens + 1) + i + 1];
        }
      const result = await model.lossAndGradients(ids, targets, batch, tokens, { passId: 'gradcheck', train: true, groupTokens: 0 });
      const params = new Map([...host].map(([n, v]) => [n, { shape: v.shape, values: Float64Array.from(v.values) }]));
      const loss = () => crossEntropy64(hfReferenceLogits(raw, params, ids, batch, tokens), targets);
      const base = loss();
      assert.ok(Math.abs(result.crossEntropy - base) <= 1e-5 * base, `loss ${result.crossEntropy} vs reference ${base}`);
      const grads = hfGradients(model);
      assert.deepEqual([...grads.keys()].sort(), [...params.keys()].sort(), 'a gradient for every tensor of the checkpoint');
      let worst = 0;
      let checked = 0;
      for (const [name, p] of params) {
        const g = grads.get(name)!;
        // Up to 6 entries per tensor: the largest gradients, where an error shows most.
        const order = Array.from(g.keys()).sort((a, b) => Math.abs(g[b]) - Math.abs(g[a])).slice(0, 6);
        for (const i of order) {
          const keep = p.values[i];
          const h = 1e-4 * Math.max(1, Math.abs(keep));
          p.values[i] = keep + h;
          const up = loss();
          p.values[i] = keep - h;
          const down = loss();
          p.values[i] = keep;
          const numeric = (up - down) / (2 * h);
          const err = Math.abs(numeric - g[i]) / Math.max(Math.abs(numeric), Math.abs(g[i]), 1e-3);
          worst = Math.max(worst, err);
          checked++;
          assert.ok(err <= 2e-3, `${name}[${i}]: analytic ${g[i]} vs float64 ${numeric} (relative ${err})`);
        }
      }
      t.diagnostic(`${family}: ${checked} gradient entries over ${params.size} tensors, worst relative error ${worst.toExponential(2)}`);
    } finally {
      model.dispose();
    }
  });

  test(`${family}: 2 routers × 2 shards train exactly like one process (switchyard train --config)`, async () => {
    const file = join(root, `${family}-train.json`);
    await writeFile(file, JSON.stringify({ base: 'tiny', model: { ...configOf(family), tie_word_embeddings: false }, train: { steps: 6, eval_interval: 3, checkpoint_interval: 3 } }));
    const single = join(root, `${family}-single`);
    const dist = join(root, `${family}-dist`);
    const one = await runCli(['train', '--config', file, '--out', single]);
    assert.equal(one.code, 0, one.stderr);
    const two = await runCli(['train', '--config', file, '--routers', '2', '--shards', '2', '--out', dist]);
    assert.equal(two.code, 0, two.stderr);
    const lines = async (dir: string) => (await readFile(join(dir, 'metrics.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as { step: number; loss: number });
    const [a, b] = [await lines(single), await lines(dist)];
    assert.equal(b.length, 6);
    assert.deepEqual(b.map((r) => r.step), a.map((r) => r.step));
    for (let i = 0; i < a.length; i++)
      assert.ok(Math.abs(a[i].loss - b[i].loss) <= 1e-4 * Math.abs(a[i].loss), `step ${a[i].step}: ${b[i].loss} vs ${a[i].loss}`);
    assert.ok(a[5].loss < a[0].loss, 'the loss falls');
  });
}

test('published defaults and refusals of the Qwen, OLMoE and GPT-OSS keys; GPT-OSS is served, not trained', async () => {
  const qwen3 = configOf('qwen3_moe');
  // The config class defaults norm_topk_prob to false; the published checkpoints set it.
  assert.equal(familyOf(parseModelConfig({ ...qwen3, norm_topk_prob: undefined })).renormalize, false);
  assert.equal(familyOf(parseModelConfig({ ...qwen3, norm_topk_prob: true })).renormalize, true);
  // decoder_sparse_step and mlp_only_layers choose the sparse layers as Qwen2MoeDecoderLayer does.
  const stepped = familyOf(parseModelConfig({ ...qwen3, num_hidden_layers: 4, decoder_sparse_step: 2, mlp_only_layers: [3] }));
  assert.deepEqual(stepped.moeLayers, [1]);
  const qwen2 = familyOf(parseModelConfig(configOf('qwen2_moe')));
  assert.equal(qwen2.sharedExpertGate, true);
  assert.equal(qwen2.attention.qkvBias, true);
  const olmoe = familyOf(parseModelConfig({ ...configOf('olmoe'), clip_qkv: 2 }));
  assert.deepEqual(olmoe.attention, { qkvBias: false, oBias: false, qkNorm: 'whole', sinks: false, clip: 2 });
  const refused: Array<[Record<string, unknown>, RegExp]> = [
    [{ ...qwen3, use_sliding_window: true }, /use_sliding_window must be false/],
    [{ ...qwen3, mlp_only_layers: [7] }, /mlp_only_layers 7 outside/],
    [{ ...qwen3, num_experts_per_tok: 99 }, /num_experts_per_tok.*num_experts/],
    [{ ...qwen3, hidden_act: 'gelu' }, /hidden_act/],
    [{ ...qwen3, switchyard_gate: { policy: 'switch' } }, /policy must be 'mixtral'/],
    [{ ...configOf('olmoe'), head_dim: 4 }, /head_dim 4 must be hidden_size \/ num_attention_heads/],
    [{ ...configOf('qwen2_moe'), head_dim: 8 }, /head_dim 8 must be hidden_size \/ num_attention_heads for Qwen2-MoE/],
    [{ ...configOf('olmoe'), model_type: 'olmo2' }, /model_type 'olmo2' is not supported \(supported: mixtral, deepseek, qwen2_moe, qwen3_moe, olmoe, gpt_oss\)/],
  ];
  // GPT-OSS: the config class's defaults (layer i slides when i is even, YaRN ×32 over 4096, head_dim 64).
  const gpt = configOf('gpt_oss');
  const bare = parseModelConfig({ ...gpt, layer_types: undefined, rope_scaling: undefined, head_dim: undefined, swiglu_limit: undefined });
  assert.equal(bare.model_type, 'gpt_oss');
  if (bare.model_type === 'gpt_oss') {
    assert.deepEqual(bare.layer_types, ['sliding_attention', 'full_attention', 'sliding_attention']);
    assert.deepEqual(bare.rope_scaling, { rope_type: 'yarn', factor: 32, beta_fast: 32, beta_slow: 1, truncate: false, original_max_position_embeddings: 4096 });
    assert.equal(bare.head_dim, 64);
  }
  const gptFamily = familyOf(parseModelConfig(gpt));
  assert.deepEqual([0, 1, 2].map((l) => gptFamily.window(l)), [4, undefined, 4]);
  assert.deepEqual(gptFamily.expertActivation, { kind: 'clamped-swiglu', alpha: 1.702, limit: 7 });
  assert.equal(gptFamily.attention.sinks, true);
  refused.push(
    [{ ...gpt, quantization_config: { quant_method: 'fp8' } }, /quant_method must be 'mxfp4'/],
    [{ ...gpt, layer_types: ['full_attention'] }, /layer_types has 1 entries for 3 layers/],
    [{ ...gpt, attention_bias: false }, /attention_bias must be true/],
    [{ ...gpt, hidden_size: 48, head_dim: 12, quantization_config: { quant_method: 'mxfp4' } }, /MXFP4 needs hidden_size and intermediate_size to be multiples of 32/],
  );
  for (const [raw, message] of refused)
    assert.throws(() => parseModelConfig(raw), (err: Error) => err instanceof ConfigError && message.test(err.message), JSON.stringify(raw).slice(0, 80));
  const file = join(root, 'gpt-oss-train.json');
  await writeFile(file, JSON.stringify({ base: 'tiny', model: gpt }));
  const cli = await runCli(['train', '--config', file, '--steps', '1', '--out', join(root, 'gpt-oss-train')]);
  assert.notEqual(cli.code, 0);
  assert.match(cli.stderr, /model_type 'gpt_oss' cannot be trained yet/);
});
