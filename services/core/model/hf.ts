// Conversion between Hugging Face Mixtral tensors ([out, in] linear weights, separate q/k/v and w1/w3)
// and Switchyard's compute layout ([in, out], q|k|v side by side). Checkpoints are always HF layout.
import type { Tensor as HostTensor } from '../checkpoint/safetensors.js';
import { headDim, type ModelConfig } from '../config.js';
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
  moeNorm: (l: number) => `layers.${l}.moe_norm`,
  gate: (l: number) => `layers.${l}.gate`,
};

export const hfNames = {
  embed: 'model.embed_tokens.weight',
  norm: 'model.norm.weight',
  lmHead: 'lm_head.weight',
  q: (l: number) => `model.layers.${l}.self_attn.q_proj.weight`,
  k: (l: number) => `model.layers.${l}.self_attn.k_proj.weight`,
  v: (l: number) => `model.layers.${l}.self_attn.v_proj.weight`,
  o: (l: number) => `model.layers.${l}.self_attn.o_proj.weight`,
  attnNorm: (l: number) => `model.layers.${l}.input_layernorm.weight`,
  moeNorm: (l: number) => `model.layers.${l}.post_attention_layernorm.weight`,
  gate: (l: number) => `model.layers.${l}.block_sparse_moe.gate.weight`,
  expert: (l: number, e: number, w: 'w1' | 'w2' | 'w3') => `model.layers.${l}.block_sparse_moe.experts.${e}.${w}.weight`,
  balanceBias: (l: number) => `model.layers.${l}.block_sparse_moe.gate.e_score_correction_bias`,
};

export const isExpertTensor = (name: string): boolean => name.includes('.block_sparse_moe.experts.');

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
    out.set(denseNames.attnNorm(l), need(tensors, hfNames.attnNorm(l)));
    out.set(denseNames.moeNorm(l), need(tensors, hfNames.moeNorm(l)));
    out.set(denseNames.gate(l), flip(need(tensors, hfNames.gate(l))));
  }
  return out;
}

export function denseToHf(config: ModelConfig, dense: Map<string, HostTensor>): Map<string, HostTensor> {
  const out = new Map<string, HostTensor>();
  const D = config.hidden_size;
  const hd = headDim(config);
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
    out.set(hfNames.o(l), flip(get(denseNames.wo(l))));
    out.set(hfNames.gate(l), flip(get(denseNames.gate(l))));
    out.set(hfNames.attnNorm(l), get(denseNames.attnNorm(l)));
    out.set(hfNames.moeNorm(l), get(denseNames.moeNorm(l)));
  }
  out.set(hfNames.norm, get(denseNames.norm));
  if (!config.tie_word_embeddings) out.set(hfNames.lmHead, flip(get(denseNames.lmHead)));
  return out;
}

export interface HostExpert { w1t: HostTensor; w3t: HostTensor; w2t: HostTensor }

export function expertFromHf(tensors: Map<string, HostTensor>, layer: number, expert: number): HostExpert {
  return {
    w1t: flip(need(tensors, hfNames.expert(layer, expert, 'w1'))),
    w3t: flip(need(tensors, hfNames.expert(layer, expert, 'w3'))),
    w2t: flip(need(tensors, hfNames.expert(layer, expert, 'w2'))),
  };
}

export function expertToHf(out: Map<string, HostTensor>, layer: number, expert: number, w: HostExpert): void {
  out.set(hfNames.expert(layer, expert, 'w1'), flip(w.w1t));
  out.set(hfNames.expert(layer, expert, 'w3'), flip(w.w3t));
  out.set(hfNames.expert(layer, expert, 'w2'), flip(w.w2t));
}

/**
 * Every tensor of a Hugging Face Mixtral checkpoint with its shape ([out, in] for linear weights, as in
 * PyTorch), plus the balancing bias when the config enables it; no lm_head.weight when the embeddings
 * are tied (Hugging Face stores the shared matrix once).
 */
export function mixtralTensorShapes(config: ModelConfig): Map<string, number[]> {
  const h = config.hidden_size;
  const hd = headDim(config);
  const q = config.num_attention_heads * hd;
  const kv = config.num_key_value_heads * hd;
  const ff = config.intermediate_size;
  const m = new Map<string, number[]>();
  m.set(hfNames.embed, [config.vocab_size, h]);
  for (let l = 0; l < config.num_hidden_layers; l++) {
    m.set(hfNames.attnNorm(l), [h]);
    m.set(hfNames.q(l), [q, h]);
    m.set(hfNames.k(l), [kv, h]);
    m.set(hfNames.v(l), [kv, h]);
    m.set(hfNames.o(l), [h, q]);
    m.set(hfNames.moeNorm(l), [h]);
    m.set(hfNames.gate(l), [config.num_local_experts, h]);
    for (let e = 0; e < config.num_local_experts; e++) {
      m.set(hfNames.expert(l, e, 'w1'), [ff, h]);
      m.set(hfNames.expert(l, e, 'w2'), [h, ff]);
      m.set(hfNames.expert(l, e, 'w3'), [ff, h]);
    }
    if (config.switchyard_gate.balance_bias_rate > 0) m.set(hfNames.balanceBias(l), [config.num_local_experts]);
  }
  m.set(hfNames.norm, [h]);
  if (!config.tie_word_embeddings) m.set(hfNames.lmHead, [config.vocab_size, h]);
  return m;
}
