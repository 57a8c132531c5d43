// Conversion between Hugging Face tensors ([out, in] linear weights, separate q/k/v and w1/w3) of any
// supported family and Switchyard's compute layout ([in, out], q|k|v side by side). Checkpoints are
// always HF layout; the family-specific names come from family.ts.
import type { Tensor as HostTensor } from '../checkpoint/safetensors.js';
import { headDim, type ModelConfig } from '../config.js';
import { familyOf, type FamilyNames, type ModelFamily, type SwigluPart } from './family.js';
import type { HostExpertParams } from './experts.js';
import { gptOssExpertFromHf, gptOssExpertNames, isGptOssByteTensor } from './gpt-oss-experts.js';
import type { StoredTensor } from '../checkpoint/safetensors.js';
import { transposeRows } from './tensors.js';

/** A tensor in host memory (the safetensors codec's type). */
export type { HostTensor };

export const denseNames = {
  embed: 'embed',
  norm: 'norm',
  lmHead: 'lm_head',
  attnNorm: (l: number) => `layers.${l}.attn_norm`,
  wqkv: (l: number) => `layers.${l}.wqkv`,
  wo: (l: number) => `layers.${l}.wo`,
  /** q|k|v biases side by side [(heads + 2·kvHeads)·headDim], and o_proj's [hidden] (AttentionVariant). */
  bqkv: (l: number) => `layers.${l}.bqkv`,
  bo: (l: number) => `layers.${l}.bo`,
  /** RMSNorm weights of q and k before RoPE: [headDim] per head, or the whole projection's width. */
  qNorm: (l: number) => `layers.${l}.q_norm`,
  kNorm: (l: number) => `layers.${l}.k_norm`,
  /** GPT-OSS attention sinks [heads]. */
  sinks: (l: number) => `layers.${l}.sinks`,
  moeNorm: (l: number) => `layers.${l}.moe_norm`,
  gate: (l: number) => `layers.${l}.gate`,
  /** The router's bias [experts] (GPT-OSS). */
  gateBias: (l: number) => `layers.${l}.gate_bias`,
  /** The router-side SwiGLU MLP of a layer (DeepSeek: dense MLP or shared experts), compute layout. */
  mlp: (l: number, part: 'w1t' | 'w3t' | 'w2t') => `layers.${l}.mlp.${part}`,
  /** Qwen2-MoE's shared-expert gate [hidden, 1], compute layout. */
  sharedGate: (l: number) => `layers.${l}.mlp.shared_gate`,
};

const MLP_PARTS = [['w1t', 'w1'], ['w3t', 'w3'], ['w2t', 'w2']] as const;

/** HF names every family shares (Llama-style attention and norms); MoE and MLP names are in family.ts. */
export const hfNames = {
  embed: 'model.embed_tokens.weight',
  norm: 'model.norm.weight',
  lmHead: 'lm_head.weight',
  q: (l: number) => `model.layers.${l}.self_attn.q_proj.weight`,
  k: (l: number) => `model.layers.${l}.self_attn.k_proj.weight`,
  v: (l: number) => `model.layers.${l}.self_attn.v_proj.weight`,
  o: (l: number) => `model.layers.${l}.self_attn.o_proj.weight`,
  qBias: (l: number) => `model.layers.${l}.self_attn.q_proj.bias`,
  kBias: (l: number) => `model.layers.${l}.self_attn.k_proj.bias`,
  vBias: (l: number) => `model.layers.${l}.self_attn.v_proj.bias`,
  oBias: (l: number) => `model.layers.${l}.self_attn.o_proj.bias`,
  qNorm: (l: number) => `model.layers.${l}.self_attn.q_norm.weight`,
  kNorm: (l: number) => `model.layers.${l}.self_attn.k_norm.weight`,
  sinks: (l: number) => `model.layers.${l}.self_attn.sinks`,
  attnNorm: (l: number) => `model.layers.${l}.input_layernorm.weight`,
  moeNorm: (l: number) => `model.layers.${l}.post_attention_layernorm.weight`,
};

/** [out, in] HF weight → [in, out] compute layout, and back. */
const flip = (t: HostTensor): HostTensor => ({ shape: [t.shape[1], t.shape[0]], values: transposeRows(t.values, t.shape[0], t.shape[1]) });

function need(tensors: Map<string, HostTensor>, name: string): HostTensor {
  const t = tensors.get(name);
  if (!t) throw new Error(`tensor ${name} missing`);
  return t;
}

/** Dense parameters in compute layout from HF tensors. */
export function denseFromHf(config: ModelConfig, tensors: Map<string, HostTensor>): Map<string, HostTensor> {
  const out = new Map<string, HostTensor>();
  const D = config.hidden_size;
  const family = familyOf(config);
  out.set(denseNames.embed, need(tensors, hfNames.embed));
  out.set(denseNames.norm, need(tensors, hfNames.norm));
  // Tied models have no LM head of their own: the model reads the embedding instead.
  if (!config.tie_word_embeddings) out.set(denseNames.lmHead, flip(need(tensors, hfNames.lmHead)));
  for (let l = 0; l < config.num_hidden_layers; l++) {
    const parts = [hfNames.q(l), hfNames.k(l), hfNames.v(l)].map((n) => flip(need(tensors, n)));
    const width = parts.reduce((s, p) => s + p.shape[1], 0);
    const qkv = new Float32Array(D * width);
    let col = 0;
    for (const p of parts) {
      for (let r = 0; r < D; r++) qkv.set(p.values.subarray(r * p.shape[1], (r + 1) * p.shape[1]), r * width + col);
      col += p.shape[1];
    }
    out.set(denseNames.wqkv(l), { shape: [D, width], values: qkv });
    out.set(denseNames.wo(l), flip(need(tensors, hfNames.o(l))));
    const a = family.attention;
    if (a.qkvBias) {
      const biases = [hfNames.qBias(l), hfNames.kBias(l), hfNames.vBias(l)].map((n) => need(tensors, n).values);
      const joined = new Float32Array(width);
      let at = 0;
      for (const b of biases) { joined.set(b, at); at += b.length; }
      out.set(denseNames.bqkv(l), { shape: [width], values: joined });
    }
    if (a.oBias) out.set(denseNames.bo(l), need(tensors, hfNames.oBias(l)));
    if (a.sinks) out.set(denseNames.sinks(l), need(tensors, hfNames.sinks(l)));
    if (a.qkNorm !== 'none') {
      out.set(denseNames.qNorm(l), need(tensors, hfNames.qNorm(l)));
      out.set(denseNames.kNorm(l), need(tensors, hfNames.kNorm(l)));
    }
    if (family.sharedExpertGate && family.isMoe(l)) out.set(denseNames.sharedGate(l), flip(need(tensors, family.names.sharedExpertGate(l))));
    out.set(denseNames.attnNorm(l), need(tensors, hfNames.attnNorm(l)));
    out.set(denseNames.moeNorm(l), need(tensors, hfNames.moeNorm(l)));
    if (family.isMoe(l)) out.set(denseNames.gate(l), flip(need(tensors, family.names.gate(l))));
    if (family.isMoe(l) && family.gateBias) out.set(denseNames.gateBias(l), need(tensors, family.names.gateBias(l)));
    if (family.routerMlpWidth(l) > 0)
      for (const [part, hf] of MLP_PARTS) out.set(denseNames.mlp(l, part), flip(need(tensors, family.names.routerMlp(l, hf))));
  }
  return out;
}

export function denseToHf(config: ModelConfig, dense: Map<string, HostTensor>): Map<string, HostTensor> {
  const out = new Map<string, HostTensor>();
  const D = config.hidden_size;
  const hd = headDim(config);
  const family = familyOf(config);
  const get = (n: string) => need(dense, n);
  out.set(hfNames.embed, get(denseNames.embed));
  for (let l = 0; l < config.num_hidden_layers; l++) {
    const qkv = get(denseNames.wqkv(l));
    const widths = [config.num_attention_heads * hd, config.num_key_value_heads * hd, config.num_key_value_heads * hd];
    const names = [hfNames.q(l), hfNames.k(l), hfNames.v(l)];
    let col = 0;
    widths.forEach((w, i) => {
      const part = new Float32Array(D * w);
      for (let r = 0; r < D; r++) part.set(qkv.values.subarray(r * qkv.shape[1] + col, r * qkv.shape[1] + col + w), r * w);
      out.set(names[i], flip({ shape: [D, w], values: part }));
      col += w;
    });
    const a = family.attention;
    if (a.qkvBias) {
      const joined = get(denseNames.bqkv(l)).values;
      let at = 0;
      [hfNames.qBias(l), hfNames.kBias(l), hfNames.vBias(l)].forEach((name, i) => {
        out.set(name, { shape: [widths[i]], values: joined.slice(at, at + widths[i]) });
        at += widths[i];
      });
    }
    if (a.qkNorm !== 'none') {
      out.set(hfNames.qNorm(l), get(denseNames.qNorm(l)));
      out.set(hfNames.kNorm(l), get(denseNames.kNorm(l)));
    }
    out.set(hfNames.o(l), flip(get(denseNames.wo(l))));
    if (a.oBias) out.set(hfNames.oBias(l), get(denseNames.bo(l)));
    if (a.sinks) out.set(hfNames.sinks(l), get(denseNames.sinks(l)));
    if (family.sharedExpertGate && family.isMoe(l)) out.set(family.names.sharedExpertGate(l), flip(get(denseNames.sharedGate(l))));
    if (family.isMoe(l)) out.set(family.names.gate(l), flip(get(denseNames.gate(l))));
    if (family.isMoe(l) && family.gateBias) out.set(family.names.gateBias(l), get(denseNames.gateBias(l)));
    if (family.routerMlpWidth(l) > 0)
      for (const [part, hf] of MLP_PARTS) out.set(family.names.routerMlp(l, hf), flip(get(denseNames.mlp(l, part))));
    out.set(hfNames.attnNorm(l), get(denseNames.attnNorm(l)));
    out.set(hfNames.moeNorm(l), get(denseNames.moeNorm(l)));
  }
  out.set(hfNames.norm, get(denseNames.norm));
  if (!config.tie_word_embeddings) out.set(hfNames.lmHead, flip(get(denseNames.lmHead)));
  return out;
}

export interface HostExpert { w1t: HostTensor; w3t: HostTensor; w2t: HostTensor }

export function expertFromHf(names: FamilyNames, tensors: Map<string, HostTensor>, layer: number, expert: number): HostExpert {
  return {
    w1t: flip(need(tensors, names.expert(layer, expert, 'w1'))),
    w3t: flip(need(tensors, names.expert(layer, expert, 'w3'))),
    w2t: flip(need(tensors, names.expert(layer, expert, 'w2'))),
  };
}

/** Expert e of layer l from a checkpoint's tensors, whatever the family stores (per-expert matrices, or fused GPT-OSS tensors). */
export function expertOfCheckpoint(family: ModelFamily, tensors: ReadonlyMap<string, StoredTensor>, layer: number, expert: number): HostExpertParams {
  if (family.fusedExperts) return gptOssExpertFromHf(tensors, layer, expert);
  return expertFromHf(family.names, tensors as Map<string, HostTensor>, layer, expert);
}

export function expertToHf(names: FamilyNames, out: Map<string, HostTensor>, layer: number, expert: number, w: HostExpert): void {
  out.set(names.expert(layer, expert, 'w1'), flip(w.w1t));
  out.set(names.expert(layer, expert, 'w3'), flip(w.w3t));
  out.set(names.expert(layer, expert, 'w2'), flip(w.w2t));
}

/** [out, in] shapes of a SwiGLU block's three matrices (PyTorch layout). */
function swigluShapes(m: Map<string, number[]>, name: (part: SwigluPart) => string, hidden: number, width: number): void {
  m.set(name('w1'), [width, hidden]);
  m.set(name('w2'), [hidden, width]);
  m.set(name('w3'), [width, hidden]);
}

/**
 * GPT-OSS's fused experts of layer l as published: bf16 `gate_up_proj` [E, hidden, 2·inter] (gate and up
 * columns interleaved) and `down_proj` [E, inter, hidden], or MXFP4 blocks [E, out, in/32, 16] (two 4-bit
 * values a byte) and scales [E, out, in/32] (uint8) when quantization_config says mxfp4; biases always.
 */
function fusedExpertShapes(m: Map<string, number[]>, config: ModelConfig, l: number, E: number, h: number, inter: number): void {
  const mxfp4 = config.model_type === 'gpt_oss' && config.quantization_config != null;
  const n = gptOssExpertNames;
  if (mxfp4) {
    m.set(n.blocks(l, 'gate_up_proj'), [E, 2 * inter, h / 32, 16]).set(n.scales(l, 'gate_up_proj'), [E, 2 * inter, h / 32]);
    m.set(n.blocks(l, 'down_proj'), [E, h, inter / 32, 16]).set(n.scales(l, 'down_proj'), [E, h, inter / 32]);
  } else {
    m.set(n.gateUp(l), [E, h, 2 * inter]);
    m.set(n.down(l), [E, inter, h]);
  }
  m.set(n.gateUpBias(l), [E, 2 * inter]).set(n.downBias(l), [E, h]);
}

/**
 * Every tensor of a Hugging Face checkpoint of the config's family with its shape ([out, in] for linear
 * weights, as in PyTorch), plus the balancing bias when the config enables it; no lm_head.weight when the
 * embeddings are tied (Hugging Face stores the shared matrix once).
 */
export function modelTensorShapes(config: ModelConfig): Map<string, number[]> {
  const h = config.hidden_size;
  const hd = headDim(config);
  const q = config.num_attention_heads * hd;
  const kv = config.num_key_value_heads * hd;
  const family = familyOf(config);
  const names = family.names;
  const m = new Map<string, number[]>();
  m.set(hfNames.embed, [config.vocab_size, h]);
  for (let l = 0; l < config.num_hidden_layers; l++) {
    m.set(hfNames.attnNorm(l), [h]);
    m.set(hfNames.q(l), [q, h]);
    m.set(hfNames.k(l), [kv, h]);
    m.set(hfNames.v(l), [kv, h]);
    m.set(hfNames.o(l), [h, q]);
    const a = family.attention;
    if (a.qkvBias) m.set(hfNames.qBias(l), [q]).set(hfNames.kBias(l), [kv]).set(hfNames.vBias(l), [kv]);
    if (a.oBias) m.set(hfNames.oBias(l), [h]);
    if (a.sinks) m.set(hfNames.sinks(l), [config.num_attention_heads]);
    if (a.qkNorm === 'head') m.set(hfNames.qNorm(l), [hd]).set(hfNames.kNorm(l), [hd]);
    if (a.qkNorm === 'whole') m.set(hfNames.qNorm(l), [q]).set(hfNames.kNorm(l), [kv]);
    if (family.sharedExpertGate && family.isMoe(l)) m.set(names.sharedExpertGate(l), [1, h]);
    m.set(hfNames.moeNorm(l), [h]);
    if (family.isMoe(l)) {
      m.set(names.gate(l), [family.experts, h]);
      if (family.gateBias) m.set(names.gateBias(l), [family.experts]);
      if (family.fusedExperts) fusedExpertShapes(m, config, l, family.experts, h, family.expertIntermediate);
      else for (let e = 0; e < family.experts; e++) swigluShapes(m, (part) => names.expert(l, e, part), h, family.expertIntermediate);
      if (config.switchyard_gate.balance_bias_rate > 0) m.set(names.balanceBias(l), [family.experts]);
    }
    const mlpWidth = family.routerMlpWidth(l);
    if (mlpWidth > 0) swigluShapes(m, (part) => names.routerMlp(l, part), h, mlpWidth);
  }
  m.set(hfNames.norm, [h]);
  if (!config.tie_word_embeddings) m.set(hfNames.lmHead, [config.vocab_size, h]);
  return m;
}

/**
 * How every model checkpoint is checked and read: the family's tensors and shapes, and the tensors kept
 * as stored bytes (GPT-OSS's MXFP4 blocks and scales; no other family has such names).
 */
export const PUBLISHED_LAYOUT = { expectedTensors: modelTensorShapes, byteTensors: isGptOssByteTensor } as const;
