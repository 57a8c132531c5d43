// The gRPC contracts loaded once, with exactly the options the generated types assume (proto/generate.mjs):
// camelCase fields, 64-bit integers and enums as strings, defaults filled in, bytes as Buffer.
import * as grpc from '@grpc/grpc-js';
import { FLOW_CONTROL_WINDOW } from './flow-control.js';
import * as protoLoader from '@grpc/proto-loader';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ProtoGrpcType as CoordinatorProtos } from '../../generated/coordinator.js';
import type { ProtoGrpcType as ExpertProtos } from '../../generated/expert.js';

export const LOADER_OPTIONS: protoLoader.Options = { keepCase: false, longs: String, enums: String, defaults: true, oneofs: true };

/** proto/ of this package, found from this module's location (source or dist). */
export function protoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'proto', 'switchyard', 'v1', 'tensor.proto'))) {
    const parent = dirname(dir);
    if (parent === dir) throw new Error('cannot find the proto/ folder of the switchyard package');
    dir = parent;
  }
  return join(dir, 'proto');
}

let definitions: protoLoader.PackageDefinition | undefined;

export function packageDefinition(): protoLoader.PackageDefinition {
  definitions ??= protoLoader.loadSync(['switchyard/v1/expert.proto', 'switchyard/v1/coordinator.proto'], {
    ...LOADER_OPTIONS, includeDirs: [protoRoot()],
  });
  return definitions;
}

export type SwitchyardProtos = ExpertProtos & CoordinatorProtos;

/** The typed grpc-js object for both services and their messages. */
export function loadProtos(): SwitchyardProtos {
  return grpc.loadPackageDefinition(packageDefinition()) as unknown as SwitchyardProtos;
}

/**
 * Largest message either end accepts unless configured (`--max-message-bytes`): a [8192, 4096] fp32 row
 * batch with room to spare. The router splits what it sends a shard into messages under its limit.
 */
export const MAX_MESSAGE_BYTES = 256 * 1024 * 1024;

/** Channel options every Switchyard client and server sets explicitly (DESIGN §6), for a message-size limit. */
export function channelOptions(maxMessageBytes = MAX_MESSAGE_BYTES): grpc.ChannelOptions {
  return {
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.max_send_message_length': maxMessageBytes,
    // Replies as large as the window come in without waiting for this side to read (flow-control.ts).
    'grpc-node.flow_control_window': FLOW_CONTROL_WINDOW,
    'grpc.keepalive_time_ms': 10_000,
    'grpc.keepalive_timeout_ms': 5_000,
  };
}

/** The channel options with the default message-size limit. */
export const CHANNEL_OPTIONS: grpc.ChannelOptions = channelOptions();
