// The bench's ceilings for streams, run in a child process like a real peer: a gRPC bidirectional stream
// that echoes opaque bytes (no protobuf, no arithmetic) and a plain TCP echo. The allreduce suite
// compares the all-reduce with the first; the wire suite compares the first with the second.
import * as grpc from '@grpc/grpc-js';
import { fork } from 'node:child_process';
import { createConnection, createServer } from 'node:net';
import { createInterface } from 'node:readline';
import type { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { CHANNEL_OPTIONS } from '../core/wire/protos.js';
import { writableAgain } from '../core/wire/backpressure.js';

const identity = (b: Buffer): Buffer => b;

export const RAW_ECHO_SERVICE: grpc.ServiceDefinition = {
  Echo: {
    path: '/switchyard.bench.RawEcho/Echo', requestStream: true, responseStream: true,
    requestSerialize: identity, requestDeserialize: identity, responseSerialize: identity, responseDeserialize: identity,
  },
};

export const RawEchoClient = grpc.makeGenericClientConstructor(RAW_ECHO_SERVICE, 'RawEcho');

/** Starts the echo process; resolves with both addresses. */
export function startEchoProcess(): Promise<{ grpc: string; tcp: string; stop: () => void }> {
  const child = fork(fileURLToPath(import.meta.url), [], { stdio: ['ignore', 'pipe', 'inherit', 'ipc'] });
  return new Promise((resolve, reject) => {
    const found: Record<string, string> = {};
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const m = line.match(/^(grpc|tcp) echo listening on (\S+)/);
      if (m) found[m[1]] = m[2];
      if (found.grpc && found.tcp) resolve({ grpc: found.grpc, tcp: found.tcp, stop: () => child.kill('SIGTERM') });
    });
    child.once('exit', (code) => reject(new Error(`echo process exited (code ${code})`)));
  });
}

/** Writes `chunks` copies of `payload`, waiting for 'drain' when asked; stops once the stream errors or closes. */
function writeChunks(stream: Writable, payload: Buffer, chunks: number): void {
  let stopped = false;
  const stop = () => { stopped = true; };
  stream.once('error', stop);
  stream.once('close', stop);
  void (async () => {
    for (let c = 0; c < chunks && !stopped; c++) {
      if (!stream.write(payload)) await writableAgain(stream);
    }
  })();
}

/** Echoes `bytes` over a raw gRPC stream in `chunkBytes` pieces, pipelined; resolves when all came back. */
export function grpcEcho(client: grpc.Client, bytes: number, chunkBytes: number): Promise<void> {
  const call = (client as unknown as { Echo(): grpc.ClientDuplexStream<Buffer, Buffer> }).Echo();
  const chunks = Math.ceil(bytes / chunkBytes);
  return new Promise((resolve, reject) => {
    let received = 0;
    call.on('data', () => {
      if (++received === chunks) {
        call.end();
        resolve();
      }
    });
    call.on('error', reject);
    call.on('end', () => reject(new Error(`echo stream ended after ${received} of ${chunks} chunks`))); // a no-op once resolved
    writeChunks(call, Buffer.alloc(chunkBytes, 7), chunks);
  });
}

/** The same over a plain TCP connection. */
export function tcpEcho(address: string, bytes: number, chunkBytes: number): Promise<void> {
  const [host, port] = [address.slice(0, address.lastIndexOf(':')), Number(address.slice(address.lastIndexOf(':') + 1))];
  const chunks = Math.ceil(bytes / chunkBytes);
  return new Promise((resolve, reject) => {
    const socket = createConnection({ host, port }, () => writeChunks(socket, Buffer.alloc(chunkBytes, 7), chunks));
    let received = 0;
    socket.on('data', (d: Buffer) => {
      received += d.length;
      if (received >= chunks * chunkBytes) {
        socket.end();
        resolve();
      }
    });
    socket.on('error', reject);
    socket.on('close', () => reject(new Error(`echo connection closed after ${received} of ${chunks * chunkBytes} bytes`))); // a no-op once resolved
  });
}

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
    process.stdout.write(`grpc echo listening on 127.0.0.1:${port}\n`);
  });
  const tcp = createServer((socket) => socket.pipe(socket));
  tcp.listen(0, '127.0.0.1', () => process.stdout.write(`tcp echo listening on 127.0.0.1:${(tcp.address() as { port: number }).port}\n`));
  process.on('disconnect', () => process.exit(0));
}
