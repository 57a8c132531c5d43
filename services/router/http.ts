// The router's HTTP server: fastify with one plugin per route family, schema-validated bodies, JSON
// errors, request ids from x-request-id, and explicit body limits.
import Fastify, { type FastifyInstance } from 'fastify';
import { randomUUID } from 'node:crypto';
import { HttpError } from './errors.js';
import type { RouterEngine } from './engine.js';
import { oipRoutes } from './oip.js';
import { openaiRoutes } from './openai.js';

export const BODY_LIMIT_BYTES = 8 * 1024 * 1024;
/** Oversized bodies up to this size are read and discarded so the client gets its 413 (larger: connection closed). */
const DRAIN_LIMIT_BYTES = 64 * 1024 * 1024;

const tooLarge = (length: number) => ({ error: { message: `request body of ${length} bytes is over the limit of ${BODY_LIMIT_BYTES} bytes`, type: 'request_too_large' } });

/** `logLevel` turns on fastify's JSON request log (to stdout) at that level; request ids are x-request-id. */
export function buildHttpApp(engine: RouterEngine, logLevel?: string): FastifyInstance {
  const app = Fastify({
    bodyLimit: BODY_LIMIT_BYTES,
    requestIdHeader: 'x-request-id',
    genReqId: () => randomUUID(),
    logger: logLevel ? { level: logLevel } : false,
  });
  // A server that answers 413 while the client is still uploading and then closes makes the client's
  // write fail before it reads the answer; draining the (bounded) rest of the body avoids that.
  app.addHook('onRequest', (req, reply, done) => {
    const length = Number(req.headers['content-length'] ?? 0);
    if (!(length > BODY_LIMIT_BYTES)) return done();
    if (length > DRAIN_LIMIT_BYTES) {
      void reply.code(413).header('connection', 'close').send(tooLarge(length));
      return;
    }
    req.raw.on('end', () => void reply.code(413).send(tooLarge(length)));
    req.raw.resume();
  });
  app.addHook('onSend', async (req, reply) => {
    reply.header('x-request-id', req.id);
  });
  app.setErrorHandler((err: Error & { statusCode?: number; validation?: unknown; code?: string }, _req, reply) => {
    const status = err instanceof HttpError ? err.statusCode : err.validation ? 400 : err.statusCode && err.statusCode < 500 ? err.statusCode : 500;
    const type = err instanceof HttpError ? err.type : status === 413 ? 'request_too_large' : status < 500 ? 'invalid_request_error' : 'server_error';
    const message = status === 500 ? `internal error: ${err.message}` : err.message;
    if (status === 503) reply.header('retry-after', '1');
    return reply.code(status).send({ error: { message, type } });
  });
  app.setNotFoundHandler((req, reply) => reply.code(404).send({ error: { message: `no route ${req.method} ${req.url}`, type: 'not_found_error' } }));
  oipRoutes(app, engine);
  openaiRoutes(app, engine);
  return app;
}
