// `switchyard serve expert`: a gRPC server around one ExpertShard, with grpc.health.v1 and reflection.
import * as grpc from '@grpc/grpc-js';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation } from 'grpc-health-check';
import type { ExpertSet } from '../core/model/experts.js';
import { CHANNEL_OPTIONS, loadProtos, packageDefinition } from '../core/wire/protos.js';
import type { ExpertReply } from '../generated/switchyard/v1/ExpertReply.js';
import type { ExpertRequest__Output } from '../generated/switchyard/v1/ExpertRequest.js';
import { ExpertShard } from './shard.js';

export const EXPERT_SERVICE_NAME = 'switchyard.v1.ExpertService';

export interface RunningExpertServer {
  port: number;
  shard: ExpertShard;
  health: HealthImplementation;
  /** Stops accepting calls and lets open streams finish. */
  close(): Promise<void>;
}

export async function startExpertServer(experts: ExpertSet, host: string, port: number): Promise<RunningExpertServer> {
  const shard = new ExpertShard(experts);
  const server = new grpc.Server(CHANNEL_OPTIONS);
  const protos = loadProtos();
  server.addService(protos.switchyard.v1.ExpertService.service, {
    Exchange(call: grpc.ServerDuplexStream<ExpertRequest__Output, ExpertReply>) {
      call.on('data', (request: ExpertRequest__Output) => {
        // Compute is synchronous; grpc-js buffers replies while the client reads slowly.
        call.write(shard.handle(request));
      });
      call.on('end', () => call.end());
      call.on('error', () => undefined);
    },
  });
  const health = new HealthImplementation({ '': 'SERVING', [EXPERT_SERVICE_NAME]: 'SERVING' });
  health.addToServer(server);
  new ReflectionService(packageDefinition()).addToServer(server);
  const boundPort = await new Promise<number>((resolve, reject) =>
    server.bindAsync(`${host}:${port}`, grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  return {
    port: boundPort,
    shard,
    health,
    close: () => new Promise<void>((resolve) => {
      health.setStatus('', 'NOT_SERVING');
      server.tryShutdown(() => resolve());
    }),
  };
}
