// moe-layer suite: one MoE block of the `medium` expert shape (hidden 1024, intermediate 2048, top-2,
// E = 8 and 64) distributed over two expert-shard processes on loopback versus the same block in one
// process (target ≥ 1.3x at 2048 tokens). Every row is checked before it is reported: the distributed
// output equals the in-process one within 1e-5 of max|y|, every call served every row (no degraded
// tokens, the same rows per expert), and the speed-up is possible on this machine's cores.
// wire suite: bytes per dispatched row versus raw, and the tensor codec's speed.
import * as tf from '@tensorflow/tfjs-core';
import type { MethodDefinition } from '@grpc/proto-loader';
import { parseModelConfig, BYTE_VOCAB_SIZE } from '../core/config.js';
import { Rng } from '../core/data/random.js';
import { MixtralModel } from '../core/model/model.js';
import { InProcessTransport } from '../core/model/experts.js';
import { MoeLayer, type MoeStats } from '../core/model/moe.js';
import { GrpcExpertTransport } from '../core/wire/grpc-transport.js';
import { CoordinatorLink } from '../core/wire/coordinator-link.js';
import { expertKeyText } from '../core/placement.js';
import { fromWireTensor, toWireTensor } from '../core/wire/tensor.js';
import * as grpc from '@grpc/grpc-js';
import { CHANNEL_OPTIONS, packageDefinition } from '../core/wire/protos.js';
import { grpcEcho, RawEchoClient, startEchoProcess, tcpEcho } from './echo-server.js';
import { report, speedupRow, timeMedian, type BenchRow } from './report.js';
import { denseNames } from '../core/model/hf.js';
import { withLocalCluster } from './local-cluster.js';

/** The wire suite's row width. */
const HIDDEN = 512;
/** The moe-layer suite's expert shape: the `medium` preset's. */
const MOE_HIDDEN = 1024;
const MOE_INTERMEDIATE = 2048;
const MOE_K = 2;
/** Largest max|y_distributed − y_in_process| / max|y_in_process| a row may show. */
export const MOE_TOLERANCE = 1e-5;

async function placementOfCluster(coordinator: string): Promise<Map<string, string>> {
  const link = new CoordinatorLink(coordinator, { memberId: 'bench', role: 'ROLE_ROUTER' });
  return new Promise((resolve) => {
    link.watch((table) => {
      if (table.shards.length < 2) return;
      const addresses = new Map(table.shards.map((s) => [s.shardId, s.address]));
      link.close();
      resolve(new Map(table.entries.map((e) => [expertKeyText(e), addresses.get(e.shardIds[0])!])));
    });
  });
}

/** One layer call's output and routing statistics. */
export interface LayerResult { values: Float32Array; stats: MoeStats }

/** A layer call that could not send some rows to their expert marks their tokens degraded: refused. */
export function checkServed(label: string, stats: MoeStats): void {
  const degraded = stats.degradedTokens;
  if (!degraded) return;
  const n = degraded.reduce((a, b) => a + b, 0);
  throw new Error(`${label}: the call left rows unserved: ${n} of ${degraded.length} tokens degraded (${(stats.degradedReasons ?? []).join('; ')})`);
}

/**
 * The checks a distributed MoE row must pass, against the in-process call on the same input: every row
 * reached its expert (no degraded tokens, the same rows per expert) and y agrees within `tolerance` of
 * max|y|. Throws with the numbers; returns max|Δy| / max|y|.
 */
export function checkMoeRow(label: string, got: LayerResult, want: LayerResult, tolerance = MOE_TOLERANCE): number {
  checkServed(`${label}, distributed`, got.stats);
  checkServed(`${label}, in-process`, want.stats);
  const a = got.stats.countsAfterDrop;
  const b = want.stats.countsAfterDrop;
  if (a.length !== b.length || a.some((n, e) => n !== b[e]))
    throw new Error(`${label}: rows per expert differ: distributed [${a.join(',')}] vs in-process [${b.join(',')}]`);
  if (got.values.length !== want.values.length) throw new Error(`${label}: y has ${got.values.length} values, in-process ${want.values.length}`);
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < want.values.length; i++) {
    diff = Math.max(diff, Math.abs(got.values[i] - want.values[i]));
    scale = Math.max(scale, Math.abs(want.values[i]));
  }
  const relative = diff / scale;
  // NaN (a NaN output, or all-zero y) fails too.
  if (!(scale > 0) || !(relative <= tolerance))
    throw new Error(`${label}: distributed y differs from in-process y: max|Δy| ${diff} is ${relative} of max|y| ${scale} (allowed ${tolerance})`);
  return relative;
}

function envInts(name: string): number[] | undefined {
  const raw = process.env[name]?.trim();
  if (!raw) return undefined;
  return raw.split(',').map((item) => {
    const n = Number(item.trim());
    if (!Number.isInteger(n) || n < 1) throw new RangeError(`${name}='${raw}': '${item}' is not a positive integer`);
    return n;
  });
}

export async function moeLayerSuite(quick: boolean): Promise<void> {
  const rows: BenchRow[] = [];
  const checks: Record<string, { maxRelativeDifference: number; calls: number; rowsPerExpert: number[] }> = {};
  const reps = quick ? 3 : 5;
  // SWITCHYARD_BENCH_EXPERTS=8 and SWITCHYARD_BENCH_TOKENS=2048 narrow a run.
  const expertCounts = envInts('SWITCHYARD_BENCH_EXPERTS') ?? [8, 64];
  const tokenCounts = envInts('SWITCHYARD_BENCH_TOKENS') ?? (quick ? [2048] : [256, 2048, 8192]);
  for (const experts of expertCounts) {
    const config = parseModelConfig({
      hidden_size: MOE_HIDDEN, intermediate_size: MOE_INTERMEDIATE, num_hidden_layers: 1, num_attention_heads: 16, num_key_value_heads: 4,
      num_local_experts: experts, num_experts_per_tok: MOE_K, vocab_size: BYTE_VOCAB_SIZE, max_position_embeddings: 64,
    });
    const model = MixtralModel.initialize(config, 3);
    try {
      await withLocalCluster('moe', model, 0, async (cluster) => {
        const owners = await placementOfCluster(cluster.coordinatorAddress);
        const remote = new GrpcExpertTransport((l, e) => [owners.get(expertKeyText({ layer: l, expert: e }))!], MOE_HIDDEN);
        try {
          const gate = model.dense.get<tf.Rank.R2>(denseNames.gate(0));
          const local = new MoeLayer(0, MOE_HIDDEN, experts, MOE_K, config.switchyard_gate, new InProcessTransport(model.localExperts!));
          const distributed = new MoeLayer(0, MOE_HIDDEN, experts, MOE_K, config.switchyard_gate, remote);
          const rng = new Rng(1);
          for (const tokens of tokenCounts) {
            const label = `E=${experts} ${tokens} tokens`;
            const h = tf.tensor2d(Float32Array.from({ length: tokens * MOE_HIDDEN }, () => rng.normal()), [tokens, MOE_HIDDEN]);
            // Every timed call keeps its output (dataSync copies it out of the heap anyway); the last one
            // of each side is compared, and every distributed call must have served all its rows.
            const last = new Map<MoeLayer, LayerResult>();
            let calls = 0;
            const run = (layer: MoeLayer) => async () => {
              const { y, stats } = await layer.forward(h, gate, { passId: 'bench', train: false, groupTokens: 0 });
              const values = y.dataSync() as Float32Array;
              y.dispose();
              last.set(layer, { values, stats });
              if (layer === distributed) checkServed(`${label}, distributed call ${++calls}`, stats);
            };
            let inProcess: number;
            let overGrpc: number;
            try {
              inProcess = tokens / (await timeMedian(reps, run(local)));
              overGrpc = tokens / (await timeMedian(reps, run(distributed)));
            } finally {
              h.dispose();
            }
            const relative = checkMoeRow(label, last.get(distributed)!, last.get(local)!);
            checks[label] = { maxRelativeDifference: relative, calls, rowsPerExpert: [...last.get(local)!.stats.countsAfterDrop] };
            process.stderr.write(`moe-layer: ${label}: one process ${inProcess.toFixed(0)} tokens/s, 2 shards ${overGrpc.toFixed(0)} tokens/s; ` +
              `checked: ${calls} distributed calls served every row, max|Δy|/max|y| ${relative.toExponential(2)}\n`);
            rows.push({ name: `${label}, one process`, value: inProcess, unit: 'tokens/s' });
            rows.push(speedupRow(`${label}, 2 shards`, overGrpc, 'tokens/s', inProcess, tokens === 2048 ? { min: 1.3 } : undefined));
            rows.push({ name: `${label}, 2 shards: max|Δy| / max|y| vs one process (checked <= 1e-5)`, value: relative, unit: 'rel' });
          }
        } finally {
          remote.close(); // its gRPC channels close before the cluster stops, also after an error
        }
      });
    } finally {
      model.dispose();
    }
  }
  await report('moe-layer', rows, {
    hidden: MOE_HIDDEN, intermediate: MOE_INTERMEDIATE, k: MOE_K, shards: 2, reps, quick, tolerance: MOE_TOLERANCE, checks,
    checked: 'every distributed call served every row (no degradedTokens); the last timed call of each side: same rows per expert, y within the tolerance of max|y|',
  });
}

export async function wireSuite(quick: boolean): Promise<void> {
  const rows: BenchRow[] = [];
  const exchange = packageDefinition()['switchyard.v1.ExpertService'] as unknown as Record<string, MethodDefinition<object, object>>;
  const { requestSerialize, requestDeserialize } = exchange.Exchange;
  const rng = new Rng(2);
  for (const rowCount of [1, 16, 64, 1024]) {
    const values = Float32Array.from({ length: rowCount * HIDDEN }, () => rng.normal());
    const bytes = requestSerialize({ messageId: '1', passId: 'step1/L0', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 0, expert: 3, rows: toWireTensor(values, [rowCount, HIDDEN]) }] });
    const ratio = bytes.length / values.byteLength;
    rows.push({ name: `bytes per row, ${rowCount} rows x ${HIDDEN} fp32`, value: bytes.length / rowCount, unit: 'bytes', anchor: HIDDEN * 4, ratio, ...(rowCount >= 64 ? { target: '<= 1.02', met: ratio <= 1.02 } : {}) });
  }
  const big = Float32Array.from({ length: 2048 * HIDDEN }, () => rng.normal());
  const reps = quick ? 5 : 20;
  const encoded = requestSerialize({ messageId: '1', passId: 'p', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 0, expert: 0, rows: toWireTensor(big, [2048, HIDDEN]) }] });
  const encodeSeconds = await timeMedian(reps, async () => {
    requestSerialize({ messageId: '1', passId: 'p', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 0, expert: 0, rows: toWireTensor(big, [2048, HIDDEN]) }] });
  });
  const decodeSeconds = await timeMedian(reps, async () => {
    const m = requestDeserialize(encoded) as { batches: Array<{ rows: Parameters<typeof fromWireTensor>[0] }> };
    fromWireTensor(m.batches[0].rows, 'rows');
  });
  rows.push({ name: 'encode 2048x512 fp32 message', value: big.byteLength / encodeSeconds / 1e6, unit: 'MB/s' });
  rows.push({ name: 'decode 2048x512 fp32 message', value: big.byteLength / decodeSeconds / 1e6, unit: 'MB/s' });
  // A grpc-js bidirectional stream against plain TCP, both echoing the same bytes to another process.
  const echo = await startEchoProcess();
  const client = new RawEchoClient(echo.grpc, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  try {
    const bytes = (quick ? 16 : 64) * 2 ** 20;
    const chunk = 2 ** 20;
    const grpcSeconds = await timeMedian(quick ? 3 : 5, () => grpcEcho(client, bytes, chunk));
    const tcpSeconds = await timeMedian(quick ? 3 : 5, () => tcpEcho(echo.tcp, bytes, chunk));
    const grpcRate = bytes / grpcSeconds / 1e6;
    const tcpRate = bytes / tcpSeconds / 1e6;
    rows.push({ name: 'raw TCP echo to a child process, 1 MiB writes', value: tcpRate, unit: 'MB/s' });
    rows.push({ name: 'grpc-js bidi stream echo, 1 MiB messages', value: grpcRate, unit: 'MB/s', anchor: tcpRate, ratio: grpcRate / tcpRate });
  } finally {
    client.close();
    echo.stop();
  }
  await report('wire', rows, { hidden: HIDDEN, quick });
}
