// Switchyard gating (DESIGN §5, §10): logits [S, E] → routing plan in index form, aux losses and the
// exact backward. Pure typed-array code, no tensors; exported as `switchyard/gating`.
//
//   plan.ts      routeTokens, capacityFor: selection, capacity, slots, weights, aux loss
//   backward.ts  gateBackward, zLoss
//   noise.ts     gumbelNoise, multiplicativeJitter, updateBalanceBias, rtsUniforms

import type { GateSettings } from '../config.js';
import type { GatePolicy } from './plan.js';

export { capacityFor, isDropless, pooledAuxLoss, pooledAuxTotals, routeTokens, RENORM_EPS } from './plan.js';
export type { GatePolicy, PolicyKind, PooledAuxTotals, RoutingPlan } from './plan.js';
export { gateBackward, zLoss } from './backward.js';
export { gumbelNoise, multiplicativeJitter, rtsUniforms, updateBalanceBias } from './noise.js';
export type { SelectionKey } from './noise.js';

/**
 * Whether training routes with Random Token Selection: DeepSpeed's use_rts, default true, top-1 (switch)
 * only. Evaluation and serving never do (see docs/decisions.md).
 */
export function rtsEnabled(settings: GateSettings): boolean {
  return settings.policy === 'switch' && (settings.use_rts ?? true);
}

/**
 * The policy for one phase from the model configuration's gate settings: training uses
 * capacity_factor, evaluation and serving eval_capacity_factor. `renormalize` false is the model
 * family's choice (DeepSeek-MoE's norm_topk_prob), not a gate setting.
 */
export function policyFromSettings(settings: GateSettings, k: number, phase: 'train' | 'eval', selectionBias?: Float32Array, renormalize = true): GatePolicy {
  return {
    kind: settings.policy,
    k,
    capacityFactor: phase === 'train' ? settings.capacity_factor : settings.eval_capacity_factor,
    minCapacity: settings.min_capacity,
    dropTokens: settings.drop_tokens,
    ...(selectionBias ? { selectionBias } : {}),
    ...(renormalize ? {} : { renormalize: false }),
  };
}
