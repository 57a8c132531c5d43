// The overlap itself, timed across processes (issue 16): this process is the router (a model over a
// GrpcExpertTransport) and two real `serve expert` processes log when each message arrived. With two
// micro-batches, every layer's rows of lane 0 reach a shard while the router is still computing lane 1
// (the sends are flushed before the turn passes); with a DeepSeek model's shared experts, the routed
// rows reach a shard before the shared-expert MLP, computed while they are away, is done.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, parseModelConfig, type ModelConfig } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { loadDenseModel, saveModel } from '../services/core/checkpoint/model.js';
import { GrpcExpertTransport } from '../services/core/wire/grpc-transport.js';
import { familyOf } from '../services/core/model/family.js';
import { assignmentSpec, spreadExperts } from '../services/core/placement.js';
import { pipelineTrace, type LaneSpan } from '../services/core/model/pipeline.js';
import { startService, type RunningService } from './support/services.js';
import { PagedDecoder } from './support/paged.js';
import { until } from './support/until.js';

await initBackend();
let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-overlap-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

interface Arrival { pass: string; receivedAt: number }

/**
 * Saves `config`'s model, starts two shards holding half the experts each (debug logs: one record per
 * served message with its arrival time), and runs `fn` with a router-side model reaching them over gRPC.
 */
async function withShards(name: string, config: ModelConfig, fn: (model: MixtralModel, arrivals: () => Arrival[]) => Promise<void>): Promise<void> {
  const checkpoint = join(root, name);
  const initial = MixtralModel.initialize(config, 2);
  await saveModel(checkpoint, initial);
  initial.dispose();
  const family = familyOf(config);
  const spread = spreadExperts(family.moeLayers, family.experts, 2);
  const shards: RunningService[] = [];
  let transport: GrpcExpertTransport | undefined;
  let model: MixtralModel | undefined;
  try {
    for (const keys of spread)
      shards.push(await startService(['serve', 'expert', '--checkpoint', checkpoint, '--experts', assignmentSpec(keys), '--port', '0'], /listening on (\S+)/, { SWITCHYARD_LOG: 'debug' }));
    const addresses = shards.map((s) => s.ready[1]);
    transport = new GrpcExpertTransport((layer, expert) => [addresses[spread.findIndex((keys) => keys.some((k) => k.layer === layer && k.expert === expert))]], config.hidden_size);
    model = await loadDenseModel(checkpoint, transport);
    const arrivals = () => shards.flatMap((s) => s.stderr().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((r) => r.msg === 'rows served').map((r) => ({ pass: String(r.pass), receivedAt: Number(r.received_at) })));
    await fn(model, arrivals);
  } finally {
    model?.dispose();
    transport?.close();
    await Promise.all(shards.map((s) => s.stop()));
  }
}

/**
 * Every arrival of the passes named: a shard logs a message before it replies, but its stderr reaches
 * this process on its own pipe, possibly after the reply, so the records are waited for.
 */
function arrivalsOf(arrivals: () => Arrival[], passes: string[]): Promise<Arrival[]> {
  return until(`the shards' records of ${passes.join(', ')}`, async () => {
    const all = arrivals();
    return passes.every((p) => all.some((a) => a.pass === p)) ? all : undefined;
  }, 10_000);
}

/** Runs `fn` while recording every lane span. */
async function traced(fn: () => Promise<void>): Promise<LaneSpan[]> {
  const spans: LaneSpan[] = [];
  pipelineTrace.onSpan = (span) => spans.push(span);
  try {
    await fn();
  } finally {
    pipelineTrace.onSpan = undefined;
  }
  return spans;
}

const mixtral = parseModelConfig({
  hidden_size: 256, intermediate_size: 512, num_hidden_layers: 4, num_attention_heads: 8, num_key_value_heads: 4,
  num_local_experts: 4, num_experts_per_tok: 2, vocab_size: BYTE_VOCAB_SIZE, max_position_embeddings: 512, bos_token_id: BOS_ID, eos_token_id: EOS_ID,
});

test('two micro-batches: each layer\'s rows of lane 0 reach a shard while the router computes lane 1', async (t) => {
  await withShards('mixtral', mixtral, async (model, arrivals) => {
    model.microBatches = 2;
    const prompts = () => [0, 1, 2, 3].map((seq) => ({ seq, ids: Int32Array.from({ length: 256 }, (_, j) => 32 + ((seq * 31 + j * 7) % 90)) }));
    await new PagedDecoder(model, 16).step(prompts(), 'warm'); // kernels and streams warmed up
    const spans = await traced(async () => {
      await new PagedDecoder(model, 16).step(prompts(), 'timed');
    });
    const laneSpans = (lane: number) => spans.filter((s) => s.lane === lane && s.kind === 'compute');
    const [lane0, lane1] = [laneSpans(0), laneSpans(1)];
    const layers = mixtral.num_hidden_layers;
    assert.equal(lane0.length, layers + 1, 'lane 0: one compute span per send, and the last one');
    const leads: number[] = [];
    const logged = await arrivalsOf(arrivals, Array.from({ length: layers }, (_, l) => `timed/m0/L${l}`));
    for (let l = 0; l < layers; l++) {
      const sent = lane0[l].end;
      const received = Math.min(...logged.filter((a) => a.pass === `timed/m0/L${l}`).map((a) => a.receivedAt));
      assert.ok(Number.isFinite(received), `a shard logged lane 0's rows of layer ${l}`);
      // Lane 1's compute that took the turn from lane 0's send of this layer.
      const next = lane1.find((s) => s.start >= sent);
      if (!next) continue; // lane 1 had already finished its layers
      leads.push(next.end - received);
      assert.ok(received < next.end, `layer ${l}: lane 0's rows arrived ${(received - next.start).toFixed(2)} ms after lane 1 started computing and ${(received - next.end).toFixed(2)} ms after it stopped`);
    }
    assert.ok(leads.length >= layers - 1, 'lane 1 computed after most of lane 0\'s sends');
    t.diagnostic(`ms between a lane-0 arrival at a shard and the end of lane 1's compute: ${leads.map((x) => x.toFixed(2)).join(', ')}`);
  });
});

test('a shared-expert MLP runs while the routed rows are away: they reach a shard before it is done', async (t) => {
  const deepseek = parseModelConfig({
    architectures: ['DeepseekForCausalLM'], model_type: 'deepseek',
    hidden_size: 256, intermediate_size: 1024, moe_intermediate_size: 128, num_hidden_layers: 3, num_attention_heads: 8, num_key_value_heads: 4,
    n_routed_experts: 4, n_shared_experts: 16, num_experts_per_tok: 2, first_k_dense_replace: 1, moe_layer_freq: 1, norm_topk_prob: false,
    scoring_func: 'softmax', aux_loss_alpha: 0.001, seq_aux: true, rms_norm_eps: 1e-6, rope_theta: 10000, attention_bias: false,
    vocab_size: BYTE_VOCAB_SIZE, max_position_embeddings: 512, tie_word_embeddings: false, bos_token_id: BOS_ID, eos_token_id: EOS_ID,
  });
  await withShards('deepseek', deepseek, async (model, arrivals) => {
    const prompt = [{ seq: 0, ids: Int32Array.from({ length: 480 }, (_, j) => 32 + ((j * 7) % 90)) }];
    await new PagedDecoder(model, 16).step(prompt, 'warm');
    const spans = await traced(async () => {
      await new PagedDecoder(model, 16).step(prompt, 'timed');
    });
    const mlps = spans.filter((s) => s.kind === 'meanwhile');
    const moeLayers = familyOf(deepseek).moeLayers;
    assert.equal(mlps.length, moeLayers.length, 'one shared-expert MLP per MoE layer, while its rows were away');
    const logged = await arrivalsOf(arrivals, moeLayers.map((l) => `timed/L${l}`));
    const margins = moeLayers.map((l, i) => {
      const received = Math.min(...logged.filter((a) => a.pass === `timed/L${l}`).map((a) => a.receivedAt));
      assert.ok(received < mlps[i].end, `layer ${l}: the routed rows arrived ${(received - mlps[i].end).toFixed(2)} ms after the shared MLP ended`);
      return mlps[i].end - received;
    });
    t.diagnostic(`ms the shared MLP went on after the routed rows reached a shard: ${margins.map((x) => x.toFixed(2)).join(', ')}`);
  });
});
