// A Switchyard gRPC server: explicit message-size limits, grpc.health.v1 and reflection for every
// service it hosts, bound on host:port (0 = any free port).
import * as grpc from '@grpc/grpc-js';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation } from 'grpc-health-check';
import { CHANNEL_OPTIONS, packageDefinition } from './protos.js';

export interface RunningGrpcServer {
  server: grpc.Server;
  port: number;
  health: HealthImplementation;
  /** Reports NOT_SERVING, stops accepting calls and lets open ones finish. */
  shutdown(): Promise<void>;
}

export async function startGrpcServer(host: string, port: number, serviceName: string, addServices: (server: grpc.Server) => void): Promise<RunningGrpcServer> {
  const server = new grpc.Server(CHANNEL_OPTIONS);
  addServices(server);
  const health = new HealthImplementation({ '': 'SERVING', [serviceName]: 'SERVING' });
  health.addToServer(server);
  new ReflectionService(packageDefinition()).addToServer(server);
  const boundPort = await new Promise<number>((resolve, reject) =>
    server.bindAsync(`${host}:${port}`, grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  return {
    server,
    port: boundPort,
    health,
    shutdown: () => new Promise<void>((resolve) => {
      health.setStatus('', 'NOT_SERVING');
      health.setStatus(serviceName, 'NOT_SERVING');
      server.tryShutdown(() => resolve());
    }),
  };
}
