// allreduce suite: two members sum a gradient vector through a real coordinator process (the training
// all-reduce), against the ceiling of the same bytes echoed over a raw grpc-js bidirectional stream to
// a process of the same kind, both with the same chunk size and both members at once. Target ≥ 0.5x.
import * as grpc from '@grpc/grpc-js';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Supervisor } from '../cli/supervisor.js';
import { CHANNEL_OPTIONS } from '../core/wire/protos.js';
import { TrainLink } from '../core/wire/train-link.js';
import { grpcEcho, RawEchoClient, startEchoProcess } from './echo-server.js';
import { median, report, type BenchRow } from './report.js';

export async function allreduceSuite(quick: boolean): Promise<void> {
  // Supervised, so the coordinator exits with the bench even when the bench is killed.
  const logDir = await mkdtemp(join(tmpdir(), 'switchyard-bench-allreduce-'));
  const supervisor = new Supervisor(logDir, (line) => process.stderr.write(line + '\n'));
  const coordinator = supervisor.start({ name: 'coordinator', args: ['serve', 'coordinator', '--port', '0'], ready: /listening on (\S+)/, restart: false });
  const echoServer = startEchoProcess();
  const rows: BenchRow[] = [];
  const links: TrainLink[] = [];
  const echoClients: grpc.Client[] = [];
  try {
    const [[, coordinatorAddress], echo] = await Promise.all([coordinator, echoServer]);
    const echoAddress = echo.grpc;
    links.push(new TrainLink(coordinatorAddress, 'bench-a'), new TrainLink(coordinatorAddress, 'bench-b'));
    echoClients.push(new RawEchoClient(echoAddress, grpc.credentials.createInsecure(), CHANNEL_OPTIONS), new RawEchoClient(echoAddress, grpc.credentials.createInsecure(), CHANNEL_OPTIONS));
    const payloadFloats = (quick ? 2 : 8) * 1024 * 1024; // 8 or 32 MiB per member
    const bytes = payloadFloats * 4;
    const values = [Float32Array.from({ length: payloadFloats }, (_, i) => i % 97), Float32Array.from({ length: payloadFloats }, (_, i) => i % 89)];
    const reps = quick ? 3 : 5;
    let round = 0;
    for (const chunkKiB of quick ? [256, 1024] : [64, 256, 1024, 4096]) {
      const chunkFloats = (chunkKiB * 1024) / 4;
      const reduceSeconds: number[] = [];
      const echoSeconds: number[] = [];
      for (let r = 0; r <= reps; r++) {
        const name = `bench/${round++}`;
        let t0 = performance.now();
        const sums = await Promise.all(links.map((l, i) => l.allReduce([{ name, contributors: 2, values: values[i] }], chunkFloats)));
        const reduce = (performance.now() - t0) / 1000;
        if (sums[0].sums[0][96] !== 96 + (96 % 89)) throw new Error('all-reduce returned a wrong sum');
        t0 = performance.now();
        await Promise.all(echoClients.map((c) => grpcEcho(c, bytes, chunkKiB * 1024)));
        const raw = (performance.now() - t0) / 1000;
        if (r > 0) { // the first round warms up both paths
          reduceSeconds.push(reduce);
          echoSeconds.push(raw);
        }
      }
      const reduceRate = bytes / median(reduceSeconds) / 1e6;
      const echoRate = bytes / median(echoSeconds) / 1e6;
      rows.push({
        name: `all-reduce ${bytes / 2 ** 20} MiB × 2 members, ${chunkKiB} KiB buckets`, value: reduceRate, unit: 'MB/s per member',
        anchor: echoRate, ratio: reduceRate / echoRate, target: '>= 0.5', met: reduceRate / echoRate >= 0.5,
      });
    }
    await report('allreduce', rows, {
      quick, members: 2, anchor: 'the same bytes echoed over a raw grpc-js bidi stream (no protobuf) to a child process, both members at once',
    });
  } finally {
    for (const l of links) l.close();
    for (const c of echoClients) c.close();
    void echoServer.then((e) => e.stop(), () => undefined);
    await supervisor.stop();
    await rm(logDir, { recursive: true, force: true });
  }
}
