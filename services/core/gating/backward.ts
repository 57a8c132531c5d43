// Backward gating and router z-loss. Routing decisions (chosen experts, kept/dropped, the clamp branch of
// the renormalisation and the counts in the aux loss) are constants of the plan; everything else is
// differentiated exactly, in float64.

import { auxCountsAllChoices, auxDivisor, keptProbSum, RENORM_EPS, type PooledAuxTotals, type RoutingPlan } from './plan.js';

/** Router z-loss (ST-MoE): mean_s logsumexp(logits[s, :])², in float64; 0 for an empty group. */
export function zLoss(logits: Float32Array, tokens: number, experts: number): number {
  checkShape(logits, tokens, experts);
  if (tokens === 0) return 0;
  let total = 0;
  for (let s = 0; s < tokens; s++) {
    const lse = logSumExp(logits, s * experts, experts);
    total += lse * lse;
  }
  return total / tokens;
}

/**
 * Gradient w.r.t. the logits [S·E] of
 *     L = Σ_i dWeight[i]·weight[i] + auxCoef·auxLoss + zCoef·zLoss(logits)
 * for the plan that routeTokens made from these logits. Per token s, with p = softmax(x_s) in float64:
 * - weights, switch or not renormalised: w = p[e] for a kept choice, so ∂L/∂p[e] += dW.
 * - weights, gshard/topk/mixtral: over the kept set K with D = Σ_{j∈K} p[e_j], w_i = p[e_i]/max(D, eps).
 *   Unclamped (float32 D ≥ eps, as in the forward): ∂L/∂p[e_j] += (dW_j − Σ_{i∈K} dW_i·w_i)/D.
 *   Clamped (D < eps): ∂L/∂p[e_j] += dW_j/eps. Dropped choices contribute nothing.
 * - aux loss with the counts n (first choices; all choices for mixtral and topk k > 2) held constant:
 *   ∂auxLoss/∂p[s,e] = E·n[e]/(S²·d), d = k for topk k > 2 (topkgating's /k), else 1.
 *   With `pooled` (mixtral, Hugging Face's whole-batch loss over N pooled tokens) the loss is
 *   E·Σ_e chosen[e]·probSum[e]/N², so ∂/∂p[s,e] = E·chosen[e]/N² with the pooled counts; auxCoef is then
 *   the coefficient of that one pooled loss (not divided among groups).
 * - through the softmax: ∂L/∂x[e] = p[e]·(g[e] − Σ_j p[j]·g[j]).
 * - z-loss: ∂zLoss/∂x[s,e] = 2·lse_s·p[e]/S.
 */
export function gateBackward(
  plan: RoutingPlan,
  logits: Float32Array,
  dWeight: Float32Array,
  auxCoef: number,
  zCoef: number,
  pooled?: PooledAuxTotals,
): Float32Array {
  const { tokens: S, experts: E, k, expert, slot, probs, kind, renormalized } = plan;
  checkShape(logits, S, E);
  if (!(dWeight instanceof Float32Array) || dWeight.length !== S * k) {
    throw new RangeError(`dWeight must be a Float32Array of length tokens·k = ${S * k}`);
  }
  if (!Number.isFinite(auxCoef)) throw new RangeError(`auxCoef must be finite, got ${auxCoef}`);
  if (!Number.isFinite(zCoef)) throw new RangeError(`zCoef must be finite, got ${zCoef}`);

  const grad = new Float32Array(S * E);
  if (S === 0) return grad;

  // ∂(auxCoef·auxLoss)/∂p[s,e], the same for every token
  const auxGrad = new Float64Array(E);
  if (pooled) {
    if (kind !== 'mixtral') throw new RangeError(`the pooled (batch-scope) aux loss is Mixtral's; got a '${kind}' plan`);
    if (pooled.chosen.length !== E) throw new RangeError(`pooled totals have ${pooled.chosen.length} experts, the plan ${E}`);
    if (pooled.tokens < S) throw new RangeError(`pooled totals cover ${pooled.tokens} tokens, fewer than this plan's ${S}`);
    const scale = (auxCoef * E) / (pooled.tokens * pooled.tokens);
    for (let e = 0; e < E; e++) auxGrad[e] = scale * pooled.chosen[e];
  } else if (auxCoef !== 0) {
    const scale = (auxCoef * E) / (S * S * auxDivisor(kind, k));
    if (auxCountsAllChoices(kind, k)) {
      for (let i = 0; i < S * k; i++) auxGrad[expert[i]] += scale;
    } else {
      for (let s = 0; s < S; s++) auxGrad[expert[s * k]] += scale;
    }
  }
  const zScale = (2 * zCoef) / S;

  const p = new Float64Array(E);
  const g = new Float64Array(E);
  for (let s = 0; s < S; s++) {
    const row = s * E;
    // float64 softmax and logsumexp
    let max = -Infinity;
    for (let e = 0; e < E; e++) if (logits[row + e] > max) max = logits[row + e];
    let sum = 0;
    for (let e = 0; e < E; e++) {
      const v = Math.exp(logits[row + e] - max);
      p[e] = v;
      sum += v;
    }
    for (let e = 0; e < E; e++) p[e] /= sum;
    const lse = max + Math.log(sum);

    g.set(auxGrad);
    const base = s * k;
    if (!renormalized) {
      for (let c = 0; c < k; c++) if (slot[base + c] >= 0) g[expert[base + c]] += dWeight[base + c];
    } else {
      const sum32 = keptProbSum(probs, expert, slot, s, E, k);
      if (sum32 >= RENORM_EPS) {
        let D = 0;
        let dot = 0;
        for (let c = 0; c < k; c++) {
          const i = base + c;
          if (slot[i] < 0) continue;
          const pe = p[expert[i]];
          D += pe;
          dot += dWeight[i] * pe;
        }
        dot /= D; // Σ dW_i·w_i
        for (let c = 0; c < k; c++) {
          const i = base + c;
          if (slot[i] >= 0) g[expert[i]] += (dWeight[i] - dot) / D;
        }
      } else if (sum32 >= 0) {
        for (let c = 0; c < k; c++) {
          const i = base + c;
          if (slot[i] >= 0) g[expert[i]] += dWeight[i] / RENORM_EPS;
        }
      }
    }

    let pg = 0;
    for (let e = 0; e < E; e++) pg += p[e] * g[e];
    const zl = zScale * lse;
    for (let e = 0; e < E; e++) grad[row + e] = p[e] * (g[e] - pg + zl);
  }
  return grad;
}

function logSumExp(x: Float32Array, offset: number, n: number): number {
  let max = -Infinity;
  for (let e = 0; e < n; e++) if (x[offset + e] > max) max = x[offset + e];
  let sum = 0;
  for (let e = 0; e < n; e++) sum += Math.exp(x[offset + e] - max);
  return max + Math.log(sum);
}

function checkShape(logits: Float32Array, tokens: number, experts: number): void {
  if (!Number.isInteger(tokens) || tokens < 0) throw new RangeError(`tokens must be an integer ≥ 0, got ${tokens}`);
  if (!Number.isInteger(experts) || experts < 1) {
    throw new RangeError(`experts must be an integer ≥ 1, got ${experts}`);
  }
  if (!(logits instanceof Float32Array)) throw new RangeError('logits must be a Float32Array');
  if (logits.length !== tokens * experts) {
    throw new RangeError(
      `logits has ${logits.length} entries, expected tokens·experts = ${tokens}·${experts} = ${tokens * experts}`,
    );
  }
  for (let i = 0; i < logits.length; i++) {
    if (!Number.isFinite(logits[i])) throw new RangeError(`logits[${i}] is ${logits[i]}: logits must be finite`);
  }
}
