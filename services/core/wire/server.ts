// A Switchyard gRPC server: explicit message-size limits, grpc.health.v1 and reflection for every
// service it hosts, bound on host:port (0 = any free port).
import * as grpc from '@grpc/grpc-js';
import { widenServerWindows } from './flow-control.js';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation } from 'grpc-health-check';
import { channelOptions, packageDefinition } from './protos.js';
import { serverCredentials } from './credentials.js';

const MALFORMED = Symbol('malformed');

/** What a handler receives instead of a request whose bytes did not decode. */
export interface MalformedMessage { [MALFORMED]: string }

export function isMalformed(message: unknown): message is MalformedMessage {
  return typeof message === 'object' && message !== null && MALFORMED in message;
}

/** The status a malformed request is answered with (grpc-js would say INTERNAL). */
export function malformedStatus(message: MalformedMessage): Partial<grpc.StatusObject> {
  return { code: grpc.status.INVALID_ARGUMENT, details: `malformed request: ${message[MALFORMED]}` };
}

/**
 * The service definition with request decoding that cannot throw: undecodable bytes reach the handler
 * as a MalformedMessage, so it can answer INVALID_ARGUMENT and the server keeps serving.
 */
export function tolerant<D extends grpc.ServiceDefinition>(definition: D): D {
  const out: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const [name, method] of Object.entries(definition)) {
    out[name] = {
      ...method,
      requestDeserialize: (bytes: Buffer) => {
        try {
          return method.requestDeserialize(bytes);
        } catch (err) {
          return { [MALFORMED]: (err as Error).message } satisfies MalformedMessage;
        }
      },
    };
  }
  return out as unknown as D;
}

/** How long a stopping server lets open calls (streams included) finish before it cuts them. */
export const SHUTDOWN_GRACE_MS = 2_000;

export interface RunningGrpcServer {
  server: grpc.Server;
  port: number;
  health: HealthImplementation;
  /** Reports NOT_SERVING, stops accepting calls and lets open ones finish for up to `graceMs`, then cuts them. */
  shutdown(graceMs?: number): Promise<void>;
}

export interface GrpcServerOptions {
  /** Largest message received or sent (default MAX_MESSAGE_BYTES); a larger one fails its call with RESOURCE_EXHAUSTED. */
  maxMessageBytes?: number;
}

export async function startGrpcServer(
  host: string, port: number, serviceName: string, addServices: (server: grpc.Server) => void, options: GrpcServerOptions = {},
): Promise<RunningGrpcServer> {
  widenServerWindows();
  const server = new grpc.Server(channelOptions(options.maxMessageBytes));
  addServices(server);
  const health = new HealthImplementation({ '': 'SERVING', [serviceName]: 'SERVING' });
  health.addToServer(server);
  new ReflectionService(packageDefinition()).addToServer(server);
  const boundPort = await new Promise<number>((resolve, reject) =>
    server.bindAsync(`${host}:${port}`, serverCredentials(), (err, p) => (err ? reject(err) : resolve(p))));
  return {
    server,
    port: boundPort,
    health,
    shutdown: (graceMs = SHUTDOWN_GRACE_MS) => new Promise<void>((resolve) => {
      health.setStatus('', 'NOT_SERVING');
      health.setStatus(serviceName, 'NOT_SERVING');
      // Long-lived streams (Exchange, WatchPlacement) never end by themselves.
      const force = setTimeout(() => {
        server.forceShutdown();
        resolve();
      }, graceMs);
      server.tryShutdown(() => {
        clearTimeout(force);
        resolve();
      });
    }),
  };
}
