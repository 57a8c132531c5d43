// The one validated model configuration: Hugging Face Mixtral keys (so config.json interoperates) plus
// Switchyard's gate settings under `switchyard_gate`, which Hugging Face loaders ignore.
import { z } from 'zod';

export const GATE_POLICIES = ['switch', 'gshard', 'mixtral', 'topk'] as const;
export type GatePolicyKind = (typeof GATE_POLICIES)[number];

const positiveInt = z.number().int().positive();

export const gateSettingsSchema = z
  .object({
    policy: z.enum(GATE_POLICIES).default('mixtral'),
    capacity_factor: z.number().positive('capacity factor must be > 0').default(1.25),
    eval_capacity_factor: z.number().positive('eval capacity factor must be > 0').default(2.0),
    min_capacity: z.number().int().nonnegative().default(4),
    drop_tokens: z.boolean().default(true),
    aux_loss_coef: z.number().nonnegative().default(0.01),
    z_loss_coef: z.number().nonnegative().default(0.001),
    // Opt-in training noise; never applied at eval.
    jitter_eps: z.number().nonnegative().default(0),
    second_expert_sampling: z.boolean().default(false),
    // DeepSeek-V3 aux-loss-free balancing: per-expert selection bias moved by this rate per step (0 = off).
    balance_bias_rate: z.number().nonnegative().default(0),
    // DeepSpeed top1gating's use_rts (Random Token Selection) for policy 'switch': an over-full expert keeps
    // a seeded random subset of its tokens in training instead of the first ones. Unset = true for switch
    // (DeepSpeed's default); only switch accepts true.
    use_rts: z.boolean().optional(),
    // Mixtral aux loss per routing group (default) or, as Hugging Face's load_balancing_loss_func, once over
    // the whole batch and every layer pooled ('batch'; policy 'mixtral', single-process training only).
    aux_loss_scope: z.enum(['group', 'batch']).default('group'),
  })
  .strict();
export type GateSettings = z.infer<typeof gateSettingsSchema>;

/** Hugging Face `model_type` values this code implements. */
export const SUPPORTED_MODEL_TYPES = ['mixtral', 'deepseek', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'gpt_oss'] as const;

/** Checkpoint dtypes (`torch_dtype`); every one is converted to float32 for compute. */
export const TORCH_DTYPES = ['float32', 'bfloat16', 'float16'] as const;

/** Checks every family shares: attention shapes and the experts chosen per token. */
function checkShapes(c: { head_dim?: number; hidden_size: number; num_attention_heads: number; num_key_value_heads: number; num_experts_per_tok: number }, experts: { key: string; count: number }, ctx: z.RefinementCtx): void {
  const issue = (path: string, message: string) => ctx.addIssue({ code: 'custom', path: [path], message });
  if (c.head_dim === undefined && c.hidden_size % c.num_attention_heads !== 0)
    issue('hidden_size', `hidden_size ${c.hidden_size} is not divisible by num_attention_heads ${c.num_attention_heads}`);
  if (c.num_attention_heads % c.num_key_value_heads !== 0)
    issue('num_key_value_heads', `num_attention_heads ${c.num_attention_heads} is not a multiple of num_key_value_heads ${c.num_key_value_heads}`);
  if (c.num_experts_per_tok > experts.count)
    issue('num_experts_per_tok', `num_experts_per_tok (k=${c.num_experts_per_tok}) exceeds ${experts.key} (${experts.count})`);
  const hd = c.head_dim ?? c.hidden_size / c.num_attention_heads;
  if (Number.isInteger(hd) && hd % 2 !== 0) issue('head_dim', `head_dim ${hd} must be even for rotary embedding`);
}

/** `rope_scaling` types Switchyard computes (services/core/model/rope.ts); `default` (like null) is plain RoPE. */
export const ROPE_SCALING_TYPES = ['default', 'linear', 'dynamic', 'yarn', 'llama3'] as const;

/**
 * A validated `rope_scaling` (Hugging Face keys, legacy `type` read as `rope_type`); optional keys the
 * definition defaults are filled in. `default` parses to null.
 */
export type RopeScaling =
  | { rope_type: 'linear'; factor: number }
  | { rope_type: 'dynamic'; factor: number; original_max_position_embeddings?: number }
  | {
    rope_type: 'yarn'; factor: number; original_max_position_embeddings?: number; attention_factor?: number;
    beta_fast: number; beta_slow: number; mscale?: number; mscale_all_dim?: number; truncate: boolean;
  }
  | { rope_type: 'llama3'; factor: number; low_freq_factor: number; high_freq_factor: number; original_max_position_embeddings: number };

/** Each type's keys besides rope_type/type: required, then optional. */
const ROPE_SCALING_KEYS: Record<(typeof ROPE_SCALING_TYPES)[number], { required: string[]; optional: string[] }> = {
  default: { required: [], optional: [] },
  linear: { required: ['factor'], optional: [] },
  dynamic: { required: ['factor'], optional: ['original_max_position_embeddings'] },
  yarn: { required: ['factor'], optional: ['original_max_position_embeddings', 'attention_factor', 'beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim', 'truncate'] },
  llama3: { required: ['factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'], optional: [] },
};

/** Parses a `rope_scaling` value; every problem goes to `issue` (then the result is meaningless). */
export function parseRopeScaling(raw: unknown, issue: (message: string) => void): RopeScaling | null {
  if (raw === undefined || raw === null) return null;
  if (typeof raw !== 'object' || Array.isArray(raw)) {
    issue(`rope_scaling must be an object or null, not ${JSON.stringify(raw)}`);
    return null;
  }
  const r = raw as Record<string, unknown>;
  if (r.rope_type !== undefined && r.type !== undefined && r.rope_type !== r.type) {
    issue(`rope_scaling has rope_type ${JSON.stringify(r.rope_type)} and legacy type ${JSON.stringify(r.type)}: they must agree`);
    return null;
  }
  const type = r.rope_type ?? r.type;
  if (type === undefined) {
    issue(`rope_scaling ${JSON.stringify(raw)} has no rope_type (or legacy type) key`);
    return null;
  }
  if (typeof type !== 'string' || !(ROPE_SCALING_TYPES as readonly string[]).includes(type)) {
    issue(`rope_scaling type ${JSON.stringify(type)} is not supported (supported: ${ROPE_SCALING_TYPES.join(', ')})`);
    return null;
  }
  const t = type as (typeof ROPE_SCALING_TYPES)[number];
  const { required, optional } = ROPE_SCALING_KEYS[t];
  // null counts as absent, as transformers reads optional keys with .get().
  const present = Object.keys(r).filter((k) => k !== 'rope_type' && k !== 'type' && r[k] !== null && r[k] !== undefined);
  const missing = required.filter((k) => !present.includes(k));
  const unknown = present.filter((k) => !required.includes(k) && !optional.includes(k));
  let ok = true;
  if (missing.length) { issue(`rope_scaling type '${t}' is missing ${missing.join(', ')}`); ok = false; }
  if (unknown.length) {
    issue(`rope_scaling key${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')} ${unknown.length > 1 ? 'are' : 'is'} not ${t === 'default' ? 'accepted with' : 'a key of'} type '${t}' (keys: ${[...required, ...optional].join(', ') || 'none'})`);
    ok = false;
  }
  if (!ok) return null;
  if (t === 'default') return null;
  const num = (key: string, check: (v: number) => boolean, what: string): number | undefined => {
    const v = r[key];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'number' || !Number.isFinite(v) || !check(v)) { issue(`rope_scaling ${key} must be ${what}, not ${JSON.stringify(v)}`); ok = false; return undefined; }
    return v;
  };
  const factor = num('factor', (v) => v >= 1, 'a number ≥ 1')!;
  const original = num('original_max_position_embeddings', (v) => Number.isInteger(v) && v > 0, 'a positive integer');
  let out: RopeScaling;
  switch (t) {
    case 'linear': out = { rope_type: t, factor }; break;
    case 'dynamic': out = { rope_type: t, factor, ...(original === undefined ? {} : { original_max_position_embeddings: original }) }; break;
    case 'yarn': {
      const attention = num('attention_factor', (v) => v > 0, 'a number > 0');
      const betaFast = num('beta_fast', (v) => v > 0, 'a number > 0') ?? 32;
      const betaSlow = num('beta_slow', (v) => v > 0, 'a number > 0') ?? 1;
      const mscale = num('mscale', (v) => v >= 0, 'a number ≥ 0');
      const mscaleAll = num('mscale_all_dim', (v) => v >= 0, 'a number ≥ 0');
      const truncate = r.truncate ?? true;
      if (typeof truncate !== 'boolean') { issue(`rope_scaling truncate must be a boolean, not ${JSON.stringify(truncate)}`); ok = false; }
      if (ok && betaFast <= betaSlow) { issue(`rope_scaling beta_fast (${betaFast}) must exceed beta_slow (${betaSlow})`); ok = false; }
      out = {
        rope_type: t, factor, beta_fast: betaFast, beta_slow: betaSlow, truncate: truncate === true,
        ...(original === undefined ? {} : { original_max_position_embeddings: original }),
        ...(attention === undefined ? {} : { attention_factor: attention }),
        ...(mscale === undefined ? {} : { mscale }),
        ...(mscaleAll === undefined ? {} : { mscale_all_dim: mscaleAll }),
      };
      break;
    }
    case 'llama3': {
      const low = num('low_freq_factor', (v) => v > 0, 'a number > 0')!;
      const high = num('high_freq_factor', (v) => v > 0, 'a number > 0')!;
      if (ok && high <= low) { issue(`rope_scaling high_freq_factor (${high}) must exceed low_freq_factor (${low})`); ok = false; }
      out = { rope_type: t, factor, low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: original! };
      break;
    }
  }
  return ok ? out : null;
}

/** `rope_scaling` as a schema field: a validated RopeScaling, or null for none/default; absent or null reads `absent`. */
const ropeScalingField = (absent: unknown = null) => z.unknown().optional().transform((raw, ctx): RopeScaling | null => {
  let bad = false;
  const out = parseRopeScaling(raw ?? absent, (message) => { bad = true; ctx.addIssue({ code: 'custom', message }); });
  return bad ? z.NEVER : out;
});
const ropeScalingSchema = ropeScalingField();

/** The decoder's shape keys, the same in every family (head_dim: hidden/heads when absent, except GPT-OSS). */
const decoderShape = {
  hidden_size: positiveInt,
  intermediate_size: positiveInt,
  num_hidden_layers: positiveInt,
  num_attention_heads: positiveInt,
  num_key_value_heads: positiveInt,
  head_dim: positiveInt.optional(),
};

export const modelConfigSchema = z
  .object({
    architectures: z.array(z.string()).default(['MixtralForCausalLM']),
    // A field-level check, so an unknown type is named (with the supported list) even beside other errors.
    // (model_type 'deepseek' is parsed by deepseekConfigSchema; every other type but mixtral is unknown.)
    model_type: z.string().default('mixtral').superRefine((type, ctx) => {
      if (type !== 'mixtral')
        ctx.addIssue({ code: 'custom', message: `model_type '${type}' is not supported (supported: ${SUPPORTED_MODEL_TYPES.join(', ')})` });
    }).transform(() => 'mixtral' as const),
    ...decoderShape,
    num_local_experts: positiveInt,
    num_experts_per_tok: positiveInt,
    rms_norm_eps: z.number().positive().default(1e-5),
    rope_theta: z.number().positive().default(10000),
    vocab_size: positiveInt,
    max_position_embeddings: positiveInt,
    // Tied: no lm_head.weight; the LM head is the embedding matrix (inference only, see assertTrainable in model/family.ts).
    tie_word_embeddings: z.boolean().default(false),
    hidden_act: z.literal('silu').default('silu'),
    initializer_range: z.number().positive().default(0.02),
    router_aux_loss_coef: z.number().nonnegative().optional(),
    // Keys attend within this many positions (Mistral's window); null or ≥ max_position_embeddings = full causal.
    sliding_window: positiveInt.nullable().optional(),
    // null, or one of ROPE_SCALING_TYPES with its keys (docs/models.md).
    rope_scaling: ropeScalingSchema,
    // Rotary embedding on every head dimension only (the key is not in Mixtral's config; refused if partial).
    partial_rotary_factor: z.literal(1, { error: 'partial_rotary_factor must be 1 (rotary embedding on part of a head is not supported)' }).optional(),
    bos_token_id: z.number().int().nonnegative().optional(),
    eos_token_id: z.number().int().nonnegative().optional(),
    torch_dtype: z.enum(TORCH_DTYPES).default('float32'),
    switchyard_gate: gateSettingsSchema.default(gateSettingsSchema.parse({})),
  })
  .passthrough()
  .superRefine((c, ctx) => {
    const issue = (path: string, message: string) => ctx.addIssue({ code: 'custom', path: [path], message });
    checkShapes(c, { key: 'num_local_experts', count: c.num_local_experts }, ctx);
    const policy = c.switchyard_gate.policy;
    if (policy === 'switch' && c.num_experts_per_tok !== 1)
      issue('switchyard_gate', `policy 'switch' is top-1 but num_experts_per_tok is ${c.num_experts_per_tok}`);
    if (policy === 'gshard' && c.num_experts_per_tok !== 2)
      issue('switchyard_gate', `policy 'gshard' is top-2 but num_experts_per_tok is ${c.num_experts_per_tok}`);
    const gate = c.switchyard_gate;
    if (gate.second_expert_sampling && !(policy === 'gshard' || (policy === 'topk' && c.num_experts_per_tok >= 2)))
      issue('switchyard_gate', `second_expert_sampling needs policy 'gshard' or 'topk' with k ≥ 2, not '${policy}'`);
    if (gate.second_expert_sampling && gate.balance_bias_rate > 0)
      issue('switchyard_gate', 'second_expert_sampling and balance_bias_rate cannot be combined (both choose the experts)');
    if (gate.use_rts === true && policy !== 'switch')
      issue('switchyard_gate', `use_rts (Random Token Selection) is DeepSpeed's top-1 option: it needs policy 'switch', not '${policy}'`);
    if (gate.aux_loss_scope === 'batch' && policy !== 'mixtral')
      issue('switchyard_gate', `aux_loss_scope 'batch' is Hugging Face Mixtral's whole-batch load_balancing_loss_func: it needs policy 'mixtral', not '${policy}'`);
  });

export type MixtralConfig = z.infer<typeof modelConfigSchema>;

// DeepSeek-MoE (deepseek-ai/deepseek-moe-16b-base) with its own published keys; what Switchyard cannot
// compute yet is refused by name rather than silently approximated.
export const deepseekConfigSchema = z
  .object({
    architectures: z.array(z.string()).default(['DeepseekForCausalLM']),
    model_type: z.literal('deepseek'),
    hidden_size: positiveInt,
    intermediate_size: positiveInt,
    moe_intermediate_size: positiveInt,
    num_hidden_layers: positiveInt,
    num_attention_heads: positiveInt,
    num_key_value_heads: positiveInt,
    head_dim: positiveInt.optional(),
    n_routed_experts: positiveInt,
    n_shared_experts: z.number().int().nonnegative().nullable().default(null),
    num_experts_per_tok: positiveInt,
    first_k_dense_replace: z.number().int().nonnegative().default(0),
    moe_layer_freq: positiveInt.default(1),
    norm_topk_prob: z.boolean().default(false),
    scoring_func: z.literal('softmax', { error: "scoring_func must be 'softmax' (the only DeepSeek-MoE gate supported)" }).default('softmax'),
    aux_loss_alpha: z.number().nonnegative().default(0.001),
    seq_aux: z.boolean().default(true),
    rms_norm_eps: z.number().positive().default(1e-6),
    rope_theta: z.number().positive().default(10000),
    rope_scaling: ropeScalingSchema,
    partial_rotary_factor: z.literal(1, { error: 'partial_rotary_factor must be 1 (rotary embedding on part of a head is not supported)' }).optional(),
    attention_bias: z.literal(false, { error: 'attention_bias must be false (biased attention projections are not supported)' }).default(false),
    vocab_size: positiveInt,
    max_position_embeddings: positiveInt,
    tie_word_embeddings: z.literal(false).default(false),
    // DeepSeek-MoE attends over the whole context.
    sliding_window: z.null().optional(),
    hidden_act: z.literal('silu').default('silu'),
    initializer_range: z.number().positive().default(0.02),
    bos_token_id: z.number().int().nonnegative().optional(),
    eos_token_id: z.number().int().nonnegative().optional(),
    torch_dtype: z.enum(TORCH_DTYPES).default('float32'),
    // DeepSeek's gate is the softmax top-k without dropping: Switchyard's 'mixtral' policy (renormalised or not per norm_topk_prob).
    switchyard_gate: gateSettingsSchema.default(gateSettingsSchema.parse({}))
      .refine((g) => g.policy === 'mixtral', { message: "policy must be 'mixtral' (DeepSeek-MoE routes by the softmax top-k, dropless)" })
      .refine((g) => g.aux_loss_scope === 'group', { message: "aux_loss_scope must be 'group' ('batch' is Hugging Face Mixtral's loss, not DeepSeek-MoE's)" }),
  })
  .passthrough()
  .superRefine((c, ctx) => checkShapes(c, { key: 'n_routed_experts', count: c.n_routed_experts }, ctx));
export type DeepseekConfig = z.infer<typeof deepseekConfigSchema>;

// Keys the Qwen-MoE and OLMoE configs share (Llama-style decoder, softmax top-k router, experts under
// `mlp.experts`); each family adds its own below. Defaults are the transformers config classes'.
const rotary = {
  rope_theta: z.number().positive().default(10000),
  rope_scaling: ropeScalingSchema,
  partial_rotary_factor: z.literal(1, { error: 'partial_rotary_factor must be 1 (rotary embedding on part of a head is not supported)' }).optional(),
};
const common = {
  ...decoderShape,
  num_experts: positiveInt,
  num_experts_per_tok: positiveInt,
  norm_topk_prob: z.boolean().default(false),
  router_aux_loss_coef: z.number().nonnegative().optional(),
  vocab_size: positiveInt,
  max_position_embeddings: positiveInt,
  hidden_act: z.literal('silu').default('silu'),
  initializer_range: z.number().positive().default(0.02),
  // null (OLMoE's bos_token_id) means none.
  bos_token_id: z.number().int().nonnegative().nullable().optional().transform((v) => v ?? undefined),
  eos_token_id: z.number().int().nonnegative().nullable().optional().transform((v) => v ?? undefined),
  torch_dtype: z.enum(TORCH_DTYPES).default('float32'),
  ...rotary,
  // The Qwen and OLMoE routers are the softmax top-k without dropping: Switchyard's 'mixtral' policy.
  switchyard_gate: gateSettingsSchema.default(gateSettingsSchema.parse({}))
    .refine((g) => g.policy === 'mixtral', { message: "policy must be 'mixtral' (this family routes by the softmax top-k, dropless)" }),
};
// Qwen's window applies only to layers from max_window_layers on, and only when use_sliding_window is set;
// the published MoE checkpoints keep it off, so Switchyard attends over the whole context and refuses it on.
const qwenWindow = {
  use_sliding_window: z.literal(false, { error: 'use_sliding_window must be false (Qwen\'s per-layer sliding window is not supported)' }).default(false),
  sliding_window: z.number().int().positive().nullable().optional().transform(() => null),
  max_window_layers: z.number().int().nonnegative().optional(),
  decoder_sparse_step: positiveInt.default(1),
  mlp_only_layers: z.array(z.number().int().nonnegative()).nullable().default(null).transform((v) => v ?? []),
  moe_intermediate_size: positiveInt,
  rms_norm_eps: z.number().positive().default(1e-6),
  tie_word_embeddings: z.boolean().default(false),
};
/** The checks both Qwen families share: attention shapes, k ≤ experts, mlp_only_layers within the layers. */
type QwenChecked = Parameters<typeof checkShapes>[0] & { num_experts: number; mlp_only_layers: number[]; num_hidden_layers: number };
const qwenChecks = (c: QwenChecked, ctx: z.RefinementCtx) => {
  checkShapes(c, { key: 'num_experts', count: c.num_experts }, ctx);
  const bad = c.mlp_only_layers.filter((l) => l >= c.num_hidden_layers);
  if (bad.length) ctx.addIssue({ code: 'custom', path: ['mlp_only_layers'], message: `mlp_only_layers ${bad.join(', ')} outside the ${c.num_hidden_layers} layers` });
};

/** A Qwen family's schema: the shared keys, the window and sparse-layer keys, and its own. */
const qwenSchema = <M extends string, T extends z.ZodRawShape>(modelType: M, architecture: string, own: T) => z
  .object({ architectures: z.array(z.string()).default([architecture]), model_type: z.literal(modelType), ...common, ...qwenWindow, ...own })
  .passthrough()
  // (the generic object's output type is not resolved here; the keys are those of `common` and `qwenWindow`)
  .superRefine((c, ctx) => qwenChecks(c as unknown as QwenChecked, ctx));

/** Qwen1.5-MoE / Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): q/k/v biases and a gated shared expert. */
export const qwen2MoeConfigSchema = qwenSchema('qwen2_moe', 'Qwen2MoeForCausalLM', {
  // Older configs have no qkv_bias key and always had the biases.
  qkv_bias: z.boolean().default(true),
  shared_expert_intermediate_size: z.number().int().nonnegative().default(0),
}).superRefine((c, ctx) => {
  // Qwen2MoeAttention sizes its heads by hidden/heads whatever a head_dim key says.
  if (c.head_dim !== undefined && c.head_dim * c.num_attention_heads !== c.hidden_size)
    ctx.addIssue({ code: 'custom', path: ['head_dim'], message: `head_dim ${c.head_dim} must be hidden_size / num_attention_heads for Qwen2-MoE` });
});
export type Qwen2MoeConfig = z.infer<typeof qwen2MoeConfigSchema>;

/** Qwen3-MoE (Qwen/Qwen3-30B-A3B, 235B-A22B): per-head q/k RMSNorm, explicit head_dim, no shared expert. */
export const qwen3MoeConfigSchema = qwenSchema('qwen3_moe', 'Qwen3MoeForCausalLM', { attention_bias: z.boolean().default(false) });
export type Qwen3MoeConfig = z.infer<typeof qwen3MoeConfigSchema>;

/** OLMoE (allenai/OLMoE-1B-7B-0924): RMSNorm over the whole q and k projections, optional clip_qkv. */
export const olmoeConfigSchema = z
  .object({
    architectures: z.array(z.string()).default(['OlmoeForCausalLM']),
    model_type: z.literal('olmoe'),
    ...common,
    rms_norm_eps: z.number().positive().default(1e-5),
    tie_word_embeddings: z.boolean().default(false),
    attention_bias: z.boolean().default(false),
    clip_qkv: z.number().positive().nullable().default(null),
    // OLMoE attends over the whole context.
    sliding_window: z.null().optional(),
  })
  .passthrough()
  .superRefine((c, ctx) => {
    checkShapes(c, { key: 'num_experts', count: c.num_experts }, ctx);
    // transformers sizes q_norm by hidden_size and k_norm by (hidden/heads)·kv heads: head_dim is hidden/heads.
    if (c.head_dim !== undefined && c.head_dim * c.num_attention_heads !== c.hidden_size)
      ctx.addIssue({ code: 'custom', path: ['head_dim'], message: `head_dim ${c.head_dim} must be hidden_size / num_attention_heads for OLMoE` });
  });
export type OlmoeConfig = z.infer<typeof olmoeConfigSchema>;

/** GPT-OSS's rotary default when config.json has no rope_scaling (the transformers config class's). */
const GPT_OSS_ROPE = { rope_type: 'yarn', factor: 32, beta_fast: 32, beta_slow: 1, truncate: false, original_max_position_embeddings: 4096 };
export const GPT_OSS_LAYER_TYPES = ['sliding_attention', 'full_attention'] as const;

/**
 * GPT-OSS (openai/gpt-oss-20b, -120b): attention with biases and sinks, sliding and full layers
 * (`layer_types`), YaRN, a biased router, experts with biases and the clamped SwiGLU, MXFP4 expert weights.
 */
export const gptOssConfigSchema = z
  .object({
    architectures: z.array(z.string()).default(['GptOssForCausalLM']),
    model_type: z.literal('gpt_oss'),
    ...decoderShape,
    head_dim: positiveInt.default(64),
    num_local_experts: positiveInt,
    num_experts_per_tok: positiveInt,
    vocab_size: positiveInt,
    max_position_embeddings: positiveInt,
    rms_norm_eps: z.number().positive().default(1e-5),
    rope_theta: z.number().positive().default(150000),
    // Absent or null: the config class's YaRN (transformers fills it in the same way).
    rope_scaling: ropeScalingField(GPT_OSS_ROPE),
    partial_rotary_factor: rotary.partial_rotary_factor,
    sliding_window: positiveInt.nullable().default(128),
    layer_types: z.array(z.enum(GPT_OSS_LAYER_TYPES)).nullable().optional(),
    attention_bias: z.literal(true, { error: 'attention_bias must be true (GPT-OSS attention always has biases)' }).default(true),
    swiglu_limit: z.number().positive().default(7),
    swiglu_alpha: z.number().positive().default(1.702),
    tie_word_embeddings: z.literal(false, { error: 'tie_word_embeddings must be false for GPT-OSS' }).default(false),
    hidden_act: z.literal('silu').default('silu'),
    initializer_range: z.number().positive().default(0.02),
    router_aux_loss_coef: z.number().nonnegative().optional(),
    bos_token_id: z.number().int().nonnegative().nullable().optional().transform((v) => v ?? undefined),
    eos_token_id: z.number().int().nonnegative().nullable().optional().transform((v) => v ?? undefined),
    torch_dtype: z.enum(TORCH_DTYPES).default('float32'),
    // Only MXFP4 expert weights (the published checkpoints'); absent = the dequantized bf16 layout.
    quantization_config: z.object({ quant_method: z.literal('mxfp4', { error: "quantization_config.quant_method must be 'mxfp4' (the only quantization read)" }) }).passthrough().nullable().optional(),
    // GPT-OSS's router is the top-k of the logits, then a softmax over those k: the renormalised softmax top-k.
    switchyard_gate: gateSettingsSchema.default(gateSettingsSchema.parse({}))
      .refine((g) => g.policy === 'mixtral', { message: "policy must be 'mixtral' (GPT-OSS routes by the softmax top-k, dropless)" }),
  })
  .passthrough()
  .transform((c) => ({
    ...c,
    // The config class's default: layer i slides when i is even.
    layer_types: c.layer_types ?? Array.from({ length: c.num_hidden_layers }, (_, i) => GPT_OSS_LAYER_TYPES[i % 2]),
  }))
  .superRefine((c, ctx) => {
    checkShapes(c, { key: 'num_local_experts', count: c.num_local_experts }, ctx);
    if (c.layer_types.length !== c.num_hidden_layers)
      ctx.addIssue({ code: 'custom', path: ['layer_types'], message: `layer_types has ${c.layer_types.length} entries for ${c.num_hidden_layers} layers` });
    if (c.quantization_config && (c.hidden_size % 32 !== 0 || c.intermediate_size % 32 !== 0))
      ctx.addIssue({ code: 'custom', path: ['quantization_config'], message: `MXFP4 needs hidden_size and intermediate_size to be multiples of 32 (blocks of 32 values), not ${c.hidden_size} and ${c.intermediate_size}` });
  });
export type GptOssConfig = z.infer<typeof gptOssConfigSchema>;

/** Any supported model family's configuration, told apart by `model_type`. */
export type ModelConfig = MixtralConfig | DeepseekConfig | Qwen2MoeConfig | Qwen3MoeConfig | OlmoeConfig | GptOssConfig;

const FAMILY_SCHEMAS: Record<string, z.ZodType<ModelConfig>> = {
  deepseek: deepseekConfigSchema, qwen2_moe: qwen2MoeConfigSchema, qwen3_moe: qwen3MoeConfigSchema, olmoe: olmoeConfigSchema,
  gpt_oss: gptOssConfigSchema as unknown as z.ZodType<GptOssConfig>,
};

export class ConfigError extends Error {
  override name = 'ConfigError';
}

function describeIssues(error: z.ZodError): string {
  return error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ');
}

/** Validates an object with the Hugging Face keys of its `model_type` (Mixtral when absent); throws ConfigError listing every problem. */
export function parseModelConfig(raw: { model_type: 'deepseek'; [key: string]: unknown }, source?: string): DeepseekConfig;
export function parseModelConfig(raw: { model_type: 'qwen2_moe'; [key: string]: unknown }, source?: string): Qwen2MoeConfig;
export function parseModelConfig(raw: { model_type: 'qwen3_moe'; [key: string]: unknown }, source?: string): Qwen3MoeConfig;
export function parseModelConfig(raw: { model_type: 'olmoe'; [key: string]: unknown }, source?: string): OlmoeConfig;
export function parseModelConfig(raw: { model_type: 'gpt_oss'; [key: string]: unknown }, source?: string): GptOssConfig;
export function parseModelConfig(raw: { model_type?: 'mixtral'; [key: string]: unknown }, source?: string): MixtralConfig;
export function parseModelConfig(raw: unknown, source?: string): ModelConfig;
export function parseModelConfig(raw: unknown, source = 'model config'): ModelConfig {
  const type = typeof raw === 'object' && raw !== null ? (raw as { model_type?: unknown }).model_type : undefined;
  const schema = (typeof type === 'string' && Object.hasOwn(FAMILY_SCHEMAS, type) ? FAMILY_SCHEMAS[type] : modelConfigSchema) as z.ZodType<ModelConfig>;
  const result = schema.safeParse(raw);
  if (!result.success) throw new ConfigError(`invalid ${source}: ${describeIssues(result.error)}`);
  return result.data;
}

export function headDim(c: ModelConfig): number {
  return c.head_dim ?? c.hidden_size / c.num_attention_heads;
}

/** The attention window in positions, or undefined when it cannot cut anything (null or ≥ max positions). */
export function attentionWindow(c: ModelConfig): number | undefined {
  const w = c.sliding_window;
  return w != null && w < c.max_position_embeddings ? w : undefined;
}


// Byte-level vocabulary: ids 0..255 are bytes, then specials.
export const BOS_ID = 256;
export const EOS_ID = 257;
export const PAD_ID = 258;
export const BYTE_VOCAB_SIZE = 259;

export const trainSettingsSchema = z
  .object({
    steps: positiveInt,
    batch_sequences: positiveInt,
    seq_len: positiveInt,
    // Tokens per routing group (DESIGN §5); 0 = the whole micro-batch is one group.
    routing_group_tokens: z.number().int().nonnegative().default(0),
    lr: z.number().positive(),
    min_lr_ratio: z.number().min(0).max(1).default(0.1),
    warmup_steps: z.number().int().nonnegative(),
    weight_decay: z.number().nonnegative().default(0.1),
    beta1: z.number().min(0).lt(1).default(0.9),
    beta2: z.number().min(0).lt(1).default(0.95),
    adam_eps: z.number().positive().default(1e-8),
    grad_clip: z.number().nonnegative().default(1.0),
    eval_interval: positiveInt.default(50),
    eval_batches: positiveInt.default(8),
    checkpoint_interval: positiveInt.default(200),
    validation_fraction: z.number().gt(0).lt(1).default(0.05),
    seed: z.number().int().default(1234),
  })
  .strict();
export type TrainSettings = z.infer<typeof trainSettingsSchema>;

export interface Preset<M extends ModelConfig = ModelConfig> {
  model: M;
  train: TrainSettings;
}

export function parseTrainSettings(raw: unknown, source = 'training settings'): TrainSettings {
  const result = trainSettingsSchema.safeParse(raw);
  if (!result.success) throw new ConfigError(`invalid ${source}: ${describeIssues(result.error)}`);
  const t = result.data;
  return t;
}

const PRESETS: Record<string, { model: Record<string, unknown>; train: Record<string, unknown> }> = {
  // Seconds per step: for tests.
  tiny: {
    model: {
      hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
      num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2,
      vocab_size: BYTE_VOCAB_SIZE, max_position_embeddings: 64,
      bos_token_id: BOS_ID, eos_token_id: EOS_ID,
    },
    train: { steps: 20, batch_sequences: 4, seq_len: 32, lr: 3e-3, warmup_steps: 4, eval_interval: 10, eval_batches: 2, checkpoint_interval: 10, routing_group_tokens: 32 },
  },
  // The default model: reaches < 2.0 nats/byte on Moby Dick within minutes on two cores.
  small: {
    model: {
      hidden_size: 128, intermediate_size: 256, num_hidden_layers: 4, num_attention_heads: 4,
      num_key_value_heads: 2, num_local_experts: 8, num_experts_per_tok: 2,
      vocab_size: BYTE_VOCAB_SIZE, max_position_embeddings: 128,
      bos_token_id: BOS_ID, eos_token_id: EOS_ID,
    },
    train: { steps: 600, batch_sequences: 32, seq_len: 128, lr: 3e-3, warmup_steps: 40, eval_interval: 50, eval_batches: 8, checkpoint_interval: 100, routing_group_tokens: 128 },
  },
  // The serving benchmark's shape (issue 15): big enough that the arithmetic, not per-op overhead, should
  // set the pace; random weights are fine there.
  medium: {
    model: {
      hidden_size: 1024, intermediate_size: 2048, num_hidden_layers: 8, num_attention_heads: 16,
      num_key_value_heads: 4, num_local_experts: 8, num_experts_per_tok: 2,
      vocab_size: BYTE_VOCAB_SIZE, max_position_embeddings: 2048,
      bos_token_id: BOS_ID, eos_token_id: EOS_ID,
    },
    train: { steps: 100, batch_sequences: 8, seq_len: 512, lr: 1e-3, warmup_steps: 10, eval_interval: 50, eval_batches: 2, checkpoint_interval: 50, routing_group_tokens: 512 },
  },
};

export const PRESET_NAMES = Object.keys(PRESETS);

export function preset(name: string): Preset<MixtralConfig> {
  const p = PRESETS[name];
  if (!p) throw new ConfigError(`unknown config preset '${name}' (known: ${PRESET_NAMES.join(', ')})`);
  return { model: parseModelConfig(p.model, `preset '${name}'`) as MixtralConfig, train: parseTrainSettings(p.train, `preset '${name}'`) };
}

/** A config file is `{ "model": {...HF keys...}, "train": {...} }`, or a preset name plus overrides. */
export function resolvePreset(spec: unknown, source: string): Preset {
  if (typeof spec !== 'object' || spec === null) throw new ConfigError(`invalid ${source}: expected a JSON object`);
  const s = spec as { base?: unknown; model?: unknown; train?: unknown };
  const base = typeof s.base === 'string' ? PRESETS[s.base] : undefined;
  if (s.base !== undefined && !base) throw new ConfigError(`invalid ${source}: unknown base preset '${String(s.base)}'`);
  const model = { ...(base?.model ?? {}), ...((s.model as object) ?? {}) };
  const train = { ...(base?.train ?? {}), ...((s.train as object) ?? {}) };
  return { model: parseModelConfig(model, `${source} (model)`), train: parseTrainSettings(train, `${source} (train)`) };
}
