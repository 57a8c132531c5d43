// Switchyard gating (DESIGN §5, §10): logits [S, E] → routing plan in index form, aux losses and the
// exact backward. Pure typed-array code, no tensors; exported as `switchyard/gating`.
//
//   plan.ts      routeTokens, capacityFor: selection, capacity, slots, weights, aux loss
//   backward.ts  gateBackward, zLoss
//   noise.ts     gumbelNoise, multiplicativeJitter, updateBalanceBias

import type { GatePolicy, PolicyKind } from './plan.js';

export { capacityFor, routeTokens, RENORM_EPS } from './plan.js';
export type { GatePolicy, PolicyKind, RoutingPlan } from './plan.js';
export { gateBackward, zLoss } from './backward.js';
export { gumbelNoise, multiplicativeJitter, updateBalanceBias } from './noise.js';

/** Gate settings as a training or serving configuration states them (train and eval capacity apart). */
export interface GateSettings {
  policy: PolicyKind;
  /** experts per token (ignored by switch = 1 and gshard = 2) */
  k?: number;
  /** capacity factor while training (default 1.0) */
  capacityFactor?: number;
  /** capacity factor for evaluation and serving (default: the training one) */
  evalCapacityFactor?: number;
  minCapacity?: number;
  dropTokens?: boolean;
}

/** The policy for one phase: training uses capacityFactor, evaluation evalCapacityFactor. */
export function policyFromSettings(settings: GateSettings, phase: 'train' | 'eval'): GatePolicy {
  const kind = settings.policy;
  const k = kind === 'switch' ? 1 : kind === 'gshard' ? 2 : settings.k;
  const trainFactor = settings.capacityFactor ?? 1.0;
  const policy: GatePolicy = {
    kind,
    capacityFactor: phase === 'eval' ? (settings.evalCapacityFactor ?? trainFactor) : trainFactor,
  };
  if (k !== undefined) policy.k = k;
  if (settings.minCapacity !== undefined) policy.minCapacity = settings.minCapacity;
  if (settings.dropTokens !== undefined) policy.dropTokens = settings.dropTokens;
  return policy;
}
