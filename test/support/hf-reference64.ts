// An independent float64 reference forward of the Hugging Face MoE decoder families mixtral,
// qwen2_moe, qwen3_moe, olmoe and gpt_oss, written from the definitions in transformers' modeling
// and configuration files. It reads tensors by their published names and layouts ([out, in] linear
// weights; gpt_oss experts [E, in, out]) and shares no code with services/: the serving model is
// checked against it, so nothing here may come from there.
//
// Everything is plain loops over Float64Array. Where transformers computes in float32 or bf16 (the
// router softmax, the RoPE table, RMSNorm's upcast) this computes the exact float64 value instead; the
// only deliberate rounding is MXFP4 dequantisation, which rounds to the bf16 values transformers
// produces because those are the weights the model then runs with.
//
// Config keys missing from config.json take the defaults of each transformers config class. Settings
// on which transformers versions disagree (qwen sliding windows without layer_types, a YaRN factor that
// is not max_position_embeddings / original_max_position_embeddings, ...) are refused, not guessed.

export type HfTensors = Map<string, { shape: number[]; values: ArrayLike<number> }>;

type Family = 'mixtral' | 'qwen2_moe' | 'qwen3_moe' | 'olmoe' | 'gpt_oss';
const FAMILIES: readonly Family[] = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'gpt_oss'];

type Raw = Record<string, unknown>;

// ---------------------------------------------------------------------------------------------------
// config: transformers' class defaults

/** Defaults of each config class for the keys this reference reads (transformers' configuration_*.py). */
const DEFAULTS: Record<Family, Raw> = {
  mixtral: {
    vocab_size: 32000, hidden_size: 4096, intermediate_size: 14336, num_hidden_layers: 32, num_attention_heads: 32,
    num_key_value_heads: 8, head_dim: null, hidden_act: 'silu', max_position_embeddings: 4096 * 32, rms_norm_eps: 1e-5,
    tie_word_embeddings: false, rope_theta: 1e6, sliding_window: null, num_experts_per_tok: 2, num_local_experts: 8,
  },
  qwen2_moe: {
    vocab_size: 151936, hidden_size: 2048, intermediate_size: 5632, num_hidden_layers: 24, num_attention_heads: 16,
    num_key_value_heads: 16, hidden_act: 'silu', max_position_embeddings: 32768, rms_norm_eps: 1e-6, tie_word_embeddings: false,
    rope_theta: 10000, use_sliding_window: false, sliding_window: 4096, decoder_sparse_step: 1, moe_intermediate_size: 1408,
    shared_expert_intermediate_size: 5632, num_experts_per_tok: 4, num_experts: 60, norm_topk_prob: false, mlp_only_layers: [],
    qkv_bias: true,
  },
  qwen3_moe: {
    vocab_size: 151936, hidden_size: 2048, intermediate_size: 6144, num_hidden_layers: 24, num_attention_heads: 32,
    num_key_value_heads: 4, head_dim: null, hidden_act: 'silu', max_position_embeddings: 32768, rms_norm_eps: 1e-6,
    tie_word_embeddings: false, rope_theta: 10000, attention_bias: false, use_sliding_window: false, sliding_window: 4096,
    decoder_sparse_step: 1, moe_intermediate_size: 768, num_experts_per_tok: 8, num_experts: 128, norm_topk_prob: false,
    mlp_only_layers: [],
  },
  olmoe: {
    vocab_size: 50304, hidden_size: 2048, intermediate_size: 2048, num_hidden_layers: 16, num_attention_heads: 16,
    num_key_value_heads: null, hidden_act: 'silu', max_position_embeddings: 4096, rms_norm_eps: 1e-5, tie_word_embeddings: false,
    rope_theta: 10000, attention_bias: false, clip_qkv: null, num_experts_per_tok: 8, num_experts: 64, norm_topk_prob: false,
  },
  gpt_oss: {
    num_hidden_layers: 36, num_local_experts: 128, vocab_size: 201088, hidden_size: 2880, intermediate_size: 2880, head_dim: 64,
    num_attention_heads: 64, num_key_value_heads: 8, sliding_window: 128, tie_word_embeddings: false, hidden_act: 'silu',
    max_position_embeddings: 131072, rms_norm_eps: 1e-5, rope_theta: 150000, num_experts_per_tok: 4, swiglu_alpha: 1.702,
    swiglu_limit: 7.0, attention_bias: true, layer_types: null,
  },
};

/** GptOssConfig's rope default when config.json has no rope key at all. */
const GPT_OSS_DEFAULT_ROPE: Raw = { rope_type: 'yarn', factor: 32.0, beta_fast: 32.0, beta_slow: 1.0, truncate: false, original_max_position_embeddings: 4096 };

class Cfg {
  constructor(readonly raw: Raw, readonly family: Family) {}

  /** The config.json value, or the class default when the key is absent. `null` stays null. */
  get(key: string): unknown {
    return key in this.raw ? this.raw[key] : DEFAULTS[this.family][key];
  }

  int(key: string): number {
    const v = this.get(key);
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) throw new Error(`${this.family}: ${key} must be a non-negative integer, got ${JSON.stringify(v)}`);
    return v;
  }

  num(key: string): number {
    const v = this.get(key);
    if (typeof v !== 'number' || !Number.isFinite(v)) throw new Error(`${this.family}: ${key} must be a number, got ${JSON.stringify(v)}`);
    return v;
  }

  bool(key: string): boolean {
    const v = this.get(key);
    if (typeof v !== 'boolean') throw new Error(`${this.family}: ${key} must be a boolean, got ${JSON.stringify(v)}`);
    return v;
  }

  /** A number or null (null/absent-with-null-default). */
  optNum(key: string): number | null {
    const v = this.get(key);
    return v == null ? null : this.num(key);
  }
}

interface Rope {
  invFreq: Float64Array;
  /** YaRN's attention factor: multiplies both cos and sin (so q·k by its square). */
  attentionFactor: number;
}

type MlpKind = 'moe' | 'dense';

/** Everything the forward needs, resolved from the raw config once. */
interface Spec {
  family: Family;
  vocab: number;
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  eps: number;
  tie: boolean;
  rope: Rope;
  maxPositions: number;
  ropeType: string;
  /** Per layer: keys j attend for query i iff j ≤ i and (window null or j > i − window). */
  windows: Array<number | null>;
  qkvBias: boolean;
  oBias: boolean;
  qkNorm: 'none' | 'per_head' | 'whole';
  clipQkv: number | null;
  sinks: boolean;
  mlp: MlpKind[];
  experts: number;
  topK: number;
  normTopK: boolean;
  intermediate: number;
  moeIntermediate: number;
  sharedIntermediate: number;
  swigluAlpha: number;
  swigluLimit: number;
}

function familyOf(config: Raw): Family {
  const t = config.model_type;
  if (typeof t !== 'string' || !(FAMILIES as readonly string[]).includes(t)) throw new Error(`hf-reference64: unsupported model_type ${JSON.stringify(t)} (supported: ${FAMILIES.join(', ')})`);
  return t as Family;
}

function resolveHeadDim(c: Cfg, hidden: number, heads: number): number {
  const explicit = c.get('head_dim');
  switch (c.family) {
    case 'mixtral':
    case 'qwen3_moe':
    case 'gpt_oss':
      // getattr(config, "head_dim", None) or hidden_size // num_attention_heads
      return explicit == null ? Math.floor(hidden / heads) : c.int('head_dim');
    case 'qwen2_moe':
    case 'olmoe': {
      // These attention classes use hidden_size // num_heads and never read head_dim.
      const hd = hidden / heads;
      if (!Number.isInteger(hd)) throw new Error(`${c.family}: hidden_size ${hidden} is not divisible by num_attention_heads ${heads}`);
      if (explicit != null && explicit !== hd) throw new Error(`${c.family}: head_dim ${String(explicit)} ≠ hidden_size / num_attention_heads = ${hd}; the modeling file ignores head_dim`);
      return hd;
    }
  }
}

/** mscale of YaRN: 1 for scale ≤ 1, else 0.1·m·ln(scale) + 1. */
function yarnMscale(scale: number, m = 1): number {
  return scale <= 1 ? 1 : 0.1 * m * Math.log(scale) + 1;
}

/**
 * Inverse RoPE frequencies and attention factor (modeling_rope_utils: default, linear, dynamic, yarn).
 * rope settings come from `rope_parameters` (transformers ≥ 5) or `rope_scaling` + `rope_theta`.
 */
function resolveRope(c: Cfg, headDim: number, maxPositions: number): { rope: Rope; type: string } {
  const raw = c.raw;
  let params: Raw | null;
  let theta: number;
  if (raw.rope_parameters != null && typeof raw.rope_parameters === 'object') {
    params = raw.rope_parameters as Raw;
    theta = typeof params.rope_theta === 'number' ? params.rope_theta : c.num('rope_theta');
  } else {
    if (c.family === 'gpt_oss' && !('rope_scaling' in raw)) params = GPT_OSS_DEFAULT_ROPE;
    else if (c.family === 'gpt_oss' && raw.rope_scaling === null) {
      throw new Error('gpt_oss: rope_scaling null means default RoPE in transformers 4.x but the YaRN default in 5.x; give it explicitly');
    } else params = (raw.rope_scaling as Raw | null | undefined) ?? null;
    theta = c.num('rope_theta');
  }
  const type = String(params?.rope_type ?? params?.type ?? 'default');
  const prf = raw.partial_rotary_factor ?? params?.partial_rotary_factor ?? 1;
  if (prf !== 1) throw new Error(`${c.family}: partial_rotary_factor ${String(prf)} is not supported by this reference`);
  const dim = headDim;
  if (dim % 2 !== 0) throw new Error(`${c.family}: head_dim ${dim} must be even for RoPE`);
  const half = dim / 2;
  const base = new Float64Array(half);
  for (let i = 0; i < half; i++) base[i] = 1 / Math.pow(theta, (2 * i) / dim);
  const p = params ?? {};
  const factorOf = (): number => {
    if (typeof p.factor !== 'number' || !(p.factor > 0)) throw new Error(`${c.family}: rope ${type} needs a positive factor`);
    return p.factor;
  };
  switch (type) {
    case 'default':
      return { rope: { invFreq: base, attentionFactor: 1 }, type };
    case 'dynamic':
      // Dynamic NTK only departs from the default past max_position_embeddings (checked per call).
      factorOf();
      return { rope: { invFreq: base, attentionFactor: 1 }, type };
    case 'linear': {
      const f = factorOf();
      return { rope: { invFreq: base.map((v) => v / f), attentionFactor: 1 }, type };
    }
    case 'yarn': {
      const original = typeof p.original_max_position_embeddings === 'number' ? p.original_max_position_embeddings : null;
      let factor: number;
      if (p.factor == null) {
        if (original == null) throw new Error(`${c.family}: yarn needs factor or original_max_position_embeddings`);
        factor = maxPositions / original;
      } else {
        factor = factorOf();
        // transformers 4.5x replaced factor by max_position_embeddings / original_max_position_embeddings
        // whenever the latter was given; later versions keep the explicit factor. Refuse the ambiguity.
        if (original != null && Math.abs(maxPositions / original - factor) > 1e-12 * factor) {
          throw new Error(`${c.family}: yarn factor ${factor} ≠ max_position_embeddings / original_max_position_embeddings = ${maxPositions / original} (transformers versions disagree on which wins)`);
        }
      }
      const origMax = original ?? maxPositions;
      let attentionFactor: number;
      if (typeof p.attention_factor === 'number') attentionFactor = p.attention_factor;
      else if (typeof p.mscale === 'number' && p.mscale && typeof p.mscale_all_dim === 'number' && p.mscale_all_dim) {
        attentionFactor = yarnMscale(factor, p.mscale) / yarnMscale(factor, p.mscale_all_dim);
      } else attentionFactor = yarnMscale(factor);
      // `get(...) or default`: a 0 or null falls back too.
      const betaFast = (p.beta_fast as number | null | undefined) || 32;
      const betaSlow = (p.beta_slow as number | null | undefined) || 1;
      const truncate = p.truncate === undefined ? true : Boolean(p.truncate);
      const correctionDim = (rotations: number) => (dim * Math.log(origMax / (rotations * 2 * Math.PI))) / (2 * Math.log(theta));
      let low = correctionDim(betaFast);
      let high = correctionDim(betaSlow);
      if (truncate) {
        low = Math.floor(low);
        high = Math.ceil(high);
      }
      low = Math.max(low, 0);
      high = Math.min(high, dim - 1);
      if (low === high) high += 0.001;
      const invFreq = new Float64Array(half);
      for (let i = 0; i < half; i++) {
        const ramp = Math.min(1, Math.max(0, (i - low) / (high - low)));
        const extrapolation = 1 - ramp; // weight of the unscaled frequency
        const extra = base[i];
        const inter = base[i] / factor;
        invFreq[i] = inter * (1 - extrapolation) + extra * extrapolation;
      }
      return { rope: { invFreq, attentionFactor }, type };
    }
    default:
      throw new Error(`${c.family}: rope type ${type} is not supported by this reference`);
  }
}

function resolveWindows(c: Cfg, layers: number): Array<number | null> {
  const layerTypes = c.get('layer_types');
  const windowsFromTypes = (types: unknown, window: number | null): Array<number | null> => {
    if (!Array.isArray(types) || types.length !== layers) throw new Error(`${c.family}: layer_types must list ${layers} entries`);
    return types.map((t) => {
      if (t === 'full_attention') return null;
      if (t === 'sliding_attention') return window;
      throw new Error(`${c.family}: unknown layer type ${JSON.stringify(t)}`);
    });
  };
  switch (c.family) {
    case 'mixtral': {
      const w = c.optNum('sliding_window');
      return Array.from({ length: layers }, () => w);
    }
    case 'qwen2_moe':
    case 'qwen3_moe': {
      if (!c.bool('use_sliding_window')) return Array.from({ length: layers }, () => null);
      // Which layers slide (max_window_layers, eager vs flash attention) differs across transformers
      // versions; only an explicit layer_types list is unambiguous.
      if (layerTypes == null) throw new Error(`${c.family}: use_sliding_window without layer_types is ambiguous across transformers versions`);
      return windowsFromTypes(layerTypes, c.optNum('sliding_window'));
    }
    case 'olmoe':
      return Array.from({ length: layers }, () => null);
    case 'gpt_oss': {
      // GptOssConfig: sliding on even layers (i + 1 odd), full on odd ones, unless layer_types is given.
      const types = layerTypes ?? Array.from({ length: layers }, (_, i) => ((i + 1) % 2 ? 'sliding_attention' : 'full_attention'));
      return windowsFromTypes(types, c.optNum('sliding_window'));
    }
  }
}

function resolveSpec(config: Raw): Spec {
  const family = familyOf(config);
  const c = new Cfg(config, family);
  if (c.get('hidden_act') !== 'silu') throw new Error(`${family}: hidden_act ${String(c.get('hidden_act'))} is not supported (silu only)`);
  const hidden = c.int('hidden_size');
  const heads = c.int('num_attention_heads');
  const kvHeads = c.get('num_key_value_heads') == null ? heads : c.int('num_key_value_heads');
  if (heads % kvHeads !== 0) throw new Error(`${family}: num_attention_heads ${heads} is not a multiple of num_key_value_heads ${kvHeads}`);
  const layers = c.int('num_hidden_layers');
  const headDim = resolveHeadDim(c, hidden, heads);
  const maxPositions = c.int('max_position_embeddings');
  const { rope, type: ropeType } = resolveRope(c, headDim, maxPositions);
  const experts = c.int(family === 'mixtral' || family === 'gpt_oss' ? 'num_local_experts' : 'num_experts');
  const topK = c.int('num_experts_per_tok');
  if (experts > 0 && (topK < 1 || topK > experts)) throw new Error(`${family}: num_experts_per_tok ${topK} must be in 1..${experts}`);

  let mlp: MlpKind[] = Array.from({ length: layers }, () => 'moe' as MlpKind);
  if (family === 'qwen2_moe' || family === 'qwen3_moe') {
    const only = c.get('mlp_only_layers') ?? [];
    if (!Array.isArray(only)) throw new Error(`${family}: mlp_only_layers must be a list`);
    const step = c.int('decoder_sparse_step');
    mlp = mlp.map((_, l) => (!only.includes(l) && experts > 0 && (l + 1) % step === 0 ? 'moe' : 'dense'));
  }

  const attentionBias = family === 'qwen3_moe' || family === 'olmoe' || family === 'gpt_oss' ? c.bool('attention_bias') : false;
  return {
    family,
    vocab: c.int('vocab_size'),
    hidden,
    layers,
    heads,
    kvHeads,
    headDim,
    eps: c.num('rms_norm_eps'),
    tie: c.bool('tie_word_embeddings'),
    rope,
    ropeType,
    maxPositions,
    windows: resolveWindows(c, layers),
    qkvBias: family === 'qwen2_moe' ? c.bool('qkv_bias') : attentionBias,
    oBias: attentionBias,
    qkNorm: family === 'qwen3_moe' ? 'per_head' : family === 'olmoe' ? 'whole' : 'none',
    clipQkv: family === 'olmoe' ? c.optNum('clip_qkv') : null,
    sinks: family === 'gpt_oss',
    mlp,
    experts,
    topK,
    // Mixtral always renormalises the top-k; gpt_oss softmaxes over the chosen logits only.
    normTopK: family === 'mixtral' ? true : family === 'gpt_oss' ? false : c.bool('norm_topk_prob'),
    intermediate: c.int('intermediate_size'),
    moeIntermediate: family === 'qwen2_moe' || family === 'qwen3_moe' ? c.int('moe_intermediate_size') : c.int('intermediate_size'),
    sharedIntermediate: family === 'qwen2_moe' ? c.int('shared_expert_intermediate_size') : 0,
    swigluAlpha: family === 'gpt_oss' ? c.num('swiglu_alpha') : 0,
    swigluLimit: family === 'gpt_oss' ? c.num('swiglu_limit') : 0,
  };
}

// ---------------------------------------------------------------------------------------------------
// tensors by name

/** Hands out float64 copies of named tensors, checking shapes and remembering which were read. */
class TensorBook {
  private readonly cache = new Map<string, Float64Array>();
  readonly used = new Set<string>();

  constructor(private readonly tensors: HfTensors) {}

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  get(name: string, shape: number[]): Float64Array {
    const t = this.tensors.get(name);
    if (!t) throw new Error(`hf-reference64: missing tensor ${name} (expected shape [${shape.join(', ')}])`);
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      throw new Error(`hf-reference64: ${name} has shape [${t.shape.join(', ')}], expected [${shape.join(', ')}]`);
    }
    this.used.add(name);
    let v = this.cache.get(name);
    if (!v) {
      const n = shape.reduce((a, b) => a * b, 1);
      if (t.values.length !== n) throw new Error(`hf-reference64: ${name} holds ${t.values.length} values for shape [${shape.join(', ')}]`);
      v = new Float64Array(n);
      for (let i = 0; i < n; i++) v[i] = t.values[i];
      this.cache.set(name, v);
    }
    return v;
  }

  /** A tensor derived from others (dequantised MXFP4), cached under its bf16 name. */
  derived(name: string, make: () => Float64Array): Float64Array {
    let v = this.cache.get(name);
    if (!v) {
      v = make();
      this.cache.set(name, v);
    }
    return v;
  }

  /** Throws when tensors were given that the forward never read (a naming mismatch, most likely). */
  checkAllUsed(ignore: (name: string) => boolean): void {
    const unused = [...this.tensors.keys()].filter((n) => !this.used.has(n) && !ignore(n));
    if (unused.length) throw new Error(`hf-reference64: tensors the forward never read: ${unused.slice(0, 8).join(', ')}${unused.length > 8 ? ', …' : ''}`);
  }
}

// ---------------------------------------------------------------------------------------------------
// building blocks

/** y[r, o] = Σ_i W[o, i]·x[r, i] (+ b[o]) for a PyTorch nn.Linear weight W [out, in]. */
function linear(x: Float64Array, rows: number, w: Float64Array, out: number, inner: number, bias?: Float64Array): Float64Array {
  const y = new Float64Array(rows * out);
  for (let r = 0; r < rows; r++) {
    const xo = r * inner;
    for (let o = 0; o < out; o++) {
      const wo = o * inner;
      let s = 0;
      for (let i = 0; i < inner; i++) s += w[wo + i] * x[xo + i];
      y[r * out + o] = bias ? s + bias[o] : s;
    }
  }
  return y;
}

/** RMSNorm over consecutive groups of `dim` values: x / sqrt(mean(x²) + eps) · w. */
function rmsNorm(x: Float64Array, dim: number, w: Float64Array, eps: number): Float64Array {
  const y = new Float64Array(x.length);
  for (let g = 0; g < x.length; g += dim) {
    let ss = 0;
    for (let d = 0; d < dim; d++) ss += x[g + d] * x[g + d];
    const inv = 1 / Math.sqrt(ss / dim + eps);
    for (let d = 0; d < dim; d++) y[g + d] = x[g + d] * inv * w[d];
  }
  return y;
}

const silu = (v: number): number => v / (1 + Math.exp(-v));
const sigmoid = (v: number): number => 1 / (1 + Math.exp(-v));

/** down(silu(gate·x) ⊙ up·x) for [out, in] weights. */
function swiglu(x: Float64Array, rows: number, hidden: number, inter: number, gate: Float64Array, up: Float64Array, down: Float64Array): Float64Array {
  const g = linear(x, rows, gate, inter, hidden);
  const u = linear(x, rows, up, inter, hidden);
  for (let i = 0; i < g.length; i++) g[i] = silu(g[i]) * u[i];
  return linear(g, rows, down, hidden, inter);
}

/**
 * gpt_oss's clamped SwiGLU of one (gate, up) pair (GptOssExperts.forward):
 * gate ≤ limit, −limit ≤ up ≤ limit, then (up + 1) · gate · sigmoid(alpha · gate).
 */
export function gptOssGlu64(gate: number, up: number, alpha = 1.702, limit = 7.0): number {
  const g = Math.min(gate, limit);
  const u = Math.min(Math.max(up, -limit), limit);
  return (u + 1) * (g * sigmoid(g * alpha));
}

/** The indices of the k largest values, largest first (ties: lower index first). */
function topK(values: ArrayLike<number>, k: number): number[] {
  const idx = Array.from({ length: values.length }, (_, i) => i);
  idx.sort((a, b) => values[b] - values[a] || a - b);
  return idx.slice(0, k);
}

function softmaxInPlace(v: Float64Array): Float64Array {
  let m = -Infinity;
  for (const x of v) m = Math.max(m, x);
  let s = 0;
  for (let i = 0; i < v.length; i++) {
    v[i] = Math.exp(v[i] - m);
    s += v[i];
  }
  for (let i = 0; i < v.length; i++) v[i] /= s;
  return v;
}

// ---------------------------------------------------------------------------------------------------
// MXFP4 (transformers integrations/mxfp4.py: FP4_VALUES, convert_moe_packed_tensors)

/** OCP e2m1 values by 4-bit code: bit 3 sign, bits 2..1 exponent, bit 0 mantissa. */
const FP4_E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6];

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** float32 → bf16 with round-to-nearest-even, returned as a number. */
function toBf16(x: number): number {
  f32Scratch[0] = x;
  const bits = u32Scratch[0];
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x7fffff) !== 0) return NaN;
  u32Scratch[0] = ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) << 16;
  return f32Scratch[0];
}

/**
 * Dequantises packed MXFP4 expert weights into the bf16 tensor transformers builds from them.
 * blocks [E, rows, G, 16] uint8 (two e2m1 codes per byte: low nibble first, then high nibble),
 * scales [E, rows, G] uint8 (E8M0: the 32 values of a group are multiplied by 2^(scale − 127)).
 * Row r of the packed tensor holds G·32 values along the input dimension; the result is transposed
 * to [E, G·32, rows], i.e. gate_up_proj_blocks [E, 2I, D/32, 16] → gate_up_proj [E, D, 2I] and
 * down_proj_blocks [E, D, I/32, 16] → down_proj [E, I, D].
 * Values are rounded like torch.ldexp into bf16 (float32 product, then bf16), which is exact for
 * every scale whose result is a normal bf16 number.
 */
export function dequantMxfp4_64(
  blocks: { shape: number[]; values: ArrayLike<number> },
  scales: { shape: number[]; values: ArrayLike<number> },
): { shape: number[]; values: Float64Array } {
  if (blocks.shape.length !== 4 || blocks.shape[3] !== 16) throw new Error(`dequantMxfp4_64: blocks must be [E, rows, G, 16], got [${blocks.shape.join(', ')}]`);
  const [E, rows, G] = blocks.shape;
  if (scales.shape.length !== 3 || scales.shape[0] !== E || scales.shape[1] !== rows || scales.shape[2] !== G) {
    throw new Error(`dequantMxfp4_64: scales [${scales.shape.join(', ')}] do not match blocks [${blocks.shape.join(', ')}]`);
  }
  if (blocks.values.length !== E * rows * G * 16 || scales.values.length !== E * rows * G) throw new Error('dequantMxfp4_64: value counts do not match shapes');
  const cols = G * 32;
  const out = new Float64Array(E * cols * rows);
  for (let e = 0; e < E; e++)
    for (let r = 0; r < rows; r++)
      for (let g = 0; g < G; g++) {
        const s = scales.values[(e * rows + r) * G + g];
        if (!Number.isInteger(s) || s < 0 || s > 255) throw new Error(`dequantMxfp4_64: scale ${s} is not a uint8`);
        const pow2 = Math.fround(Math.pow(2, s - 127));
        for (let b = 0; b < 16; b++) {
          const byte = blocks.values[((e * rows + r) * G + g) * 16 + b];
          if (!Number.isInteger(byte) || byte < 0 || byte > 255) throw new Error(`dequantMxfp4_64: block byte ${byte} is not a uint8`);
          const col = g * 32 + 2 * b;
          const lo = toBf16(Math.fround(FP4_E2M1[byte & 0x0f] * pow2));
          const hi = toBf16(Math.fround(FP4_E2M1[byte >> 4] * pow2));
          out[(e * cols + col) * rows + r] = lo;
          out[(e * cols + col + 1) * rows + r] = hi;
        }
      }
  return { shape: [E, cols, rows], values: out };
}

// ---------------------------------------------------------------------------------------------------
// attention

/**
 * q, k, v of one layer's attention for `rows` normed hidden rows, as the modeling file has them just
 * before RoPE: projections (+ biases), then qwen3_moe's per-head q_norm/k_norm, or olmoe's q_norm /
 * k_norm over the whole projection followed by the clip_qkv clamp of q, k and v.
 * Layouts: q [rows, heads·hd], k and v [rows, kvHeads·hd].
 */
export function hfAttentionInputs64(config: Record<string, unknown>, tensors: HfTensors, layer: number, x: Float64Array, rows: number): { q: Float64Array; k: Float64Array; v: Float64Array } {
  const spec = resolveSpec(config);
  return attentionInputs(spec, new TensorBook(tensors), layer, x, rows);
}

function attentionInputs(s: Spec, book: TensorBook, l: number, x: Float64Array, rows: number): { q: Float64Array; k: Float64Array; v: Float64Array } {
  const p = `model.layers.${l}.self_attn.`;
  const D = s.hidden;
  const qDim = s.heads * s.headDim;
  const kvDim = s.kvHeads * s.headDim;
  const bias = (name: string, n: number) => (s.qkvBias ? book.get(`${p}${name}.bias`, [n]) : undefined);
  let q = linear(x, rows, book.get(`${p}q_proj.weight`, [qDim, D]), qDim, D, bias('q_proj', qDim));
  let k = linear(x, rows, book.get(`${p}k_proj.weight`, [kvDim, D]), kvDim, D, bias('k_proj', kvDim));
  const v = linear(x, rows, book.get(`${p}v_proj.weight`, [kvDim, D]), kvDim, D, bias('v_proj', kvDim));
  if (s.qkNorm === 'per_head') {
    // Qwen3MoeAttention: q_norm/k_norm over head_dim, applied to each head separately.
    q = rmsNorm(q, s.headDim, book.get(`${p}q_norm.weight`, [s.headDim]), s.eps);
    k = rmsNorm(k, s.headDim, book.get(`${p}k_norm.weight`, [s.headDim]), s.eps);
  } else if (s.qkNorm === 'whole') {
    // OlmoeAttention: one RMSNorm over all heads of q (and of k), then the clamp.
    q = rmsNorm(q, qDim, book.get(`${p}q_norm.weight`, [qDim]), s.eps);
    k = rmsNorm(k, kvDim, book.get(`${p}k_norm.weight`, [kvDim]), s.eps);
  }
  if (s.clipQkv != null) {
    const c = s.clipQkv;
    for (const t of [q, k, v]) for (let i = 0; i < t.length; i++) t[i] = Math.min(Math.max(t[i], -c), c);
  }
  return { q, k, v };
}

/** Rotates each head of `t` [rows, nHeads·hd] in place; row r of sequence position pos[r]. Halves convention. */
function applyRope(t: Float64Array, rows: number, nHeads: number, hd: number, rope: Rope, pos: (r: number) => number): void {
  const half = hd / 2;
  for (let r = 0; r < rows; r++) {
    const p = pos(r);
    for (let i = 0; i < half; i++) {
      const angle = p * rope.invFreq[i];
      const cos = Math.cos(angle) * rope.attentionFactor;
      const sin = Math.sin(angle) * rope.attentionFactor;
      for (let h = 0; h < nHeads; h++) {
        const o = (r * nHeads + h) * hd;
        const x1 = t[o + i];
        const x2 = t[o + i + half];
        t[o + i] = x1 * cos - x2 * sin;
        t[o + i + half] = x2 * cos + x1 * sin;
      }
    }
  }
}

function attention(s: Spec, book: TensorBook, l: number, x: Float64Array, batch: number, tokens: number): Float64Array {
  const rows = batch * tokens;
  const hd = s.headDim;
  const { q, k, v } = attentionInputs(s, book, l, x, rows);
  applyRope(q, rows, s.heads, hd, s.rope, (r) => r % tokens);
  applyRope(k, rows, s.kvHeads, hd, s.rope, (r) => r % tokens);
  const p = `model.layers.${l}.self_attn.`;
  const sinks = s.sinks ? book.get(`${p}sinks`, [s.heads]) : null;
  const window = s.windows[l];
  const scale = 1 / Math.sqrt(hd);
  const group = s.heads / s.kvHeads;
  const qDim = s.heads * hd;
  const kvDim = s.kvHeads * hd;
  const out = new Float64Array(rows * qDim);
  const scores = new Float64Array(tokens);
  for (let b = 0; b < batch; b++)
    for (let h = 0; h < s.heads; h++) {
      const kh = Math.floor(h / group);
      for (let i = 0; i < tokens; i++) {
        const qo = (b * tokens + i) * qDim + h * hd;
        const first = window == null ? 0 : Math.max(0, i - window + 1);
        let m = -Infinity;
        for (let j = first; j <= i; j++) {
          const ko = (b * tokens + j) * kvDim + kh * hd;
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += q[qo + d] * k[ko + d];
          scores[j] = dot * scale;
          m = Math.max(m, scores[j]);
        }
        // gpt_oss: a learned per-head logit joins the softmax and is dropped afterwards.
        if (sinks) m = Math.max(m, sinks[h]);
        let denom = sinks ? Math.exp(sinks[h] - m) : 0;
        for (let j = first; j <= i; j++) {
          scores[j] = Math.exp(scores[j] - m);
          denom += scores[j];
        }
        const oo = (b * tokens + i) * qDim + h * hd;
        for (let j = first; j <= i; j++) {
          const w = scores[j] / denom;
          const vo = (b * tokens + j) * kvDim + kh * hd;
          for (let d = 0; d < hd; d++) out[oo + d] += w * v[vo + d];
        }
      }
    }
  const oBias = s.oBias ? book.get(`${p}o_proj.bias`, [s.hidden]) : undefined;
  return linear(out, rows, book.get(`${p}o_proj.weight`, [s.hidden, qDim]), s.hidden, qDim, oBias);
}

// ---------------------------------------------------------------------------------------------------
// MLP / MoE

/** Expert choice and weights per row: softmax → top-k (→ renormalise), or gpt_oss's top-k → softmax. */
function route(s: Spec, logits: Float64Array, rows: number): Array<Array<{ expert: number; weight: number }>> {
  const E = s.experts;
  const out: Array<Array<{ expert: number; weight: number }>> = [];
  for (let r = 0; r < rows; r++) {
    const row = logits.slice(r * E, (r + 1) * E);
    if (s.family === 'gpt_oss') {
      const chosen = topK(row, s.topK);
      const w = softmaxInPlace(Float64Array.from(chosen, (e) => row[e]));
      out.push(chosen.map((expert, i) => ({ expert, weight: w[i] })));
    } else {
      const probs = softmaxInPlace(row);
      const chosen = topK(probs, s.topK);
      let sum = 0;
      for (const e of chosen) sum += probs[e];
      out.push(chosen.map((expert) => ({ expert, weight: s.normTopK ? probs[expert] / sum : probs[expert] })));
    }
  }
  return out;
}

/** gpt_oss expert weights in the bf16 layout, dequantising MXFP4 blocks when that is what the map holds. */
function gptOssExpertWeights(s: Spec, book: TensorBook, l: number): { gateUp: Float64Array; down: Float64Array } {
  const p = `model.layers.${l}.mlp.experts.`;
  const E = s.experts;
  const D = s.hidden;
  const I = s.intermediate;
  const load = (proj: 'gate_up_proj' | 'down_proj', shape: number[]): Float64Array => {
    if (!book.has(`${p}${proj}_blocks`)) return book.get(`${p}${proj}`, shape);
    const rows = shape[2];
    const inner = shape[1];
    if (inner % 32 !== 0) throw new Error(`gpt_oss: ${proj} input size ${inner} is not a multiple of 32 (MXFP4 groups)`);
    const blocksShape = [E, rows, inner / 32, 16];
    const scalesShape = [E, rows, inner / 32];
    const blocks = book.get(`${p}${proj}_blocks`, blocksShape);
    const scales = book.get(`${p}${proj}_scales`, scalesShape);
    return book.derived(`${p}${proj}`, () => dequantMxfp4_64({ shape: blocksShape, values: blocks }, { shape: scalesShape, values: scales }).values);
  };
  return { gateUp: load('gate_up_proj', [E, D, 2 * I]), down: load('down_proj', [E, I, D]) };
}

function gptOssMlp(s: Spec, book: TensorBook, l: number, x: Float64Array, rows: number): Float64Array {
  const p = `model.layers.${l}.mlp.`;
  const E = s.experts;
  const D = s.hidden;
  const I = s.intermediate;
  const logits = linear(x, rows, book.get(`${p}router.weight`, [E, D]), E, D, book.get(`${p}router.bias`, [E]));
  const { gateUp, down } = gptOssExpertWeights(s, book, l);
  const gateUpBias = book.get(`${p}experts.gate_up_proj_bias`, [E, 2 * I]);
  const downBias = book.get(`${p}experts.down_proj_bias`, [E, D]);
  const out = new Float64Array(rows * D);
  const gu = new Float64Array(2 * I);
  const h = new Float64Array(I);
  const routes = route(s, logits, rows);
  for (let r = 0; r < rows; r++)
    for (const { expert: e, weight } of routes[r]) {
      // gate_up = x @ gate_up_proj[e] + bias: gate_up_proj is [in = D, out = 2I].
      for (let j = 0; j < 2 * I; j++) gu[j] = gateUpBias[e * 2 * I + j];
      for (let d = 0; d < D; d++) {
        const xv = x[r * D + d];
        const wo = (e * D + d) * 2 * I;
        for (let j = 0; j < 2 * I; j++) gu[j] += xv * gateUp[wo + j];
      }
      // Interleaved columns: gate = gate_up[..., ::2], up = gate_up[..., 1::2].
      for (let i = 0; i < I; i++) h[i] = gptOssGlu64(gu[2 * i], gu[2 * i + 1], s.swigluAlpha, s.swigluLimit);
      for (let d = 0; d < D; d++) {
        let acc = downBias[e * D + d];
        for (let i = 0; i < I; i++) acc += h[i] * down[(e * I + i) * D + d];
        out[r * D + d] += weight * acc;
      }
    }
  return out;
}

function moeMlp(s: Spec, book: TensorBook, l: number, x: Float64Array, rows: number): Float64Array {
  const D = s.hidden;
  const E = s.experts;
  const I = s.moeIntermediate;
  const block = s.family === 'mixtral' ? `model.layers.${l}.block_sparse_moe.` : `model.layers.${l}.mlp.`;
  const logits = linear(x, rows, book.get(`${block}gate.weight`, [E, D]), E, D);
  const routes = route(s, logits, rows);
  const out = new Float64Array(rows * D);
  // Expert by expert over the rows that chose it, as the modeling files loop.
  for (let e = 0; e < E; e++) {
    const mine: Array<{ row: number; weight: number }> = [];
    routes.forEach((rs, row) => rs.forEach((c) => c.expert === e && mine.push({ row, weight: c.weight })));
    if (!mine.length) {
      // Still check the expert's tensors exist with the right shapes.
      expertWeights(s, book, block, e, D, I);
      continue;
    }
    const xs = new Float64Array(mine.length * D);
    mine.forEach(({ row }, i) => xs.set(x.subarray(row * D, (row + 1) * D), i * D));
    const [gate, up, down] = expertWeights(s, book, block, e, D, I);
    const y = swiglu(xs, mine.length, D, I, gate, up, down);
    mine.forEach(({ row, weight }, i) => {
      for (let d = 0; d < D; d++) out[row * D + d] += weight * y[i * D + d];
    });
  }
  if (s.family === 'qwen2_moe') {
    // Shared expert, scaled per row by sigmoid(shared_expert_gate · x).
    const S = s.sharedIntermediate;
    const sp = `${block}shared_expert.`;
    const shared = swiglu(x, rows, D, S, book.get(`${sp}gate_proj.weight`, [S, D]), book.get(`${sp}up_proj.weight`, [S, D]), book.get(`${sp}down_proj.weight`, [D, S]));
    const gate = linear(x, rows, book.get(`${block}shared_expert_gate.weight`, [1, D]), 1, D);
    for (let r = 0; r < rows; r++) {
      const g = sigmoid(gate[r]);
      for (let d = 0; d < D; d++) out[r * D + d] += g * shared[r * D + d];
    }
  }
  return out;
}

function expertWeights(s: Spec, book: TensorBook, block: string, e: number, D: number, I: number): [Float64Array, Float64Array, Float64Array] {
  const p = `${block}experts.${e}.`;
  if (s.family === 'mixtral') {
    // w1 = gate, w3 = up, w2 = down.
    return [book.get(`${p}w1.weight`, [I, D]), book.get(`${p}w3.weight`, [I, D]), book.get(`${p}w2.weight`, [D, I])];
  }
  return [book.get(`${p}gate_proj.weight`, [I, D]), book.get(`${p}up_proj.weight`, [I, D]), book.get(`${p}down_proj.weight`, [D, I])];
}

function mlp(s: Spec, book: TensorBook, l: number, x: Float64Array, rows: number): Float64Array {
  if (s.family === 'gpt_oss') return gptOssMlp(s, book, l, x, rows);
  if (s.mlp[l] === 'moe') return moeMlp(s, book, l, x, rows);
  const p = `model.layers.${l}.mlp.`;
  const D = s.hidden;
  const I = s.intermediate;
  return swiglu(x, rows, D, I, book.get(`${p}gate_proj.weight`, [I, D]), book.get(`${p}up_proj.weight`, [I, D]), book.get(`${p}down_proj.weight`, [D, I]));
}

// ---------------------------------------------------------------------------------------------------
// the model

/** The inverse RoPE frequencies and attention factor the config gives (for tests of YaRN and defaults). */
export function hfRopeParameters64(config: Record<string, unknown>): { invFreq: Float64Array; attentionFactor: number } {
  const { rope } = resolveSpec(config);
  return { invFreq: rope.invFreq.slice(), attentionFactor: rope.attentionFactor };
}

/** Logits [batch*tokens, vocab] (float64) of `batch` sequences of `tokens` ids each, full causal forward from position 0. */
export function hfReferenceLogits(config: Record<string, unknown>, tensors: HfTensors, ids: Int32Array, batch: number, tokens: number): Float64Array {
  const s = resolveSpec(config);
  const rows = batch * tokens;
  if (ids.length !== rows) throw new Error(`hfReferenceLogits: ${ids.length} ids for ${batch} × ${tokens}`);
  if (s.ropeType === 'dynamic' && tokens > s.maxPositions) throw new Error('hfReferenceLogits: dynamic RoPE beyond max_position_embeddings is not supported');
  const book = new TensorBook(tensors);
  const D = s.hidden;
  const V = s.vocab;
  const embed = book.get('model.embed_tokens.weight', [V, D]);
  let x: Float64Array = new Float64Array(rows * D);
  for (let r = 0; r < rows; r++) {
    const id = ids[r];
    if (!(id >= 0 && id < V)) throw new Error(`hfReferenceLogits: token id ${id} outside the vocabulary of ${V}`);
    x.set(embed.subarray(id * D, (id + 1) * D), r * D);
  }
  for (let l = 0; l < s.layers; l++) {
    const p = `model.layers.${l}.`;
    const a = attention(s, book, l, rmsNorm(x, D, book.get(`${p}input_layernorm.weight`, [D]), s.eps), batch, tokens);
    for (let i = 0; i < x.length; i++) x[i] += a[i];
    const m = mlp(s, book, l, rmsNorm(x, D, book.get(`${p}post_attention_layernorm.weight`, [D]), s.eps), rows);
    for (let i = 0; i < x.length; i++) x[i] += m[i];
  }
  x = rmsNorm(x, D, book.get('model.norm.weight', [D]), s.eps);
  const head = s.tie ? embed : book.get('lm_head.weight', [V, D]);
  const logits = linear(x, rows, head, V, D);
  // A tied checkpoint may still carry lm_head.weight (transformers ties it over); buffers are not weights.
  book.checkAllUsed((n) => n.endsWith('.rotary_emb.inv_freq') || (s.tie && n === 'lm_head.weight'));
  return logits;
}
