// DeepSeek-MoE (model_type "deepseek"): a tiny model with a dense first layer, routed and shared
// experts and norm_topk_prob false, checked against a plain float64 reference, over a real cluster,
// through its checkpoint names, for the values it refuses, and in training.
import { after, before, test } from 'node:test';
import { PagedDecoder } from './support/paged.js';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../services/core/backend.js';
import { BOS_ID, BYTE_VOCAB_SIZE, ConfigError, EOS_ID, parseModelConfig, preset, type DeepseekConfig } from '../services/core/config.js';
import { gateBackward, routeTokens } from '../services/core/gating/index.js';
import { loadCheckpoint, readSafetensorsHeader } from '../services/core/checkpoint/index.js';
import { loadExpertSet, loadModel, saveModel } from '../services/core/checkpoint/model.js';
import { familyOf } from '../services/core/model/family.js';
import type { HostTensor } from '../services/core/model/hf.js';
import { MixtralModel } from '../services/core/model/model.js';
import { parseAssignment } from '../services/expert/assignment.js';
import { startCluster, type TestCluster } from './support/cluster.js';
import { runCli } from './support/cli.js';

await initBackend();

// Published DeepSeek-MoE keys (deepseek-ai/deepseek-moe-16b-base config.json), scaled down.
const rawConfig = {
  architectures: ['DeepseekForCausalLM'], model_type: 'deepseek',
  hidden_size: 32, intermediate_size: 48, moe_intermediate_size: 16,
  num_hidden_layers: 3, num_attention_heads: 4, num_key_value_heads: 2,
  n_routed_experts: 6, n_shared_experts: 2, num_experts_per_tok: 2,
  first_k_dense_replace: 1, moe_layer_freq: 1, norm_topk_prob: false,
  scoring_func: 'softmax', aux_loss_alpha: 0.001, seq_aux: true,
  rms_norm_eps: 1e-6, rope_theta: 10000, rope_scaling: null, attention_bias: false,
  vocab_size: BYTE_VOCAB_SIZE, max_position_embeddings: 64, tie_word_embeddings: false,
  bos_token_id: BOS_ID, eos_token_id: EOS_ID, torch_dtype: 'float32',
} as const;
const config: DeepseekConfig = parseModelConfig(rawConfig);
const D = rawConfig.hidden_size;
const E = rawConfig.n_routed_experts;
const K = rawConfig.num_experts_per_tok;

let root: string;
let model: MixtralModel;
let hf: Map<string, HostTensor>;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-deepseek-'));
  model = MixtralModel.initialize(config, 7);
  hf = model.toHf();
});

after(async () => {
  model?.dispose();
  await rm(root, { recursive: true, force: true });
});

// ---------------------------------------------------------------- float64 reference, written plainly

/** y = W·x for an HF [out, in] weight, every row of x. */
function linear64(x: Float64Array, rows: number, w: HostTensor): Float64Array {
  const [out, inner] = w.shape;
  const y = new Float64Array(rows * out);
  for (let r = 0; r < rows; r++)
    for (let o = 0; o < out; o++) {
      let s = 0;
      for (let i = 0; i < inner; i++) s += w.values[o * inner + i] * x[r * inner + i];
      y[r * out + o] = s;
    }
  return y;
}

/** down(silu(gate·x) ⊙ up·x) from the three HF tensors named by `prefix` + {gate,up,down}_proj.weight. */
function swiglu64(x: Float64Array, rows: number, prefix: string): Float64Array {
  const a = linear64(x, rows, hf.get(`${prefix}gate_proj.weight`)!);
  const b = linear64(x, rows, hf.get(`${prefix}up_proj.weight`)!);
  const g = a.map((v, i) => (v / (1 + Math.exp(-v))) * b[i]);
  return linear64(g, rows, hf.get(`${prefix}down_proj.weight`)!);
}

/** DeepSeek-MoE layer l: Σ_chosen w_e·expert_e(x) + shared(x), softmax over all routed experts, top-k. */
function moeLayer64(x: Float64Array, rows: number, l: number, normTopkProb: boolean): { routed: Float64Array; shared: Float64Array; chosenMass: number[] } {
  const logits = linear64(x, rows, hf.get(`model.layers.${l}.mlp.gate.weight`)!);
  const routed = new Float64Array(rows * D);
  const chosenMass: number[] = [];
  const expertOut = Array.from({ length: E }, (_, e) => swiglu64(x, rows, `model.layers.${l}.mlp.experts.${e}.`));
  for (let r = 0; r < rows; r++) {
    const row = Array.from(logits.subarray(r * E, r * E + E));
    const max = Math.max(...row);
    const exps = row.map((v) => Math.exp(v - max));
    const sum = exps.reduce((s, v) => s + v, 0);
    const probs = exps.map((v) => v / sum);
    const chosen = probs.map((p, e) => ({ p, e })).sort((a, b) => b.p - a.p || a.e - b.e).slice(0, K);
    const mass = chosen.reduce((s, c) => s + c.p, 0);
    chosenMass.push(mass);
    for (const { p, e } of chosen) {
      const w = normTopkProb ? p / mass : p;
      for (let d = 0; d < D; d++) routed[r * D + d] += w * expertOut[e][r * D + d];
    }
  }
  return { routed, shared: swiglu64(x, rows, `model.layers.${l}.mlp.shared_experts.`), chosenMass };
}

function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

function randomRows(rows: number, seed: number): Float32Array {
  let s = seed;
  return Float32Array.from({ length: rows * D }, () => {
    s = (s * 1103515245 + 12345) % 2 ** 31;
    return (s / 2 ** 31) * 4 - 2;
  });
}

async function feedForward(m: MixtralModel, l: number, x: Float32Array, rows: number): Promise<Float32Array> {
  const h = tf.tensor2d(x, [rows, D]);
  const out = await m.feedForward(l, h, { passId: `ff${l}`, train: false, groupTokens: 0 });
  const y = out.y.dataSync() as Float32Array;
  tf.dispose([h, out.y]);
  return y;
}

// ---------------------------------------------------------------- tests

test('the family description: dense first layer, MoE layers, widths, no renormalisation', () => {
  const f = familyOf(config);
  assert.deepEqual(f.moeLayers, [1, 2]);
  assert.equal(f.experts, E);
  assert.equal(f.expertIntermediate, 16);
  assert.equal(f.routerMlpWidth(0), 48, 'dense MLP of layer 0 is intermediate_size wide');
  assert.equal(f.routerMlpWidth(1), 32, 'shared experts: moe_intermediate_size × n_shared_experts');
  assert.equal(f.renormalize, false);
  const everyOther = familyOf(parseModelConfig({ ...rawConfig, num_hidden_layers: 5, moe_layer_freq: 2 }));
  assert.deepEqual(everyOther.moeLayers, [2, 4], 'moe_layer_freq keeps odd layers dense');
});

test('expert assignments cover the MoE layers only', () => {
  const f = familyOf(config);
  const all = parseAssignment('all', f.moeLayers, f.experts);
  assert.equal(all.length, 2 * E);
  assert.ok(all.every((k) => k.layer === 1 || k.layer === 2));
  const spread = [0, 1].flatMap((i) => parseAssignment(`spread:${i}/2`, f.moeLayers, f.experts));
  assert.deepEqual(spread.map((k) => `${k.layer}/${k.expert}`).sort(), all.map((k) => `${k.layer}/${k.expert}`).sort());
  assert.throws(() => parseAssignment('0:1', f.moeLayers, f.experts), /layer 0 has no experts \(layers with experts: 1, 2\)/);
});

test('incremental decoding (KV cache, dense and MoE layers) gives the full pass\'s last logits', async () => {
  const ids = Int32Array.from([BOS_ID, 72, 101, 108, 108, 111]);
  const full = await model.logits(ids, 1, ids.length);
  const paged = new PagedDecoder(model, 4);
  await paged.step([{ seq: 0, ids: ids.subarray(0, 4) }], 'dec0');
  const [next] = await paged.step([{ seq: 0, ids: ids.subarray(4) }], 'dec1');
  const want = full.subarray((ids.length - 1) * BYTE_VOCAB_SIZE);
  assert.ok(maxDiff(next, want) <= 1e-5 * maxAbs(want), `|Δ| ${maxDiff(next, want)}`);
});

test('an MoE layer equals routed + shared experts of the float64 reference; norm_topk_prob scales the routed part', async () => {
  const rows = 12;
  const x = randomRows(rows, 3);
  const x64 = Float64Array.from(x);
  const renormModel = MixtralModel.fromHf(parseModelConfig({ ...rawConfig, norm_topk_prob: true }), hf);
  try {
    for (const l of [1, 2]) {
      const plain = await feedForward(model, l, x, rows);
      const renorm = await feedForward(renormModel, l, x, rows);
      const ref = moeLayer64(x64, rows, l, false);
      const refRenorm = moeLayer64(x64, rows, l, true);
      const want = ref.routed.map((v, i) => v + ref.shared[i]);
      const wantRenorm = refRenorm.routed.map((v, i) => v + refRenorm.shared[i]);
      const scale = maxAbs(want);
      assert.ok(maxDiff(plain, want) <= 1e-5 * scale, `layer ${l}: |Δ| ${maxDiff(plain, want)} vs scale ${scale}`);
      assert.ok(maxDiff(renorm, wantRenorm) <= 1e-5 * maxAbs(wantRenorm), `layer ${l} renormalised: |Δ| ${maxDiff(renorm, wantRenorm)}`);
      // The two differ only in the routed part, by the chosen probability mass (< 1) per token.
      assert.ok(maxDiff(plain, renorm) > 1e-3 * scale, 'norm_topk_prob changes the output');
      for (let r = 0; r < rows; r++) {
        const mass = ref.chosenMass[r];
        assert.ok(mass > 0 && mass < 1);
        for (let d = 0; d < D; d++) {
          const i = r * D + d;
          const scaled = mass * (renorm[i] - ref.shared[i]);
          assert.ok(Math.abs(plain[i] - ref.shared[i] - scaled) <= 1e-5 * scale, `layer ${l} row ${r}: routed part is mass × renormalised`);
        }
      }
    }
    // Layer 0 is dense: only the MLP of intermediate_size.
    const dense = await feedForward(model, 0, x, rows);
    const want0 = swiglu64(x64, rows, 'model.layers.0.mlp.');
    assert.ok(maxDiff(dense, want0) <= 1e-5 * maxAbs(want0), `dense layer 0: |Δ| ${maxDiff(dense, want0)}`);
  } finally {
    renormModel.dispose();
  }
});

test('gating without renormalisation: weights are the softmax probabilities, and the backward matches finite differences', () => {
  const S = 4;
  const logits = Float32Array.from({ length: S * E }, (_, i) => Math.sin(i * 1.7) * 2);
  const plan = routeTokens(logits, S, E, { kind: 'mixtral', k: K, renormalize: false });
  assert.equal(plan.renormalized, false);
  for (let i = 0; i < S * K; i++) assert.equal(plan.weight[i], plan.probs[Math.floor(i / K) * E + plan.expert[i]]);
  const renormalized = routeTokens(logits, S, E, { kind: 'mixtral', k: K });
  assert.deepEqual(renormalized.expert, plan.expert, 'the same experts are chosen');
  const dWeight = Float32Array.from({ length: S * K }, (_, i) => Math.cos(i) + 0.5);
  const analytic = gateBackward(plan, logits, dWeight, 0, 0);
  // L = Σ dW·p[chosen] with the choices held fixed, in float64.
  const loss = (x: Float64Array) => {
    let total = 0;
    for (let s = 0; s < S; s++) {
      const row = Array.from(x.subarray(s * E, s * E + E));
      const max = Math.max(...row);
      const sum = row.reduce((acc, v) => acc + Math.exp(v - max), 0);
      for (let c = 0; c < K; c++) total += dWeight[s * K + c] * Math.exp(row[plan.expert[s * K + c]] - max) / sum;
    }
    return total;
  };
  const h = 1e-6;
  for (let i = 0; i < S * E; i++) {
    const up = Float64Array.from(logits);
    const down = Float64Array.from(logits);
    up[i] += h;
    down[i] -= h;
    const numeric = (loss(up) - loss(down)) / (2 * h);
    assert.ok(Math.abs(numeric - analytic[i]) <= 1e-5, `dL/dlogit[${i}]: ${analytic[i]} vs ${numeric}`);
  }
});

test('checkpoint round trip with the published DeepSeek-MoE tensor names', async () => {
  const dir = join(root, 'roundtrip');
  await saveModel(dir, model);
  // The names and [out, in] shapes of deepseek-moe-16b-base, for this config.
  const want = new Map<string, number[]>([
    ['model.embed_tokens.weight', [BYTE_VOCAB_SIZE, D]], ['model.norm.weight', [D]], ['lm_head.weight', [BYTE_VOCAB_SIZE, D]],
  ]);
  for (let l = 0; l < 3; l++) {
    const p = `model.layers.${l}`;
    want.set(`${p}.input_layernorm.weight`, [D]).set(`${p}.post_attention_layernorm.weight`, [D]);
    want.set(`${p}.self_attn.q_proj.weight`, [D, D]).set(`${p}.self_attn.k_proj.weight`, [16, D]);
    want.set(`${p}.self_attn.v_proj.weight`, [16, D]).set(`${p}.self_attn.o_proj.weight`, [D, D]);
    const mlp = (prefix: string, width: number) => {
      want.set(`${prefix}gate_proj.weight`, [width, D]).set(`${prefix}up_proj.weight`, [width, D]).set(`${prefix}down_proj.weight`, [D, width]);
    };
    if (l === 0) {
      mlp(`${p}.mlp.`, 48);
      continue;
    }
    want.set(`${p}.mlp.gate.weight`, [E, D]);
    for (let e = 0; e < E; e++) mlp(`${p}.mlp.experts.${e}.`, 16);
    mlp(`${p}.mlp.shared_experts.`, 32);
  }
  const header = await readSafetensorsHeader(join(dir, 'model.safetensors'));
  const saved = new Map([...header.tensors].map(([name, info]) => [name, [...info.shape]]));
  assert.deepEqual(new Map([...saved].sort()), new Map([...want].sort()));
  const json = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
  assert.equal(json.model_type, 'deepseek');
  assert.deepEqual(json.architectures, ['DeepseekForCausalLM']);
  for (const key of ['n_routed_experts', 'n_shared_experts', 'moe_intermediate_size', 'first_k_dense_replace', 'norm_topk_prob', 'scoring_func'])
    assert.ok(key in json, `config.json keeps ${key}`);

  const ids = Int32Array.from({ length: 2 * 7 }, (_, i) => (i * 29 + 5) % 256);
  const loaded = await loadModel(dir);
  try {
    assert.deepEqual(await loaded.logits(ids, 2, 7), await model.logits(ids, 2, 7), 'a reloaded model computes the same logits');
    assert.deepEqual(new Map([...loaded.toHf()].map(([n, t]) => [n, Array.from(t.values)])), new Map([...hf].map(([n, t]) => [n, Array.from(t.values)])));
  } finally {
    loaded.dispose();
  }
  // A shard reads only its experts, in DeepSeek names; a dense layer has none to give.
  const shard = await loadExpertSet(dir, [{ layer: 2, expert: 5 }]);
  try {
    assert.deepEqual(shard.keys(), [{ layer: 2, expert: 5 }]);
    const w1t = shard.weights(2, 5).w1t;
    assert.deepEqual(w1t.shape, [D, 16]);
    const gateProj = hf.get('model.layers.2.mlp.experts.5.gate_proj.weight')!;
    // w1t[0][1] (compute layout [in, out]) is gate_proj[1][0] (HF [out, in]).
    assert.equal((w1t.dataSync() as Float32Array)[1], gateProj.values[D], 'w1t is gate_proj transposed');
  } finally {
    shard.dispose();
  }
  await assert.rejects(loadExpertSet(dir, [{ layer: 0, expert: 0 }]), /layer 0, expert 0\) does not exist.*MoE layers 1, 2/);
});

test('unsupported DeepSeek-MoE values are refused by name', async () => {
  const refused: Array<[Record<string, unknown>, RegExp]> = [
    [{ scoring_func: 'sigmoid' }, /scoring_func/],
    [{ rope_scaling: { type: 'longrope', short_factor: [1], long_factor: [1] } }, /rope_scaling type "longrope" is not supported/],
    [{ partial_rotary_factor: 0.5 }, /partial_rotary_factor/],
    [{ attention_bias: true }, /attention_bias/],
    [{ num_experts_per_tok: 7 }, /num_experts_per_tok.*n_routed_experts/],
    [{ moe_intermediate_size: 0 }, /moe_intermediate_size/],
    [{ switchyard_gate: { policy: 'gshard' } }, /switchyard_gate.*'mixtral'/],
    [{ switchyard_gate: { aux_loss_scope: 'batch' } }, /aux_loss_scope/],
  ];
  for (const [change, message] of refused) {
    assert.throws(() => parseModelConfig({ ...rawConfig, ...change }), (err: Error) => err instanceof ConfigError && message.test(err.message), JSON.stringify(change));
  }
  // Mixtral keys do not make a DeepSeek config, and the Mixtral behaviour is unchanged.
  assert.throws(() => parseModelConfig({ ...rawConfig, n_routed_experts: undefined }), /n_routed_experts/);
  assert.equal(parseModelConfig({ ...preset('tiny').model }).model_type, 'mixtral');

});

test('DeepSeek-MoE trains (dense layer and shared experts on the router): 2 routers × 2 shards give one process\'s losses', async () => {
  const file = join(root, 'deepseek-config.json');
  await writeFile(file, JSON.stringify({ base: 'tiny', model: rawConfig, train: { steps: 4, eval_interval: 2, checkpoint_interval: 2 } }));
  const single = join(root, 'train-single');
  const dist = join(root, 'train-dist');
  const one = await runCli(['train', '--config', file, '--out', single]);
  assert.equal(one.code, 0, one.stderr);
  const two = await runCli(['train', '--config', file, '--routers', '2', '--shards', '2', '--out', dist]);
  assert.equal(two.code, 0, two.stderr);
  const losses = async (dir: string) => (await readFile(join(dir, 'metrics.jsonl'), 'utf8')).trim().split('\n').map((l) => (JSON.parse(l) as { loss: number }).loss);
  const [a, b] = [await losses(single), await losses(dist)];
  assert.equal(b.length, 4);
  for (let i = 0; i < 4; i++) assert.ok(Math.abs(a[i] - b[i]) <= 1e-4 * Math.abs(a[i]), `step ${i + 1}: ${b[i]} vs ${a[i]}`);
  assert.ok(a[3] < a[0], 'the loss falls');
});

test('the same logits in-process and over a cluster of two expert shards', async (t) => {
  const checkpoint = join(root, 'ds-moe');
  await saveModel(checkpoint, model);
  const { config: saved } = await loadCheckpoint(checkpoint, { only: () => false });
  assert.equal(saved.model_type, 'deepseek');
  let cluster: TestCluster | undefined;
  try {
    cluster = await startCluster(checkpoint, ['spread:0/2', 'spread:1/2'], [[]]);
    const ids = Array.from({ length: 2 * 9 }, (_, i) => (i * 37 + 11) % 256);
    const res = await fetch(`${cluster.routers[0].base}/v2/models/ds-moe/infer`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [2, 9], data: ids }], outputs: [{ name: 'logits' }, { name: 'routing_experts' }] }),
    });
    assert.equal(res.status, 200, await res.clone().text());
    const body = (await res.json()) as { outputs: Array<{ name: string; shape: number[]; data: number[] }> };
    const [logits, routing] = body.outputs;
    assert.deepEqual(logits.shape, [2, 9, BYTE_VOCAB_SIZE]);
    assert.deepEqual(routing.shape, [2, 2, 9, K], 'routing covers the two MoE layers');
    const local = await model.logitsWithRouting(Int32Array.from(ids), 2, 9);
    const diff = maxDiff(logits.data, local.logits);
    const scale = maxAbs(local.logits);
    t.diagnostic(`max |Δlogit| in-process vs cluster: ${diff} (max |logit| ${scale})`);
    assert.ok(diff <= 1e-5 * scale, `max |Δlogit| ${diff} vs max |logit| ${scale}`);
    assert.deepEqual(routing.data, local.routing.flatMap((layer) => layer.plans.flatMap((p) => Array.from(p.expert))), 'the same experts are chosen');
    // The spread covers only the MoE layers: 2 layers × 6 experts over two shards.
    for (const shard of cluster.shards) assert.match(shard.ready.input!, /holding 6 experts/);
  } finally {
    await cluster?.stop();
  }
});
