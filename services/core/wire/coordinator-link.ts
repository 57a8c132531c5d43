// A member's connection to the coordinator: register, keep the lease alive (registering again when the
// coordinator forgot it, e.g. after a restart), and follow the placement watch, reconnecting as needed.
// Routers keep their last placement while the coordinator is away.
import * as grpc from '@grpc/grpc-js';
import type { ExpertKey, PlacementTable } from '../placement.js';
import type { CoordinatorClient } from '../../generated/switchyard/v1/Coordinator.js';
import type { Placement, Placement__Output } from '../../generated/switchyard/v1/Placement.js';
import type { Role } from '../../generated/switchyard/v1/Role.js';
import { CHANNEL_OPTIONS, loadProtos } from './protos.js';
import { channelCredentials } from './credentials.js';

export interface MemberInfo {
  memberId: string;
  role: Role;
  address?: string;
  experts?: ExpertKey[];
  tokenBudget?: number;
  maxExperts?: number;
  /** Shards: the MoE layers and routed experts per layer of the model they serve. */
  model?: { moeLayers: readonly number[]; experts: number };
}

/** What a member adds to each heartbeat: a router's demand per expert, a shard's rows per second. */
export interface HeartbeatLoad {
  expertLoads?: Array<{ layer: number; expert: number; rowsPerSecond: number }>;
  rowsPerSecond?: number;
}

const CALL_DEADLINE_MS = 2_000;
const RETRY_MS = 250;

export function toWirePlacement(t: PlacementTable): Placement {
  const shards = t.shards.map(({ assigned, ...s }) => ({ ...s, assigned: assigned ?? [], assignmentSet: assigned !== undefined }));
  return { version: String(t.version), shards, entries: t.entries, routers: t.routers ?? 0 };
}

export function fromWirePlacement(p: Placement__Output): PlacementTable {
  return {
    version: Number(p.version),
    routers: p.routers,
    shards: p.shards.map((s) => ({
      shardId: s.shardId, address: s.address, tokenBudget: s.tokenBudget,
      ...(s.assignmentSet ? { assigned: s.assigned.map((k) => ({ layer: k.layer, expert: k.expert })) } : {}),
    })),
    entries: p.entries.map((e) => ({ layer: e.layer, expert: e.expert, shardIds: [...e.shardIds] })),
  };
}

export class CoordinatorLink {
  private readonly client: CoordinatorClient;
  private leaseId?: string;
  private ttlMs = 5_000;
  private timer?: NodeJS.Timeout;
  private watchCall?: grpc.ClientReadableStream<Placement__Output>;
  private closed = false;
  /** Holdings the coordinator has not acknowledged yet: re-sent with every heartbeat until it does. */
  private unreported?: ExpertKey[];
  /** The last placement seen (kept while the coordinator is unreachable). */
  placement?: PlacementTable;
  registrations = 0;
  /** Read at every heartbeat. */
  heartbeatLoad?: () => HeartbeatLoad;
  /** Epoch ms of the first successful registration. */
  registeredAt?: number;

  constructor(readonly address: string, readonly member: MemberInfo) {
    const protos = loadProtos();
    this.client = new protos.switchyard.v1.Coordinator(address, channelCredentials(), CHANNEL_OPTIONS);
  }

  private deadline(): Date {
    return new Date(Date.now() + CALL_DEADLINE_MS);
  }

  /** Registers and then keeps the lease alive until close(); never throws (retries in the background). */
  start(): void {
    const tick = () => {
      if (this.closed) return;
      const next = (ms: number) => { if (!this.closed) this.timer = setTimeout(tick, ms); };
      if (this.leaseId === undefined) {
        const experts = this.member.experts ?? [];
        this.client.Register({
          memberId: this.member.memberId, role: this.member.role, address: this.member.address ?? '',
          experts, tokenBudget: this.member.tokenBudget ?? 0, maxExperts: this.member.maxExperts ?? 0,
          modelMoeLayers: [...(this.member.model?.moeLayers ?? [])], modelExperts: this.member.model?.experts ?? 0,
        }, { deadline: this.deadline() }, (err, reply) => {
          if (err || !reply) return next(RETRY_MS);
          this.leaseId = reply.leaseId;
          this.registeredAt ??= Date.now();
          this.ttlMs = reply.leaseTtlMs;
          this.registrations++;
          if (this.unreported === experts) this.unreported = undefined; // the registration carried them
          next(this.ttlMs / 3);
        });
      } else {
        this.client.Heartbeat({ memberId: this.member.memberId, leaseId: this.leaseId, ...this.heartbeatLoad?.() }, { deadline: this.deadline() }, (err, reply) => {
          if (!err && reply && !reply.known) this.leaseId = undefined; // forgotten: register again now
          else if (!err && this.unreported) void this.sendHoldings();
          next(err ? RETRY_MS : this.leaseId === undefined ? 0 : this.ttlMs / 3);
        });
      }
    };
    tick();
  }

  /** Follows the placement; `listener` gets every table, starting with the current one. */
  watch(listener: (table: PlacementTable) => void): void {
    const open = () => {
      if (this.closed) return;
      const call = this.client.WatchPlacement({ memberId: this.member.memberId });
      this.watchCall = call;
      call.on('data', (p: Placement__Output) => {
        this.placement = fromWirePlacement(p);
        listener(this.placement);
      });
      call.on('error', () => undefined);
      call.on('close', () => { if (!this.closed) setTimeout(open, RETRY_MS); });
    };
    open();
  }

  /**
   * Reports the experts this shard holds now; also what it registers with if the coordinator restarts.
   * Delivery is the link's job: a report that fails (deadline, coordinator away) is re-sent with the
   * heartbeats until one is acknowledged, or carried by the next registration. Resolves whether this
   * first attempt was acknowledged.
   */
  reportHoldings(experts: ExpertKey[]): Promise<boolean> {
    this.member.experts = experts;
    this.unreported = experts;
    return this.sendHoldings();
  }

  private sendHoldings(): Promise<boolean> {
    const experts = this.unreported;
    const leaseId = this.leaseId;
    if (!experts || leaseId === undefined || this.closed) return Promise.resolve(false);
    return new Promise((resolve) => this.client.ReportHoldings({ memberId: this.member.memberId, leaseId, experts }, { deadline: this.deadline() }, (err, reply) => {
      const acknowledged = !err && Boolean(reply?.known);
      if (acknowledged && this.unreported === experts) this.unreported = undefined;
      resolve(acknowledged);
    }));
  }

  /**
   * Asks the coordinator to move this shard's experts elsewhere and publish a placement without it;
   * the lease stays alive meanwhile. Resolves with the coordinator's answer (never throws).
   */
  async drain(timeoutMs: number): Promise<{ drained: boolean; message: string }> {
    const leaseId = this.leaseId;
    if (leaseId === undefined) return { drained: false, message: 'not registered' };
    return new Promise((resolve) => this.client.Drain({ memberId: this.member.memberId, leaseId }, { deadline: new Date(Date.now() + timeoutMs) },
      (err, reply) => resolve(err || !reply ? { drained: false, message: err?.message ?? 'no reply' } : { drained: reply.drained, message: reply.message })));
  }

  /** Leaves the coordinator now (graceful shutdown), so routers stop sending before this member stops. */
  async leave(): Promise<void> {
    const leaseId = this.leaseId;
    this.closed = true;
    clearTimeout(this.timer);
    if (leaseId === undefined) return;
    await new Promise<void>((resolve) => this.client.Deregister({ memberId: this.member.memberId, leaseId }, { deadline: this.deadline() }, () => resolve()));
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    this.watchCall?.cancel();
    this.client.close();
  }
}
