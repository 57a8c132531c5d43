// OpenAI-compatible completions and models (DESIGN §9); `stream: true` answers with server-sent events.
import type { FastifyInstance } from 'fastify';
import { randomUUID } from 'node:crypto';
import { CompletionStream } from './completion-stream.js';
import { HttpError } from './errors.js';
import { OverloadError } from '../core/overload.js';
import { checkSampling, type SamplingOptions } from '../core/sampling.js';
import { servingMetrics } from '../core/metrics/serving.js';
import type { RouterEngine } from './engine.js';

const MAX_TOKENS_LIMIT = 4096;

const completionSchema = {
  body: {
    type: 'object',
    required: ['prompt'],
    properties: {
      model: { type: 'string' },
      prompt: { type: 'string', minLength: 1 },
      max_tokens: { type: 'integer', minimum: 0, maximum: MAX_TOKENS_LIMIT, default: 16 },
      temperature: { type: 'number', minimum: 0, maximum: 2, default: 1 },
      top_p: { type: 'number', exclusiveMinimum: 0, maximum: 1, default: 1 },
      // Absent: a fresh random seed, so identical unseeded requests differ.
      seed: { type: 'integer', minimum: -Number.MAX_SAFE_INTEGER, maximum: Number.MAX_SAFE_INTEGER },
      top_k: { type: 'integer', minimum: -1 }, // -1 or 0 (and absent): off
      min_p: { type: 'number', minimum: 0, maximum: 1, default: 0 },
      repetition_penalty: { type: 'number', exclusiveMinimum: 0, default: 1 },
      presence_penalty: { type: 'number', minimum: -2, maximum: 2, default: 0 },
      frequency_penalty: { type: 'number', minimum: -2, maximum: 2, default: 0 },
      // Token id (a decimal string, as JSON keys are) -> bias; ids beyond the vocabulary are refused in the handler.
      logit_bias: { type: 'object', propertyNames: { pattern: '^(0|[1-9][0-9]{0,9})$' }, additionalProperties: { type: 'number', minimum: -100, maximum: 100 } },
      // vLLM's extension: ids that end the completion besides the tokenizer's EOS.
      stop_token_ids: { type: 'array', items: { type: 'integer', minimum: 0 } },
      stop: { anyOf: [{ type: 'string' }, { type: 'array', items: { type: 'string' }, maxItems: 4 }] },
      stream: { type: 'boolean', default: false },
    },
  },
} as const;

interface CompletionBody {
  model?: string;
  prompt: string;
  max_tokens: number;
  temperature: number;
  top_p: number;
  seed?: number;
  top_k?: number;
  min_p: number;
  repetition_penalty: number;
  presence_penalty: number;
  frequency_penalty: number;
  logit_bias?: Record<string, number>;
  stop_token_ids?: number[];
  stop?: string | string[];
  stream: boolean;
}

export function openaiRoutes(app: FastifyInstance, engine: RouterEngine): void {
  app.get('/v1/models', async () => ({
    object: 'list',
    data: [{ id: engine.modelName, object: 'model', created: 0, owned_by: 'switchyard' }],
  }));

  app.post<{ Body: CompletionBody }>('/v1/completions', { schema: completionSchema }, async (req, reply) => {
    const body = req.body;
    if (body.model !== undefined && body.model !== engine.modelName)
      throw new HttpError(404, `model '${body.model}' is not served here (serving '${engine.modelName}')`, 'not_found_error');
    const tokenizer = engine.tokenizer;
    // Without a seed the request's sampler draws a fresh one.
    const sampling: SamplingOptions = {
      maxTokens: body.max_tokens, temperature: body.temperature, topP: body.top_p, seed: body.seed,
      ...(body.top_k !== undefined ? { topK: body.top_k } : {}),
      minP: body.min_p, repetitionPenalty: body.repetition_penalty, presencePenalty: body.presence_penalty, frequencyPenalty: body.frequency_penalty,
      ...(body.logit_bias !== undefined ? { logitBias: body.logit_bias } : {}),
      stopIds: [...new Set([...tokenizer.stopIds, ...(body.stop_token_ids ?? [])])],
    };
    // A bad request is a 400 whatever the state of the cluster (SamplingError: logit_bias or stop_token_ids outside the vocabulary).
    checkSampling(sampling, engine.model.config.vocab_size);
    if (!engine.ready()) throw new OverloadError('not every expert has a shard yet', 'unavailable');
    const prompt = tokenizer.encode(body.prompt);
    if (prompt.length === 0) throw new HttpError(400, 'the prompt encodes to no tokens');
    const context = engine.model.config.max_position_embeddings;
    if (prompt.length > context) throw new HttpError(400, `prompt of ${prompt.length} tokens exceeds the model's context of ${context}`);
    const stops = (body.stop === undefined ? [] : Array.isArray(body.stop) ? body.stop : [body.stop]).filter((x) => x.length > 0);
    const id = `cmpl-${randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const completion = new CompletionStream(tokenizer, prompt, stops);
    const chunk = (text: string, finish: string | null) =>
      `data: ${JSON.stringify({ id, object: 'text_completion', created, model: engine.modelName, choices: [{ index: 0, text, finish_reason: finish, logprobs: null }] })}\n\n`;
    if (body.stream) {
      reply.hijack();
      reply.raw.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-request-id': String(req.id) });
    }
    let closed = false;
    // The response closing before we end it means the client went away: stop generating.
    const gone = new AbortController();
    reply.raw.on('close', () => {
      closed = true;
      gone.abort(); // a request still queued or in its prefill leaves too, not only at its next token
    });
    let result: Awaited<ReturnType<RouterEngine['complete']>>;
    try {
      result = await engine.complete(prompt, sampling, (next) => {
        const piece = completion.push(next);
        if (body.stream && !closed && piece) reply.raw.write(chunk(piece, null));
        return completion.stopped || closed;
      }, String(req.id), req.deadline, gone.signal);
    } catch (err) {
      if (!body.stream) throw err;
      // Headers are sent: report the failure as a final event and end the stream.
      const overloaded = err instanceof OverloadError;
      if (overloaded) servingMetrics.rejections.inc({ reason: err.reason });
      if (!closed) reply.raw.end(`data: ${JSON.stringify({ error: { message: (err as Error).message, type: overloaded ? 'overloaded' : 'server_error', ...(overloaded ? { reason: err.reason } : {}) } })}\n\ndata: [DONE]\n\n`);
      return reply;
    }
    // Some rows could not reach their experts (drop or reroute policy): say so.
    const degraded = result.degraded ? { degraded: { reasons: result.degraded } } : {};
    if (result.degraded) servingMetrics.degraded.inc();
    const { text, stopped } = completion;
    const finish = stopped ? 'stop' : result.finishReason;
    if (body.stream) {
      if (!closed) {
        const rest = completion.rest();
        if (rest) reply.raw.write(chunk(rest, null));
        if (result.degraded) reply.raw.write(`data: ${JSON.stringify({ id, object: 'text_completion', created, model: engine.modelName, choices: [], ...degraded })}\n\n`);
        reply.raw.write(chunk('', finish));
        reply.raw.end('data: [DONE]\n\n');
      }
      return reply;
    }
    if (result.degraded) reply.header('x-switchyard-degraded', 'true');
    return {
      id, object: 'text_completion', created, model: engine.modelName, ...degraded,
      choices: [{ index: 0, text, finish_reason: finish, logprobs: null }],
      usage: {
        prompt_tokens: prompt.length, completion_tokens: result.ids.length, total_tokens: prompt.length + result.ids.length,
        // OpenAI's field for prompt tokens served from the prefix cache.
        prompt_tokens_details: { cached_tokens: result.cachedPromptTokens ?? 0 },
      },
    };
  });
}
