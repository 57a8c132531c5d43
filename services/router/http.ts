// The router's HTTP server: fastify with one plugin per route family, schema-validated bodies, JSON
// errors, request ids from x-request-id, and explicit body limits.
import Fastify, { type FastifyInstance } from 'fastify';
import { randomUUID } from 'node:crypto';
import { HttpError } from './errors.js';
import type { RouterEngine } from './engine.js';
import { oipRoutes } from './oip.js';
import { openaiRoutes } from './openai.js';

export const BODY_LIMIT_BYTES = 8 * 1024 * 1024;

/** `logLevel` turns on fastify's JSON request log (to stdout) at that level; request ids are x-request-id. */
export function buildHttpApp(engine: RouterEngine, logLevel?: string): FastifyInstance {
  const app = Fastify({
    bodyLimit: BODY_LIMIT_BYTES,
    requestIdHeader: 'x-request-id',
    genReqId: () => randomUUID(),
    logger: logLevel ? { level: logLevel } : false,
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
