// An expert shard following the coordinator's assignment: it loads the experts it gains from the
// checkpoint store (only their byte ranges), reports them (the coordinator lists them for routers only
// then), and drops the experts it lost after a grace period, so rows already on their way still land.
import { Gauge } from 'prom-client';
import { loadExpertSet } from '../core/checkpoint/model.js';
import { MetricGroup } from '../core/metrics/registry.js';
import { expertKeyText, type ExpertKey, type PlacementTable } from '../core/placement.js';
import type { CoordinatorLink } from '../core/wire/coordinator-link.js';
import type { ExpertShard } from './shard.js';

export interface FollowerOptions {
  shard: ExpertShard;
  memberId: string;
  checkpointDir: string;
  link: CoordinatorLink;
  dropGraceMs: number;
  log: (record: Record<string, unknown>) => void;
}


let current: AssignmentFollower | undefined;
/** Exported once a shard follows the coordinator's assignment (serving shards; training ones take theirs from the run). */
export const followerMetricGroup = new MetricGroup([
  new Gauge({ name: 'switchyard_expert_load_seconds', help: 'Time the last set of gained experts took to load from the checkpoint store', registers: [], collect() { this.set(current?.lastLoadSeconds ?? 0); } }),
]);

export class AssignmentFollower {
  private wanted?: ExpertKey[];
  private running = false;
  private closed = false;
  private readonly drops = new Map<string, NodeJS.Timeout>();
  lastLoadSeconds = 0;
  /** The holdings last reported (sorted keys), so placements that change nothing here cost nothing. */
  private reported?: string;

  constructor(readonly o: FollowerOptions) {
    current = this;
    followerMetricGroup.register();
  }

  /** Called with every placement: acts when the entry of this shard carries an assignment. */
  follow(table: PlacementTable): void {
    const me = table.shards.find((s) => s.shardId === this.o.memberId);
    if (!me?.assigned || this.closed) return;
    this.wanted = me.assigned;
    if (!this.running) void this.converge();
  }

  private async converge(): Promise<void> {
    this.running = true;
    try {
      // Placements may arrive while weights load: converge to the newest.
      while (this.wanted && !this.closed) {
        const target = this.wanted;
        this.wanted = undefined;
        await this.apply(target);
      }
    } catch (err) {
      this.o.log({ msg: 'cannot follow the assignment', error: (err as Error).message });
    } finally {
      this.running = false;
    }
  }

  private async apply(target: ExpertKey[]): Promise<void> {
    const experts = this.o.shard.experts;
    const wanted = new Set(target.map(expertKeyText));
    for (const k of wanted) {
      clearTimeout(this.drops.get(k));
      this.drops.delete(k);
    }
    const missing = target.filter((k) => !experts.holds(k.layer, k.expert));
    if (missing.length) {
      const started = performance.now();
      experts.adopt(await loadExpertSet(this.o.checkpointDir, missing));
      this.lastLoadSeconds = (performance.now() - started) / 1000;
      this.o.log({ msg: 'experts loaded', experts: missing.map(expertKeyText).join(' '), seconds: this.lastLoadSeconds });
    }
    if (this.closed) return; // stopping: the shard's experts are freed with it
    for (const k of experts.keys()) {
      const key = expertKeyText(k);
      if (wanted.has(key) || this.drops.has(key)) continue;
      this.drops.set(key, setTimeout(() => {
        this.drops.delete(key);
        experts.remove(k.layer, k.expert);
        this.o.log({ msg: 'expert dropped', expert: key });
        this.report();
      }, this.o.dropGraceMs));
    }
    this.report();
  }

  /** Reports the holdings when they changed; the link re-sends a report until the coordinator has it. */
  private report(): void {
    const held = this.o.shard.experts.keys();
    const text = held.map(expertKeyText).sort().join(' ');
    if (text === this.reported) return;
    this.reported = text;
    void this.o.link.reportHoldings(held);
  }

  close(): void {
    this.closed = true;
    for (const t of this.drops.values()) clearTimeout(t);
    this.drops.clear();
    if (current === this) current = undefined;
  }
}
