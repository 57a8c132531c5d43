// `switchyard serve coordinator`: membership with leases and the placement watch over gRPC, with
// grpc.health.v1 and reflection. Soft state only: after a restart members simply register again.
import * as grpc from '@grpc/grpc-js';
import { Gauge } from 'prom-client';
import { MetricGroup } from '../core/metrics/registry.js';
import { registerCoordinatorTrainingMetrics } from '../core/metrics/training.js';
import { loadProtos } from '../core/wire/protos.js';
import { isMalformed, malformedStatus, startGrpcServer, tolerant, type MalformedMessage } from '../core/wire/server.js';
import type { DeregisterReply } from '../generated/switchyard/v1/DeregisterReply.js';
import type { DrainReply } from '../generated/switchyard/v1/DrainReply.js';
import type { ReportHoldingsRequest__Output } from '../generated/switchyard/v1/ReportHoldingsRequest.js';
import { toWirePlacement } from '../core/wire/coordinator-link.js';
import { expertKeyText } from '../core/placement.js';
import { DEFAULT_REBALANCE, Rebalancer, type RebalancerOptions } from './rebalancer.js';
import type { DeregisterRequest__Output } from '../generated/switchyard/v1/DeregisterRequest.js';
import type { HeartbeatReply } from '../generated/switchyard/v1/HeartbeatReply.js';
import type { HeartbeatRequest__Output } from '../generated/switchyard/v1/HeartbeatRequest.js';
import type { Placement } from '../generated/switchyard/v1/Placement.js';
import type { RegisterReply } from '../generated/switchyard/v1/RegisterReply.js';
import type { RegisterRequest__Output } from '../generated/switchyard/v1/RegisterRequest.js';
import type { WatchPlacementRequest__Output } from '../generated/switchyard/v1/WatchPlacementRequest.js';
import type { ReduceChunk } from '../generated/switchyard/v1/ReduceChunk.js';
import type { ReduceChunk__Output } from '../generated/switchyard/v1/ReduceChunk.js';
import type { TrainSyncReply } from '../generated/switchyard/v1/TrainSyncReply.js';
import type { TrainSyncRequest__Output } from '../generated/switchyard/v1/TrainSyncRequest.js';
import { Membership, type Role } from './membership.js';
import { ReduceHub } from './allreduce-hub.js';
import { TrainingJob, TrainSyncError, type TrainingJobOptions } from './training.js';

export const COORDINATOR_SERVICE_NAME = 'switchyard.v1.Coordinator';

/** Gauges of the newest coordinator of the process, read when Prometheus scrapes; exported once one starts. */
let currentMembership: Membership | undefined;
export const coordinatorMetricGroup = new MetricGroup([
  new Gauge({ name: 'switchyard_coordinator_members', help: 'Members holding a lease, by role', labelNames: ['role'], registers: [], collect() {
    for (const role of ['router', 'expert-shard'] as const) this.set({ role }, currentMembership?.list(role).length ?? 0);
  } }),
  new Gauge({ name: 'switchyard_coordinator_placement_version', help: 'Version of the placement (grows with every change)', registers: [], collect() {
    this.set(currentMembership?.placement().version ?? 0);
  } }),
  ...MetricGroup.busy,
]);

const ROLES: Record<string, Role> = { ROLE_ROUTER: 'router', ROLE_EXPERT_SHARD: 'expert-shard' };


export interface RunningCoordinator {
  port: number;
  membership: Membership;
  reduceHub: ReduceHub;
  training?: TrainingJob;
  /** Moves experts live (serving clusters; a training run changes placement at step boundaries instead). */
  rebalancer?: Rebalancer;
  close(): Promise<void>;
}

export async function startCoordinator(
  host: string, port: number, leaseTtlMs: number, trainingOptions?: TrainingJobOptions, rebalance: Partial<RebalancerOptions> = {},
): Promise<RunningCoordinator> {
  const membership = new Membership(leaseTtlMs);
  currentMembership = membership;
  const rebalancer = trainingOptions ? undefined : new Rebalancer(membership, { ...DEFAULT_REBALANCE, ...rebalance });
  const reduceHub = new ReduceHub();
  const training = trainingOptions ? new TrainingJob(trainingOptions, membership) : undefined;
  if (training) training.onAbort = (generation, reason) => reduceHub.drop(`g${generation}/`, `training attempt ${generation} aborted: ${reason}`);
  coordinatorMetricGroup.register();
  // The training job's series only where there is a job (the Rebalancer registers the placement ones).
  if (training) registerCoordinatorTrainingMetrics({
    generation: () => training.generation, committedStep: () => training.committedStep,
    reduceBytesIn: () => reduceHub.bytesIn, reduceBytesOut: () => reduceHub.bytesOut, pendingChunks: () => reduceHub.pendingChunks,
  });
  const protos = loadProtos();
  const watchers = new Set<grpc.ServerWritableStream<WatchPlacementRequest__Output | MalformedMessage, Placement>>();
  const running = await startGrpcServer(host, port, COORDINATOR_SERVICE_NAME, (server) => server.addService(tolerant(protos.switchyard.v1.Coordinator.service), {
    Register(call: grpc.ServerUnaryCall<RegisterRequest__Output | MalformedMessage, RegisterReply>, callback: grpc.sendUnaryData<RegisterReply>) {
      if (isMalformed(call.request)) return callback(malformedStatus(call.request));
      const r = call.request;
      const role = ROLES[r.role];
      if (!role) return callback({ code: grpc.status.INVALID_ARGUMENT, message: `unknown role ${r.role}` });
      try {
        const m = membership.register(
          { memberId: r.memberId, role, address: r.address, experts: r.experts.map((k) => ({ layer: k.layer, expert: k.expert })), tokenBudget: r.tokenBudget, maxExperts: r.maxExperts },
          { moeLayers: [...r.modelMoeLayers], experts: r.modelExperts });
        callback(null, { leaseId: m.leaseId, leaseTtlMs: leaseTtlMs });
      } catch (err) {
        callback({ code: grpc.status.INVALID_ARGUMENT, message: (err as Error).message });
      }
    },
    Heartbeat(call: grpc.ServerUnaryCall<HeartbeatRequest__Output | MalformedMessage, HeartbeatReply>, callback: grpc.sendUnaryData<HeartbeatReply>) {
      if (isMalformed(call.request)) return callback(malformedStatus(call.request));
      const r = call.request;
      const known = membership.heartbeat(r.memberId, r.leaseId);
      if (known) membership.recordLoad(r.memberId, new Map(r.expertLoads.map((l) => [expertKeyText(l), l.rowsPerSecond])), r.rowsPerSecond);
      callback(null, { known, leaseTtlMs: leaseTtlMs });
    },
    ReportHoldings(call: grpc.ServerUnaryCall<ReportHoldingsRequest__Output | MalformedMessage, HeartbeatReply>, callback: grpc.sendUnaryData<HeartbeatReply>) {
      if (isMalformed(call.request)) return callback(malformedStatus(call.request));
      const r = call.request;
      try {
        callback(null, { known: membership.reportHoldings(r.memberId, r.leaseId, r.experts.map((k) => ({ layer: k.layer, expert: k.expert }))), leaseTtlMs });
      } catch (err) {
        callback({ code: grpc.status.INVALID_ARGUMENT, message: (err as Error).message });
      }
    },
    Drain(call: grpc.ServerUnaryCall<DeregisterRequest__Output | MalformedMessage, DrainReply>, callback: grpc.sendUnaryData<DrainReply>) {
      if (isMalformed(call.request)) return callback(malformedStatus(call.request));
      const m = membership.get(call.request.memberId);
      if (!m || m.leaseId !== call.request.leaseId) return callback(null, { drained: false, message: 'unknown lease' });
      if (!rebalancer) return callback(null, { drained: false, message: 'this coordinator does not move experts (training run)' });
      void rebalancer.drain(m.memberId).then((result) => callback(null, result));
    },
    Deregister(call: grpc.ServerUnaryCall<DeregisterRequest__Output | MalformedMessage, DeregisterReply>, callback: grpc.sendUnaryData<DeregisterReply>) {
      if (isMalformed(call.request)) return callback(malformedStatus(call.request));
      callback(null, { known: membership.deregister(call.request.memberId, call.request.leaseId) });
    },
    WatchPlacement(call: grpc.ServerWritableStream<WatchPlacementRequest__Output | MalformedMessage, Placement>) {
      if (isMalformed(call.request)) {
        call.emit('error', malformedStatus(call.request));
        return;
      }
      watchers.add(call);
      call.write(toWirePlacement(membership.placement()));
      const stop = membership.watch((table) => call.write(toWirePlacement(table)));
      const done = () => {
        stop();
        watchers.delete(call);
      };
      call.on('cancelled', done);
      call.on('close', done);
    },
    AllReduce(call: grpc.ServerDuplexStream<ReduceChunk__Output | MalformedMessage, ReduceChunk>) {
      call.on('data', (chunk: ReduceChunk__Output | MalformedMessage) => {
        if (isMalformed(chunk)) return void call.emit('error', malformedStatus(chunk));
        try {
          reduceHub.add(chunk, call);
        } catch (err) {
          call.emit('error', { code: grpc.status.INVALID_ARGUMENT, details: (err as Error).message });
        }
      });
      const gone = () => reduceHub.forget(call);
      call.on('end', () => call.end());
      call.on('cancelled', gone);
      call.on('error', gone);
    },
    TrainSync(call: grpc.ServerUnaryCall<TrainSyncRequest__Output | MalformedMessage, TrainSyncReply>, callback: grpc.sendUnaryData<TrainSyncReply>) {
      if (isMalformed(call.request)) return callback(malformedStatus(call.request));
      if (!training) return callback({ code: grpc.status.FAILED_PRECONDITION, details: 'this coordinator runs no training job (start it with --train-routers/--train-shards/--train-checkpoint)' });
      try {
        training.handle(call.request, (reply) => callback(null, reply));
      } catch (err) {
        const code = err instanceof TrainSyncError ? grpc.status[err.code] : grpc.status.INTERNAL;
        callback({ code, details: (err as Error).message });
      }
    },
  }));
  const sweeper = setInterval(() => membership.expire(), Math.max(50, leaseTtlMs / 4));
  return {
    port: running.port,
    membership,
    reduceHub,
    training,
    rebalancer,
    close: async () => {
      clearInterval(sweeper);
      rebalancer?.close();
      for (const w of watchers) w.end();
      await running.shutdown();
    },
  };
}
