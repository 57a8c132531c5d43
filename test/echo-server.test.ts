import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as grpc from '@grpc/grpc-js';
import { createServer } from 'node:net';
import { grpcEcho, RAW_ECHO_SERVICE, RawEchoClient, tcpEcho } from '../services/bench/echo-server.js';

// A peer that hangs up early must fail the measurement, not leave it waiting forever.

test('grpcEcho rejects when the echo stream ends before every chunk came back', { timeout: 20_000 }, async () => {
  const server = new grpc.Server();
  server.addService(RAW_ECHO_SERVICE, {
    Echo(call: grpc.ServerDuplexStream<Buffer, Buffer>) {
      call.once('data', (b: Buffer) => { call.write(b); call.end(); }); // one chunk back, then done
    },
  });
  const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  const client = new RawEchoClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  try {
    await assert.rejects(grpcEcho(client, 8 * 1024, 1024), /echo stream ended after 1 of 8 chunks/);
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test('tcpEcho rejects when the peer closes before every byte came back', { timeout: 20_000 }, async () => {
  const server = createServer((socket) => socket.once('data', (d) => socket.end(d.subarray(0, 10))));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    await assert.rejects(tcpEcho(`127.0.0.1:${(server.address() as { port: number }).port}`, 64 * 1024 * 1024, 1024 * 1024), /closed after 10 of \d+ bytes|ECONNRESET|EPIPE/);
  } finally {
    server.close();
  }
});
