// A member's connection to the coordinator: register, keep the lease alive (registering again when the
// coordinator forgot it, e.g. after a restart), and follow the placement watch, reconnecting as needed.
// Routers keep their last placement while the coordinator is away.
import * as grpc from '@grpc/grpc-js';
import type { ExpertKey, PlacementTable } from '../placement.js';
import type { CoordinatorClient } from '../../generated/switchyard/v1/Coordinator.js';
import type { Placement__Output } from '../../generated/switchyard/v1/Placement.js';
import type { Role } from '../../generated/switchyard/v1/Role.js';
import { CHANNEL_OPTIONS, loadProtos } from './protos.js';
import { channelCredentials } from './credentials.js';

export interface MemberInfo {
  memberId: string;
  role: Role;
  address?: string;
  experts?: ExpertKey[];
  tokenBudget?: number;
}

const CALL_DEADLINE_MS = 2_000;
const RETRY_MS = 250;

export function fromWirePlacement(p: Placement__Output): PlacementTable {
  return {
    version: Number(p.version),
    routers: p.routers,
    shards: p.shards.map((s) => ({ shardId: s.shardId, address: s.address, tokenBudget: s.tokenBudget })),
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
  /** The last placement seen (kept while the coordinator is unreachable). */
  placement?: PlacementTable;
  registrations = 0;

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
        this.client.Register({
          memberId: this.member.memberId, role: this.member.role, address: this.member.address ?? '',
          experts: this.member.experts ?? [], tokenBudget: this.member.tokenBudget ?? 0,
        }, { deadline: this.deadline() }, (err, reply) => {
          if (err || !reply) return next(RETRY_MS);
          this.leaseId = reply.leaseId;
          this.ttlMs = reply.leaseTtlMs;
          this.registrations++;
          next(this.ttlMs / 3);
        });
      } else {
        this.client.Heartbeat({ memberId: this.member.memberId, leaseId: this.leaseId }, { deadline: this.deadline() }, (err, reply) => {
          if (!err && reply && !reply.known) this.leaseId = undefined; // forgotten: register again now
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
