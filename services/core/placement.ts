// Expert placement: which shard or shards hold each (layer, expert). One module for the coordinator
// (table from registrations), `switchyard up` (default spread) and routers (lookup).

export interface ExpertKey { layer: number; expert: number }

/** `layer/expert`: how placements, metrics and logs name an expert. */
export const expertKeyText = (k: ExpertKey): string => `${k.layer}/${k.expert}`;

/**
 * The layers that hold experts: a count means layers 0..n−1 (every Mixtral layer); a list names them
 * (DeepSeek-MoE keeps its first layers dense, family.moeLayers).
 */
export type ExpertLayers = number | readonly number[];

export function expertLayerList(layers: ExpertLayers): readonly number[] {
  return typeof layers === 'number' ? Array.from({ length: layers }, (_, l) => l) : layers;
}

export interface ShardHoldings {
  shardId: string;
  address: string;
  experts: ExpertKey[];
  /** Rows per expert the shard accepts in flight (0 = unlimited). */
  tokenBudget?: number;
  /** What the coordinator's planner wants the shard to hold (absent: nothing assigned yet). */
  assigned?: ExpertKey[];
}

export interface PlacementTable {
  version: number;
  shards: Array<{ shardId: string; address: string; tokenBudget?: number; assigned?: ExpertKey[] }>;
  /** Routers registered; each may keep tokenBudget / routers rows per expert in flight on a shard. */
  routers?: number;
  /** Every placed (layer, expert) with the shards holding it, sorted by layer then expert. */
  entries: Array<{ layer: number; expert: number; shardIds: string[] }>;
}

/** The table for a set of shards: an expert held by several shards lists them all (replicas). */
export function placementOf(holdings: ShardHoldings[], version: number, routers = 0): PlacementTable {
  const byKey = new Map<string, { layer: number; expert: number; shardIds: string[] }>();
  const shards = [...holdings].sort((a, b) => a.shardId.localeCompare(b.shardId));
  for (const s of shards)
    for (const { layer, expert } of s.experts) {
      const key = expertKeyText({ layer, expert });
      const entry = byKey.get(key) ?? { layer, expert, shardIds: [] };
      entry.shardIds.push(s.shardId);
      byKey.set(key, entry);
    }
  const entries = [...byKey.values()].sort((a, b) => a.layer - b.layer || a.expert - b.expert);
  return {
    version, routers, entries,
    shards: shards.map(({ shardId, address, tokenBudget, assigned }) => ({ shardId, address, tokenBudget: tokenBudget ?? 0, ...(assigned ? { assigned } : {}) })),
  };
}

/** The addresses holding each expert, keyed `layer/expert`: what a router dials. */
export function ownerAddresses(table: PlacementTable): Map<string, string[]> {
  const addresses = new Map(table.shards.map((s) => [s.shardId, s.address]));
  return new Map(table.entries.map((e) => [expertKeyText(e), e.shardIds.map((id) => addresses.get(id)!).filter(Boolean)]));
}

/** A router's credits on a shard: its share of the shard's per-expert budget (undefined = unlimited). */
export function creditsPerExpert(table: PlacementTable, shardId: string): number | undefined {
  const budget = table.shards.find((s) => s.shardId === shardId)?.tokenBudget ?? 0;
  if (!(budget > 0)) return undefined;
  return Math.max(1, Math.floor(budget / Math.max(1, table.routers ?? 1)));
}

/** Every routed expert of a model: each MoE layer's experts, in layer order. */
export function expertKeys(layers: ExpertLayers, experts: number): ExpertKey[] {
  return expertLayerList(layers).flatMap((layer) => Array.from({ length: experts }, (_, expert) => ({ layer, expert })));
}

/**
 * The default placement of `layers × experts` over `shards`: consecutive experts of a layer go to
 * different shards and each shard gets the same number of experts (±1), so a batch's rows spread over
 * every shard at every layer.
 */
export function spreadExperts(layers: ExpertLayers, experts: number, shards: number): ExpertKey[][] {
  if (!(Number.isInteger(shards) && shards >= 1)) throw new RangeError(`shards must be a positive integer, got ${shards}`);
  const out: ExpertKey[][] = Array.from({ length: shards }, () => []);
  expertLayerList(layers).forEach((layer, i) => {
    for (let expert = 0; expert < experts; expert++) out[(i * experts + expert) % shards].push({ layer, expert });
  });
  return out;
}

/** `--experts` text for a list of keys (the inverse of the shard's assignment parser). */
export function assignmentSpec(keys: ExpertKey[]): string {
  const byLayer = new Map<number, number[]>();
  for (const { layer, expert } of keys) byLayer.set(layer, [...(byLayer.get(layer) ?? []), expert]);
  return [...byLayer].map(([layer, ids]) => `${layer}:${ids.join(',')}`).join(';');
}

/** The (layer, expert) pairs of a model that no shard in the table holds. */
export function unplaced(table: PlacementTable, layers: ExpertLayers, experts: number): ExpertKey[] {
  const placed = new Set(table.entries.filter((e) => e.shardIds.length > 0).map(expertKeyText));
  const missing: ExpertKey[] = [];
  for (const layer of expertLayerList(layers))
    for (let expert = 0; expert < experts; expert++) if (!placed.has(expertKeyText({ layer, expert }))) missing.push({ layer, expert });
  return missing;
}

/**
 * Adds replicas of hot experts to a placement (one key list per shard): each listed expert is copied to
 * the next shards after its holder until it has `copies` holders (at most one per shard).
 */
export function withReplicas(assignment: ExpertKey[][], hot: ExpertKey[], copies = 2): ExpertKey[][] {
  const out = assignment.map((keys) => [...keys]);
  const holds = (s: number, k: ExpertKey) => out[s].some((x) => x.layer === k.layer && x.expert === k.expert);
  for (const k of hot) {
    const holders = out.map((_, s) => s).filter((s) => holds(s, k));
    if (holders.length === 0) throw new RangeError(`expert (layer ${k.layer}, expert ${k.expert}) is not placed, so it cannot be replicated`);
    if (copies > out.length) throw new RangeError(`cannot place ${copies} replicas of expert (layer ${k.layer}, expert ${k.expert}) on ${out.length} shard(s)`);
    for (let s = (holders[0] + 1) % out.length; holders.length < copies; s = (s + 1) % out.length)
      if (!holders.includes(s)) {
        out[s].push(k);
        holders.push(s);
      }
  }
  return out;
}
