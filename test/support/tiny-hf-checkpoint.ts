// Tiny random Hugging Face checkpoints in the published layout of the MoE families mixtral,
// qwen2_moe, qwen3_moe, olmoe and gpt_oss: config.json, sharded safetensors
// (model-0000i-of-0000N.safetensors) and model.safetensors.index.json. Tensor names and shapes follow
// transformers' modeling files and the published checkpoints ([out, in] linear weights; gpt_oss's
// fused experts [E, in, out], or their MXFP4 blocks and scales). Nothing here comes from services/,
// whose loaders these files test; the safetensors serializer is a minimal one of its own.
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { mulberry32 } from './mulberry32.js';

type Dtype = 'BF16' | 'F32' | 'U8';

export interface TinyCheckpoint { tensors: Map<string, { shape: number[]; values: Float32Array | Uint8Array; dtype: Dtype }> }

type Raw = Record<string, unknown>;

// ---------------------------------------------------------------------------------------------------
// the configs

/**
 * One small config per family with the published keys (architectures, model_type and each family's
 * own key names), scaled down: hidden 64, 4 heads, 2 kv heads, vocab 259, max_position_embeddings 64.
 * - qwen2_moe: layer 1 dense through mlp_only_layers, a shared expert, tied embeddings.
 * - qwen3_moe: head_dim 24 ≠ hidden / heads, norm_topk_prob true.
 * - olmoe: 16 experts top-4, clip_qkv 1.5 (q and k are RMS-normed, so about 13% of them clip).
 * - gpt_oss: sliding and full layers alternating, sliding_window 4, head_dim 32, YaRN with the published
 *   keys scaled so factor = max_position_embeddings / original_max_position_embeddings (4 = 64 / 16),
 *   hidden and intermediate multiples of 32 for MXFP4.
 */
export function tinyConfigs(): Record<'mixtral' | 'qwen2_moe' | 'qwen3_moe' | 'olmoe' | 'gpt_oss', Raw> {
  return {
    mixtral: {
      architectures: ['MixtralForCausalLM'], model_type: 'mixtral', attention_dropout: 0.0, bos_token_id: 256, eos_token_id: 257,
      hidden_act: 'silu', hidden_size: 64, initializer_range: 0.02, intermediate_size: 96, max_position_embeddings: 64,
      num_attention_heads: 4, num_experts_per_tok: 2, num_hidden_layers: 2, num_key_value_heads: 2, num_local_experts: 8,
      output_router_logits: false, rms_norm_eps: 1e-5, rope_theta: 1e6, router_aux_loss_coef: 0.02, router_jitter_noise: 0.0,
      sliding_window: null, tie_word_embeddings: false, torch_dtype: 'bfloat16', use_cache: true, vocab_size: 259,
    },
    qwen2_moe: {
      architectures: ['Qwen2MoeForCausalLM'], model_type: 'qwen2_moe', attention_dropout: 0.0, bos_token_id: 256, eos_token_id: 257,
      hidden_act: 'silu', hidden_size: 64, initializer_range: 0.02, intermediate_size: 128, max_position_embeddings: 64,
      max_window_layers: 3, num_attention_heads: 4, num_hidden_layers: 3, num_key_value_heads: 2, rms_norm_eps: 1e-6,
      rope_theta: 1e6, sliding_window: 64, tie_word_embeddings: true, torch_dtype: 'bfloat16', use_cache: true,
      use_sliding_window: false, vocab_size: 259, decoder_sparse_step: 1, moe_intermediate_size: 32,
      shared_expert_intermediate_size: 96, num_experts_per_tok: 2, num_experts: 8, norm_topk_prob: false,
      output_router_logits: false, router_aux_loss_coef: 0.001, mlp_only_layers: [1],
    },
    qwen3_moe: {
      architectures: ['Qwen3MoeForCausalLM'], model_type: 'qwen3_moe', attention_bias: false, attention_dropout: 0.0,
      bos_token_id: 256, decoder_sparse_step: 1, eos_token_id: 257, head_dim: 24, hidden_act: 'silu', hidden_size: 64,
      initializer_range: 0.02, intermediate_size: 128, max_position_embeddings: 64, max_window_layers: 3, mlp_only_layers: [],
      moe_intermediate_size: 32, norm_topk_prob: true, num_attention_heads: 4, num_experts: 8, num_experts_per_tok: 2,
      num_hidden_layers: 3, num_key_value_heads: 2, output_router_logits: false, rms_norm_eps: 1e-6, rope_scaling: null,
      rope_theta: 1e6, router_aux_loss_coef: 0.001, sliding_window: null, tie_word_embeddings: false, torch_dtype: 'bfloat16',
      use_cache: true, use_sliding_window: false, vocab_size: 259,
    },
    olmoe: {
      architectures: ['OlmoeForCausalLM'], model_type: 'olmoe', attention_bias: false, attention_dropout: 0.0, clip_qkv: 1.5,
      eos_token_id: 257, hidden_act: 'silu', hidden_size: 64, initializer_range: 0.02, intermediate_size: 32,
      max_position_embeddings: 64, norm_topk_prob: false, num_attention_heads: 4, num_experts: 16, num_experts_per_tok: 4,
      num_hidden_layers: 2, num_key_value_heads: 2, output_router_logits: false, pad_token_id: 258, rms_norm_eps: 1e-5,
      rope_scaling: null, rope_theta: 10000.0, router_aux_loss_coef: 0.01, tie_word_embeddings: false, torch_dtype: 'bfloat16',
      use_cache: true, vocab_size: 259,
    },
    gpt_oss: {
      architectures: ['GptOssForCausalLM'], model_type: 'gpt_oss', attention_bias: true, attention_dropout: 0.0, eos_token_id: 257,
      experts_per_token: 2, head_dim: 32, hidden_act: 'silu', hidden_size: 64, initial_context_length: 16, initializer_range: 0.02,
      intermediate_size: 64, layer_types: ['sliding_attention', 'full_attention', 'sliding_attention'], max_position_embeddings: 64,
      num_attention_heads: 4, num_experts_per_tok: 2, num_hidden_layers: 3, num_key_value_heads: 2, num_local_experts: 8,
      output_router_logits: false, pad_token_id: 258, rms_norm_eps: 1e-5,
      rope_scaling: { beta_fast: 32.0, beta_slow: 1.0, factor: 4.0, original_max_position_embeddings: 16, rope_type: 'yarn', truncate: false },
      rope_theta: 150000, router_aux_loss_coef: 0.9, sliding_window: 4, swiglu_limit: 7.0, tie_word_embeddings: false,
      torch_dtype: 'bfloat16', use_cache: true, vocab_size: 259,
    },
  };
}

// ---------------------------------------------------------------------------------------------------
// tensor names and shapes (from the modeling files, with each class's config defaults)

/** How a tensor's random values are drawn. */
type Init =
  | { kind: 'normal'; std: number }
  | { kind: 'norm' } // 1 + 0.1·N(0, 1)
  | { kind: 'bytes' } // uniform uint8 (MXFP4 blocks)
  | { kind: 'scales'; lo: number; hi: number }; // uniform integers in [lo, hi] (MXFP4 E8M0 scales)

interface TensorSpec { name: string; shape: number[]; init: Init; quantized?: boolean }

function intKey(c: Raw, key: string, fallback?: number): number {
  const v = c[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) throw new Error(`tiny-hf-checkpoint: ${key} must be an integer, got ${JSON.stringify(v)}`);
  return v;
}

const boolKey = (c: Raw, key: string, fallback: boolean): boolean => (typeof c[key] === 'boolean' ? (c[key] as boolean) : fallback);

function tensorSpecs(c: Raw, mxfp4: boolean): TensorSpec[] {
  const family = c.model_type;
  const D = intKey(c, 'hidden_size');
  const V = intKey(c, 'vocab_size');
  const L = intKey(c, 'num_hidden_layers');
  const H = intKey(c, 'num_attention_heads');
  const KV = c.num_key_value_heads == null ? H : intKey(c, 'num_key_value_heads');
  // qwen2_moe and olmoe attention use hidden // heads; the others honour head_dim (GptOssConfig
  // defaults it to 64 when the key is absent, to hidden // heads when it is null).
  let hd: number;
  if (family === 'qwen2_moe' || family === 'olmoe') hd = D / H;
  else if (c.head_dim != null) hd = intKey(c, 'head_dim');
  else hd = family === 'gpt_oss' && !('head_dim' in c) ? 64 : Math.floor(D / H);
  const I = intKey(c, 'intermediate_size');
  const lin = (name: string, out: number, inner: number): TensorSpec => ({ name, shape: [out, inner], init: { kind: 'normal', std: 1 / Math.sqrt(inner) } });
  const vec = (name: string, n: number, std = 0.1): TensorSpec => ({ name, shape: [n], init: { kind: 'normal', std } });
  const expertBias = (name: string, experts: number, n: number): TensorSpec => ({ name, shape: [experts, n], init: { kind: 'normal', std: 0.1 } });
  const norm = (name: string, n: number): TensorSpec => ({ name, shape: [n], init: { kind: 'norm' } });
  const swigluOf = (p: string, inter: number): TensorSpec[] => [lin(`${p}gate_proj.weight`, inter, D), lin(`${p}up_proj.weight`, inter, D), lin(`${p}down_proj.weight`, D, inter)];

  const specs: TensorSpec[] = [{ name: 'model.embed_tokens.weight', shape: [V, D], init: { kind: 'normal', std: 1 } }];
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}.`;
    const a = `${p}self_attn.`;
    specs.push(norm(`${p}input_layernorm.weight`, D));
    specs.push(lin(`${a}q_proj.weight`, H * hd, D), lin(`${a}k_proj.weight`, KV * hd, D), lin(`${a}v_proj.weight`, KV * hd, D), lin(`${a}o_proj.weight`, D, H * hd));
    const qkvBias = family === 'qwen2_moe' ? boolKey(c, 'qkv_bias', true) : family === 'mixtral' ? false : boolKey(c, 'attention_bias', family === 'gpt_oss');
    const oBias = family === 'qwen2_moe' || family === 'mixtral' ? false : boolKey(c, 'attention_bias', family === 'gpt_oss');
    if (qkvBias) specs.push(vec(`${a}q_proj.bias`, H * hd), vec(`${a}k_proj.bias`, KV * hd), vec(`${a}v_proj.bias`, KV * hd));
    if (oBias) specs.push(vec(`${a}o_proj.bias`, D));
    if (family === 'qwen3_moe') specs.push(norm(`${a}q_norm.weight`, hd), norm(`${a}k_norm.weight`, hd));
    if (family === 'olmoe') specs.push(norm(`${a}q_norm.weight`, H * hd), norm(`${a}k_norm.weight`, KV * hd));
    if (family === 'gpt_oss') specs.push(vec(`${a}sinks`, H, 1));
    specs.push(norm(`${p}post_attention_layernorm.weight`, D));

    const m = `${p}mlp.`;
    switch (family) {
      case 'mixtral': {
        const E = intKey(c, 'num_local_experts', 8);
        const b = `${p}block_sparse_moe.`;
        specs.push(lin(`${b}gate.weight`, E, D));
        for (let e = 0; e < E; e++) {
          const x = `${b}experts.${e}.`;
          specs.push(lin(`${x}w1.weight`, I, D), lin(`${x}w2.weight`, D, I), lin(`${x}w3.weight`, I, D));
        }
        break;
      }
      case 'qwen2_moe':
      case 'qwen3_moe': {
        const E = intKey(c, 'num_experts', family === 'qwen2_moe' ? 60 : 128);
        const only = Array.isArray(c.mlp_only_layers) ? (c.mlp_only_layers as number[]) : [];
        const step = intKey(c, 'decoder_sparse_step', 1);
        if (only.includes(l) || E === 0 || (l + 1) % step !== 0) {
          specs.push(...swigluOf(m, I));
          break;
        }
        const Im = intKey(c, 'moe_intermediate_size', family === 'qwen2_moe' ? 1408 : 768);
        specs.push(lin(`${m}gate.weight`, E, D));
        for (let e = 0; e < E; e++) specs.push(...swigluOf(`${m}experts.${e}.`, Im));
        if (family === 'qwen2_moe') {
          specs.push(...swigluOf(`${m}shared_expert.`, intKey(c, 'shared_expert_intermediate_size', 5632)));
          specs.push(lin(`${m}shared_expert_gate.weight`, 1, D));
        }
        break;
      }
      case 'olmoe': {
        const E = intKey(c, 'num_experts', 64);
        specs.push(lin(`${m}gate.weight`, E, D));
        for (let e = 0; e < E; e++) specs.push(...swigluOf(`${m}experts.${e}.`, I));
        break;
      }
      case 'gpt_oss': {
        const E = intKey(c, 'num_local_experts', 128);
        const x = `${m}experts.`;
        specs.push(lin(`${m}router.weight`, E, D), vec(`${m}router.bias`, E));
        if (mxfp4) {
          if (D % 32 || I % 32) throw new Error('tiny-hf-checkpoint: MXFP4 needs hidden_size and intermediate_size multiples of 32');
          // Packed along the input dimension: [E, out, in / 32, 16] bytes and [E, out, in / 32] scales.
          // Scale exponents −4..−2 for gate_up (so the SwiGLU clamp at 7 bites now and then), −6..−4 for down.
          specs.push({ name: `${x}gate_up_proj_blocks`, shape: [E, 2 * I, D / 32, 16], init: { kind: 'bytes' }, quantized: true });
          specs.push({ name: `${x}gate_up_proj_scales`, shape: [E, 2 * I, D / 32], init: { kind: 'scales', lo: 123, hi: 125 }, quantized: true });
          specs.push(expertBias(`${x}gate_up_proj_bias`, E, 2 * I));
          specs.push({ name: `${x}down_proj_blocks`, shape: [E, D, I / 32, 16], init: { kind: 'bytes' }, quantized: true });
          specs.push({ name: `${x}down_proj_scales`, shape: [E, D, I / 32], init: { kind: 'scales', lo: 121, hi: 123 }, quantized: true });
          specs.push(expertBias(`${x}down_proj_bias`, E, D));
        } else {
          // Fused, [E, in, out]: gate and up interleaved along the last axis. gate_up is drawn wide
          // (std 3.5/√D) so the SwiGLU clamp at 7 bites now and then, as with the MXFP4 scales above.
          specs.push({ name: `${x}gate_up_proj`, shape: [E, D, 2 * I], init: { kind: 'normal', std: 3.5 / Math.sqrt(D) } });
          specs.push(expertBias(`${x}gate_up_proj_bias`, E, 2 * I));
          specs.push({ name: `${x}down_proj`, shape: [E, I, D], init: { kind: 'normal', std: 1 / Math.sqrt(I) } });
          specs.push(expertBias(`${x}down_proj_bias`, E, D));
        }
        break;
      }
      default:
        throw new Error(`tiny-hf-checkpoint: unsupported model_type ${JSON.stringify(family)}`);
    }
  }
  specs.push(norm('model.norm.weight', D));
  if (!boolKey(c, 'tie_word_embeddings', false)) specs.push(lin('lm_head.weight', V, D));
  return specs;
}

// ---------------------------------------------------------------------------------------------------
// random values


function normalSource(uniform: () => number): () => number {
  return () => {
    const u = 1 - uniform(); // (0, 1]
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * uniform());
  };
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float32 bits of a bf16 rounding (round to nearest even) of x. */
function bf16Bits(x: number): number {
  f32[0] = x;
  const bits = u32[0];
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x7fffff) !== 0) return 0x7fc0; // NaN
  return (bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16;
}

function bf16FromBits(b: number): number {
  u32[0] = b << 16;
  return f32[0];
}

// ---------------------------------------------------------------------------------------------------
// safetensors

const BYTES: Record<Dtype, number> = { BF16: 2, F32: 4, U8: 1 };

function encode(values: Float32Array | Uint8Array, dtype: Dtype): Uint8Array {
  if (dtype === 'U8') return values as Uint8Array;
  const out = new Uint8Array(values.length * BYTES[dtype]);
  const view = new DataView(out.buffer);
  if (dtype === 'F32') for (let i = 0; i < values.length; i++) view.setFloat32(i * 4, values[i], true);
  else for (let i = 0; i < values.length; i++) view.setUint16(i * 2, bf16Bits(values[i]), true);
  return out;
}

/** u64 LE header length | JSON header (space-padded to 8 bytes) | tensor bytes in header order. */
function safetensorsFile(entries: Array<{ name: string; shape: number[]; dtype: Dtype; bytes: Uint8Array }>): Buffer {
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  let offset = 0;
  for (const e of entries) {
    header[e.name] = { dtype: e.dtype, shape: e.shape, data_offsets: [offset, offset + e.bytes.length] };
    offset += e.bytes.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  const head = Buffer.from(json, 'utf8');
  const out = Buffer.alloc(8 + head.length + offset);
  out.writeBigUInt64LE(BigInt(head.length), 0);
  head.copy(out, 8);
  let at = 8 + head.length;
  for (const e of entries) {
    out.set(e.bytes, at);
    at += e.bytes.length;
  }
  return out;
}

const shardName = (i: number, n: number) => `model-${String(i + 1).padStart(5, '0')}-of-${String(n).padStart(5, '0')}.safetensors`;

/** Writes config.json + sharded safetensors (`model-0000i-of-0000N.safetensors`) + `model.safetensors.index.json` (metadata.total_size, weight_map). Values are random (seeded, deterministic), rounded to bf16 when dtype is BF16 so the returned values are exactly what is stored. */
export async function writeTinyHfCheckpoint(dir: string, config: Record<string, unknown>, opts: { seed: number; shards?: number; dtype?: 'BF16' | 'F32'; mxfp4?: boolean }): Promise<TinyCheckpoint> {
  const dtype = opts.dtype ?? 'BF16';
  const shards = opts.shards ?? 2;
  const mxfp4 = opts.mxfp4 ?? false;
  if (mxfp4 && config.model_type !== 'gpt_oss') throw new Error('tiny-hf-checkpoint: mxfp4 is for gpt_oss experts only');
  if (!Number.isInteger(shards) || shards < 1) throw new Error(`tiny-hf-checkpoint: shards must be a positive integer, got ${shards}`);

  const uniform = mulberry32(opts.seed);
  const normal = normalSource(uniform);
  const tensors: TinyCheckpoint['tensors'] = new Map();
  for (const spec of tensorSpecs(config, mxfp4)) {
    const n = spec.shape.reduce((a, b) => a * b, 1);
    const init = spec.init;
    if (init.kind === 'bytes' || init.kind === 'scales') {
      const values = new Uint8Array(n);
      for (let i = 0; i < n; i++) values[i] = init.kind === 'bytes' ? Math.floor(uniform() * 256) : init.lo + Math.floor(uniform() * (init.hi - init.lo + 1));
      tensors.set(spec.name, { shape: spec.shape, values, dtype: 'U8' });
      continue;
    }
    const values = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      const v = init.kind === 'norm' ? 1 + 0.1 * normal() : init.std * normal();
      values[i] = dtype === 'BF16' ? bf16FromBits(bf16Bits(v)) : v;
    }
    tensors.set(spec.name, { shape: spec.shape, values, dtype });
  }

  // Shards balanced by bytes, in tensor order; each gets at least one tensor.
  const entries = [...tensors].map(([name, t]) => ({ name, shape: t.shape, dtype: t.dtype, bytes: encode(t.values, t.dtype) }));
  if (entries.length < shards) throw new Error(`tiny-hf-checkpoint: ${entries.length} tensors cannot fill ${shards} shards`);
  const total = entries.reduce((a, e) => a + e.bytes.length, 0);
  const groups: Array<typeof entries> = Array.from({ length: shards }, () => []);
  let before = 0;
  entries.forEach((e, i) => {
    let s = Math.min(shards - 1, Math.floor((shards * (before + e.bytes.length / 2)) / total));
    // Leave at least one tensor for each later shard.
    s = Math.max(s, shards - (entries.length - i));
    groups[s].push(e);
    before += e.bytes.length;
  });
  for (let s = 0; s < shards; s++) if (!groups[s].length) throw new Error(`tiny-hf-checkpoint: shard ${s + 1} came out empty`);

  await mkdir(dir, { recursive: true });
  const written: Raw = { ...config };
  if (!('torch_dtype' in written)) written.torch_dtype = dtype === 'BF16' ? 'bfloat16' : 'float32';
  if (mxfp4 && !('quantization_config' in written)) {
    written.quantization_config = { modules_to_not_convert: ['model.layers.*.self_attn', 'model.layers.*.mlp.router', 'model.embed_tokens', 'lm_head'], quant_method: 'mxfp4' };
  }
  await writeFile(join(dir, 'config.json'), JSON.stringify(written, null, 2) + '\n');
  const weightMap: Record<string, string> = {};
  for (let s = 0; s < shards; s++) {
    const file = shardName(s, shards);
    await writeFile(join(dir, file), safetensorsFile(groups[s]));
    for (const e of groups[s]) weightMap[e.name] = file;
  }
  const sortedMap = Object.fromEntries(Object.keys(weightMap).sort().map((k) => [k, weightMap[k]]));
  await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: total }, weight_map: sortedMap }, null, 2) + '\n');
  return { tensors };
}
