// Membership with leases: members register (a re-registration replaces the old lease), renew with
// heartbeats, and are removed when silent longer than their TTL. The clock is injected for tests.
import { placementOf, type ExpertKey, type PlacementTable } from '../core/placement.js';

export type Role = 'router' | 'expert-shard';

export interface Member {
  memberId: string;
  role: Role;
  address: string;
  experts: ExpertKey[];
  tokenBudget: number;
  leaseId: string;
  expiresAt: number;
}

export class Membership {
  private readonly members = new Map<string, Member>();
  private nextLease = 1;
  private version = 0;
  private readonly listeners = new Set<(table: PlacementTable) => void>();
  private readonly memberListeners = new Set<(memberId: string, event: 'registered' | 'expired') => void>();

  constructor(readonly leaseTtlMs: number, private readonly now: () => number = Date.now) {}

  register(m: Omit<Member, 'leaseId' | 'expiresAt'>): Member {
    if (!m.memberId) throw new RangeError('member_id is empty');
    if (m.role === 'expert-shard' && !m.address) throw new RangeError(`shard ${m.memberId} registered without an address`);
    const member: Member = { ...m, leaseId: String(this.nextLease++), expiresAt: this.now() + this.leaseTtlMs };
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
    return placementOf(this.list('expert-shard').map((m) => ({ shardId: m.memberId, address: m.address, experts: m.experts, tokenBudget: m.tokenBudget })), this.version, this.list('router').length);
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
