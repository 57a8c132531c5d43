// The router's model: dense weights in this process, experts on shards found through the coordinator's
// placement. Inference calls share the shards' streams; a batch for a replicated expert is split over its replicas.
import { inspectModel, loadDenseModel } from '../core/checkpoint/model.js';
import { loadChatTemplate, loadTokenizer, type ChatTemplate, type TextTokenizer } from '../core/tokenizer/index.js';
import type { SamplingOptions } from '../core/sampling.js';
import { Scheduler, type Generation, type LogprobRequest, type OnToken } from './scheduler.js';
import type { FloatDtype } from '../core/dtypes.js';
import type { MixtralModel } from '../core/model/model.js';
import type { PlacementTable } from '../core/placement.js';
import { creditsPerExpert, expertKeyText, ownerAddresses, unplaced } from '../core/placement.js';
import type { OverflowPolicy } from '../core/overload.js';
import { servingMetricGroup, servingMetrics } from '../core/metrics/serving.js';
import { Limiter } from './admission.js';
import { HttpError } from './errors.js';
import { RoutingStats } from './routing-stats.js';
import { Counter, Gauge } from 'prom-client';
import { MetricGroup } from '../core/metrics/registry.js';
import { RequestMetrics, requestMetricGroup } from './request-metrics.js';

/** Engine gauges read the newest engine of the process when Prometheus scrapes; exported once an engine starts. */
let currentEngine: RouterEngine | undefined;
const prefixTokens = new Counter({
  name: 'switchyard_router_prefix_cache_tokens_total', help: 'Prompt tokens of admitted requests found in the prefix cache (hit) or computed (miss)', labelNames: ['result'], registers: [],
});
const preemptions = new Counter({
  name: 'switchyard_router_preemptions_total', help: 'Running sequences that gave their KV blocks back to be recomputed later (the cache was full)', registers: [],
});
export const engineMetricGroup = new MetricGroup([
  new Gauge({ name: 'switchyard_router_queue_depth', help: 'Requests waiting for a place (generations and infer calls)', registers: [], collect() {
    this.set(currentEngine ? currentEngine.scheduler.depth.waiting + currentEngine.inferLimiter.depth.waiting : 0);
  } }),
  new Gauge({ name: 'switchyard_router_running_sequences', help: 'Generations in the running batch', registers: [], collect() {
    this.set(currentEngine?.scheduler.depth.running ?? 0);
  } }),
  new Gauge({ name: 'switchyard_router_kv_blocks', help: 'KV cache blocks: total, used (held by sequences) and cached (prefix cache, held or not)', labelNames: ['state'], registers: [], collect() {
    const blocks = currentEngine?.scheduler.blocks;
    this.set({ state: 'total' }, blocks?.blocks ?? 0);
    this.set({ state: 'used' }, blocks?.used ?? 0);
    this.set({ state: 'cached' }, blocks?.cached ?? 0);
  } }),
  prefixTokens,
  preemptions,
  new Gauge({ name: 'switchyard_router_credits_in_flight', help: 'Rows this router has in flight per shard (credits taken)', labelNames: ['shard'], registers: [], collect() {
    this.reset();
    if (!currentEngine) return;
    const byShard = new Map<string, number>();
    for (const [key, rows] of currentEngine.transport.credits.snapshot()) {
      const address = key.slice(0, key.indexOf('|'));
      const shard = currentEngine.shardName(address);
      byShard.set(shard, (byShard.get(shard) ?? 0) + rows);
    }
    for (const s of currentEngine.table?.shards ?? []) this.set({ shard: s.shardId }, 0);
    for (const [shard, rows] of byShard) this.set({ shard }, rows);
  } }),
]);
import { GrpcExpertTransport } from '../core/wire/grpc-transport.js';

/** Two lanes: one computes on the router while the other's rows are with the shards (issue 16). */
export const DEFAULT_MICRO_BATCHES = 2;

export interface EngineOptions {
  wireDtype?: FloatDtype;
  /** Largest gRPC message to a shard (default MAX_MESSAGE_BYTES): bigger sends are split. */
  maxMessageBytes?: number;
  overflow?: OverflowPolicy;
  /** Generations running in one step, and waiting for a place (beyond: 503). */
  maxSequences?: number;
  maxWaiting?: number;
  /** Tokens in one model step (decodes, then prompt chunks). */
  maxBatchedTokens?: number;
  /** Tokens the KV cache holds over all sequences (default: every sequence at full context, within a quarter of memory). */
  kvCacheTokens?: number;
  prefixCaching?: boolean;
  /** Open Inference `infer` calls at once, and waiting. */
  inferConcurrency?: number;
  inferQueue?: number;
  /** Ping-pong micro-batches per model step and infer call (default 2; 1 = one lane). */
  microBatches?: number;
  /** A step splits only when each lane brings every expert this many rows on average (MixtralModel.minExpertRowsPerLane). */
  microBatchMinRows?: number;
  /** Load no tokenizer (vLLM's skip_tokenizer_init): token-id APIs only, text endpoints answer 400. */
  skipTokenizer?: boolean;
  /** A chat template (file path or inline text) instead of the checkpoint's (`--chat-template`). */
  chatTemplate?: string;
}

export class RouterEngine {
  table?: PlacementTable;
  private owners = new Map<string, string[]>();
  /** Owners of experts that later placements no longer list (the coordinator restarted or a shard left): used only when no listed owner exists. */
  private staleOwners = new Map<string, string[]>();
  private shardIdOf = new Map<string, string>();
  private passes = 0;

  readonly scheduler: Scheduler;
  readonly inferLimiter: Limiter;
  readonly routing: RoutingStats;
  /** How chat messages become a prompt (the checkpoint's template, an override, or the ChatML default); none without a tokenizer. */
  chatTemplate?: ChatTemplate;
  /** TTFT, TPOT, end-to-end and queue times, tokens and finish reasons of generations (./request-metrics.ts). */
  readonly requests: RequestMetrics;

  private constructor(
    readonly model: MixtralModel, readonly tokenizer: TextTokenizer | undefined, readonly transport: GrpcExpertTransport, readonly modelName: string, options: EngineOptions,
  ) {
    model.microBatches = options.microBatches ?? DEFAULT_MICRO_BATCHES;
    if (options.microBatchMinRows !== undefined) model.minExpertRowsPerLane = options.microBatchMinRows;
    this.requests = new RequestMetrics(modelName, () => this.scheduler.depth);
    this.scheduler = new Scheduler(model, {
      maxSequences: options.maxSequences ?? 64, maxWaiting: options.maxWaiting ?? 256, maxBatchedTokens: options.maxBatchedTokens,
      kvCacheTokens: options.kvCacheTokens, prefixCaching: options.prefixCaching,
      onAdmit: (seconds) => this.requests.queued(seconds),
      onPrefix: (hit, miss) => {
        prefixTokens.inc({ result: 'hit' }, hit);
        prefixTokens.inc({ result: 'miss' }, miss);
      },
      onPreempt: () => preemptions.inc(),
    });
    for (const result of ['hit', 'miss']) prefixTokens.inc({ result }, 0);
    this.inferLimiter = new Limiter(options.inferConcurrency ?? 4, options.inferQueue ?? 64);
    this.routing = new RoutingStats(model.family.moeLayers, model.family.experts);
    for (const layer of model.family.moeLayers)
      for (let expert = 0; expert < model.family.experts; expert++)
        for (const reason of ['shard_down', 'at_capacity']) servingMetrics.unservedRows.inc({ layer: String(layer), expert: String(expert), reason }, 0);
    model.onRouting = (layer, stats) => this.routing.record(layer, stats);
    currentEngine = this;
    // A router exports its serving, engine and request metrics from the start (RoutingStats registers its own).
    servingMetricGroup.register();
    engineMetricGroup.register();
    requestMetricGroup.register();
  }

  /** Ids that end every generation: the tokenizer's EOS and config.json's eos_token_id. */
  get stopIds(): readonly number[] {
    return this.tokenizer?.stopIds ?? [this.model.config.eos_token_id].filter((id): id is number => id !== undefined);
  }

  /** The tokenizer, or a 400 for an endpoint that needs text when the router runs without one. */
  textTokenizer(what: string): TextTokenizer {
    if (!this.tokenizer) throw new HttpError(400, `${what} needs a tokenizer, and this router runs with --skip-tokenizer: send token ids`);
    return this.tokenizer;
  }

  /** A shard's id for metrics labels (its address until the placement names it). */
  shardName(address: string): string {
    return this.shardIdOf.get(address) ?? address;
  }

  static async load(checkpointDir: string, modelName: string, options: EngineOptions = {}): Promise<RouterEngine> {
    const { config } = await inspectModel(checkpointDir);
    // Before any connection is opened: a checkpoint without a usable tokenizer is refused at start.
    const tokenizer = options.skipTokenizer ? undefined : await loadTokenizer(checkpointDir, config);
    const chatTemplate = tokenizer ? await loadChatTemplate(checkpointDir, tokenizer, { override: options.chatTemplate }) : undefined;
    const holder: { engine?: RouterEngine } = {};
    const transport = new GrpcExpertTransport((layer, expert) => holder.engine!.shardsFor(layer, expert), config.hidden_size, {
      wireDtype: options.wireDtype, overflow: options.overflow,
      maxMessageBytes: options.maxMessageBytes,
      creditLimit: (address) => holder.engine!.creditsOf(address),
      onUnserved: (layer, expert, rows, reason) => {
        servingMetrics.unservedRows.inc({ layer: String(layer), expert: String(expert), reason }, rows);
        holder.engine!.routing.recordUnserved(layer, expert, rows);
      },
      onDispatch: (address, bytes, seconds) => {
        const shard = holder.engine!.shardIdOf.get(address) ?? address;
        servingMetrics.dispatchSeconds.observe({ shard }, seconds);
        servingMetrics.dispatchBytes.inc({ shard }, bytes);
      },
    });
    transport.health.onChange = () => servingMetrics.shardsDown.set(transport.health.downAddresses().length);
    const model = await loadDenseModel(checkpointDir, transport);
    holder.engine = new RouterEngine(model, tokenizer, transport, modelName, options);
    holder.engine.chatTemplate = chatTemplate;
    return holder.engine;
  }

  /** Adopts a new placement (from the coordinator's watch), remembering owners it no longer lists. */
  setPlacement(table: PlacementTable): void {
    const owners = ownerAddresses(table);
    for (const [key, previous] of this.owners) if (!owners.get(key)?.length) this.staleOwners.set(key, previous);
    for (const key of owners.keys()) this.staleOwners.delete(key);
    this.owners = owners;
    this.shardIdOf = new Map(table.shards.map((s) => [s.address, s.shardId]));
    this.table = table;
    this.transport.placementChanged();
  }

  /** This router's credits per expert on the shard at `address` (undefined = unlimited). */
  creditsOf(address: string): number | undefined {
    const shardId = this.shardIdOf.get(address);
    return this.table && shardId ? creditsPerExpert(this.table, shardId) : undefined;
  }

  /** Ready when every expert of the model has a shard. */
  ready(): boolean {
    if (this.table === undefined) return false;
    // Experts remembered from an earlier placement count: routers keep serving while the coordinator is away.
    return unplaced(this.table, this.model.family.moeLayers, this.model.family.experts).every((k) => this.staleOwners.has(expertKeyText(k)));
  }

  private shardsFor(layer: number, expert: number): string[] {
    const key = expertKeyText({ layer, expert });
    const listed = this.owners.get(key) ?? [];
    return listed.length ? listed : this.staleOwners.get(key) ?? [];
  }

  /** Logits [batch, tokens, vocab] for every position, and per layer the routing of every token. */
  infer(ids: Int32Array, batch: number, tokens: number, requestId?: string, deadline?: number): ReturnType<MixtralModel['logitsWithRouting']> {
    return this.inferLimiter.run(deadline, () => this.model.logitsWithRouting(ids, batch, tokens, `infer${this.passes++}`, requestId ? [requestId] : undefined, deadline));
  }

  /** Generation through the scheduler: concurrent requests share every model step. Followed by this.requests from here. */
  complete(
    prompt: Int32Array, sampling: SamplingOptions, onToken?: OnToken, requestId?: string, deadline?: number, signal?: AbortSignal, want?: LogprobRequest,
  ): Promise<Generation> {
    const request = this.requests.start(prompt.length, deadline, signal);
    return request.finished(this.scheduler.submit(prompt, sampling, request.onToken(onToken), requestId, deadline, signal, want));
  }

  /** Graceful shutdown: refuse new work, finish what is queued and running. */
  async drain(): Promise<void> {
    await Promise.all([this.scheduler.drain(), this.inferLimiter.drain()]);
  }

  close(): void {
    this.transport.close();
    this.model.dispose();
  }
}
