// The coordinator's part of distributed training (DESIGN §2, §7): which members form the run, the
// per-step barriers, the global gradient norm, replica checks, checkpoint commits, and aborts. A step
// completes everywhere or nowhere: any failure aborts the attempt ("generation"), every member rejoins,
// reloads the last committed checkpoint and continues from it.
import { mkdir } from 'node:fs/promises';
import { resolve } from 'node:path';
import { checkpointStep, commitClusterCheckpoint, type CheckpointPartFiles } from '../core/checkpoint/cluster.js';
import { removeStaleStaging, stagingDirOf } from '../core/checkpoint/index.js';
import { expertKeys, expertKeyText, placementOf, unplaced, type ExpertKey } from '../core/placement.js';
import { toWirePlacement } from '../core/wire/coordinator-link.js';
import { planPlacement } from './planner.js';
import type { TrainSyncReply } from '../generated/switchyard/v1/TrainSyncReply.js';
import type { TrainSyncRequest__Output } from '../generated/switchyard/v1/TrainSyncRequest.js';
import type { Member, Membership } from './membership.js';

export interface TrainingJobOptions {
  /** Members the run needs before it starts or resumes. */
  routers: number;
  shards: number;
  /** The committed checkpoint (and where new ones go). */
  checkpointDir: string;
  log?: (record: Record<string, unknown>) => void;
}

/** A refusal that is not an abort (e.g. a member that has not registered yet): answered as an RPC error. */
export class TrainSyncError extends Error {
  constructor(readonly code: 'FAILED_PRECONDITION' | 'INVALID_ARGUMENT', message: string) {
    super(message);
  }
}

type Reply = (reply: TrainSyncReply) => void;

interface Arrival { request: TrainSyncRequest__Output; reply: Reply }

interface Barrier {
  arrivals: Map<string, Arrival>;
  resolving: boolean;
}

interface TrainSettingsView { steps: number; checkpoint_interval: number }

export class TrainingJob {
  /**
   * Attempt numbers start from the clock, so attempts stay distinct across coordinator restarts (the
   * coordinator keeps no state; members' rows and reductions are tagged with their attempt).
   */
  generation = Date.now();
  private state: 'joining' | 'running' | 'finished' = 'joining';
  private joins = new Map<string, Arrival>();
  /** Members of the running generation with the lease each held when it joined. */
  private roster = new Map<string, { role: Member['role']; leaseId: string }>();
  private barriers = new Map<string, Barrier>();
  /** Replies of completed barriers, for members whose long poll timed out just before the answer. */
  private resolved = new Map<string, TrainSyncReply>();
  private joinReply?: TrainSyncReply;
  private settingsJson = '';
  private lastAbort = '';
  committedStep = 0;
  /** Where each shard's experts are in the running attempt (from registrations until a replan). */
  private assignment?: Map<string, ExpertKey[]>;
  /** Shards that asked to join a running attempt: placed at the next step boundary. */
  private readonly pending = new Map<string, Arrival>();
  /** Members every new attempt waits for: the previous roster (while registered) and pending shards. */
  private expected = new Set<string>();
  /** Called on every abort with the generation that ended (the all-reduce hub drops its reductions). */
  onAbort?: (generation: number, reason: string) => void;

  constructor(readonly options: TrainingJobOptions, private readonly membership: Membership) {
    membership.onMemberChange((memberId, event) => {
      if (event === 'expired') {
        this.expected.delete(memberId);
        this.pending.delete(memberId);
      }
      if (this.state === 'joining') {
        if (event === 'expired') this.joins.delete(memberId);
        return;
      }
      const m = this.roster.get(memberId);
      if (!m) return;
      const current = membership.get(memberId);
      if (event === 'expired' || current?.leaseId !== m.leaseId) this.abort(`${memberId} ${event === 'expired' ? 'stopped answering (lease expired)' : 'restarted'}`);
    });
  }

  private log(record: Record<string, unknown>): void {
    this.options.log?.({ service: 'coordinator', generation: this.generation, ...record });
  }

  handle(request: TrainSyncRequest__Output, reply: Reply): void {
    const generation = Number(request.generation);
    const step = Number(request.step);
    switch (request.phase) {
      case 'TRAIN_PHASE_JOIN': return this.join(request, reply);
      case 'TRAIN_PHASE_ABORT':
        if (generation === this.generation && this.state === 'running') this.abort(`${request.memberId}: ${request.error || 'aborted'}`);
        return reply({ aborted: true, abortReason: this.lastAbort, generation: String(this.generation) });
      case 'TRAIN_PHASE_BACKWARD_DONE':
      case 'TRAIN_PHASE_COMMIT':
      case 'TRAIN_PHASE_CHECKPOINT':
        break;
      default:
        throw new TrainSyncError('INVALID_ARGUMENT', `unknown training phase ${request.phase}`);
    }
    const key = `${generation}/${step}/${request.phase}`;
    const memo = this.resolved.get(key);
    if (memo) return reply(memo);
    if (generation !== this.generation || this.state !== 'running')
      return reply({ aborted: true, abortReason: this.lastAbort || 'not part of the current attempt', generation: String(this.generation) });
    if (!this.roster.has(request.memberId))
      return reply({ aborted: true, abortReason: `${request.memberId} is not a member of generation ${generation}`, generation: String(this.generation) });
    let barrier = this.barriers.get(key);
    if (!barrier) {
      barrier = { arrivals: new Map(), resolving: false };
      this.barriers.set(key, barrier);
    }
    barrier.arrivals.set(request.memberId, { request, reply });
    if (!barrier.resolving && barrier.arrivals.size === this.roster.size) {
      barrier.resolving = true;
      void this.complete(key, step, request.phase, barrier);
    }
  }

  private join(request: TrainSyncRequest__Output, reply: Reply): void {
    const member = this.membership.get(request.memberId);
    if (!member) throw new TrainSyncError('FAILED_PRECONDITION', `${request.memberId} has not registered`);
    if (this.state === 'finished') this.state = 'joining'; // a new run (e.g. resumed with more steps)
    if (this.state === 'running') {
      const known = this.roster.get(request.memberId);
      // The same process asking again (its long poll timed out): same answer.
      if (known && known.leaseId === member.leaseId && this.joinReply) return reply(this.joinReply);
      if (!known && member.role === 'expert-shard') {
        // Scale-up during training: the placement changes at the next step boundary, after a checkpoint
        // that carries every expert's weights and optimizer state to wherever the new plan puts it.
        if (!this.pending.has(request.memberId)) this.log({ msg: 'shard waits for the next step boundary to join', shard: request.memberId });
        this.pending.set(request.memberId, { request, reply });
        return;
      }
      this.abort(`${request.memberId} rejoined`);
    }
    this.joins.set(request.memberId, { request, reply });
    if (request.trainSettingsJson) this.settingsJson = request.trainSettingsJson;
    this.tryStart().catch((err: unknown) => {
      // E.g. no committed checkpoint to resume from: every joiner hears why and retries.
      const reason = `cannot start training: ${(err as Error).message}`;
      this.log({ msg: reason });
      const waiting = [...this.joins.values()];
      this.joins.clear();
      for (const a of waiting) a.reply({ aborted: true, abortReason: reason, generation: String(this.generation) });
    });
  }

  private starting = false;

  private async tryStart(): Promise<void> {
    if (this.state !== 'joining' || this.starting) return;
    const joined = [...this.joins.keys()].map((id) => this.membership.get(id)).filter((m): m is Member => m !== undefined);
    const routers = joined.filter((m) => m.role === 'router');
    const shards = joined.filter((m) => m.role === 'expert-shard');
    if (routers.length < this.options.routers || shards.length < this.options.shards || !this.settingsJson) return;
    if ([...this.expected].some((id) => !this.joins.has(id))) return;
    this.starting = true;
    try {
      const dir = resolve(this.options.checkpointDir);
      this.committedStep = await checkpointStep(dir);
      await removeStaleStaging(dir); // parts of checkpoints that never committed
      if (this.state !== 'joining') return;
      const members = [...routers, ...shards];
      this.roster = new Map(members.map((m) => [m.memberId, { role: m.role, leaseId: m.leaseId }]));
      this.assignment = this.placeExperts(shards);
      const placement = placementOf(shards.map((m) => ({ shardId: m.memberId, address: m.address, experts: this.assignment!.get(m.memberId) ?? [] })), 0, routers.length);
      const replicas = placement.entries.filter((e) => e.shardIds.length > 1).map((e) => ({ layer: e.layer, expert: e.expert, shardIds: e.shardIds }));
      this.joinReply = {
        generation: String(this.generation), resumeStep: String(this.committedStep), checkpointDir: dir,
        trainSettingsJson: this.settingsJson, replicas, routers: routers.length, placement: toWirePlacement(placement),
      };
      this.expected = new Set(this.roster.keys());
      this.state = 'running';
      this.barriers.clear();
      this.resolved.clear();
      const waiting = [...this.joins.values()];
      this.joins.clear();
      this.log({ msg: 'training attempt started', members: [...this.roster.keys()], resume_step: this.committedStep, replicated_experts: replicas.length });
      for (const a of waiting) a.reply(this.joinReply);
    } finally {
      this.starting = false;
    }
  }

  /**
   * The attempt's placement: the previous attempt's (or, at first, what shards registered with); shards
   * without experts (new ones) get some from the planner, which keeps what it can where it is. Demand is
   * taken as uniform: every expert steps every iteration.
   */
  private placeExperts(shards: Member[]): Map<string, ExpertKey[]> {
    const previous = this.assignment ?? new Map(shards.map((m) => [m.memberId, m.experts]));
    const current = new Map(shards.map((m) => [m.memberId, previous.get(m.memberId) ?? []]));
    const shape = this.membership.shape;
    if (!shape) return current;
    // Re-plan when a shard holds nothing (it joined) or an expert has no shard (its holder left).
    const table = placementOf([...current].map(([shardId, experts]) => ({ shardId, address: '', experts })), 0);
    if ([...current.values()].every((keys) => keys.length > 0) && unplaced(table, shape.moeLayers, shape.experts).length === 0) return current;
    const experts = expertKeys(shape.moeLayers, shape.experts);
    const plan = planPlacement({
      experts, load: new Float64Array(experts.length).fill(1),
      shards: shards.map((m) => ({ shardId: m.memberId, maxExperts: m.maxExperts, holds: current.get(m.memberId)! })),
    });
    this.log({ msg: 'training placement planned', loads: plan.loads, assignment: Object.fromEntries([...plan.assignment].map(([id, keys]) => [id, keys.length])) });
    return plan.assignment;
  }

  private settings(): TrainSettingsView {
    return JSON.parse(this.settingsJson) as TrainSettingsView;
  }

  private async complete(key: string, step: number, phase: string, barrier: Barrier): Promise<void> {
    const generation = this.generation;
    let reply: TrainSyncReply;
    try {
      reply = { generation: String(generation), ...(await this.resolve(step, phase, [...barrier.arrivals.values()].map((a) => a.request))) };
    } catch (err) {
      // A failure of an attempt already ended must not abort the one that replaced it.
      if (generation === this.generation) this.abort(`step ${step}: ${(err as Error).message}`);
      return;
    }
    if (generation !== this.generation || this.barriers.get(key) !== barrier) return; // aborted meanwhile
    this.barriers.delete(key);
    this.resolved.set(key, reply);
    for (const k of this.resolved.keys()) if (Number(k.split('/')[1]) < step - 2) this.resolved.delete(k);
    if (phase === 'TRAIN_PHASE_CHECKPOINT' && step === this.settings().steps) {
      // The run is complete: members leaving now is no failure.
      this.state = 'finished';
      this.log({ msg: 'training finished', step });
    } else if (phase === 'TRAIN_PHASE_CHECKPOINT' && this.pending.size > 0) {
      // Step boundary with the step committed: end the attempt; everyone rejoins with the new shards.
      const joining = [...this.pending.keys()];
      this.endAttempt(`placement change after step ${step}: ${joining.join(', ')} join${joining.length === 1 ? 's' : ''}`, false);
      for (const [id, arrival] of this.pending) {
        this.joins.set(id, arrival);
        this.expected.add(id);
      }
      this.pending.clear();
      const rejoin: TrainSyncReply = { aborted: true, abortReason: this.lastAbort, generation: String(this.generation) };
      for (const a of barrier.arrivals.values()) a.reply(rejoin);
      return;
    }
    for (const a of barrier.arrivals.values()) a.reply(reply);
  }

  private async resolve(step: number, phase: string, requests: TrainSyncRequest__Output[]): Promise<Partial<TrainSyncReply>> {
    if (phase === 'TRAIN_PHASE_BACKWARD_DONE') return {};
    if (phase === 'TRAIN_PHASE_COMMIT') {
      this.checkReplicas(requests);
      const routerDigests = new Set(requests.filter((r) => this.roster.get(r.memberId)?.role === 'router').map((r) => r.weightsDigest));
      if (routerDigests.size > 1) throw new Error('router replicas hold different dense weights');
      const routerSums = requests.filter((r) => this.roster.get(r.memberId)?.role === 'router').map((r) => r.gradSquareSum);
      // Router replicas hold identical all-reduced dense gradients: any difference is divergence.
      if (routerSums.some((s) => s !== routerSums[0])) throw new Error(`router replicas disagree on the dense gradient norm (${routerSums.join(', ')})`);
      const shardSum = requests.filter((r) => this.roster.get(r.memberId)?.role === 'expert-shard').reduce((s, r) => s + r.gradSquareSum, 0);
      const gradNorm = Math.sqrt((routerSums[0] ?? 0) + shardSum);
      const t = this.settings();
      // A shard waiting to join: checkpoint this step, so the new placement starts from it.
      const checkpoint = step % t.checkpoint_interval === 0 || step === t.steps || this.pending.size > 0;
      const stagingDir = stagingDirOf(this.options.checkpointDir, this.generation, step);
      if (checkpoint) await mkdir(stagingDir, { recursive: true });
      return { gradNorm, checkpoint, stagingDir: checkpoint ? stagingDir : '' };
    }
    // CHECKPOINT: every part is durable; write the indexes and commit.
    const staging = stagingDirOf(this.options.checkpointDir, this.generation, step);
    const parts: CheckpointPartFiles[] = requests.flatMap((r) => r.parts.map((p) => ({ file: p.file, tensors: p.tensors, optimizerFile: p.optimizerFile, optimizerTensors: p.optimizerTensors })));
    const state = requests.find((r) => r.trainerStateJson)?.trainerStateJson;
    if (!state) throw new Error('no member sent the trainer state for the checkpoint');
    const started = performance.now();
    await commitClusterCheckpoint(staging, resolve(this.options.checkpointDir), parts, state);
    this.committedStep = step;
    this.log({ msg: 'checkpoint committed', step, parts: parts.length, seconds: (performance.now() - started) / 1000 });
    return {};
  }

  /** Every holder of a replicated expert must report the same weights digest. */
  private checkReplicas(requests: TrainSyncRequest__Output[]): void {
    const seen = new Map<string, { digest: string; memberId: string }>();
    for (const r of requests)
      for (const d of r.digests) {
        const key = expertKeyText(d);
        const first = seen.get(key);
        if (!first) seen.set(key, { digest: d.digest, memberId: r.memberId });
        else if (first.digest !== d.digest)
          throw new Error(`replicas of expert (layer ${d.layer}, expert ${d.expert}) diverged: ${first.memberId} and ${r.memberId} hold different weights`);
      }
  }

  /** Ends the running attempt: every waiting member is told, and all rejoin from the last checkpoint. */
  abort(reason: string): void {
    this.endAttempt(reason, true);
  }

  private endAttempt(reason: string, failure: boolean): void {
    if (this.state !== 'running') return;
    const ended = this.generation;
    this.lastAbort = reason;
    this.generation++;
    this.state = 'joining';
    this.joinReply = undefined;
    this.log({ msg: failure ? 'training attempt aborted' : 'training attempt ended for a placement change', ended_generation: ended, reason });
    const reply: TrainSyncReply = { aborted: true, abortReason: reason, generation: String(this.generation) };
    for (const b of this.barriers.values()) for (const a of b.arrivals.values()) a.reply(reply);
    this.barriers.clear();
    this.resolved.clear();
    this.onAbort?.(ended, reason);
  }
}
