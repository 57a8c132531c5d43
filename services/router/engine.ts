// The router's model: dense weights in this process, experts on shards found through the coordinator's
// placement. Inference calls share the shards' streams; a batch for a replicated expert is split over its replicas.
import { loadCheckpoint } from '../core/checkpoint/index.js';
import { loadDenseModel } from '../core/checkpoint/model.js';
import type { Generation, SamplingOptions } from '../core/generate.js';
import { ContinuousBatcher } from '../core/generate.js';
import type { FloatDtype } from '../core/dtypes.js';
import type { MixtralModel } from '../core/model/model.js';
import type { PlacementTable } from '../core/placement.js';
import { unplaced } from '../core/placement.js';
import { GrpcExpertTransport } from '../core/wire/grpc-transport.js';

export class RouterEngine {
  private table?: PlacementTable;
  private owners = new Map<string, string[]>();
  private passes = 0;

  readonly batcher: ContinuousBatcher;

  private constructor(readonly model: MixtralModel, readonly transport: GrpcExpertTransport, readonly modelName: string) {
    this.batcher = new ContinuousBatcher(model);
  }

  static async load(checkpointDir: string, modelName: string, wireDtype: FloatDtype = 'F32'): Promise<RouterEngine> {
    const { config } = await loadCheckpoint(checkpointDir, { only: () => false });
    const holder: { engine?: RouterEngine } = {};
    const transport = new GrpcExpertTransport((layer, expert) => holder.engine!.shardsFor(layer, expert), config.hidden_size, 30_000, wireDtype);
    const model = await loadDenseModel(checkpointDir, transport);
    holder.engine = new RouterEngine(model, transport, modelName);
    return holder.engine;
  }

  /** Adopts a new placement (from the coordinator's watch). */
  setPlacement(table: PlacementTable): void {
    const addresses = new Map(table.shards.map((s) => [s.shardId, s.address]));
    this.owners = new Map(table.entries.map((e) => [`${e.layer}/${e.expert}`, e.shardIds.map((id) => addresses.get(id)!).filter(Boolean)]));
    this.table = table;
  }

  /** Ready when every expert of the model has a shard. */
  ready(): boolean {
    const c = this.model.config;
    return this.table !== undefined && unplaced(this.table, c.num_hidden_layers, c.num_local_experts).length === 0;
  }

  private shardsFor(layer: number, expert: number): string[] {
    return this.owners.get(`${layer}/${expert}`) ?? [];
  }

  /** Logits [batch, tokens, vocab] for every position, and per layer the routing of every token. */
  infer(ids: Int32Array, batch: number, tokens: number, requestId?: string): ReturnType<MixtralModel['logitsWithRouting']> {
    return this.model.logitsWithRouting(ids, batch, tokens, `infer${this.passes++}`, requestId ? [requestId] : undefined);
  }

  /** Generation through the continuous batcher: concurrent requests share every model step. */
  complete(prompt: Int32Array, sampling: SamplingOptions, onToken?: (id: number) => boolean | void, requestId?: string): Promise<Generation> {
    return this.batcher.submit(prompt, sampling, onToken, requestId);
  }

  close(): void {
    this.transport.close();
    this.model.dispose();
  }
}
