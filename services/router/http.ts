// The router's HTTP server: fastify with one plugin per route family, schema-validated bodies, JSON
// errors (shaped by path: errorBody), request ids from x-request-id, and explicit body limits.
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import underPressure from '@fastify/under-pressure';
import { randomUUID } from 'node:crypto';
import { bearerMatches } from '../core/auth.js';
import { OverloadError } from '../core/overload.js';
import { SamplingError } from '../core/sampling.js';
import { ChatTemplateError } from '../core/tokenizer/index.js';
import { metricsText } from '../core/metrics/registry.js';
import { servingMetricGroup, servingMetrics } from '../core/metrics/serving.js';
import { HttpError } from './errors.js';
import type { RouterEngine } from './engine.js';
import { oipRoutes } from './oip.js';
import { openaiRoutes } from './openai.js';
import { openaiChatRoutes } from './openai-chat.js';
import { tokenizeRoutes } from './tokenize.js';
import { dashboardRoutes } from './dashboard.js';

export const BODY_LIMIT_BYTES = 8 * 1024 * 1024;
/** Oversized bodies up to this size are read and discarded so the client gets its 413 (larger: connection closed). */
const DRAIN_LIMIT_BYTES = 64 * 1024 * 1024;

const tooLarge = (length: number) => `request body of ${length} bytes is over the limit of ${BODY_LIMIT_BYTES} bytes`;

/** Open Inference Protocol paths (`/v2`, `/v2/...`): their errors have the protocol's body. */
const OIP_PATH = /^\/v2(\/|\?|$)/;

/**
 * The one place an error's body is decided, by the request's path: the Open Inference Protocol's
 * `{"error": "<message>"}` on /v2 paths, OpenAI's `{"error": {"message", "type", ...extra}}` elsewhere.
 */
export function errorBody(url: string, message: string, type: string, extra: Record<string, unknown> = {}): object {
  return OIP_PATH.test(url) ? { error: message } : { error: { message, type, ...extra } };
}

/** Sends an error answer with the body its path calls for. */
function sendError(req: FastifyRequest, reply: FastifyReply, status: number, message: string, type: string, extra?: Record<string, unknown>): FastifyReply {
  return reply.code(status).send(errorBody(req.url, message, type, extra));
}

export interface HttpOptions {
  /** fastify's JSON request log (to stdout) at this level; request ids are x-request-id. */
  logLevel?: string;
  /** Clients must send `Authorization: Bearer <token>` (health and /metrics stay open for probes and scrapers). */
  apiToken?: string;
  /** Deadline of a request without an `x-request-timeout-ms` header. */
  requestTimeoutMs?: number;
  /** Above these the router answers 503 before doing any work (@fastify/under-pressure). */
  maxEventLoopDelayMs?: number;
  maxHeapUsedBytes?: number;
  maxRssBytes?: number;
}

export const DEADLINE_HEADER = 'x-request-timeout-ms';
/** Longest deadline a client may ask for. */
const MAX_TIMEOUT_MS = 10 * 60_000;

declare module 'fastify' {
  interface FastifyRequest {
    /** Epoch ms by which the answer must be sent (from x-request-timeout-ms or the default). */
    deadline: number;
  }
}

// Probes, scrapes and the live dashboard (a browser page and EventSource cannot send a bearer token;
// it shows the same aggregate load /metrics does).
const OPEN_PATHS = /^\/(v2\/health\/|metrics$|dashboard(\/data|\/events)?$)/;

export function buildHttpApp(engine: RouterEngine, o: HttpOptions = {}): FastifyInstance {
  servingMetricGroup.register(); // the engine did already; an app over a stand-in engine needs them too
  const logLevel = o.logLevel;
  const app = Fastify({
    bodyLimit: BODY_LIMIT_BYTES,
    requestIdHeader: 'x-request-id',
    genReqId: () => randomUUID(),
    logger: logLevel ? { level: logLevel } : false,
    // A number where a string belongs (or null for a number) is a client error, not something to guess at.
    // Unknown fields are refused by name (additionalProperties: false), never silently dropped.
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false } },
    schemaErrorFormatter: (errors, dataVar) => {
      const e = errors[0];
      const path = e.instancePath.slice(1).replaceAll('/', '.');
      if (e.keyword === 'additionalProperties') {
        const field = `${path ? `${path}.` : ''}${String((e.params as { additionalProperty?: unknown }).additionalProperty)}`;
        return new Error(`unknown field '${field}' in the request ${dataVar}`);
      }
      return new Error(`${dataVar}${e.instancePath} ${e.message ?? 'is invalid'}`);
    },
  });
  // First hook, so refusals by the hooks after it (413, 401, a bad deadline) are counted too. Counted when
  // the response closes: that also covers streamed (hijacked) answers and aborted ones. The dashboard's
  // event stream lasts as long as the page is open: neither in flight nor a latency.
  app.addHook('onRequest', (req, reply, done) => {
    const route = req.routeOptions.url ?? 'unmatched';
    const stream = route === '/dashboard/events';
    if (!stream) servingMetrics.inFlight.inc();
    const started = performance.now();
    reply.raw.once('close', () => {
      servingMetrics.requests.inc({ route, status: String(reply.raw.statusCode) });
      if (stream) return;
      servingMetrics.inFlight.dec();
      servingMetrics.latency.observe({ route }, (performance.now() - started) / 1000);
    });
    done();
  });
  // A server that answers 413 while the client is still uploading and then closes makes the client's
  // write fail before it reads the answer; draining the (bounded) rest of the body avoids that.
  app.addHook('onRequest', (req, reply, done) => {
    const length = Number(req.headers['content-length'] ?? 0);
    if (!(length > BODY_LIMIT_BYTES)) return done();
    if (length > DRAIN_LIMIT_BYTES) {
      void sendError(req, reply.header('connection', 'close'), 413, tooLarge(length), 'request_too_large');
      return;
    }
    req.raw.on('end', () => void sendError(req, reply, 413, tooLarge(length), 'request_too_large'));
    req.raw.resume();
  });
  // Once closing, answers end their keep-alive connection: close() closes only connections idle when it
  // starts, and one busy then would otherwise hold the router open for the keep-alive timeout (72 s).
  let closing = false;
  app.addHook('preClose', (done) => {
    closing = true;
    done();
  });
  app.addHook('onSend', async (req, reply) => {
    reply.header('x-request-id', req.id);
    if (closing) reply.header('connection', 'close');
  });
  app.decorateRequest('deadline', 0);
  app.addHook('onRequest', async (req: FastifyRequest, reply) => {
    if (o.apiToken && !OPEN_PATHS.test(req.url.split('?')[0]) && !bearerMatches(req.headers.authorization, o.apiToken)) {
      servingMetrics.rejections.inc({ reason: 'unauthorized' });
      return sendError(req, reply.header('www-authenticate', 'Bearer'), 401, 'missing or wrong bearer token (Authorization: Bearer <token>)', 'authentication_error');
    }
    const raw = req.headers[DEADLINE_HEADER];
    let timeout = o.requestTimeoutMs ?? 30_000;
    if (raw !== undefined) {
      const n = Number(raw);
      if (!(Number.isFinite(n) && n > 0 && n <= MAX_TIMEOUT_MS))
        return sendError(req, reply, 400, `${DEADLINE_HEADER} must be a number of milliseconds in (0, ${MAX_TIMEOUT_MS}], got '${String(raw)}'`, 'invalid_request_error');
      timeout = n;
    }
    req.deadline = Date.now() + timeout;
  });
  void app.register(underPressure, {
    maxEventLoopDelay: o.maxEventLoopDelayMs ?? 2_000,
    maxHeapUsedBytes: o.maxHeapUsedBytes ?? 1_500 * 2 ** 20,
    maxRssBytes: o.maxRssBytes ?? 3 * 2 ** 30,
    retryAfter: 1,
    pressureHandler: (req, reply, type, value) => {
      // Probes and scrapes must keep working: they are how an operator sees the pressure.
      if (OPEN_PATHS.test(req.url.split('?')[0])) return;
      servingMetrics.rejections.inc({ reason: `pressure_${type}` });
      void sendError(req, reply.header('retry-after', '1'), 503, `the router is under pressure (${type} ${Math.round(value ?? 0)})`, 'overloaded');
    },
  });
  app.get('/metrics', async (_req, reply) => {
    const { contentType, body } = await metricsText();
    return reply.header('content-type', contentType).send(body);
  });
  app.setErrorHandler((err: Error & { statusCode?: number; validation?: unknown; code?: string }, req, reply) => {
    if (err instanceof OverloadError) {
      servingMetrics.rejections.inc({ reason: err.reason });
      return sendError(req, reply.header('retry-after', String(err.retryAfterSeconds)), 503, err.message, 'overloaded', { reason: err.reason });
    }
    const status = err instanceof HttpError ? err.statusCode : err.validation || err instanceof SamplingError || err instanceof ChatTemplateError ? 400 : err.statusCode && err.statusCode < 500 ? err.statusCode : 500;
    const type = err instanceof HttpError ? err.type : status === 413 ? 'request_too_large' : status < 500 ? 'invalid_request_error' : 'server_error';
    const message = status === 500 ? `internal error: ${err.message}` : err.message;
    return sendError(req, reply, status, message, type, err instanceof HttpError && err.param ? { param: err.param } : {});
  });
  app.setNotFoundHandler((req, reply) => sendError(req, reply, 404, `no route ${req.method} ${req.url}`, 'not_found_error'));
  oipRoutes(app, engine);
  openaiRoutes(app, engine);
  openaiChatRoutes(app, engine);
  tokenizeRoutes(app, engine);
  dashboardRoutes(app, engine);
  return app;
}
