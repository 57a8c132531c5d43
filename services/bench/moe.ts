// moe-layer suite: one MoE block distributed over two expert-shard processes on loopback versus the same
// block in one process (target ≥ 0.7x at 2048 tokens); wire suite: bytes per dispatched row versus raw,
// and the tensor codec's speed.
import * as tf from '@tensorflow/tfjs-core';
import type { MethodDefinition } from '@grpc/proto-loader';
import { parseModelConfig, BYTE_VOCAB_SIZE } from '../core/config.js';
import { Rng } from '../core/data/random.js';
import { MixtralModel } from '../core/model/model.js';
import { InProcessTransport } from '../core/model/experts.js';
import { MoeLayer } from '../core/model/moe.js';
import { GrpcExpertTransport } from '../core/wire/grpc-transport.js';
import { CoordinatorLink } from '../core/wire/coordinator-link.js';
import { expertKeyText } from '../core/placement.js';
import { fromWireTensor, toWireTensor } from '../core/wire/tensor.js';
import * as grpc from '@grpc/grpc-js';
import { CHANNEL_OPTIONS, packageDefinition } from '../core/wire/protos.js';
import { grpcEcho, RawEchoClient, startEchoProcess, tcpEcho } from './echo-server.js';
import { report, timeMedian, type BenchRow } from './report.js';
import { denseNames } from '../core/model/hf.js';
import { withLocalCluster } from './local-cluster.js';

const HIDDEN = 512;
const INTERMEDIATE = 1024;

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

export async function moeLayerSuite(quick: boolean): Promise<void> {
  const rows: BenchRow[] = [];
  const reps = quick ? 3 : 5;
  const expertCounts = quick ? [8] : [8, 64];
  const tokenCounts = quick ? [2048] : [256, 2048, 8192];
  for (const experts of expertCounts) {
    const config = parseModelConfig({
      hidden_size: HIDDEN, intermediate_size: INTERMEDIATE, num_hidden_layers: 1, num_attention_heads: 8, num_key_value_heads: 8,
      num_local_experts: experts, num_experts_per_tok: 2, vocab_size: BYTE_VOCAB_SIZE, max_position_embeddings: 64,
    });
    const model = MixtralModel.initialize(config, 3);
    try {
      await withLocalCluster('moe', model, 0, async (cluster) => {
        const owners = await placementOfCluster(cluster.coordinatorAddress);
        const remote = new GrpcExpertTransport((l, e) => [owners.get(expertKeyText({ layer: l, expert: e }))!], HIDDEN);
        try {
          const gate = model.dense.get<tf.Rank.R2>(denseNames.gate(0));
          const local = new MoeLayer(0, HIDDEN, experts, 2, config.switchyard_gate, new InProcessTransport(model.localExperts!));
          const distributed = new MoeLayer(0, HIDDEN, experts, 2, config.switchyard_gate, remote);
          const rng = new Rng(1);
          for (const tokens of tokenCounts) {
            const h = tf.tensor2d(Float32Array.from({ length: tokens * HIDDEN }, () => rng.normal()), [tokens, HIDDEN]);
            const run = (layer: MoeLayer) => async () => {
              const { y } = await layer.forward(h, gate, { passId: 'bench', train: false, groupTokens: 0 });
              y.dataSync();
              y.dispose();
            };
            let inProcess: number;
            let overGrpc: number;
            try {
              inProcess = tokens / (await timeMedian(reps, run(local)));
              overGrpc = tokens / (await timeMedian(reps, run(distributed)));
            } finally {
              h.dispose();
            }
            const ratio = overGrpc / inProcess;
            rows.push({ name: `E=${experts} ${tokens} tokens, one process`, value: inProcess, unit: 'tokens/s' });
            rows.push({
              name: `E=${experts} ${tokens} tokens, 2 shards`, value: overGrpc, unit: 'tokens/s', anchor: inProcess, ratio,
              ...(tokens === 2048 ? { target: '>= 0.7', met: ratio >= 0.7 } : {}),
            });
          }
        } finally {
          remote.close(); // its gRPC channels close before the cluster stops, also after an error
        }
      });
    } finally {
      model.dispose();
    }
  }
  await report('moe-layer', rows, { hidden: HIDDEN, intermediate: INTERMEDIATE, k: 2, shards: 2, reps, quick });
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
