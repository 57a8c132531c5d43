// The bench's ceiling for streams: a gRPC bidirectional stream that echoes opaque bytes (no protobuf,
// no arithmetic), in its own process like the coordinator. Run as a child by the allreduce suite.
import * as grpc from '@grpc/grpc-js';
import { CHANNEL_OPTIONS } from '../core/wire/protos.js';

const identity = (b: Buffer): Buffer => b;

export const RAW_ECHO_SERVICE: grpc.ServiceDefinition = {
  Echo: {
    path: '/switchyard.bench.RawEcho/Echo', requestStream: true, responseStream: true,
    requestSerialize: identity, requestDeserialize: identity, responseSerialize: identity, responseDeserialize: identity,
  },
};

export const RawEchoClient = grpc.makeGenericClientConstructor(RAW_ECHO_SERVICE, 'RawEcho');

if (process.argv[1] && import.meta.url.endsWith(process.argv[1].split('/').pop()!)) {
  const server = new grpc.Server(CHANNEL_OPTIONS);
  server.addService(RAW_ECHO_SERVICE, {
    Echo(call: grpc.ServerDuplexStream<Buffer, Buffer>) {
      call.on('data', (b: Buffer) => call.write(b));
      call.on('end', () => call.end());
    },
  });
  server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, port) => {
    if (err) throw err;
    process.stdout.write(`echo listening on 127.0.0.1:${port}\n`);
  });
  process.on('disconnect', () => process.exit(0));
}
