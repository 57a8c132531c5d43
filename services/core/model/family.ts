// The one description of a model family that model, checkpoint, router and expert code ask instead of
// reading family-specific config keys or tensor names: which layers route to experts, how wide each MLP
// is, whether the chosen weights are renormalised, and the published Hugging Face names of the tensors
// that differ between families (attention and norms are Llama-style in every family, see hf.ts).
import type { ExpertActivation } from './expert.js';
import { gptOssExpertTensorNames } from './gpt-oss-experts.js';
import { attentionWindow, ConfigError, type DeepseekConfig, type GptOssConfig, type MixtralConfig, type ModelConfig, type OlmoeConfig, type Qwen2MoeConfig, type Qwen3MoeConfig } from '../config.js';

/** A SwiGLU matrix in Mixtral terms: w1 = gate_proj, w3 = up_proj, w2 = down_proj. */
export type SwigluPart = 'w1' | 'w2' | 'w3';
export const SWIGLU_PARTS: readonly SwigluPart[] = ['w1', 'w2', 'w3'];

export interface FamilyNames {
  /** Router weight [experts, hidden] of MoE layer l. */
  gate(l: number): string;
  /** Aux-loss-free balancing bias [experts] of MoE layer l (Switchyard's own, when enabled). */
  balanceBias(l: number): string;
  /** One matrix of routed expert e of MoE layer l. */
  expert(l: number, e: number, part: SwigluPart): string;
  isExpertTensor(name: string): boolean;
  /** The always-on SwiGLU MLP of layer l that the router computes: a dense layer's MLP or an MoE layer's shared experts. */
  routerMlp(l: number, part: SwigluPart): string;
  /** Qwen2-MoE's shared-expert gate [1, hidden] of MoE layer l (families with ModelFamily.sharedExpertGate). */
  sharedExpertGate(l: number): string;
  /** The router's bias [experts] of MoE layer l (families with ModelFamily.gateBias). */
  gateBias(l: number): string;
  /**
   * Every checkpoint tensor a holder of expert e of layer l reads: its three matrices, or (fused experts)
   * the layer's tensors that hold every expert of it.
   */
  expertTensors(l: number, e: number): string[];
}



/** What a family adds to Llama attention, between the q|k|v projection and RoPE, and after o_proj. */
export interface AttentionVariant {
  /** q_proj, k_proj and v_proj carry biases. */
  qkvBias: boolean;
  /** o_proj carries a bias. */
  oBias: boolean;
  /** RMSNorm of q and k before RoPE: per head (Qwen3: weights [head_dim]), over the whole projection (OLMoE), or none. */
  qkNorm: 'none' | 'head' | 'whole';
  /** q, k and v clamped to ±clip after the norms (OLMoE clip_qkv). */
  clip?: number;
  /** A learned logit per head joins each softmax denominator (GPT-OSS `self_attn.sinks`). */
  sinks: boolean;
}

export interface ModelFamily {
  kind: ModelConfig['model_type'];
  layers: number;
  /** Model layer indices that have routed experts, ascending (the other layers have a dense MLP). */
  moeLayers: readonly number[];
  isMoe(l: number): boolean;
  /** Routed experts per MoE layer, and experts chosen per token. */
  experts: number;
  k: number;
  /** Intermediate width of one routed expert. */
  expertIntermediate: number;
  /** Intermediate width of layer l's router-side MLP (dense MLP or all shared experts together); 0 = none. */
  routerMlpWidth(l: number): number;
  /** Whether the k chosen softmax weights are renormalised to sum to 1 (Mixtral; DeepSeek's norm_topk_prob). */
  renormalize: boolean;
  /** Whether the hand-written backward covers the family (training refuses it otherwise). */
  trainable: boolean;
  /** Whether an MoE layer's router-side MLP (shared expert) is scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE). */
  sharedExpertGate: boolean;
  attention: AttentionVariant;
  /** Whether the router adds a bias to its logits (GPT-OSS). */
  gateBias: boolean;
  /** Whether one checkpoint tensor holds every expert of a layer (GPT-OSS `mlp.experts.gate_up_proj`). */
  fusedExperts: boolean;
  /** What a routed expert computes (expert.ts): SwiGLU, or GPT-OSS's clamped SwiGLU with biases. */
  expertActivation: ExpertActivation;
  /** Layer l's attention window in positions (see attentionWindow in config.ts), undefined = full causal. */
  window(l: number): number | undefined;
  names: FamilyNames;
}

const SILU_EXPERT: ExpertActivation = { kind: 'silu' };
const LLAMA_ATTENTION: AttentionVariant = { qkvBias: false, oBias: false, qkNorm: 'none', sinks: false };
const noSharedGate = (l: number): string => { throw new Error(`layer ${l} has no shared-expert gate in this family`); };
const noGateBias = (l: number): string => { throw new Error(`layer ${l}'s router has no bias in this family`); };

const HF_PROJ: Record<SwigluPart, string> = { w1: 'gate_proj', w3: 'up_proj', w2: 'down_proj' };

function mixtralFamily(c: MixtralConfig): ModelFamily {
  const layers = Array.from({ length: c.num_hidden_layers }, (_, l) => l);
  const moe = (l: number) => `model.layers.${l}.block_sparse_moe`;
  return {
    kind: 'mixtral', layers: c.num_hidden_layers, moeLayers: layers, isMoe: (l) => l >= 0 && l < c.num_hidden_layers,
    experts: c.num_local_experts, k: c.num_experts_per_tok, expertIntermediate: c.intermediate_size,
    routerMlpWidth: () => 0, renormalize: true, trainable: true, sharedExpertGate: false, attention: LLAMA_ATTENTION, gateBias: false, fusedExperts: false, expertActivation: SILU_EXPERT, window: () => attentionWindow(c),
    names: {
      gate: (l) => `${moe(l)}.gate.weight`,
      balanceBias: (l) => `${moe(l)}.gate.e_score_correction_bias`,
      expert: (l, e, part) => `${moe(l)}.experts.${e}.${part}.weight`,
      isExpertTensor: (name) => name.includes('.block_sparse_moe.experts.'),
      routerMlp: (l) => { throw new Error(`Mixtral layer ${l} has no router-side MLP`); },
      sharedExpertGate: noSharedGate,
      gateBias: noGateBias,
      expertTensors: (l, e) => SWIGLU_PARTS.map((part) => `${moe(l)}.experts.${e}.${part}.weight`),
    },
  };
}

function deepseekFamily(c: DeepseekConfig): ModelFamily {
  // HF DeepseekDecoderLayer: routed experts where layer ≥ first_k_dense_replace and layer % moe_layer_freq == 0.
  const isMoe = (l: number) => l >= c.first_k_dense_replace && l < c.num_hidden_layers && l % c.moe_layer_freq === 0;
  const shared = c.moe_intermediate_size * (c.n_shared_experts ?? 0);
  return {
    kind: 'deepseek', layers: c.num_hidden_layers,
    moeLayers: Array.from({ length: c.num_hidden_layers }, (_, l) => l).filter(isMoe), isMoe,
    experts: c.n_routed_experts, k: c.num_experts_per_tok, expertIntermediate: c.moe_intermediate_size,
    routerMlpWidth: (l) => (isMoe(l) ? shared : c.intermediate_size),
    renormalize: c.norm_topk_prob, trainable: true, sharedExpertGate: false, attention: LLAMA_ATTENTION, gateBias: false, fusedExperts: false, expertActivation: SILU_EXPERT, window: () => attentionWindow(c),
    names: mlpFamilyNames(isMoe, 'shared_experts', false),
  };
}

/**
 * Names of the families that keep a layer's feed-forward under `model.layers.L.mlp` (DeepSeek, Qwen, OLMoE):
 * router `mlp.gate`, experts `mlp.experts.E.{gate,up,down}_proj`, the dense MLP of a dense layer directly
 * under `mlp`, an MoE layer's shared experts under `mlp.<shared>`, and Qwen2's `mlp.shared_expert_gate`.
 */
function mlpFamilyNames(isMoe: (l: number) => boolean, shared: string | undefined, gated: boolean): FamilyNames {
  const mlp = (l: number) => `model.layers.${l}.mlp`;
  const expert = (l: number, e: number, part: SwigluPart) => `${mlp(l)}.experts.${e}.${HF_PROJ[part]}.weight`;
  return {
    gate: (l) => `${mlp(l)}.gate.weight`,
    balanceBias: (l) => `${mlp(l)}.gate.e_score_correction_bias`,
    expert,
    isExpertTensor: (name) => name.includes('.mlp.experts.'),
    routerMlp: (l, part) => (isMoe(l) ? `${mlp(l)}.${shared}.${HF_PROJ[part]}.weight` : `${mlp(l)}.${HF_PROJ[part]}.weight`),
    sharedExpertGate: gated ? (l) => `${mlp(l)}.shared_expert_gate.weight` : noSharedGate,
    gateBias: noGateBias,
    expertTensors: (l, e) => SWIGLU_PARTS.map((part) => expert(l, e, part)),
  };
}

/**
 * Qwen2-MoE, Qwen3-MoE and OLMoE: routed experts `mlp.experts.{e}.{gate,up,down}_proj`, router `mlp.gate`.
 * Qwen (HF Qwen2MoeDecoderLayer/Qwen3MoeDecoderLayer): layer l is sparse unless listed in mlp_only_layers,
 * when (l + 1) is a multiple of decoder_sparse_step; the others have a dense MLP of intermediate_size.
 */
function mlpExpertsFamily(
  c: Qwen2MoeConfig | Qwen3MoeConfig | OlmoeConfig, isMoe: (l: number) => boolean, expertIntermediate: number,
  routerMlpWidth: (l: number) => number, sharedName: string | undefined, attention: AttentionVariant, trainable: boolean,
): ModelFamily {
  const inRange = (l: number) => l >= 0 && l < c.num_hidden_layers && isMoe(l);
  return {
    kind: c.model_type, layers: c.num_hidden_layers,
    moeLayers: Array.from({ length: c.num_hidden_layers }, (_, l) => l).filter(inRange), isMoe: inRange,
    experts: c.num_experts, k: c.num_experts_per_tok, expertIntermediate,
    routerMlpWidth, renormalize: c.norm_topk_prob, trainable, sharedExpertGate: sharedName !== undefined, attention, gateBias: false, fusedExperts: false, expertActivation: SILU_EXPERT, window: () => attentionWindow(c),
    names: mlpFamilyNames(inRange, sharedName, sharedName !== undefined),
  };
}

const qwenIsMoe = (c: Qwen2MoeConfig | Qwen3MoeConfig) => (l: number) => !c.mlp_only_layers.includes(l) && (l + 1) % c.decoder_sparse_step === 0;

function qwen2MoeFamily(c: Qwen2MoeConfig): ModelFamily {
  const isMoe = qwenIsMoe(c);
  const shared = c.shared_expert_intermediate_size;
  return mlpExpertsFamily(c, isMoe, c.moe_intermediate_size, (l) => (isMoe(l) ? shared : c.intermediate_size), shared > 0 ? 'shared_expert' : undefined,
    { qkvBias: c.qkv_bias, oBias: false, qkNorm: 'none', sinks: false }, true);
}

function qwen3MoeFamily(c: Qwen3MoeConfig): ModelFamily {
  const isMoe = qwenIsMoe(c);
  return mlpExpertsFamily(c, isMoe, c.moe_intermediate_size, (l) => (isMoe(l) ? 0 : c.intermediate_size), undefined,
    { qkvBias: c.attention_bias, oBias: c.attention_bias, qkNorm: 'head', sinks: false }, true);
}

function olmoeFamily(c: OlmoeConfig): ModelFamily {
  return mlpExpertsFamily(c, () => true, c.intermediate_size, () => 0, undefined,
    { qkvBias: c.attention_bias, oBias: c.attention_bias, qkNorm: 'whole', sinks: false, ...(c.clip_qkv === null ? {} : { clip: c.clip_qkv }) }, true);
}

/**
 * GPT-OSS (HF GptOssDecoderLayer): every layer sparse, the router `mlp.router` with a bias, experts fused
 * per layer, attention with biases and sinks, sliding or full per `layer_types`.
 */
function gptOssFamily(c: GptOssConfig): ModelFamily {
  const mlp = (l: number) => `model.layers.${l}.mlp`;
  const L = c.num_hidden_layers;
  const mxfp4 = c.quantization_config != null;
  const windows = c.layer_types.map((type) => (type === 'sliding_attention' && c.sliding_window !== null && c.sliding_window < c.max_position_embeddings ? c.sliding_window : undefined));
  const isMoe = (l: number) => l >= 0 && l < L;
  return {
    kind: 'gpt_oss', layers: L, moeLayers: Array.from({ length: L }, (_, l) => l), isMoe,
    experts: c.num_local_experts, k: c.num_experts_per_tok, expertIntermediate: c.intermediate_size,
    routerMlpWidth: () => 0, renormalize: true, trainable: false, sharedExpertGate: false,
    attention: { qkvBias: true, oBias: true, qkNorm: 'none', sinks: true }, gateBias: true, fusedExperts: true,
    expertActivation: { kind: 'clamped-swiglu', alpha: c.swiglu_alpha, limit: c.swiglu_limit },
    window: (l) => windows[l],
    names: {
      gate: (l) => `${mlp(l)}.router.weight`,
      gateBias: (l) => `${mlp(l)}.router.bias`,
      balanceBias: (l) => `${mlp(l)}.router.e_score_correction_bias`,
      expert: (l) => { throw new Error(`GPT-OSS layer ${l} keeps its experts fused (see expertTensors)`); },
      isExpertTensor: (name) => name.includes('.mlp.experts.'),
      routerMlp: (l) => { throw new Error(`GPT-OSS layer ${l} has no router-side MLP`); },
      sharedExpertGate: noSharedGate,
      expertTensors: (l) => gptOssExpertTensorNames(l, mxfp4 ? 'mxfp4' : 'unquantized'),
    },
  };
}

/** Throws when a config can be served but not trained here (every trainer calls this before starting). */
export function assertTrainable(config: ModelConfig): void {
  const family = familyOf(config);
  if (!family.trainable)
    throw new ConfigError(`model_type '${config.model_type}' cannot be trained yet (the hand-written backward does not cover it); it can be served and generated from`);
  if (config.tie_word_embeddings)
    throw new ConfigError('tie_word_embeddings: true is supported for inference only; training with tied embeddings is not implemented');
}

const cache = new WeakMap<ModelConfig, ModelFamily>();

/** The family description of a validated config (cached per config object). */
export function familyOf(config: ModelConfig): ModelFamily {
  let family = cache.get(config);
  if (!family) {
    switch (config.model_type) {
      case 'deepseek': family = deepseekFamily(config); break;
      case 'qwen2_moe': family = qwen2MoeFamily(config); break;
      case 'qwen3_moe': family = qwen3MoeFamily(config); break;
      case 'olmoe': family = olmoeFamily(config); break;
      case 'gpt_oss': family = gptOssFamily(config); break;
      default: family = mixtralFamily(config);
    }
    cache.set(config, family);
  }
  return family;
}
