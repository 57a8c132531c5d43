// HTTP/2 flow-control windows for row traffic. With the protocol's default window (64 KiB per stream and
// per connection) a peer may send only 64 KiB before it hears back from the receiver. A router sends a
// micro-batch's rows and then computes the next micro-batch for tens of milliseconds, during which it
// cannot read the receiver's WINDOW_UPDATE frames, so everything past the first 64 KiB would wait for that
// compute and nothing would overlap. Windows of FLOW_CONTROL_WINDOW let a message of that size leave at
// once (a serving step's rows are far smaller; a bigger message overlaps its first 4 MiB).
import http2 from 'node:http2';

/**
 * Bytes a peer may send on a stream (and a connection) before it must hear back. Not larger: with
 * windows of 12 MiB and more on both ends, the coordinator's AllReduce streams stalled at their first
 * reduction under Node 20 (reproduced with 8 MiB reductions; 4 and 8 MiB windows never stalled).
 */
export const FLOW_CONTROL_WINDOW = 4 * 1024 * 1024;

let serversWidened = false;

/**
 * Makes every HTTP/2 server created from now on (grpc-js servers included) advertise FLOW_CONTROL_WINDOW
 * per stream and open its connection window as far. grpc-js has a client option for its receive window
 * (`grpc-node.flow_control_window`, set in channelOptions) but none for servers, and creates its servers
 * through this module's functions, so they are wrapped once here.
 */
export function widenServerWindows(): void {
  if (serversWidened) return;
  serversWidened = true;
  const widen = <S extends http2.Http2Server | http2.Http2SecureServer>(create: (options: http2.ServerOptions) => S) => (options: http2.ServerOptions = {}): S => {
    const server = create({ ...options, settings: { ...options.settings, initialWindowSize: FLOW_CONTROL_WINDOW } });
    // Only once the peers have exchanged settings: a connection window widened before that stalls the
    // session's first streams.
    server.on('session', (session: http2.ServerHttp2Session) => session.once('remoteSettings', () => session.setLocalWindowSize(FLOW_CONTROL_WINDOW)));
    return server;
  };
  const createServer = http2.createServer.bind(http2) as (options: http2.ServerOptions) => http2.Http2Server;
  const createSecureServer = http2.createSecureServer.bind(http2) as (options: http2.SecureServerOptions) => http2.Http2SecureServer;
  (http2 as { createServer: unknown }).createServer = widen(createServer);
  (http2 as { createSecureServer: unknown }).createSecureServer = widen(createSecureServer);
}
