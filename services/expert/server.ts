// `switchyard serve expert`: a gRPC server around one ExpertShard.
import * as grpc from '@grpc/grpc-js';
import type { ExpertSet } from '../core/model/experts.js';
import { loadProtos } from '../core/wire/protos.js';
import { isMalformed, malformedStatus, startGrpcServer, tolerant, type GrpcServerOptions, type MalformedMessage } from '../core/wire/server.js';
import type { ExpertReply } from '../generated/switchyard/v1/ExpertReply.js';
import type { ExpertRequest__Output } from '../generated/switchyard/v1/ExpertRequest.js';
import { ExpertShard, RouterStream, type ShardLimits } from './shard.js';

export const EXPERT_SERVICE_NAME = 'switchyard.v1.ExpertService';

export interface RunningExpertServer {
  port: number;
  shard: ExpertShard;
  /** Stops accepting calls and lets open streams finish. */
  close(): Promise<void>;
}

/** Per-message records go to stderr as JSON lines when SWITCHYARD_LOG=debug. */
const debugLog = process.env.SWITCHYARD_LOG === 'debug'
  ? (record: Record<string, unknown>) => process.stderr.write(JSON.stringify({ time: Date.now(), service: 'expert', ...record }) + '\n')
  : undefined;

/** The server's message-size limit and what its shard accepts (credits per router, queue bounds). */
export interface ExpertServerOptions extends GrpcServerOptions, ShardLimits {}

/** `maxMessageBytes`: the largest row message accepted (and reply sent); routers must send no larger ones. */
export async function startExpertServer(experts: ExpertSet, host: string, port: number, options: ExpertServerOptions = {}): Promise<RunningExpertServer> {
  const shard = new ExpertShard(experts, debugLog, options);
  const protos = loadProtos();
  const running = await startGrpcServer(host, port, EXPERT_SERVICE_NAME, (server) => server.addService(tolerant(protos.switchyard.v1.ExpertService.service), {
    Exchange(call: grpc.ServerDuplexStream<ExpertRequest__Output | MalformedMessage, ExpertReply>) {
      // Requests queue at the shard (its queue depth is the autoscaling signal); grpc-js buffers replies while the client reads slowly.
      // Requests are computed later (the queue): the stream ends only after the last one is answered.
      // One stream is one router: its credits at this shard are counted per stream.
      const router = new RouterStream();
      let outstanding = 0;
      let ending = false;
      const gone = () => call.writableEnded || call.destroyed || call.cancelled;
      call.on('data', (request: ExpertRequest__Output | MalformedMessage) => {
        // Undecodable bytes leave no message id to answer: the stream ends with INVALID_ARGUMENT.
        if (isMalformed(request)) return void call.emit('error', malformedStatus(request));
        outstanding++;
        shard.enqueue(request, (reply) => {
          outstanding--;
          // Not awaited (no 'drain' wait): the shard's compute turns never wait for a reply to be written.
          if (!gone()) call.write(reply);
          if (ending && outstanding === 0 && !gone()) call.end();
        }, gone, router);
      });
      call.on('end', () => {
        ending = true;
        if (outstanding === 0) call.end();
      });
      call.on('error', () => undefined);
    },
  }), options);
  return { port: running.port, shard, close: running.shutdown };
}
