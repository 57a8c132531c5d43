// Live placement changes: plans with the load-aware planner and moves experts without failing a request.
// A migration first asks shards to load what they gain (keeping what they hold), waits until they report
// it loaded (only then do routers see the new holders), and only then takes away what they lose. One
// migration runs at a time. Triggers: a shard that registers holding nothing (scale-up), a shard that asks
// to drain (scale-down), the interval (with hysteresis) and operators (`switchyard placement apply`).
import { Gauge, Histogram } from 'prom-client';
import { MetricGroup } from '../core/metrics/registry.js';
import { expertKeyText, expertKeys, type ExpertKey } from '../core/placement.js';
import type { Member, Membership, ModelShape } from './membership.js';
import { maxOverMean, PlacementInfeasible, placementLoad, planPlacement, type Plan } from './planner.js';

export interface RebalancerOptions {
  /** 0 = no periodic rebalancing. */
  intervalMs: number;
  /** Rebalance only when the predicted max/mean shard load is at least this. */
  minImbalance: number;
  /** ... and the plan lowers the most loaded shard by at least this fraction. */
  minGain: number;
  /** How long shards may take to load what they gain. */
  loadTimeoutMs: number;
  log?: (record: Record<string, unknown>) => void;
  /** The clock of the interval's back-off (injected by tests). */
  now?: () => number;
}

export const DEFAULT_REBALANCE: Omit<RebalancerOptions, 'log' | 'now'> = { intervalMs: 30_000, minImbalance: 1.25, minGain: 0.1, loadTimeoutMs: 120_000 };


export interface MigrationResult {
  applied: boolean;
  reason: string;
  seconds: number;
  /** Expert copies loaded by shards that did not hold them. */
  loaded: number;
  plan?: PlanSummary;
}

export interface PlanSummary {
  assignment: Record<string, string>;
  replicas: Array<{ layer: number; expert: number; shards: number }>;
  predictedLoad: Record<string, number>;
  predictedMaxOverMean: number;
  lowerBoundMaxOverMean: number;
  currentMaxOverMean: number;
  loads: number;
}

const STOPPING = 'the coordinator is stopping';
let current: Rebalancer | undefined;
const migrationSeconds = new Histogram({
  name: 'switchyard_placement_migration_seconds', help: 'Time from a plan to the placement that applies it (shards loaded the experts they gained)', registers: [],
  buckets: [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
});
const readySeconds = new Histogram({
  name: 'switchyard_shard_ready_seconds', help: 'Time from an empty shard\'s registration to the placement that lists it', registers: [],
  buckets: [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
});
/** Exported once a coordinator that moves experts (a serving one) starts its Rebalancer. */
export const placementMetricGroup = new MetricGroup([
  migrationSeconds,
  readySeconds,
  new Gauge({ name: 'switchyard_placement_generation', help: 'Placement migrations applied by this coordinator', registers: [], collect() { this.set(current?.generation ?? 0); } }),
  new Gauge({ name: 'switchyard_expert_replicas', help: 'Shards serving each expert', labelNames: ['layer', 'expert'], registers: [], collect() {
    this.reset();
    for (const e of current?.membership.placement().entries ?? []) this.set({ layer: String(e.layer), expert: String(e.expert) }, e.shardIds.length);
  } }),
  new Gauge({ name: 'switchyard_placement_predicted_max_over_mean', help: 'Most loaded shard over the mean, predicted from routers\' measured demand and the current placement', registers: [], collect() {
    this.set(current?.predictedImbalance() ?? 0);
  } }),
  new Gauge({ name: 'switchyard_placement_measured_max_over_mean', help: 'Most loaded shard over the mean, from the rows per second shards report', registers: [], collect() {
    this.set(current?.measuredImbalance() ?? 0);
  } }),
]);

export class Rebalancer {
  generation = 0;
  private queue: Promise<unknown> = Promise.resolve();
  /** Migrations running or queued: the interval adds none while there are any. */
  private migrations = 0;
  private timer?: NodeJS.Timeout;
  /** When the last migration ended, applied or abandoned: the interval waits a full period after it. */
  private lastMigration = 0;
  /** Stopping: no migration starts or waits any more. */
  private closed = false;
  private readonly now: () => number;
  /** Shards that registered empty, with when, until a placement lists them. */
  private readonly joining = new Map<string, number>();
  /** Ends the migrations waiting for shards to load (their timers would keep a stopping coordinator alive). */
  private readonly abortWaits = new Set<(why: string) => void>();
  private readonly unsubscribe: Array<() => void> = [];

  constructor(readonly membership: Membership, readonly options: RebalancerOptions) {
    current = this;
    placementMetricGroup.register();
    this.now = options.now ?? Date.now;
    this.unsubscribe.push(membership.onMemberChange((memberId, event) => {
      if (event === 'expired') return void this.joining.delete(memberId);
      const m = membership.get(memberId);
      if (m?.role !== 'expert-shard' || m.experts.length > 0) return;
      this.joining.set(memberId, Date.now());
      // Scale-up: put the new shard to work now (no hysteresis: it has capacity and nothing to do).
      setTimeout(() => void this.rebalance(`shard ${memberId} joined`).catch((err: Error) =>
        options.log?.({ msg: 'cannot place experts on the new shard', shard: memberId, error: err.message })), 100).unref();
    }));
    this.unsubscribe.push(membership.watch((table) => {
      for (const [id, since] of this.joining)
        if (table.entries.some((e) => e.shardIds.includes(id))) {
          readySeconds.observe((Date.now() - since) / 1000);
          this.joining.delete(id);
        }
    }));
    if (options.intervalMs > 0) this.timer = setInterval(() => void this.tick(), options.intervalMs);
    this.timer?.unref();
  }

  get shape(): ModelShape | undefined {
    return this.membership.shape;
  }

  /** Ends the migration in progress and every one queued or triggered later (a join, a drain, an operator). */
  close(): void {
    this.closed = true;
    clearInterval(this.timer);
    for (const stop of this.unsubscribe.splice(0)) stop();
    for (const abort of [...this.abortWaits]) abort(STOPPING);
    if (current === this) current = undefined;
  }

  /** Every routed expert of the served model. */
  experts(): ExpertKey[] {
    const { moeLayers, experts } = this.requireShape();
    return expertKeys(moeLayers, experts);
  }

  /** Routers' measured demand, summed (rows per second), in the order of experts(). */
  demand(): Float64Array {
    const keys = this.experts();
    const index = new Map(keys.map((k, i) => [expertKeyText(k), i]));
    const out = new Float64Array(keys.length);
    for (const r of this.membership.list('router'))
      for (const [key, rate] of r.expertLoads ?? []) {
        const i = index.get(key);
        if (i !== undefined) out[i] += rate;
      }
    return out;
  }

  predictedImbalance(): number {
    if (!this.shape) return 0;
    return maxOverMean(placementLoad(this.servingAssignment(), this.experts(), this.demand()).values());
  }

  measuredImbalance(): number {
    const rates = this.membership.list('expert-shard').map((m) => m.rowsPerSecond ?? 0);
    return maxOverMean(rates);
  }

  private servingAssignment(): Map<string, ExpertKey[]> {
    return new Map(this.membership.list('expert-shard').map((m) => [m.memberId, this.membership.serving(m)]));
  }

  private requireShape(): ModelShape {
    if (!this.shape) throw new PlacementInfeasible('no shard has registered yet, so the model\'s shape is unknown');
    return this.shape;
  }

  /** A plan over the shards that stay (draining ones get nothing). */
  plan(): { plan: Plan; summary: PlanSummary } {
    const experts = this.experts();
    const members = this.membership.list('expert-shard');
    const staying = members.filter((m) => !m.draining);
    const demand = this.demand();
    const plan = planPlacement({
      experts, load: demand,
      shards: staying.map((m) => ({ shardId: m.memberId, maxExperts: m.maxExperts, holds: this.membership.serving(m) })),
    });
    for (const m of members) if (m.draining) plan.assignment.set(m.memberId, []);
    const replicas: PlanSummary['replicas'] = [];
    plan.replicas.forEach((n, i) => { if (n > 1) replicas.push({ ...experts[i], shards: n }); });
    return {
      plan,
      summary: {
        assignment: Object.fromEntries([...plan.assignment].map(([id, keys]) => [id, keys.map(expertKeyText).join(' ')])),
        replicas,
        predictedLoad: Object.fromEntries(plan.shardLoad),
        predictedMaxOverMean: plan.mean > 0 ? plan.predictedMax / plan.mean : 0,
        lowerBoundMaxOverMean: plan.mean > 0 ? plan.lowerBound / plan.mean : 0,
        currentMaxOverMean: this.predictedImbalance(),
        loads: plan.loads,
      },
    };
  }

  /** Plans and applies (queued behind a migration in progress). */
  rebalance(reason: string): Promise<MigrationResult> {
    this.migrations++;
    const run = this.queue.then(() => this.migrate(reason)).finally(() => {
      this.migrations--;
      this.lastMigration = this.now();
    });
    this.queue = run.catch(() => undefined);
    return run;
  }

  /** Scale-down: the shard's experts go elsewhere, then the placement drops it. */
  async drain(memberId: string): Promise<{ drained: boolean; message: string }> {
    const m = this.membership.get(memberId);
    if (!m || m.role !== 'expert-shard') return { drained: false, message: `${memberId} is not a registered shard` };
    this.membership.setDraining(memberId);
    try {
      const result = await this.rebalance(`shard ${memberId} drains`);
      const listed = this.membership.placement().entries.some((e) => e.shardIds.includes(memberId));
      return { drained: !listed, message: result.reason };
    } catch (err) {
      return { drained: false, message: (err as Error).message };
    }
  }

  /**
   * Periodic check with hysteresis: act only on a clear imbalance that a plan clearly improves, at most
   * once per interval, never while a migration runs or waits (a slow one would pile up copies behind it).
   * Called by the interval; public for tests.
   */
  async tick(): Promise<void> {
    if (this.closed || this.migrations > 0 || !this.shape || this.now() - this.lastMigration < this.options.intervalMs) return;
    const demand = this.demand();
    if (!(demand.reduce((a, b) => a + b, 0) > 0)) return;
    try {
      // The cheap check first: most ticks find the balance good enough and plan nothing.
      const current = [...placementLoad(this.servingAssignment(), this.experts(), demand).values()];
      const imbalance = maxOverMean(current);
      if (imbalance < this.options.minImbalance) return;
      const { plan, summary } = this.plan();
      if (!(plan.predictedMax < Math.max(...current) * (1 - this.options.minGain))) return;
      await this.rebalance(`imbalance ${imbalance.toFixed(2)} → ${summary.predictedMaxOverMean.toFixed(2)}`);
    } catch (err) {
      this.options.log?.({ msg: 'rebalance skipped', error: (err as Error).message });
    }
  }

  private async migrate(reason: string): Promise<MigrationResult> {
    if (this.closed) return { applied: false, reason: `${reason}: abandoned, ${STOPPING}`, seconds: 0, loaded: 0 };
    const started = performance.now();
    const { plan, summary } = this.plan();
    const seconds = () => (performance.now() - started) / 1000;
    // Phase 1: every shard gets what it gains on top of what it serves.
    const gains = new Map<string, ExpertKey[]>();
    for (const [id, keys] of plan.assignment) {
      const m = this.membership.get(id);
      if (!m) continue;
      const serving = this.membership.serving(m);
      const have = new Set(serving.map(expertKeyText));
      gains.set(id, [...serving, ...keys.filter((k) => !have.has(expertKeyText(k)))]);
    }
    this.membership.assign(gains);
    this.options.log?.({ msg: 'placement migration started', reason, loads: plan.loads, predicted_max_over_mean: summary.predictedMaxOverMean });
    const loaded = await this.untilHeld(plan.assignment);
    if (loaded !== true) {
      // Take back the unfinished part: shards keep serving what they reported.
      this.membership.assign(new Map([...gains.keys()].map((id) => {
        const m = this.membership.get(id);
        return [id, m ? m.experts : []];
      })));
      this.options.log?.({ msg: 'placement migration abandoned', reason: loaded });
      return { applied: false, reason: `${reason}: abandoned, ${loaded}`, seconds: seconds(), loaded: 0, plan: summary };
    }
    // Phase 2: every expert is served where the plan puts it; now shards may drop the rest.
    this.membership.assign(plan.assignment);
    this.generation++;
    migrationSeconds.observe(seconds());
    this.options.log?.({ msg: 'placement migration applied', reason, seconds: seconds(), generation: this.generation });
    return { applied: true, reason, seconds: seconds(), loaded: plan.loads, plan: summary };
  }

  /** true once every shard reports holding its part of `target`; otherwise why not. */
  private untilHeld(target: Map<string, ExpertKey[]>): Promise<true | string> {
    // undefined: done; `wait`: still loading; anything else: the migration cannot finish.
    const state = (): undefined | { wait: boolean; why: string } => {
      for (const [id, keys] of target) {
        const m: Member | undefined = this.membership.get(id);
        if (!m) return { wait: false, why: `shard ${id} left during the migration` };
        const held = new Set(m.experts.map(expertKeyText));
        if (keys.some((k) => !held.has(expertKeyText(k)))) return { wait: true, why: `shard ${id} has not loaded its experts` };
      }
      return undefined;
    };
    return new Promise((resolve) => {
      const settle = (result: true | string) => {
        clearTimeout(timer);
        stop();
        this.abortWaits.delete(settle);
        resolve(result);
      };
      const check = () => {
        const s = state();
        if (!s) settle(true);
        else if (!s.wait) settle(s.why);
      };
      const timer = setTimeout(() => settle(`${state()?.why ?? 'timeout'} within ${this.options.loadTimeoutMs} ms`), this.options.loadTimeoutMs);
      const stop = this.membership.watch(check);
      this.abortWaits.add(settle);
      if (this.closed) settle(STOPPING);
      else check();
    });
  }
}
