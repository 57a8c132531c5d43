// What the router's gates did with real traffic, per (layer, expert): Prometheus counters that agree
// exactly with the routing plans (routed before capacity, kept, dropped by reason), and a decaying
// window of recent load behind the imbalance and utilisation gauges and the live /dashboard.
import { Counter, Gauge } from 'prom-client';
import { registry } from '../core/metrics/registry.js';
import type { MoeStats } from '../core/model/moe.js';
import { DecayingRates } from '../core/metrics/decaying.js';

/** Recent load halves every this many seconds (the dashboard's and gauges' memory). */
const HALF_LIFE_S = 20;

const tokens = new Counter({
  name: 'switchyard_expert_tokens_total', help: 'Routing choices per (layer, expert) in serving: routed (before capacity) and kept (after)',
  labelNames: ['layer', 'expert', 'stage'], registers: [registry],
});
const dropped = new Counter({
  name: 'switchyard_expert_dropped_tokens_total', help: 'Routing choices dropped per (layer, expert): over the gate\'s capacity, or unserved (no live shard / no credits, then dropped or rerouted per the overflow policy)',
  labelNames: ['layer', 'expert', 'reason'], registers: [registry],
});

/** The gauges read the newest RoutingStats of the process (one router engine per process in service). */
let current: RoutingStats | undefined;
const views = (): LayerView[] => current?.view() ?? [];
new Gauge({
  name: 'switchyard_layer_imbalance_cv', help: 'Coefficient of variation of recent routed load over a layer\'s experts', labelNames: ['layer'], registers: [registry],
  collect() { for (const v of views()) this.set({ layer: String(v.layer) }, v.imbalanceCv); },
});
new Gauge({
  name: 'switchyard_layer_imbalance_max_over_mean', help: 'Most loaded expert\'s recent load over the layer\'s mean', labelNames: ['layer'], registers: [registry],
  collect() { for (const v of views()) this.set({ layer: String(v.layer) }, v.imbalanceMaxOverMean); },
});
new Gauge({
  name: 'switchyard_layer_capacity_utilization', help: 'Recent kept choices over capacity slots (per routing group: capacity × experts)', labelNames: ['layer'], registers: [registry],
  collect() { for (const v of views()) this.set({ layer: String(v.layer) }, v.utilization); },
});

export interface LayerView {
  layer: number;
  /** Routed choices per second per expert (decaying window). */
  load: number[];
  /** Dropped choices per second per expert (capacity + unserved). */
  drops: number[];
  imbalanceMaxOverMean: number;
  imbalanceCv: number;
  /** Kept choices over capacity slots, recent. */
  utilization: number;
}

export class RoutingStats {
  private readonly routed: DecayingRates[];
  private readonly drops: DecayingRates[];
  private readonly kept: DecayingRates;
  private readonly slots: DecayingRates;

  constructor(readonly layers: number, readonly experts: number) {
    this.routed = Array.from({ length: layers }, () => new DecayingRates(experts, HALF_LIFE_S));
    this.drops = Array.from({ length: layers }, () => new DecayingRates(experts, HALF_LIFE_S));
    this.kept = new DecayingRates(layers, HALF_LIFE_S);
    this.slots = new DecayingRates(layers, HALF_LIFE_S);
    current = this;
  }

  /** One MoE block's routing of an inference pass. */
  record(layer: number, stats: MoeStats): void {
    const L = String(layer);
    for (let e = 0; e < this.experts; e++) {
      const before = stats.countsBeforeDrop[e];
      const after = stats.countsAfterDrop[e];
      if (before === 0) continue;
      const labels = { layer: L, expert: String(e) };
      tokens.inc({ ...labels, stage: 'routed' }, before);
      tokens.inc({ ...labels, stage: 'kept' }, after);
      if (before > after) {
        dropped.inc({ ...labels, reason: 'capacity' }, before - after);
        this.drops[layer].add(e, before - after);
      }
      this.routed[layer].add(e, before);
    }
    let slots = 0;
    for (const plan of stats.plans) slots += plan.capacity * this.experts;
    this.kept.add(layer, stats.countsAfterDrop.reduce((s, n) => s + n, 0));
    this.slots.add(layer, slots);
  }

  /** Rows that reached no expert (dropped or rerouted per the overflow policy). */
  recordUnserved(layer: number, expert: number, rows: number): void {
    dropped.inc({ layer: String(layer), expert: String(expert), reason: 'unserved' }, rows);
    this.drops[layer].add(expert, rows);
  }

  /** Recent routed rows per second of every expert with any: the coordinator's planner input. */
  expertLoads(): Array<{ layer: number; expert: number; rowsPerSecond: number }> {
    return this.routed.flatMap((window, layer) => window.rates().map((rowsPerSecond, expert) => ({ layer, expert, rowsPerSecond })).filter((l) => l.rowsPerSecond > 1e-6));
  }

  view(): LayerView[] {
    const kept = this.kept.rates();
    const slots = this.slots.rates();
    return this.routed.map((window, layer) => {
      const load = window.rates();
      const mean = load.reduce((s, x) => s + x, 0) / load.length;
      const variance = load.reduce((s, x) => s + (x - mean) ** 2, 0) / load.length;
      return {
        layer, load, drops: this.drops[layer].rates(),
        imbalanceMaxOverMean: mean > 0 ? Math.max(...load) / mean : 0,
        imbalanceCv: mean > 0 ? Math.sqrt(variance) / mean : 0,
        utilization: slots[layer] > 0 ? kept[layer] / slots[layer] : 0,
      };
    });
  }
}
