// An independent float64 reference of the Mixtral decoder (DESIGN §4, §5), written in plain loops over
// Float64Array so it shares no code with the tfjs model. Used by the gradient checks: the model's float32
// analytic gradients are compared with float64 central differences of these functions.
//
// Layouts match the model's compute layout ([in, out] weights, row-major), so parameters copy over
// directly: `embed` [V, D], `layers.{l}.wqkv` [D, (H + 2·KV)·hd] with q | k | v columns side by side,
// `layers.{l}.wo` [H·hd, D], `layers.{l}.gate` [D, E], `lm_head` [D, V], experts `w1t`, `w3t` [D, I] and
// `w2t` [I, D].
import type { MixtralConfig as ModelConfig, RopeScaling } from '../../services/core/config.js';

export type Params64 = Map<string, Float64Array>;

/** float32 machine epsilon: the clamp of the top-k renormalisation denominator. */
const RENORM_EPS = 2 ** -23;

export function toF64(values: ArrayLike<number>): Float64Array {
  const out = new Float64Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = values[i];
  return out;
}

/** out[n, m] = a[n, k] · b[k, m] */
export function matmul64(a: Float64Array, b: Float64Array, n: number, k: number, m: number): Float64Array {
  const out = new Float64Array(n * m);
  for (let i = 0; i < n; i++) {
    const o = i * m;
    for (let j = 0; j < k; j++) {
      const av = a[i * k + j];
      if (av === 0) continue;
      const r = j * m;
      for (let c = 0; c < m; c++) out[o + c] += av * b[r + c];
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// layers

/** RMSNorm per row: x · (mean(x²) + eps)^(-1/2) · w.  x [rows, dim], w [dim]. */
export function rmsNorm64(x: Float64Array, rows: number, dim: number, w: Float64Array, eps: number): Float64Array {
  const out = new Float64Array(rows * dim);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let d = 0; d < dim; d++) ss += x[r * dim + d] * x[r * dim + d];
    const inv = 1 / Math.sqrt(ss / dim + eps);
    for (let d = 0; d < dim; d++) out[r * dim + d] = x[r * dim + d] * inv * w[d];
  }
  return out;
}

/** Scaled rotary frequencies: one inverse frequency per pair, and the factor on cos and sin. */
export interface RopeFreq64 { invFreq: ArrayLike<number>; attentionFactor: number }

/**
 * The rope_scaling types from their definitions (Hugging Face transformers), written pair by pair in
 * terms of each pair's wavelength 2π·theta^(2i/hd) and its turns over the original context:
 * - linear: every angle's position divided by factor;
 * - dynamic: the NTK base theta·α^(hd/(hd−2)) with α = factor·(factor·maxPositions)/maxPositions − factor + 1
 *   (Switchyard's fixed choice: the length is factor·maxPositions);
 * - yarn: pairs below index floor(jFast) keep their frequency, above ceil(jSlow) are divided by factor,
 *   linear in the index between, where j(β) is the (fractional) pair whose turns over the original context are β;
 *   cos and sin multiplied by attention_factor or 1 + 0.1·ln(factor) (mscale ratio when mscale and
 *   mscale_all_dim are given);
 * - llama3: short wavelengths (< original/high) kept, long (> original/low) divided by factor, between
 *   interpolated by the turns over the original context.
 */
export function ropeFreq64(hd: number, theta: number, scaling: RopeScaling | null, maxPositions: number): RopeFreq64 {
  const pairs = hd / 2;
  const base = new Float64Array(pairs);
  for (let i = 0; i < pairs; i++) base[i] = Math.exp((-2 * i / hd) * Math.log(theta));
  if (scaling === null) return { invFreq: base, attentionFactor: 1 };
  const s = scaling.factor;
  const out = new Float64Array(pairs);
  if (scaling.rope_type === 'linear') {
    for (let i = 0; i < pairs; i++) out[i] = base[i] / s;
    return { invFreq: out, attentionFactor: 1 };
  }
  if (scaling.rope_type === 'dynamic') {
    const alpha = s * s - s + 1;
    const ntkTheta = theta * Math.exp((hd / (hd - 2)) * Math.log(alpha));
    for (let i = 0; i < pairs; i++) out[i] = Math.exp((-2 * i / hd) * Math.log(ntkTheta));
    return { invFreq: out, attentionFactor: 1 };
  }
  if (scaling.rope_type === 'yarn') {
    const context = scaling.original_max_position_embeddings ?? maxPositions;
    // turns(j) = context·theta^(−2j/hd)/(2π) = β  ⇔  j = (hd/2)·ln(context/(2πβ))/ln(theta)
    const pairAt = (beta: number) => (hd / 2) * Math.log(context / (2 * Math.PI * beta)) / Math.log(theta);
    let from = pairAt(scaling.beta_fast);
    let to = pairAt(scaling.beta_slow);
    if (scaling.truncate) { from = Math.floor(from); to = Math.ceil(to); }
    from = Math.max(0, from);
    to = Math.min(hd - 1, to);
    if (to === from) to += 0.001;
    for (let i = 0; i < pairs; i++) {
      const w = i <= from ? 0 : i >= to ? 1 : (i - from) / (to - from);
      out[i] = base[i] * (1 - w + w / s);
    }
    const m = (k: number) => (s <= 1 ? 1 : 1 + 0.1 * k * Math.log(s));
    const attentionFactor = scaling.attention_factor !== undefined ? scaling.attention_factor
      : scaling.mscale && scaling.mscale_all_dim ? m(scaling.mscale) / m(scaling.mscale_all_dim) : m(1);
    return { invFreq: out, attentionFactor };
  }
  const { original_max_position_embeddings: context, low_freq_factor: low, high_freq_factor: high } = scaling;
  for (let i = 0; i < pairs; i++) {
    const turns = context * base[i] / (2 * Math.PI);
    if (turns > high) out[i] = base[i];
    else if (turns < low) out[i] = base[i] / s;
    else {
      const w = (turns - low) / (high - low);
      out[i] = w * base[i] + (1 - w) * base[i] / s;
    }
  }
  return { invFreq: out, attentionFactor: 1 };
}

/**
 * Rotary embedding, Hugging Face rotate-half layout. x [rows, heads·hd]; row r sits at position
 * positions[r]. Per head, element i < hd/2 pairs with i + hd/2 at frequency theta^(-2i/hd) (or
 * `freq.invFreq[i]`, cos and sin then times `freq.attentionFactor`):
 *   out[i] = x[i]·cos − x[i+half]·sin,   out[i+half] = x[i+half]·cos + x[i]·sin.
 */
export function rope64(
  x: Float64Array, rows: number, heads: number, hd: number, positions: ArrayLike<number>, theta: number, freq?: RopeFreq64,
): Float64Array {
  const half = hd / 2;
  const out = new Float64Array(x.length);
  const a = freq?.attentionFactor ?? 1;
  for (let r = 0; r < rows; r++) {
    for (let h = 0; h < heads; h++) {
      const base = r * heads * hd + h * hd;
      for (let i = 0; i < half; i++) {
        const angle = positions[r] * (freq ? freq.invFreq[i] : Math.pow(theta, (-2 * i) / hd));
        const c = Math.cos(angle) * a;
        const s = Math.sin(angle) * a;
        const x1 = x[base + i];
        const x2 = x[base + i + half];
        out[base + i] = x1 * c - x2 * s;
        out[base + i + half] = x2 * c + x1 * s;
      }
    }
  }
  return out;
}

export interface AttnShape64 {
  batch: number;
  tokens: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  /** hidden size (rows of wqkv, columns of wo) */
  hidden: number;
  theta: number;
  /** position of the first token of every sequence (default 0) */
  positionOffset?: number;
  /** sliding window: query t attends keys j with t − window < j ≤ t (default: all j ≤ t) */
  window?: number;
  /** scaled rotary frequencies (default: theta's) */
  rope?: RopeFreq64;
}

/**
 * Causal self-attention the Hugging Face way: q/k/v projections, rotary on q and k, KV heads repeated
 * (query head h reads KV head floor(h / (heads/kvHeads))), per-head scores q·k/sqrt(hd) over keys j ≤ t,
 * softmax, weighted sum of v, output projection. h [batch·tokens, hidden] (sequence-major rows).
 */
export function attention64(h: Float64Array, wqkv: Float64Array, wo: Float64Array, s: AttnShape64): Float64Array {
  const { batch: B, tokens: T, heads: H, kvHeads: KV, headDim: hd, hidden: D } = s;
  const rows = B * T;
  const qW = H * hd;
  const kvW = KV * hd;
  const width = qW + 2 * kvW;
  const qkv = matmul64(h, wqkv, rows, D, width);
  const q = new Float64Array(rows * qW);
  const k = new Float64Array(rows * kvW);
  const v = new Float64Array(rows * kvW);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < qW; c++) q[r * qW + c] = qkv[r * width + c];
    for (let c = 0; c < kvW; c++) {
      k[r * kvW + c] = qkv[r * width + qW + c];
      v[r * kvW + c] = qkv[r * width + qW + kvW + c];
    }
  }
  const positions = new Float64Array(rows);
  for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) positions[b * T + t] = (s.positionOffset ?? 0) + t;
  const qr = rope64(q, rows, H, hd, positions, s.theta, s.rope);
  const kr = rope64(k, rows, KV, hd, positions, s.theta, s.rope);
  // repeat_kv: expand each KV head to heads/kvHeads query heads
  const nRep = H / KV;
  const kRep = new Float64Array(rows * qW);
  const vRep = new Float64Array(rows * qW);
  for (let r = 0; r < rows; r++)
    for (let head = 0; head < H; head++) {
      const kvh = Math.floor(head / nRep);
      for (let d = 0; d < hd; d++) {
        kRep[r * qW + head * hd + d] = kr[r * kvW + kvh * hd + d];
        vRep[r * qW + head * hd + d] = v[r * kvW + kvh * hd + d];
      }
    }
  const scale = 1 / Math.sqrt(hd);
  const context = new Float64Array(rows * qW);
  const scores = new Float64Array(T);
  for (let b = 0; b < B; b++)
    for (let head = 0; head < H; head++)
      for (let t = 0; t < T; t++) {
        const qo = (b * T + t) * qW + head * hd;
        let max = -Infinity;
        const first = s.window === undefined ? 0 : Math.max(0, t - s.window + 1);
        for (let j = first; j <= t; j++) {
          const ko = (b * T + j) * qW + head * hd;
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += qr[qo + d] * kRep[ko + d];
          scores[j] = dot * scale;
          if (scores[j] > max) max = scores[j];
        }
        let sum = 0;
        for (let j = first; j <= t; j++) {
          scores[j] = Math.exp(scores[j] - max);
          sum += scores[j];
        }
        for (let j = first; j <= t; j++) {
          const p = scores[j] / sum;
          const vo = (b * T + j) * qW + head * hd;
          for (let d = 0; d < hd; d++) context[qo + d] += p * vRep[vo + d];
        }
      }
  return matmul64(context, wo, rows, qW, D);
}

export interface Expert64 { w1t: Float64Array; w3t: Float64Array; w2t: Float64Array }

const silu = (a: number): number => a / (1 + Math.exp(-a));

/** SwiGLU expert w2(silu(w1·x) ⊙ (w3·x)) on rows x [rows, hidden]; w1t, w3t [hidden, inter], w2t [inter, hidden]. */
export function expert64(x: Float64Array, rows: number, hidden: number, inter: number, w: Expert64): Float64Array {
  const a = matmul64(x, w.w1t, rows, hidden, inter);
  const b = matmul64(x, w.w3t, rows, hidden, inter);
  const g = new Float64Array(rows * inter);
  for (let i = 0; i < g.length; i++) g[i] = silu(a[i]) * b[i];
  return matmul64(g, w.w2t, rows, inter, hidden);
}

// ---------------------------------------------------------------------------------------------------
// gate, routing and the sparse MoE block

export type RefPolicy = 'mixtral' | 'switch' | 'gshard' | 'topk';

export interface MoeOptions64 {
  policy: RefPolicy;
  k: number;
  experts: number;
  hidden: number;
  inter: number;
  /** capacity factor of the phase (train or eval); ignored by dropless routing */
  capacityFactor: number;
  minCapacity: number;
  dropTokens: boolean;
  /** tokens per routing group; 0 = one group */
  groupTokens: number;
}

export interface MoeResult64 {
  y: Float64Array;
  /** mean over routing groups */
  auxLoss: number;
  /** mean over routing groups */
  zLoss: number;
  /** [tokens·k] chosen experts, token-major, choice order within a token */
  choices: Int32Array;
  /** [tokens·k] 1 where the choice was kept */
  kept: Uint8Array;
  dropped: number;
  /** [E] rows each expert processed */
  rowsPerExpert: Int32Array;
  /** gate logits [tokens, E] */
  logits: Float64Array;
}

/** Capacity of one group for dropping policies: max(ceil(fl32(S/E)·fl32(k·cf)), minCapacity). */
export function capacity64(S: number, E: number, k: number, cf: number, minCapacity: number): number {
  const f = Math.fround(k * cf);
  return Math.max(Math.ceil(Math.fround(Math.fround(S / E) * f)), minCapacity);
}

/**
 * Sparse MoE block. logits = h·gate; per routing group: p = softmax(logits); choices = top-k of p (or
 * `forced`, [tokens·k]); capacity dropping (choice-major, token order) for switch/gshard/topk; combine
 * weights: switch p[e]; others p[e] / max(Σ_kept p, 2^-23); output Σ_kept w·expert_e(h).
 * auxLoss per group: E·Σ_e (n_e/S)·mean_s p[s,e] with n = first-choice counts (switch, gshard, topk k ≤ 2) or
 * counts over all k choices (mixtral, HF load_balancing_loss_func; topk k > 2 as DeepSpeed topkgating, then
 * divided by k); zLoss per group: mean_s lse(logits_s)².
 */
export function moe64(
  h: Float64Array, tokens: number, gate: Float64Array, experts: (e: number) => Expert64,
  o: MoeOptions64, forced?: Int32Array,
): MoeResult64 {
  const { experts: E, k, hidden: D, inter: I } = o;
  if (forced && forced.length !== tokens * k) throw new RangeError(`forced choices: expected ${tokens * k}, got ${forced.length}`);
  const logits = matmul64(h, gate, tokens, D, E);
  const choices = new Int32Array(tokens * k);
  const kept = new Uint8Array(tokens * k);
  const weights = new Float64Array(tokens * k);
  const dropless = o.policy === 'mixtral' || !o.dropTokens;
  const groupSize = o.groupTokens > 0 ? o.groupTokens : tokens;
  let auxSum = 0;
  let zSum = 0;
  let groups = 0;
  const p = new Float64Array(tokens * E);
  for (let start = 0; start < tokens; start += groupSize) {
    const S = Math.min(groupSize, tokens - start);
    groups++;
    let zGroup = 0;
    for (let s = start; s < start + S; s++) {
      let max = -Infinity;
      for (let e = 0; e < E; e++) max = Math.max(max, logits[s * E + e]);
      let sum = 0;
      for (let e = 0; e < E; e++) sum += Math.exp(logits[s * E + e] - max);
      for (let e = 0; e < E; e++) p[s * E + e] = Math.exp(logits[s * E + e] - max) / sum;
      const lse = max + Math.log(sum);
      zGroup += lse * lse;
      if (forced) {
        for (let c = 0; c < k; c++) choices[s * k + c] = forced[s * k + c];
      } else {
        // top-k by probability, ties to the lower index
        const taken = new Uint8Array(E);
        for (let c = 0; c < k; c++) {
          let best = -1;
          for (let e = 0; e < E; e++) if (!taken[e] && (best < 0 || p[s * E + e] > p[s * E + best])) best = e;
          taken[best] = 1;
          choices[s * k + c] = best;
        }
      }
    }
    zSum += zGroup / S;
    // capacity: slots are handed out choice by choice, tokens in order, per expert
    const cap = dropless ? Infinity : capacity64(S, E, k, o.capacityFactor, o.minCapacity);
    const used = new Int32Array(E);
    for (let c = 0; c < k; c++)
      for (let s = start; s < start + S; s++) {
        const e = choices[s * k + c];
        if (used[e]++ < cap) kept[s * k + c] = 1;
      }
    // aux loss with counts held constant
    // (DeepSpeed topkgating, topk k > 2: counts over the k-hot mask and l_aux·1/k)
    const topkgating = o.policy === 'topk' && k > 2;
    const counts = new Float64Array(E);
    for (let s = start; s < start + S; s++) {
      if (o.policy === 'mixtral' || topkgating) for (let c = 0; c < k; c++) counts[choices[s * k + c]]++;
      else counts[choices[s * k]]++;
    }
    let aux = 0;
    for (let e = 0; e < E; e++) {
      let meanP = 0;
      for (let s = start; s < start + S; s++) meanP += p[s * E + e];
      aux += (counts[e] / S) * (meanP / S);
    }
    auxSum += (E * aux) / (topkgating ? k : 1);
    // combine weights
    for (let s = start; s < start + S; s++) {
      if (o.policy === 'switch') {
        for (let c = 0; c < k; c++) if (kept[s * k + c]) weights[s * k + c] = p[s * E + choices[s * k + c]];
        continue;
      }
      let denom = 0;
      for (let c = 0; c < k; c++) if (kept[s * k + c]) denom += p[s * E + choices[s * k + c]];
      denom = Math.max(denom, RENORM_EPS);
      for (let c = 0; c < k; c++) if (kept[s * k + c]) weights[s * k + c] = p[s * E + choices[s * k + c]] / denom;
    }
  }
  // expert computation, one batch of rows per expert
  const y = new Float64Array(tokens * D);
  const rowsPerExpert = new Int32Array(E);
  let dropped = 0;
  for (let e = 0; e < E; e++) {
    const idx: number[] = [];
    for (let i = 0; i < tokens * k; i++) if (choices[i] === e && kept[i]) idx.push(i);
    rowsPerExpert[e] = idx.length;
    if (idx.length === 0) continue;
    const x = new Float64Array(idx.length * D);
    idx.forEach((i, r) => x.set(h.subarray(Math.floor(i / k) * D, Math.floor(i / k) * D + D), r * D));
    const out = expert64(x, idx.length, D, I, experts(e));
    idx.forEach((i, r) => {
      const t = Math.floor(i / k);
      for (let d = 0; d < D; d++) y[t * D + d] += weights[i] * out[r * D + d];
    });
  }
  for (let i = 0; i < tokens * k; i++) if (!kept[i]) dropped++;
  return { y, auxLoss: auxSum / groups, zLoss: zSum / groups, choices, kept, dropped, rowsPerExpert, logits };
}

/** Mean cross-entropy (nats) of logits [rows, V] against target ids. */
export function crossEntropy64(logits: Float64Array, rows: number, vocab: number, targets: ArrayLike<number>): number {
  let total = 0;
  for (let r = 0; r < rows; r++) {
    let max = -Infinity;
    for (let v = 0; v < vocab; v++) max = Math.max(max, logits[r * vocab + v]);
    let sum = 0;
    for (let v = 0; v < vocab; v++) sum += Math.exp(logits[r * vocab + v] - max);
    total += max + Math.log(sum) - logits[r * vocab + targets[r]];
  }
  return total / rows;
}

// ---------------------------------------------------------------------------------------------------
// whole model

export interface ModelRunOptions64 {
  /** per layer [tokens·k] expert ids to use instead of the top-k (keeps finite differences on one branch) */
  forcedChoices?: Int32Array[];
  /** tokens per routing group (0 = the whole call) */
  groupTokens?: number;
  /** selects the train (default) or eval capacity factor */
  train?: boolean;
}

export interface ModelResult64 {
  logits: Float64Array;
  /**
   * Σ over layers of the per-layer aux loss (mean over groups); with aux_loss_scope 'batch', HF's
   * load_balancing_loss_func over every layer's tokens concatenated
   */
  auxLoss: number;
  zLoss: number;
  /** per layer: the routing decisions taken */
  choices: Int32Array[];
  /** per layer: rows each expert processed */
  rowsPerExpert: Int32Array[];
}

function need(params: Params64, name: string): Float64Array {
  const t = params.get(name);
  if (!t) throw new Error(`reference: parameter ${name} missing`);
  return t;
}

export function referenceForward(
  params: Params64, config: ModelConfig, ids: ArrayLike<number>, batch: number, tokens: number, opt: ModelRunOptions64 = {},
): ModelResult64 {
  const D = config.hidden_size;
  const V = config.vocab_size;
  const I = config.intermediate_size;
  const H = config.num_attention_heads;
  const KV = config.num_key_value_heads;
  const hd = config.head_dim ?? D / H;
  const E = config.num_local_experts;
  const k = config.num_experts_per_tok;
  const g = config.switchyard_gate;
  const eps = config.rms_norm_eps;
  const rows = batch * tokens;
  if (ids.length !== rows) throw new RangeError(`reference: expected ${rows} ids, got ${ids.length}`);
  const embed = need(params, 'embed');
  let x = new Float64Array(rows * D);
  for (let r = 0; r < rows; r++) x.set(embed.subarray(ids[r] * D, ids[r] * D + D), r * D);
  const rope = config.rope_scaling ? ropeFreq64(hd, config.rope_theta, config.rope_scaling, config.max_position_embeddings) : undefined;
  let auxLoss = 0;
  let zLoss = 0;
  const choices: Int32Array[] = [];
  const layerLogits: Float64Array[] = [];
  const rowsPerExpert: Int32Array[] = [];
  for (let l = 0; l < config.num_hidden_layers; l++) {
    const n1 = rmsNorm64(x, rows, D, need(params, `layers.${l}.attn_norm`), eps);
    const a = attention64(n1, need(params, `layers.${l}.wqkv`), need(params, `layers.${l}.wo`), {
      batch, tokens, heads: H, kvHeads: KV, headDim: hd, hidden: D, theta: config.rope_theta, rope,
      window: config.sliding_window != null && config.sliding_window < config.max_position_embeddings ? config.sliding_window : undefined,
    });
    const x1 = new Float64Array(rows * D);
    for (let i = 0; i < x1.length; i++) x1[i] = x[i] + a[i];
    const n2 = rmsNorm64(x1, rows, D, need(params, `layers.${l}.moe_norm`), eps);
    const m = moe64(
      n2, rows, need(params, `layers.${l}.gate`),
      (e) => ({
        w1t: need(params, `layers.${l}.experts.${e}.w1t`),
        w3t: need(params, `layers.${l}.experts.${e}.w3t`),
        w2t: need(params, `layers.${l}.experts.${e}.w2t`),
      }),
      {
        policy: g.policy, k, experts: E, hidden: D, inter: I,
        capacityFactor: opt.train === false ? g.eval_capacity_factor : g.capacity_factor,
        minCapacity: g.min_capacity, dropTokens: g.drop_tokens, groupTokens: opt.groupTokens ?? 0,
      },
      opt.forcedChoices?.[l],
    );
    auxLoss += m.auxLoss;
    zLoss += m.zLoss;
    layerLogits.push(m.logits);
    choices.push(m.choices);
    rowsPerExpert.push(m.rowsPerExpert);
    x = new Float64Array(rows * D);
    for (let i = 0; i < x.length; i++) x[i] = x1[i] + m.y[i];
  }
  if (g.aux_loss_scope === 'batch') {
    // HF: tokens_per_expert = mean one_hot(top-k) [k, E], router_prob_per_expert = mean softmax [E], over
    // all layers' rows; loss = E·Σ tokens_per_expert·router_prob_per_expert
    const N = rows * layerLogits.length;
    const chosen = new Float64Array(E);
    const probSum = new Float64Array(E);
    layerLogits.forEach((lg, l) => {
      for (const e of choices[l]) chosen[e]++;
      for (let r = 0; r < rows; r++) {
        let max = -Infinity;
        for (let e = 0; e < E; e++) max = Math.max(max, lg[r * E + e]);
        let sum = 0;
        for (let e = 0; e < E; e++) sum += Math.exp(lg[r * E + e] - max);
        for (let e = 0; e < E; e++) probSum[e] += Math.exp(lg[r * E + e] - max) / sum;
      }
    });
    auxLoss = 0;
    for (let e = 0; e < E; e++) auxLoss += (chosen[e] / N) * (probSum[e] / N);
    auxLoss *= E;
  }
  const nf = rmsNorm64(x, rows, D, need(params, 'norm'), eps);
  const logits = matmul64(nf, need(params, 'lm_head'), rows, D, V);
  return { logits, auxLoss, zLoss, choices, rowsPerExpert };
}

export function referenceLogits(
  params: Params64, config: ModelConfig, ids: ArrayLike<number>, batch: number, tokens: number, forcedChoices?: Int32Array[],
): Float64Array {
  return referenceForward(params, config, ids, batch, tokens, { forcedChoices, train: false }).logits;
}

/** The training objective: CE_mean + aux_loss_coef·Σ_layers aux + z_loss_coef·Σ_layers z. */
export function referenceLoss(
  params: Params64, config: ModelConfig, ids: ArrayLike<number>, targets: ArrayLike<number>, batch: number, tokens: number,
  forcedChoices?: Int32Array[], opt: Omit<ModelRunOptions64, 'forcedChoices'> = {},
): number {
  const r = referenceForward(params, config, ids, batch, tokens, { ...opt, forcedChoices });
  const ce = crossEntropy64(r.logits, batch * tokens, config.vocab_size, targets);
  const g = config.switchyard_gate;
  return ce + g.aux_loss_coef * r.auxLoss + g.z_loss_coef * r.zLoss;
}

// ---------------------------------------------------------------------------------------------------
// gradient-check helpers

/** Central difference of f with respect to x[i], step eps·max(1, |x[i]|); x is restored. */
export function centralDiff(f: () => number, x: Float64Array, i: number, relEps = 1e-5): number {
  const orig = x[i];
  const step = relEps * Math.max(1, Math.abs(orig));
  x[i] = orig + step;
  const up = f();
  x[i] = orig - step;
  const down = f();
  x[i] = orig;
  return (up - down) / (2 * step);
}

/** ‖a − n‖₂ / max(‖n‖₂, 1e-8) */
export function relErr(a: ArrayLike<number>, n: ArrayLike<number>): number {
  if (a.length !== n.length) throw new RangeError(`relErr: lengths ${a.length} and ${n.length} differ`);
  let diff = 0;
  let norm = 0;
  for (let i = 0; i < a.length; i++) {
    diff += (a[i] - n[i]) ** 2;
    norm += n[i] ** 2;
  }
  return Math.sqrt(diff) / Math.max(Math.sqrt(norm), 1e-8);
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new RangeError(`maxAbsDiff: lengths ${a.length} and ${b.length} differ`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

export function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

/** `count` distinct indices in [0, n) (all of them when n ≤ count), drawn with `next()` uniform in [0, 1). */
export function sampleIndices(next: () => number, n: number, count: number): number[] {
  if (n <= count) return Array.from({ length: n }, (_, i) => i);
  const chosen = new Set<number>();
  while (chosen.size < count) chosen.add(Math.floor(next() * n));
  return [...chosen].sort((a, b) => a - b);
}
