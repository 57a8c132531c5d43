// Training extras around the gate: Gumbel noise for second-expert sampling, multiplicative input jitter
// and the aux-loss-free balancing bias update. `random` is any uniform source on [0, 1) (Math.random or
// a seeded generator), so runs can be made reproducible.

/** Smallest positive normal float32 (torch.finfo(float32).tiny): lower clamp of U, as torch's Gumbel. */
const TINY32 = 2 ** -126;

/**
 * `count` samples of standard Gumbel noise −log(−log(U)), U uniform in (0, 1). A draw of exactly 0 is
 * clamped to 2^-126 so the result stays finite.
 */
export function gumbelNoise(count: number, random: () => number): Float32Array {
  if (!Number.isInteger(count) || count < 0) throw new RangeError(`count must be an integer ≥ 0, got ${count}`);
  const out = new Float32Array(count);
  for (let i = 0; i < count; i++) {
    let u = random();
    if (!(u >= 0 && u < 1)) throw new RangeError(`random() must return a number in [0, 1), got ${u}`);
    if (u < TINY32) u = TINY32;
    out[i] = -Math.log(-Math.log(u));
  }
  return out;
}

/**
 * Multiplicative jitter (Switch Transformer; HF Mixtral's router_jitter_noise): one factor per entry of
 * `rows`, uniform in [1 − eps, 1 + eps). The caller multiplies the gate input by them (and the gradient
 * by the same factors). eps = 0 gives all ones.
 */
export function multiplicativeJitter(rows: Float32Array, eps: number, random: () => number): Float32Array {
  if (!Number.isFinite(eps) || eps < 0 || eps >= 1) throw new RangeError(`jitter eps must be in [0, 1), got ${eps}`);
  const out = new Float32Array(rows.length);
  for (let i = 0; i < out.length; i++) {
    const u = random();
    if (!(u >= 0 && u < 1)) throw new RangeError(`random() must return a number in [0, 1), got ${u}`);
    out[i] = 1 - eps + 2 * eps * u;
  }
  return out;
}

/**
 * DeepSeek-V3 aux-loss-free balancing, in place: b_e += rate · sign(mean load − load_e), where load_e is
 * the number of rows routed to expert e (pass plan.countsBeforeDrop, summed over the groups of a step if
 * the bias is shared). Overloaded experts become less likely to be chosen, underloaded ones more.
 */
export function updateBalanceBias(bias: Float32Array, countsBeforeDrop: Int32Array, rate: number): void {
  const E = bias.length;
  if (countsBeforeDrop.length !== E) {
    throw new RangeError(`countsBeforeDrop has ${countsBeforeDrop.length} entries, bias has ${E}`);
  }
  if (!Number.isFinite(rate) || rate < 0) throw new RangeError(`rate must be a finite number ≥ 0, got ${rate}`);
  if (E === 0) return;
  let total = 0;
  for (let e = 0; e < E; e++) total += countsBeforeDrop[e];
  const mean = total / E;
  for (let e = 0; e < E; e++) {
    const load = countsBeforeDrop[e];
    const sign = load < mean ? 1 : load > mean ? -1 : 0;
    bias[e] += rate * sign;
  }
}

/**
 * What a Random Token Selection uniform is a function of, besides the (token, expert) it belongs to. The
 * stream is counter-based (a hash, no state), so a uniform depends only on (seed, step, layer, token,
 * expert): a resumed run, and a data-parallel replica that routes tokens firstToken.. of the same global
 * batch, draw exactly the uniforms of the uninterrupted single-process run.
 */
export interface SelectionKey {
  /** the training seed (any safe integer) */
  seed: number;
  /** optimizer step (≥ 0) */
  step: number;
  /** model layer (≥ 0) */
  layer: number;
}

/**
 * Uniforms in (0, 1) for Random Token Selection, [tokens·experts] token-major, for the global token
 * indices firstToken..firstToken+tokens−1 of the step's batch. 32 random bits each (+½ so never 0, which
 * would tie with the unchosen experts' zeros in DeepSpeed's mask1·uniform). Not cryptographic.
 */
export function rtsUniforms(key: SelectionKey, firstToken: number, tokens: number, experts: number): Float64Array {
  if (!Number.isSafeInteger(key.seed)) throw new RangeError(`seed must be a safe integer, got ${key.seed}`);
  for (const [name, v] of [['step', key.step], ['layer', key.layer], ['firstToken', firstToken], ['tokens', tokens], ['experts', experts]] as const) {
    if (!Number.isInteger(v) || v < 0 || v >= 2 ** 32) throw new RangeError(`${name} must be an integer in [0, 2^32), got ${v}`);
  }
  let h = absorb(0x5eed5eed, key.seed >>> 0);
  h = absorb(h, Math.floor(key.seed / 2 ** 32) >>> 0);
  h = absorb(h, key.step);
  h = absorb(h, key.layer);
  const out = new Float64Array(tokens * experts);
  for (let s = 0; s < tokens; s++) {
    const ht = absorb(h, firstToken + s);
    for (let e = 0; e < experts; e++) out[s * experts + e] = (absorb(ht, e) + 0.5) / 2 ** 32;
  }
  return out;
}

/** One word into a 32-bit hash state: odd-multiplier spread, then murmur3's fmix32 finaliser (a bijection). */
function absorb(h: number, word: number): number {
  let x = ((h ^ Math.imul(word | 0, 0x9e3779b1)) + 0x7f4a7c15) | 0;
  x ^= x >>> 16;
  x = Math.imul(x, 0x85ebca6b);
  x ^= x >>> 13;
  x = Math.imul(x, 0xc2b2ae35);
  x ^= x >>> 16;
  return x >>> 0;
}
