// Which metric groups each service (role) exports, as docs/observability.md states it, in terms of the
// groups their owning modules define: the spec the per-service /metrics test checks real processes
// against, and what the config test registers to find every name the rules and dashboards use.
import type { MetricGroup } from '../../services/core/metrics/registry.js';
import { servingMetricGroup } from '../../services/core/metrics/serving.js';
import { coordinatorTrainingMetricGroup, trainingMetricGroup } from '../../services/core/metrics/training.js';
import { engineMetricGroup } from '../../services/router/engine.js';
import { requestMetricGroup } from '../../services/router/request-metrics.js';
import { routingMetricGroup } from '../../services/router/routing-stats.js';
import { shardMetricGroup } from '../../services/expert/shard.js';
import { followerMetricGroup } from '../../services/expert/follower.js';
import { coordinatorMetricGroup } from '../../services/coordinator/server.js';
import { placementMetricGroup } from '../../services/coordinator/rebalancer.js';

export type Role = 'router' | 'expert' | 'expert --train' | 'coordinator' | 'coordinator --train-*' | 'trainer';

/** Every group a module defines; a group no role exports would be dead. */
export const ALL_GROUPS: Record<string, MetricGroup> = {
  serving: servingMetricGroup, engine: engineMetricGroup, request: requestMetricGroup, routing: routingMetricGroup,
  shard: shardMetricGroup, follower: followerMetricGroup,
  coordinator: coordinatorMetricGroup, placement: placementMetricGroup, coordinatorTraining: coordinatorTrainingMetricGroup,
  training: trainingMetricGroup,
};

/** The groups each role exports, beside the process defaults and moe_build_info that every one has. */
export const ROLE_GROUPS: Record<Role, Array<keyof typeof ALL_GROUPS>> = {
  router: ['serving', 'engine', 'request', 'routing'],
  expert: ['shard', 'follower'], // a serving shard following the coordinator's placement
  'expert --train': ['shard', 'training'],
  coordinator: ['coordinator', 'placement'],
  'coordinator --train-*': ['coordinator', 'coordinatorTraining'], // a training coordinator moves no experts live
  trainer: ['training'],
};

export const namesOf = (role: Role): Set<string> => new Set(ROLE_GROUPS[role].flatMap((g) => ALL_GROUPS[g].names));
