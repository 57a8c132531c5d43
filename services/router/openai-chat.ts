// OpenAI-compatible /v1/chat/completions: `messages` rendered with the checkpoint's chat template
// (core/tokenizer/chat-template.ts), then generated like a completion: `n` choices, logprobs with
// top_logprobs, stop strings, and server-sent `chat.completion.chunk` events with `stream: true`.
import type { FastifyInstance } from 'fastify';
import { randomUUID } from 'node:crypto';
import { HttpError } from './errors.js';
import { OverloadError } from '../core/overload.js';
import { checkSampling } from '../core/sampling.js';
import { MAX_TOP_LOGPROBS } from '../core/logprobs.js';
import { encodeChat, normalizeChatMessages } from '../core/tokenizer/index.js';
import type { RouterEngine } from './engine.js';
import type { Generation } from './scheduler.js';
import { MAX_TOKENS_LIMIT, SAMPLING_FIELD_SCHEMAS, samplingOptions, type SamplingFields } from './sampling-fields.js';
import { OPENAI_GENERATION_FIELDS, UNSUPPORTED_CHAT_FIELDS, checkStreamOptions, openAiFields } from './openai-fields.js';
import { chatLogprobs, tokenTexts } from './openai-logprobs.js';
import { choicesOf, runChoices } from './choices.js';
import { CompletionStream } from './completion-stream.js';
import { EventStream, checkModel, clientGone, degradedOf, stopsOf, usageOf } from './openai-common.js';
import type { TokenLogprob } from '../core/logprobs.js';

const chatSchema = {
  body: {
    type: 'object',
    required: ['messages'],
    additionalProperties: false,
    properties: {
      ...OPENAI_GENERATION_FIELDS,
      // Checked by normalizeChatMessages, whose errors name the message and field.
      messages: { type: 'array', minItems: 1 },
      max_completion_tokens: { type: 'integer', minimum: 0, maximum: MAX_TOKENS_LIMIT },
      logprobs: { type: 'boolean', default: false },
      top_logprobs: { type: 'integer', minimum: 0, maximum: MAX_TOP_LOGPROBS },
      // vLLM's chat extensions.
      add_generation_prompt: { type: 'boolean', default: true },
      continue_final_message: { type: 'boolean', default: false },
      chat_template_kwargs: { type: 'object' },
      ...SAMPLING_FIELD_SCHEMAS,
      // No default: until the context is full.
      max_tokens: { type: 'integer', minimum: 0, maximum: MAX_TOKENS_LIMIT },
      // Unsupported fields get through only with the value that asks for nothing (openAiFields refuses the rest).
      ...Object.fromEntries(Object.keys(UNSUPPORTED_CHAT_FIELDS).map((field) => [field, {}])),
    },
  },
} as const;

interface ChatBody extends SamplingFields {
  model?: string;
  messages: unknown[];
  max_tokens?: number;
  max_completion_tokens?: number;
  n: number;
  logprobs: boolean;
  top_logprobs?: number;
  stop?: string | string[];
  stream: boolean;
  stream_options?: { include_usage?: boolean };
  add_generation_prompt: boolean;
  continue_final_message: boolean;
  chat_template_kwargs?: Record<string, unknown>;
  return_token_ids: boolean;
}

export function openaiChatRoutes(app: FastifyInstance, engine: RouterEngine): void {
  const texts = tokenTexts(engine.tokenizer);
  app.post<{ Body: ChatBody }>('/v1/chat/completions', { schema: chatSchema, preValidation: openAiFields(UNSUPPORTED_CHAT_FIELDS) }, async (req, reply) => {
    const body = req.body;
    checkModel(engine, body.model);
    checkStreamOptions(body);
    if (body.top_logprobs !== undefined && !body.logprobs)
      throw new HttpError(400, "'top_logprobs' needs 'logprobs': true", 'invalid_request_error', 'top_logprobs');
    const tokenizer = engine.textTokenizer('chat completions');
    const template = engine.chatTemplate!;
    const messages = normalizeChatMessages(body.messages);
    const { ids: prompt } = encodeChat(template, tokenizer, messages, {
      addGenerationPrompt: body.continue_final_message ? false : body.add_generation_prompt,
      continueFinalMessage: body.continue_final_message, kwargs: body.chat_template_kwargs,
    });
    const context = engine.model.config.max_position_embeddings;
    if (prompt.length === 0) throw new HttpError(400, 'the conversation renders to no tokens', 'invalid_request_error', 'messages');
    if (prompt.length > context) throw new HttpError(400, `the conversation's ${prompt.length} tokens exceed the model's context of ${context}`, 'invalid_request_error', 'messages');
    // OpenAI's newer name wins; neither: until the context is full (or a stop).
    const maxTokens = body.max_completion_tokens ?? body.max_tokens ?? context - prompt.length;
    const sampling = samplingOptions(body, engine.stopIds, maxTokens);
    checkSampling(sampling, engine.model.config.vocab_size);
    // The template's own end of message (the default ChatML's <|im_end|>) ends a reply too.
    const stops = [...new Set([...stopsOf(body.stop, engine), ...template.stopStrings])];
    if (!engine.ready()) throw new OverloadError('not every expert has a shard yet', 'unavailable');

    const id = `chatcmpl-${randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const specs = choicesOf([prompt], body.n, sampling);
    const streams = specs.map((s) => new CompletionStream(tokenizer, s.prompt, stops));
    const pending = specs.map(() => ({ ids: [] as number[], logprobs: [] as TokenLogprob[] }));
    const head = { id, object: body.stream ? 'chat.completion.chunk' : 'chat.completion', created, model: engine.modelName };
    const includeUsage = body.stream && body.stream_options?.include_usage === true;
    const events = body.stream ? new EventStream(reply, String(req.id)) : undefined;
    const returnIds = body.return_token_ids;
    const chunk = (index: number, delta: object, finish: string | null, logprobs: object | null = null, extra: object = {}) =>
      events!.send({ ...head, choices: [{ index, delta, logprobs, finish_reason: finish, ...extra }], ...(includeUsage ? { usage: null } : {}) });
    const flush = (index: number, text: string) => {
      const { ids, logprobs } = pending[index];
      if (!text && !ids.length) return;
      pending[index] = { ids: [], logprobs: [] };
      chunk(index, { content: text }, null, body.logprobs ? { content: chatLogprobs(logprobs, texts) } : null, returnIds ? { token_ids: ids } : {});
    };
    // OpenAI's first event of each choice names the role.
    if (events) specs.forEach((_, i) => chunk(i, { role: 'assistant', content: '' }, null));

    let gens: Generation[];
    try {
      gens = await runChoices(engine, specs, {
        requestId: String(req.id), deadline: req.deadline, signal: clientGone(reply),
        want: body.logprobs ? { logprobs: body.top_logprobs ?? 0 } : {},
        onToken: (index, next, logprob) => {
          pending[index].ids.push(next);
          if (logprob) pending[index].logprobs.push(logprob);
          const piece = streams[index].push(next);
          if (events && piece) flush(index, piece);
          return streams[index].stopped || (events?.closed ?? false);
        },
      });
    } catch (err) {
      if (!events) throw err;
      events.fail(err);
      return reply;
    }
    const usage = usageOf([prompt], body.n, gens);
    const degraded = degradedOf(gens, events ? undefined : reply);
    const finishOf = (i: number) => (streams[i].stopped ? 'stop' : gens[i].finishReason);
    if (events) {
      gens.forEach((_, i) => {
        flush(i, streams[i].rest());
        chunk(i, {}, finishOf(i));
      });
      events.finish(head, degraded, includeUsage ? usage : undefined);
      return reply;
    }
    return {
      ...head, ...degraded,
      choices: gens.map((g, i) => ({
        index: i,
        message: { role: 'assistant', content: streams[i].text },
        logprobs: body.logprobs ? { content: chatLogprobs(g.logprobs ?? [], texts) } : null,
        finish_reason: finishOf(i),
        ...(returnIds ? { token_ids: g.ids } : {}),
      })),
      ...(returnIds ? { prompt_token_ids: Array.from(prompt) } : {}),
      usage,
    };
  });
}
