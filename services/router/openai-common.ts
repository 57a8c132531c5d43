// What the generating endpoints share (OpenAI's, and Open Inference generate's client and stop handling):
// server-sent events, the client going away, usage,
// degraded answers, stop strings and the model check.
import type { FastifyReply } from 'fastify';
import { HttpError } from './errors.js';
import { OverloadError } from '../core/overload.js';
import { servingMetrics } from '../core/metrics/serving.js';
import type { RouterEngine } from './engine.js';
import type { Generation } from './scheduler.js';


/** Server-sent events of one streamed answer; nothing is written once the client has gone. */
export class EventStream {
  closed = false;

  constructor(private readonly reply: FastifyReply, requestId: string) {
    reply.hijack();
    reply.raw.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-request-id': requestId });
    reply.raw.on('close', () => { this.closed = true; });
  }

  send(event: unknown): void {
    if (!this.closed) this.reply.raw.write(`data: ${JSON.stringify(event)}\n\n`);
  }

  end(): void {
    if (!this.closed) this.reply.raw.end('data: [DONE]\n\n');
  }

  /** The last events of an answer: a degraded notice, the usage chunk when asked for (`choices: []`), then [DONE]. */
  finish(head: object, degraded: { degraded?: unknown }, usage?: object): void {
    if (degraded.degraded) this.send({ ...head, choices: [], ...degraded });
    if (usage) this.send({ ...head, choices: [], usage });
    this.end();
  }

  /** A failure after the headers went out: a final error event (OpenAI's error object), then the end. */
  fail(err: unknown): void {
    const overloaded = err instanceof OverloadError;
    if (overloaded) servingMetrics.rejections.inc({ reason: err.reason });
    const status = err instanceof HttpError ? err.statusCode : 500;
    const type = overloaded ? 'overloaded' : err instanceof HttpError ? err.type : status < 500 ? 'invalid_request_error' : 'server_error';
    this.send({ error: { message: (err as Error).message, type, ...(overloaded ? { reason: err.reason } : {}) } });
    this.end();
  }
}

/** Ends the generations when the response closes before we end it: the client went away. */
export function clientGone(reply: FastifyReply): AbortSignal {
  const gone = new AbortController();
  reply.raw.on('close', () => gone.abort()); // a request still queued or in its prefill leaves too
  return gone.signal;
}

/** `degraded` fields and header when some rows could not reach their experts (drop or reroute policy). */
export function degradedOf(gens: Generation[], reply?: FastifyReply): { degraded?: { reasons: string[] } } {
  const reasons = [...new Set(gens.flatMap((g) => g.degraded ?? []))];
  if (!reasons.length) return {};
  servingMetrics.degraded.inc();
  reply?.header('x-switchyard-degraded', 'true');
  return { degraded: { reasons } };
}

export function usageOf(prompts: Int32Array[], n: number, gens: Generation[]): object {
  const promptTokens = prompts.reduce((sum, p) => sum + p.length, 0);
  const completionTokens = gens.reduce((sum, g) => sum + g.ids.length, 0);
  // Cached tokens per prompt, as its first choice found them.
  const cached = prompts.reduce((sum, _, i) => sum + (gens[i * n]?.cachedPromptTokens ?? 0), 0);
  return {
    prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens,
    // OpenAI's field for prompt tokens served from the prefix cache.
    prompt_tokens_details: { cached_tokens: cached },
  };
}

/** Stop strings of a request (they need a tokenizer: they match text). */
export function stopsOf(stop: string | string[] | undefined, engine: RouterEngine): string[] {
  const stops = (stop === undefined ? [] : Array.isArray(stop) ? stop : [stop]).filter((x) => x.length > 0);
  if (stops.length) engine.textTokenizer("'stop' (stop strings)");
  return stops;
}

export function checkModel(engine: RouterEngine, model: string | undefined): void {
  if (model !== undefined && model !== engine.modelName)
    throw new HttpError(404, `model '${model}' is not served here (serving '${engine.modelName}')`, 'not_found_error', 'model');
}
