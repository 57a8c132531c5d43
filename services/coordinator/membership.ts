// Membership with leases: members register (a re-registration replaces the old lease), renew with
// heartbeats, and are removed when silent longer than their TTL. The clock is injected for tests.
import { expertKeyText, placementOf, type ExpertKey, type PlacementTable } from '../core/placement.js';

export type Role = 'router' | 'expert-shard';

export interface Member {
  memberId: string;
  role: Role;
  address: string;
  /** Experts the shard holds and serves (registered, then reported). */
  experts: ExpertKey[];
  tokenBudget: number;
  /** Most experts the shard may hold; 0 = no limit. */
  maxExperts: number;
  leaseId: string;
  expiresAt: number;
  /** Set by the planner: what the shard should hold. Only held ∩ assigned is published. */
  assigned?: ExpertKey[];
  /** Leaving: the planner places nothing new on it. */
  draining?: boolean;
  /** Routers: routed rows per second per expert (keyed by expertKeyText), from heartbeats. */
  expertLoads?: Map<string, number>;
  /** Shards: rows computed per second, from heartbeats. */
  rowsPerSecond?: number;
}


/** The served model's routed experts: its MoE layers and the experts of each. */
export interface ModelShape { moeLayers: number[]; experts: number }

/** Experts outside the model would end up in the placement routers follow. */
function checkExperts(experts: ExpertKey[], shape: ModelShape | undefined): void {
  const outside = shape && experts.find((k) => !shape.moeLayers.includes(k.layer) || k.expert >= shape.experts);
  if (outside) throw new RangeError(`expert (layer ${outside.layer}, expert ${outside.expert}) is outside the model`);
}

export class Membership {
  /** MoE layers × experts of the served model, from shards' registrations. */
  shape?: ModelShape;
  private readonly members = new Map<string, Member>();
  private nextLease = 1;
  private version = 0;
  private readonly listeners = new Set<(table: PlacementTable) => void>();
  private readonly memberListeners = new Set<(memberId: string, event: 'registered' | 'expired') => void>();

  constructor(readonly leaseTtlMs: number, private readonly now: () => number = Date.now) {}

  /**
   * `shape`: the model a shard serves. The first one fixes the cluster's shape; every later one must agree.
   * Throws RangeError for a bad request, which then changes nothing (not even the shape).
   */
  register(m: Omit<Member, 'leaseId' | 'expiresAt' | 'maxExperts'> & { maxExperts?: number }, shape?: ModelShape): Member {
    if (!m.memberId) throw new RangeError('member_id is empty');
    if (m.role === 'expert-shard' && !m.address) throw new RangeError(`shard ${m.memberId} registered without an address`);
    const model = shape && shape.moeLayers.length > 0 && shape.experts > 0 ? shape : undefined;
    const text = (s: ModelShape) => `MoE layers [${s.moeLayers.join(', ')}] × ${s.experts} experts`;
    if (model && this.shape && text(this.shape) !== text(model))
      throw new RangeError(`shard ${m.memberId} serves a model with ${text(model)}, the cluster ${text(this.shape)}`);
    checkExperts(m.experts, model ?? this.shape);
    if (model) this.shape = model;
    const member: Member = { ...m, maxExperts: m.maxExperts ?? 0, leaseId: String(this.nextLease++), expiresAt: this.now() + this.leaseTtlMs };
    this.members.set(m.memberId, member);
    this.changed(); // shards change the placement; routers change how budgets divide into credits
    for (const l of this.memberListeners) l(m.memberId, 'registered');
    return member;
  }

  /** Renews a lease; false when the lease is unknown (expired, replaced, or the coordinator restarted). */
  heartbeat(memberId: string, leaseId: string): boolean {
    this.expire();
    const m = this.members.get(memberId);
    if (!m || m.leaseId !== leaseId) return false;
    m.expiresAt = this.now() + this.leaseTtlMs;
    return true;
  }

  /** Heartbeat payloads: a router's measured demand, a shard's measured rows per second. */
  recordLoad(memberId: string, loads: Map<string, number>, rowsPerSecond: number): void {
    const m = this.members.get(memberId);
    // Each heartbeat replaces the last: an idle router's demand falls to nothing.
    if (m?.role === 'router') m.expertLoads = loads;
    else if (m) m.rowsPerSecond = rowsPerSecond;
  }

  /** A shard's report of what it holds now; false for an unknown lease, RangeError for a key outside the model. */
  reportHoldings(memberId: string, leaseId: string, experts: ExpertKey[]): boolean {
    checkExperts(experts, this.shape);
    const m = this.members.get(memberId);
    if (!m || m.leaseId !== leaseId) return false;
    const same = (a: ExpertKey[], b: ExpertKey[]) => a.length === b.length && a.map(expertKeyText).sort().join() === b.map(expertKeyText).sort().join();
    if (same(m.experts, experts)) return true; // a report that changes nothing publishes nothing
    m.experts = experts;
    this.changed();
    return true;
  }

  /** The planner's wish for each shard (absent shards keep theirs); published at once. */
  assign(assignment: Map<string, ExpertKey[]>): void {
    for (const [id, keys] of assignment) {
      const m = this.members.get(id);
      if (m) m.assigned = keys;
    }
    this.changed();
  }

  setDraining(memberId: string): void {
    const m = this.members.get(memberId);
    if (m) m.draining = true;
  }

  /** The experts a shard serves: what it holds, limited to its assignment once it has one. */
  serving(m: Member): ExpertKey[] {
    if (!m.assigned) return m.experts;
    const wanted = new Set(m.assigned.map(expertKeyText));
    return m.experts.filter((k) => wanted.has(expertKeyText(k)));
  }

  /** Removes members whose lease ran out; returns their ids. */
  expire(): string[] {
    const now = this.now();
    const gone = [...this.members.values()].filter((m) => m.expiresAt <= now);
    for (const m of gone) this.members.delete(m.memberId);
    if (gone.length) this.changed();
    for (const m of gone) for (const l of this.memberListeners) l(m.memberId, 'expired');
    return gone.map((m) => m.memberId);
  }

  /** Removes a member at its own request (graceful shutdown); false for an unknown lease. */
  deregister(memberId: string, leaseId: string): boolean {
    const m = this.members.get(memberId);
    if (!m || m.leaseId !== leaseId) return false;
    this.members.delete(memberId);
    this.changed();
    for (const l of this.memberListeners) l(memberId, 'expired');
    return true;
  }

  list(role?: Role): Member[] {
    return [...this.members.values()].filter((m) => !role || m.role === role);
  }

  get(memberId: string): Member | undefined {
    return this.members.get(memberId);
  }

  /** Calls `listener` when a member registers (or re-registers with a new lease) or its lease expires. */
  onMemberChange(listener: (memberId: string, event: 'registered' | 'expired') => void): () => void {
    this.memberListeners.add(listener);
    return () => this.memberListeners.delete(listener);
  }

  placement(): PlacementTable {
    const shards = this.list('expert-shard').map((m) => ({
      shardId: m.memberId, address: m.address, experts: this.serving(m), tokenBudget: m.tokenBudget, assigned: m.assigned,
    }));
    return placementOf(shards, this.version, this.list('router').length);
  }

  /** Calls `listener` with every new placement; returns the unsubscribe function. */
  watch(listener: (table: PlacementTable) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private changed(): void {
    this.version++;
    const table = this.placement();
    for (const l of this.listeners) l(table);
  }
}
