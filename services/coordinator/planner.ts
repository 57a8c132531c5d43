// Load-aware placement (replicate, then pack): from the demand of every (layer, expert) it decides how
// many replicas each expert gets and which shard holds each replica, minimising the most loaded shard
// within every shard's memory budget (most experts it may hold). Routers split an expert's rows evenly
// over its replicas, so a replica carries load / replicas.
import { expertKeyText, type ExpertKey } from '../core/placement.js';

export interface PlannerShard {
  shardId: string;
  /** Most experts the shard may hold; 0 = no limit. */
  maxExperts: number;
  /** What it holds now: kept where that costs little, so a plan moves few weights. */
  holds: ExpertKey[];
}

export interface PlanInput {
  /** Every expert of the model (the routed experts of its MoE layers). */
  experts: readonly ExpertKey[];
  shards: PlannerShard[];
  /** Demand per expert, in the order of `experts` (rows per second, or any consistent unit). */
  load: ArrayLike<number>;
}

export interface Plan {
  /** Experts per shard id. */
  assignment: Map<string, ExpertKey[]>;
  /** Replicas per expert, in the order of the input's experts. */
  replicas: Int32Array;
  /** Predicted load per shard id. */
  shardLoad: Map<string, number>;
  predictedMax: number;
  mean: number;
  /** No placement within the budgets can have a smaller maximum. */
  lowerBound: number;
  /** Expert copies a shard must load that it does not hold now. */
  loads: number;
}

export class PlacementInfeasible extends Error {
  override name = 'PlacementInfeasible';
}

// A shard that already holds an expert keeps it unless another shard ends up this much (in units of
// the replica's load) less loaded: moving weights costs loading time for a small gain.
const STICKINESS = 0.25;
// A replica costs memory and loading time: it is added only when it lowers the predicted maximum by at
// least this fraction, and none is added once the maximum is this close to the mean (no plan beats it).
const MIN_GAIN = 0.05;
const GOOD_ENOUGH = 1.05;
// Greedy replication may need a few replicas before the maximum falls (two hot experts on one shard).
const PATIENCE = 3;
// Keeping experts where they are may cost at most this much of the most loaded shard's load.
const STICKY_COST = 0.02;


export function planPlacement(input: PlanInput): Plan {
  const { experts, shards } = input;
  const n = experts.length;
  const indexOf = new Map(experts.map((k, i) => [expertKeyText(k), i]));
  if (shards.length === 0) throw new PlacementInfeasible('no shard to place experts on');
  if (input.load.length !== n) throw new RangeError(`load has ${input.load.length} entries, the model has ${n} experts`);
  const capacity = shards.map((s) => (s.maxExperts > 0 ? Math.min(s.maxExperts, n) : n));
  const slots = capacity.reduce((a, b) => a + b, 0);
  if (slots < n) throw new PlacementInfeasible(`${shards.length} shard(s) hold at most ${slots} experts together, the model has ${n}`);
  const total = Array.from(input.load).reduce((a, b) => a + Math.max(0, b), 0);
  // Unmeasured experts still cost memory and some work: give every expert a small floor so they spread.
  const floor = total > 0 ? (total / n) * 1e-3 : 1;
  const demand = Float64Array.from(input.load, (x) => Math.max(0, x) + floor);
  const held = shards.map((s) => new Set(s.holds.map((k) => indexOf.get(expertKeyText(k))).filter((i): i is number => i !== undefined)));

  // Replica counts are chosen on balance alone (no preference for what shards hold), so keeping weights
  // in place never makes the planner buy replicas to make up for a lopsided packing.
  const unheld = shards.map(() => new Set<number>());
  const replicas = new Int32Array(n).fill(1);
  let balanced = pack(demand, replicas, capacity, unheld);
  const current = replicas.slice();
  let misses = 0;
  const mean = demand.reduce((a, b) => a + b, 0) / shards.length;
  for (let used = n; used < slots && misses < PATIENCE && !(balanced && balanced.max <= mean * GOOD_ENOUGH); used++) {
    let hot = -1;
    for (let e = 0; e < n; e++)
      if (current[e] < shards.length && (hot < 0 || demand[e] / current[e] > demand[hot] / current[hot])) hot = e;
    if (hot < 0) break;
    current[hot]++;
    const trial = pack(demand, current, capacity, unheld);
    if (trial && (!balanced || trial.max < balanced.max * (1 - MIN_GAIN))) {
      balanced = trial;
      replicas.set(current);
      misses = 0;
    } else {
      misses++;
    }
  }
  // Then the same copies packed with a preference for where weights already are, when that costs little.
  const sticky = pack(demand, replicas, capacity, held);
  const best = sticky && (!balanced || sticky.max <= balanced.max * (1 + STICKY_COST)) ? sticky : balanced;
  if (!best) throw new PlacementInfeasible('the experts do not fit the shards\' budgets');
  // A single expert can be split over at most min(shards, 1 + spare slots) replicas.
  const maxCopies = Math.min(shards.length, 1 + slots - n);
  const lowerBound = Math.max(mean, ...Array.from(demand, (d) => d / maxCopies));
  const assignment = new Map<string, ExpertKey[]>();
  const shardLoad = new Map<string, number>();
  let loads = 0;
  shards.forEach((s, i) => {
    const keys = [...best!.members[i]].sort((a, b) => a - b);
    loads += keys.filter((k) => !held[i].has(k)).length;
    assignment.set(s.shardId, keys.map((k) => experts[k]));
    shardLoad.set(s.shardId, best!.load[i]);
  });
  return { assignment, replicas, shardLoad, predictedMax: best.max, mean, lowerBound, loads };
}

interface Packing { members: Array<Set<number>>; load: Float64Array; max: number }

/**
 * Longest-processing-time packing of every replica (load demand / replicas) onto the least loaded
 * shard with room that does not hold the expert yet; null when the budgets leave no legal packing.
 */
function pack(demand: Float64Array, replicas: Int32Array, capacity: number[], held: Array<Set<number>>): Packing | null {
  const S = capacity.length;
  const items: Array<{ expert: number; size: number; first: boolean }> = [];
  for (let e = 0; e < demand.length; e++)
    for (let r = 0; r < replicas[e]; r++) items.push({ expert: e, size: demand[e] / replicas[e], first: r === 0 });
  items.sort((a, b) => b.size - a.size || a.expert - b.expert);
  const members = Array.from({ length: S }, () => new Set<number>());
  const load = new Float64Array(S);
  const free = capacity.slice();
  let freeSlots = free.reduce((a, b) => a + b, 0);
  let primariesLeft = demand.length;
  for (const item of items) {
    // A replica may not take the last slots that experts without any copy still need.
    if (!item.first && freeSlots - 1 < primariesLeft) return null;
    let chosen = -1;
    let chosenScore = Infinity;
    for (let s = 0; s < S; s++) {
      if (free[s] === 0 || members[s].has(item.expert)) continue;
      const score = load[s] + item.size - (held[s].has(item.expert) ? STICKINESS * item.size : 0);
      if (score < chosenScore) {
        chosen = s;
        chosenScore = score;
      }
    }
    if (chosen < 0) return null;
    members[chosen].add(item.expert);
    load[chosen] += item.size;
    free[chosen]--;
    freeSlots--;
    if (item.first) primariesLeft--;
  }
  return { members, load, max: Math.max(...load) };
}

/** Predicted load per shard of an existing placement (replicas share an expert's demand evenly). */
export function placementLoad(assignment: Map<string, ExpertKey[]>, experts: readonly ExpertKey[], load: ArrayLike<number>): Map<string, number> {
  const demand = new Map(experts.map((k, i) => [expertKeyText(k), load[i] ?? 0]));
  const holders = new Map<string, number>();
  for (const keys of assignment.values()) for (const k of keys) holders.set(expertKeyText(k), (holders.get(expertKeyText(k)) ?? 0) + 1);
  return new Map([...assignment].map(([id, keys]) => [id, keys.reduce((s, k) => s + (demand.get(expertKeyText(k)) ?? 0) / holders.get(expertKeyText(k))!, 0)]));
}

// max / mean of a set of shard loads: defined once in core, re-exported for the coordinator and benchmarks.
export { maxOverMean } from '../core/metrics/imbalance.js';
