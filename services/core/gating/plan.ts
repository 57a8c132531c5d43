// Forward gating: logits [S, E] → routing plan in index form (DESIGN §5).
//
// Conventions shared by every policy
// - probs = softmax(logits) per token, float32 (exp of float32 differences, sum in float64, one division
//   rounded to float32). Kept in the plan for gateBackward.
// - Choice 0 of a token is argmax(probs) (or argmax(probs + selectionBias)); ties go to the lowest expert
//   index, as torch.argmax on CPU. DeepSpeed's top1gating/top2gating take the first expert from the
//   softmax, not from the logits, so a float32 tie in probs that the logits would break is broken the
//   DeepSpeed way.
// - Choices 1..k−1 are the best remaining experts by a "secondary score", in descending order, ties to
//   the lowest index:
//     mixtral                   probs                     (HF Mixtral: torch.topk of the softmax)
//     gshard / topk             logits                    (DeepSpeed top2gating: argmax of the logits
//                                                         with the first expert masked to −inf)
//     gshard / topk + noise     fl32(logits + noise)      (DeepSpeed top2_2nd_expert_sampling)
//     any + selectionBias       fl32(probs + bias)        (DeepSeek-V3: top-k of the biased scores)
// - Slots are choice-major per expert: every choice-0 row of an expert (token order), then every
//   choice-1 row, … . A choice's slot is its position in that order counted BEFORE dropping (DeepSpeed's
//   `locations2 += sum(mask1)`); it is dropped when that position is ≥ capacity. Hence the first C rows
//   of the order survive, and the survivors' slots are exactly 0..kept−1.
// - Exception, switch with selectionUniform (DeepSpeed top1gating's use_rts, Random Token Selection): an
//   expert with more first choices than capacity keeps the `capacity` tokens with the largest uniform
//   (torch.topk(mask1 · uniform, capacity, dim=0)); slots are ranks among the kept tokens in token order
//   (cumsum(kept mask) − 1). Equal uniforms go to the lower token index (torch.topk leaves ties unspecified).

export type PolicyKind = 'switch' | 'gshard' | 'mixtral' | 'topk';

export interface GatePolicy {
  kind: PolicyKind;
  /** experts per token: switch 1 (fixed), gshard 2 (fixed), mixtral/topk default 2 */
  k?: number;
  /** capacity factor (default 1.0, DeepSpeed's default); ignored by mixtral, which is dropless */
  capacityFactor?: number;
  /** lower bound of the capacity when dropping (default 4, DeepSpeed MoE's default) */
  minCapacity?: number;
  /** default true; false sizes the capacity to the largest per-expert count and drops nothing */
  dropTokens?: boolean;
  /**
   * Optional selection-only bias per expert [E] (DeepSeek-V3 aux-loss-free balancing): experts are chosen
   * as the top-k of fl32(probs + bias); weights and the aux loss still use the unbiased probs.
   */
  selectionBias?: Float32Array;
  /**
   * Optional noise [S·E] for choosing the 2nd..kth expert (gshard/topk with k ≥ 2), as DeepSpeed's
   * top2_2nd_expert_sampling: the secondary score becomes fl32(logits + noise). Typically gumbelNoise().
   * Cannot be combined with selectionBias.
   */
  secondChoiceNoise?: Float32Array;
  /**
   * Optional uniforms in [0, 1) per (token, expert) [S·E] for Random Token Selection, switch only
   * (DeepSpeed top1gating with use_rts: mask1_rand = mask1 · uniform). Only the entries of each token's
   * chosen expert are read. Typically rtsUniforms(); without it the first tokens in token order are kept.
   */
  selectionUniform?: Float32Array | Float64Array;
  /**
   * Default true. false keeps the kept choices' softmax probabilities as combine weights (DeepSeek-MoE with
   * norm_topk_prob = false); switch never renormalises.
   */
  renormalize?: boolean;
}

export interface RoutingPlan {
  kind: PolicyKind;
  tokens: number;
  experts: number;
  k: number;
  /** slots per expert buffer; for dropless routing (mixtral, dropTokens=false) the largest count */
  capacity: number;
  /** true when `capacity` only mirrors the largest count (nothing can be dropped), not a limit */
  dropless: boolean;
  /** [tokens·k] token-major, choice order within a token; holds the chosen expert even when dropped */
  expert: Int32Array;
  /** [tokens·k] slot in the expert's buffer, −1 when dropped */
  slot: Int32Array;
  /** [tokens·k] combine weight, 0 when dropped */
  weight: Float32Array;
  /** [E] rows sent to each expert before capacity (all k choices; DeepSpeed's exp_counts) */
  countsBeforeDrop: Int32Array;
  /** [E] rows kept per expert */
  countsAfterDrop: Int32Array;
  auxLoss: number;
  /** softmax(logits) [tokens·experts] float32, kept for backward */
  probs: Float32Array;
  /** whether the weights are the kept probabilities divided by their sum (false: the probabilities) */
  renormalized: boolean;
}

/** float32 machine epsilon, torch.finfo(torch.float32).eps: the clamp of the renormalisation denominator */
export const RENORM_EPS = 2 ** -23;

const fround = Math.fround;

/**
 * DeepSpeed's `_capacity`: max(ceil(fl32(S/E)·fl32(f)), minCapacity) with f = k·capacityFactor, the product
 * and the ceil done in float32 (torch multiplies a Python float by a float32 0-dim tensor).
 */
export function capacityFor(
  tokens: number,
  experts: number,
  k: number,
  capacityFactor: number,
  minCapacity: number,
): number {
  checkCount('tokens', tokens, 0);
  checkCount('experts', experts, 1);
  checkCount('k', k, 1);
  checkCapacityFactor(capacityFactor);
  checkCount('minCapacity', minCapacity, 0);
  const f = fround(k * capacityFactor);
  const capacity = Math.ceil(fround(fround(tokens / experts) * f));
  return Math.max(capacity, minCapacity);
}

/** Whether a policy keeps every choice whatever the group's size: mixtral, or any policy with drop_tokens off. */
export function isDropless(kind: PolicyKind, dropTokens: boolean | undefined): boolean {
  return kind === 'mixtral' || dropTokens === false;
}

/** How choices 1..k−1 are ranked. */
const enum Secondary {
  Logits,
  NoisyLogits,
  Probs,
  BiasedProbs,
}

interface ResolvedPolicy {
  kind: PolicyKind;
  k: number;
  capacityFactor: number;
  minCapacity: number;
  dropTokens: boolean;
  bias: Float32Array | undefined;
  noise: Float32Array | undefined;
  uniform: Float32Array | Float64Array | undefined;
  renormalize: boolean;
}

export function routeTokens(
  logits: Float32Array,
  tokens: number,
  experts: number,
  policy: GatePolicy,
): RoutingPlan {
  checkCount('tokens', tokens, 0);
  checkCount('experts', experts, 1);
  if (!(logits instanceof Float32Array)) throw new RangeError('logits must be a Float32Array');
  if (logits.length !== tokens * experts) {
    throw new RangeError(
      `logits has ${logits.length} entries, expected tokens·experts = ${tokens}·${experts} = ${tokens * experts}`,
    );
  }
  const p = resolvePolicy(policy, tokens, experts);
  const { kind, k } = p;
  const S = tokens;
  const E = experts;

  const probs = new Float32Array(S * E);
  softmaxRows(logits, S, E, probs);

  // ---- selection -------------------------------------------------------------------------------
  const expert = new Int32Array(S * k);
  const choiceCounts = new Int32Array(k * E); // [k][E] rows per (choice, expert) before dropping
  const secondary: Secondary = p.bias
    ? Secondary.BiasedProbs
    : kind === 'mixtral'
      ? Secondary.Probs
      : p.noise
        ? Secondary.NoisyLogits
        : Secondary.Logits;
  const bias = p.bias;
  const noise = p.noise;
  const m = k - 1; // secondary choices per token
  const topIdx = new Int32Array(Math.max(m, 1));
  const topVal = new Float64Array(Math.max(m, 1));

  for (let s = 0; s < S; s++) {
    const row = s * E;
    // choice 0: argmax of probs (+ bias), lowest index on ties
    let first = 0;
    let best = bias ? fround(probs[row] + bias[0]) : probs[row];
    for (let e = 1; e < E; e++) {
      const v = bias ? fround(probs[row + e] + bias[e]) : probs[row + e];
      if (v > best) {
        best = v;
        first = e;
      }
    }
    expert[s * k] = first;
    choiceCounts[first]++;
    if (m === 0) continue;

    // choices 1..k−1: partial selection of the m best secondary scores (insertion into a sorted buffer;
    // strict comparisons keep equal scores in index order)
    let filled = 0;
    for (let e = 0; e < E; e++) {
      if (e === first) continue;
      let v: number;
      switch (secondary) {
        case Secondary.Logits:
          v = logits[row + e];
          break;
        case Secondary.NoisyLogits:
          v = fround(logits[row + e] + noise![row + e]);
          break;
        case Secondary.Probs:
          v = probs[row + e];
          break;
        default:
          v = fround(probs[row + e] + bias![e]);
      }
      let j: number;
      if (filled < m) {
        j = filled++;
      } else if (v > topVal[m - 1]) {
        j = m - 1;
      } else {
        continue;
      }
      while (j > 0 && v > topVal[j - 1]) {
        topVal[j] = topVal[j - 1];
        topIdx[j] = topIdx[j - 1];
        j--;
      }
      topVal[j] = v;
      topIdx[j] = e;
    }
    for (let c = 1; c < k; c++) {
      const e = topIdx[c - 1];
      expert[s * k + c] = e;
      choiceCounts[c * E + e]++;
    }
  }

  // ---- counts, capacity ------------------------------------------------------------------------
  const countsBeforeDrop = new Int32Array(E);
  let maxCount = 0;
  for (let e = 0; e < E; e++) {
    let n = 0;
    for (let c = 0; c < k; c++) n += choiceCounts[c * E + e];
    countsBeforeDrop[e] = n;
    if (n > maxCount) maxCount = n;
  }
  const dropless = isDropless(kind, p.dropTokens);
  // DeepSpeed with drop_tokens=False: capacity = max(exp_counts) (top-1 also min(·, S), a no-op), and
  // min_capacity is not applied.
  const capacity = dropless ? maxCount : capacityFor(S, E, k, p.capacityFactor, p.minCapacity);

  // ---- aux loss (before choiceCounts is turned into slot cursors) -------------------------------
  const auxLoss = auxLossOf(kind, k, probs, S, E, choiceCounts, countsBeforeDrop);

  // ---- slots -----------------------------------------------------------------------------------
  // cursor[c][e] = Σ_{c'<c} choiceCounts[c'][e]: where choice c's rows start in expert e's order
  const cursor = choiceCounts;
  for (let e = 0; e < E; e++) {
    let acc = 0;
    for (let c = 0; c < k; c++) {
      const n = cursor[c * E + e];
      cursor[c * E + e] = acc;
      acc += n;
    }
  }
  const slot = new Int32Array(S * k);
  const countsAfterDrop = new Int32Array(E);
  if (p.uniform && !dropless) {
    // (dropless: every token is kept, so the uniforms cannot matter)
    keepByUniform(expert, p.uniform, countsBeforeDrop, S, E, capacity, slot, countsAfterDrop);
  } else {
    for (let s = 0; s < S; s++) {
      for (let c = 0; c < k; c++) {
        const i = s * k + c;
        const e = expert[i];
        const location = cursor[c * E + e]++;
        if (location < capacity) {
          slot[i] = location;
          countsAfterDrop[e]++;
        } else {
          slot[i] = -1;
        }
      }
    }
  }

  // ---- weights ---------------------------------------------------------------------------------
  const weight = new Float32Array(S * k);
  const renormalized = kind !== 'switch' && p.renormalize;
  if (!renormalized) {
    // top1gating, and DeepSeek-MoE without norm_topk_prob: the softmax probability of each kept choice
    for (let i = 0; i < S * k; i++) {
      if (slot[i] >= 0) weight[i] = probs[((i / k) | 0) * E + expert[i]];
    }
  } else {
    // gshard/topk: renormalise the kept choices, denominator max(Σ kept, eps) summed in float32 in choice
    // order (top2gating: gates1_s + gates2_s, clamp(min=eps)); a token with every choice dropped gets 0s.
    // mixtral: nothing is dropped, so this renormalises over the k chosen (HF: topk values / their sum).
    // HF has no clamp; here it can only bind when a selectionBias picks experts of vanishing probability.
    for (let s = 0; s < S; s++) {
      const base = s * k;
      const sum = keptProbSum(probs, expert, slot, s, E, k);
      if (sum < 0) continue;
      const denom = sum > RENORM_EPS ? sum : RENORM_EPS;
      for (let c = 0; c < k; c++) {
        const i = base + c;
        if (slot[i] >= 0) weight[i] = fround(probs[s * E + expert[i]] / denom);
      }
    }
  }

  return {
    kind,
    tokens: S,
    experts: E,
    k,
    capacity,
    dropless,
    expert,
    slot,
    weight,
    countsBeforeDrop,
    countsAfterDrop,
    auxLoss,
    probs,
    renormalized,
  };
}

/**
 * float32 Σ of the kept probabilities of token s, accumulated in choice order (top2gating's
 * gates1_s + gates2_s); −1 when no choice of the token was kept. The forward pass divides by
 * max(sum, RENORM_EPS); the backward pass uses the same value to pick the clamp branch.
 */
export function keptProbSum(
  probs: Float32Array,
  expert: Int32Array,
  slot: Int32Array,
  s: number,
  E: number,
  k: number,
): number {
  let sum = 0;
  let kept = false;
  for (let c = 0; c < k; c++) {
    const i = s * k + c;
    if (slot[i] < 0) continue;
    sum = fround(sum + probs[s * E + expert[i]]);
    kept = true;
  }
  return kept ? sum : -1;
}

/**
 * Auxiliary load-balancing loss of one routing group (S tokens), computed in float64:
 * - switch / gshard / topk with k ≤ 2 (DeepSpeed top1gating/top2gating, GShard, Switch Transformer):
 *     l_aux = E · Σ_e mean_s(probs[s,e]) · count1[e]/S
 *   where count1[e] counts the tokens whose FIRST choice is e, before dropping (top2gating's
 *   mean(me·ce)·E·E is the same quantity). Balanced routing gives 1.
 * - topk with k > 2 (DeepSpeed topkgating): ce is the mean of the k-hot mask, so every choice counts:
 *     l_aux = mean_e(me·ce)·E·E/k = (E/k) · Σ_e mean_s(probs[s,e]) · countAllChoices[e]/S
 *   Balanced routing gives 1.
 * - mixtral (Hugging Face `load_balancing_loss_func` for one group, no attention mask):
 *     tokens_per_expert[c,e] = mean_s one_hot(choice c of s)[e]            shape [k, E]
 *     router_prob_per_expert[e] = mean_s probs[s,e]
 *     l_aux = E · Σ_c Σ_e tokens_per_expert[c,e] · router_prob_per_expert[e]
 *           = E · Σ_e (countAllChoices[e]/S) · mean_s probs[s,e]
 *   i.e. the fraction of tokens per expert is taken per choice and summed over the k choices, so balanced
 *   routing gives k, not 1. HF pools every layer and the whole batch into one group: see pooledAuxTotals
 *   for that scope; this function is the per-routing-group one.
 * The probabilities are always the unbiased softmax; an empty group has loss 0.
 */
function auxLossOf(
  kind: PolicyKind,
  k: number,
  probs: Float32Array,
  S: number,
  E: number,
  choiceCounts: Int32Array,
  countsAllChoices: Int32Array,
): number {
  if (S === 0) return 0;
  const counts = auxCountsAllChoices(kind, k) ? countsAllChoices : choiceCounts.subarray(0, E);
  // Σ_e count[e] · Σ_s probs[s,e], accumulated over tokens without a per-expert temporary
  let total = 0;
  for (let s = 0; s < S; s++) {
    const row = s * E;
    for (let e = 0; e < E; e++) total += counts[e] * probs[row + e];
  }
  return (E * total) / (S * S * auxDivisor(kind, k));
}

/** Whether the aux loss counts every choice (mixtral, topkgating) or first choices only (top1/top2gating). */
export function auxCountsAllChoices(kind: PolicyKind, k: number): boolean {
  return kind === 'mixtral' || (kind === 'topk' && k > 2);
}

/** The 1/k of DeepSpeed topkgating's l_aux (k > 2); 1 for every other policy. */
export function auxDivisor(kind: PolicyKind, k: number): number {
  return kind === 'topk' && k > 2 ? k : 1;
}

/**
 * Per-expert totals of the Mixtral aux loss over any set of plans (routing groups, layers): rows chosen
 * (all k choices, before dropping), Σ_s probs[s,e] in float64, and the number of tokens.
 */
export interface PooledAuxTotals {
  tokens: number;
  chosen: Float64Array;
  probSum: Float64Array;
}

/**
 * Hugging Face `load_balancing_loss_func` pools the router logits of every layer and every token of the
 * batch (torch.cat over layers, no attention mask) before taking the means; these are its sufficient
 * statistics. Only for mixtral plans of one expert count.
 */
export function pooledAuxTotals(plans: readonly RoutingPlan[], experts: number): PooledAuxTotals {
  checkCount('experts', experts, 1);
  const chosen = new Float64Array(experts);
  const probSum = new Float64Array(experts);
  let tokens = 0;
  for (const plan of plans) {
    if (plan.kind !== 'mixtral') throw new RangeError(`the pooled (batch-scope) aux loss is Mixtral's; got a '${plan.kind}' plan`);
    if (plan.experts !== experts) throw new RangeError(`plan has ${plan.experts} experts, expected ${experts}`);
    tokens += plan.tokens;
    for (let i = 0; i < plan.expert.length; i++) chosen[plan.expert[i]]++;
    for (let s = 0; s < plan.tokens; s++) {
      const row = s * experts;
      for (let e = 0; e < experts; e++) probSum[e] += plan.probs[row + e];
    }
  }
  return { tokens, chosen, probSum };
}

/** HF's loss from the pooled totals: E · Σ_e (chosen[e]/N) · (probSum[e]/N); 0 with no tokens. */
export function pooledAuxLoss(totals: PooledAuxTotals): number {
  const { tokens: N, chosen, probSum } = totals;
  if (N === 0) return 0;
  let total = 0;
  for (let e = 0; e < chosen.length; e++) total += chosen[e] * probSum[e];
  return (chosen.length * total) / (N * N);
}

/**
 * Random Token Selection (switch, dropping): per expert, keep the `capacity` first-choice tokens with the
 * largest uniform (ties to the lower token index), then number the kept tokens in token order.
 */
function keepByUniform(
  expert: Int32Array,
  uniform: Float32Array | Float64Array,
  counts: Int32Array,
  S: number,
  E: number,
  capacity: number,
  slot: Int32Array,
  countsAfterDrop: Int32Array,
): void {
  const kept = new Uint8Array(S);
  // tokens bucketed by expert, token order within a bucket
  const start = new Int32Array(E + 1);
  for (let e = 0; e < E; e++) start[e + 1] = start[e] + counts[e];
  const fill = start.slice(0, E);
  const order = new Int32Array(S);
  for (let s = 0; s < S; s++) order[fill[expert[s]]++] = s;
  for (let e = 0; e < E; e++) {
    const bucket = order.subarray(start[e], start[e + 1]);
    if (bucket.length <= capacity) {
      for (const s of bucket) kept[s] = 1;
      continue;
    }
    const ranked = Array.from(bucket).sort((a, b) => uniform[b * E + e] - uniform[a * E + e] || a - b);
    for (let j = 0; j < capacity; j++) kept[ranked[j]] = 1;
  }
  for (let s = 0; s < S; s++) {
    if (kept[s]) {
      slot[s] = countsAfterDrop[expert[s]]++;
    } else {
      slot[s] = -1;
    }
  }
}

/** Row-wise float32 softmax; throws RangeError on a non-finite logit. */
export function softmaxRows(logits: Float32Array, S: number, E: number, out: Float32Array): void {
  for (let s = 0; s < S; s++) {
    const row = s * E;
    let max = -Infinity;
    for (let e = 0; e < E; e++) {
      const x = logits[row + e];
      if (!Number.isFinite(x)) {
        throw new RangeError(`logits[${s}, ${e}] is ${x}: logits must be finite`);
      }
      if (x > max) max = x;
    }
    let sum = 0;
    for (let e = 0; e < E; e++) {
      const v = fround(Math.exp(fround(logits[row + e] - max)));
      out[row + e] = v;
      sum += v;
    }
    for (let e = 0; e < E; e++) out[row + e] = fround(out[row + e] / sum);
  }
}

function resolvePolicy(policy: GatePolicy, tokens: number, experts: number): ResolvedPolicy {
  if (policy === null || typeof policy !== 'object') throw new RangeError('policy must be an object');
  const kind = policy.kind;
  let k: number;
  switch (kind) {
    case 'switch':
      k = policy.k ?? 1;
      if (k !== 1) throw new RangeError(`policy 'switch' routes each token to 1 expert, got k = ${k}`);
      break;
    case 'gshard':
      k = policy.k ?? 2;
      if (k !== 2) throw new RangeError(`policy 'gshard' routes each token to 2 experts, got k = ${k}`);
      break;
    case 'mixtral':
    case 'topk':
      k = policy.k ?? 2;
      break;
    default:
      throw new RangeError(
        `unknown gating policy kind ${JSON.stringify(kind)} (expected switch, gshard, mixtral or topk)`,
      );
  }
  if (!Number.isInteger(k) || k < 1) throw new RangeError(`k must be an integer ≥ 1, got ${k}`);
  if (k > experts) throw new RangeError(`k = ${k} exceeds the number of experts (${experts})`);

  const capacityFactor = policy.capacityFactor ?? 1.0;
  checkCapacityFactor(capacityFactor);
  const minCapacity = policy.minCapacity ?? 4;
  checkCount('minCapacity', minCapacity, 0);
  const dropTokens = policy.dropTokens ?? true;
  if (typeof dropTokens !== 'boolean') throw new RangeError('dropTokens must be a boolean');
  const renormalize = policy.renormalize ?? true;
  if (typeof renormalize !== 'boolean') throw new RangeError('renormalize must be a boolean');

  const bias = policy.selectionBias;
  if (bias !== undefined) {
    if (!(bias instanceof Float32Array) || bias.length !== experts) {
      throw new RangeError(`selectionBias must be a Float32Array of length experts = ${experts}`);
    }
    for (let e = 0; e < experts; e++) {
      if (!Number.isFinite(bias[e])) throw new RangeError(`selectionBias[${e}] is ${bias[e]}: must be finite`);
    }
  }
  const noise = policy.secondChoiceNoise;
  if (noise !== undefined) {
    if (kind !== 'gshard' && kind !== 'topk') {
      throw new RangeError(`secondChoiceNoise applies to gshard and topk only, not to '${kind}'`);
    }
    if (k < 2) throw new RangeError('secondChoiceNoise needs k ≥ 2 (it only picks the 2nd..kth expert)');
    if (bias !== undefined) {
      throw new RangeError('secondChoiceNoise and selectionBias cannot be combined');
    }
    if (!(noise instanceof Float32Array) || noise.length !== tokens * experts) {
      throw new RangeError(
        `secondChoiceNoise must be a Float32Array of length tokens·experts = ${tokens * experts}`,
      );
    }
    for (let i = 0; i < noise.length; i++) {
      if (!Number.isFinite(noise[i])) throw new RangeError(`secondChoiceNoise[${i}] is ${noise[i]}: must be finite`);
    }
  }
  const uniform = policy.selectionUniform;
  if (uniform !== undefined) {
    if (kind !== 'switch') {
      throw new RangeError(`selectionUniform (Random Token Selection) applies to policy 'switch' only, not to '${kind}'`);
    }
    if (!(uniform instanceof Float32Array || uniform instanceof Float64Array) || uniform.length !== tokens * experts) {
      throw new RangeError(`selectionUniform must be a Float32Array or Float64Array of length tokens·experts = ${tokens * experts}`);
    }
    for (let i = 0; i < uniform.length; i++) {
      if (!(uniform[i] >= 0 && uniform[i] < 1)) throw new RangeError(`selectionUniform[${i}] is ${uniform[i]}: must be in [0, 1)`);
    }
  }
  return { kind, k, capacityFactor, minCapacity, dropTokens, bias, noise, uniform, renormalize };
}

function checkCount(name: string, value: number, min: number): void {
  if (!Number.isInteger(value) || value < min) {
    throw new RangeError(`${name} must be an integer ≥ ${min}, got ${value}`);
  }
}

function checkCapacityFactor(capacityFactor: number): void {
  if (typeof capacityFactor !== 'number' || !Number.isFinite(capacityFactor) || capacityFactor <= 0) {
    throw new RangeError(`capacityFactor must be a finite number > 0, got ${capacityFactor}`);
  }
}
