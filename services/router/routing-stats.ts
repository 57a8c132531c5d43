// What the router's gates did with real traffic, per (layer, expert): Prometheus counters that agree
// exactly with the routing plans (routed before capacity, kept, dropped by reason), and a decaying
// window of recent load behind the imbalance and utilisation gauges and the live /dashboard.
import { Counter, Gauge } from 'prom-client';
import { MetricGroup } from '../core/metrics/registry.js';
import type { MoeStats } from '../core/model/moe.js';
import { DecayingRates } from '../core/metrics/decaying.js';
import { coefficientOfVariation, maxOverMean } from '../core/metrics/imbalance.js';

/** Recent load halves every this many seconds (the dashboard's and gauges' memory). */
const HALF_LIFE_S = 20;

/** The metrics read the newest RoutingStats of the process (one router engine per process in service); exported once one exists. */
let current: RoutingStats | undefined;
const views = (): LayerView[] => current?.view() ?? [];

// The counters are kept as plain per-(layer, expert) totals and handed to prom-client at scrape time:
// record() runs for every MoE layer of every decode step, and a labelled inc() hashes its labels each call.
// Every series exists from the start at zero, so rules averaging over experts see the unused ones too.
export const routingMetricGroup = new MetricGroup([
  new Counter({
    name: 'switchyard_expert_tokens_total', help: 'Routing choices per (layer, expert) in serving: routed (before capacity) and kept (after)',
    labelNames: ['layer', 'expert', 'stage'], registers: [],
    collect() {
      this.reset();
      for (const s of current?.layerStats() ?? [])
        for (let e = 0; e < s.routedTotal.length; e++) {
          const labels = { layer: String(s.layer), expert: String(e) };
          this.inc({ ...labels, stage: 'routed' }, s.routedTotal[e]);
          this.inc({ ...labels, stage: 'kept' }, s.keptTotal[e]);
        }
    },
  }),
  new Counter({
    name: 'switchyard_expert_dropped_tokens_total', help: 'Routing choices dropped per (layer, expert): over the gate\'s capacity, or unserved (no live shard / no credits, then dropped or rerouted per the overflow policy)',
    labelNames: ['layer', 'expert', 'reason'], registers: [],
    collect() {
      this.reset();
      for (const s of current?.layerStats() ?? [])
        for (let e = 0; e < s.routedTotal.length; e++) {
          const labels = { layer: String(s.layer), expert: String(e) };
          this.inc({ ...labels, reason: 'capacity' }, s.capacityDropped[e]);
          this.inc({ ...labels, reason: 'unserved' }, s.unservedDropped[e]);
        }
    },
  }),
  new Gauge({
    name: 'switchyard_layer_imbalance_cv', help: 'Coefficient of variation of recent routed load over a layer\'s experts', labelNames: ['layer'], registers: [],
    collect() { for (const v of views()) this.set({ layer: String(v.layer) }, v.imbalanceCv); },
  }),
  new Gauge({
    name: 'switchyard_layer_imbalance_max_over_mean', help: 'Most loaded expert\'s recent load over the layer\'s mean', labelNames: ['layer'], registers: [],
    collect() { for (const v of views()) this.set({ layer: String(v.layer) }, v.imbalanceMaxOverMean); },
  }),
  new Gauge({
    name: 'switchyard_layer_capacity_utilization', help: 'Recent kept choices over capacity slots (per routing group: capacity × experts); only layers whose gate has a capacity limit (dropless gates have none)',
    labelNames: ['layer'], registers: [],
    collect() { for (const v of views()) if (v.utilization !== null) this.set({ layer: String(v.layer) }, v.utilization); },
  }),
]);

export interface LayerView {
  layer: number;
  /** Routed choices per second per expert (decaying window). */
  load: number[];
  /** Dropped choices per second per expert (capacity + unserved). */
  drops: number[];
  imbalanceMaxOverMean: number;
  imbalanceCv: number;
  /** Kept choices over capacity slots, recent; null for a dropless gate (its "capacity" is just the largest count). */
  utilization: number | null;
}

/** One MoE layer's recent-load windows and its counter totals. */
interface LayerStats {
  layer: number;
  routed: DecayingRates;
  drops: DecayingRates;
  /** [0] kept choices, [1] capacity slots, of capacity-limited plans only. */
  fill: DecayingRates;
  /** Since start, per expert. */
  routedTotal: Float64Array;
  keptTotal: Float64Array;
  capacityDropped: Float64Array;
  unservedDropped: Float64Array;
}

export class RoutingStats {
  private readonly byLayer = new Map<number, LayerStats>();

  /** `moeLayers`: the layers with a router (DeepSeek's first dense layers have none). */
  constructor(moeLayers: readonly number[], readonly experts: number) {
    for (const layer of moeLayers)
      this.byLayer.set(layer, {
        layer,
        routed: new DecayingRates(experts, HALF_LIFE_S),
        drops: new DecayingRates(experts, HALF_LIFE_S),
        fill: new DecayingRates(2, HALF_LIFE_S),
        routedTotal: new Float64Array(experts),
        keptTotal: new Float64Array(experts),
        capacityDropped: new Float64Array(experts),
        unservedDropped: new Float64Array(experts),
      });
    current = this;
    routingMetricGroup.register();
  }

  layerStats(): Iterable<Readonly<LayerStats>> {
    return this.byLayer.values();
  }

  /** One MoE block's routing of an inference pass. */
  record(layer: number, stats: MoeStats): void {
    const s = this.byLayer.get(layer);
    if (!s) return;
    const now = Date.now();
    for (let e = 0; e < this.experts; e++) {
      const before = stats.countsBeforeDrop[e];
      const after = stats.countsAfterDrop[e];
      if (before === 0) continue;
      s.routedTotal[e] += before;
      s.keptTotal[e] += after;
      if (before > after) {
        s.capacityDropped[e] += before - after;
        s.drops.add(e, before - after, now);
      }
      s.routed.add(e, before, now);
    }
    for (const plan of stats.plans) {
      if (plan.dropless) continue;
      s.fill.add(0, plan.countsAfterDrop.reduce((sum, n) => sum + n, 0), now);
      s.fill.add(1, plan.capacity * plan.experts, now);
    }
  }

  /** Rows that reached no expert (dropped or rerouted per the overflow policy). */
  recordUnserved(layer: number, expert: number, rows: number): void {
    const s = this.byLayer.get(layer);
    if (!s) return;
    s.unservedDropped[expert] += rows;
    s.drops.add(expert, rows);
  }

  /** Recent routed rows per second of every expert with any: the coordinator's planner input. */
  expertLoads(): Array<{ layer: number; expert: number; rowsPerSecond: number }> {
    return [...this.byLayer.values()].flatMap((s) => s.routed.rates().map((rowsPerSecond, expert) => ({ layer: s.layer, expert, rowsPerSecond })).filter((l) => l.rowsPerSecond > 1e-6));
  }

  view(): LayerView[] {
    return [...this.byLayer.values()].map((s) => {
      const load = s.routed.rates();
      const [kept, slots] = s.fill.rates();
      return {
        layer: s.layer, load, drops: s.drops.rates(),
        imbalanceMaxOverMean: maxOverMean(load),
        imbalanceCv: coefficientOfVariation(load),
        utilization: slots > 0 ? kept / slots : null,
      };
    });
  }
}
