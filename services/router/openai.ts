// OpenAI-compatible /v1/models and /v1/completions (DESIGN §9), with vLLM's extensions: prompts as text,
// texts, token ids or lists of them; `n` choices each; `echo`; `logprobs` of generated and (with echo)
// prompt tokens; `stream: true` answers with server-sent events. Chat lives in openai-chat.ts.
import type { FastifyInstance } from 'fastify';
import { randomUUID } from 'node:crypto';
import { CompletionStream } from './completion-stream.js';
import { HttpError } from './errors.js';
import { OverloadError } from '../core/overload.js';
import { checkSampling } from '../core/sampling.js';
import { MAX_TOP_LOGPROBS, type TokenLogprob } from '../core/logprobs.js';
import type { TextTokenizer } from '../core/tokenizer/index.js';
import type { RouterEngine } from './engine.js';
import type { Generation } from './scheduler.js';
import { SAMPLING_FIELD_SCHEMAS, samplingOptions, type SamplingFields } from './sampling-fields.js';
import { MAX_N, OPENAI_GENERATION_FIELDS, UNSUPPORTED_COMPLETION_FIELDS, checkStreamOptions, openAiFields } from './openai-fields.js';
import { legacyLogprobs, textLength, tokenTexts } from './openai-logprobs.js';
import { MAX_CHOICES, choicesOf, runChoices } from './choices.js';
import { EventStream, checkModel, clientGone, degradedOf, stopsOf, usageOf } from './openai-common.js';

const completionSchema = {
  body: {
    type: 'object',
    required: ['prompt'],
    additionalProperties: false,
    properties: {
      ...OPENAI_GENERATION_FIELDS,
      // A string, strings, token ids or token-id lists: checked by promptsOf for a message naming the element.
      prompt: {},
      best_of: { type: 'integer', minimum: 1, maximum: MAX_N },
      echo: { type: 'boolean', default: false },
      logprobs: { type: 'integer', minimum: 0, maximum: MAX_TOP_LOGPROBS },
      suffix: { type: 'string' },
      ...SAMPLING_FIELD_SCHEMAS,
    },
  },
} as const;

interface CompletionBody extends SamplingFields {
  model?: string;
  prompt: unknown;
  max_tokens: number;
  n: number;
  best_of?: number;
  echo: boolean;
  logprobs?: number;
  stop?: string | string[];
  stream: boolean;
  stream_options?: { include_usage?: boolean };
  return_token_ids: boolean;
}

/** One prompt: its ids and, for echo, its text. */
interface Prompt { ids: Int32Array; text: string }

const PROMPT_FORMS = 'a string, an array of strings, an array of token ids or an array of token-id arrays';

/** The request's prompts, tokenized (strings) or checked (token ids). */
function promptsOf(prompt: unknown, engine: RouterEngine): Prompt[] {
  const vocab = engine.model.config.vocab_size;
  const fromText = (text: string): Prompt => {
    const ids = engine.textTokenizer('a text prompt').encode(text);
    if (ids.length === 0) throw new HttpError(400, 'the prompt encodes to no tokens', 'invalid_request_error', 'prompt');
    return { ids, text };
  };
  const fromIds = (ids: unknown[], where: string): Prompt => {
    if (ids.length === 0) throw new HttpError(400, `${where} is an empty list of token ids`, 'invalid_request_error', 'prompt');
    ids.forEach((id, i) => {
      if (!(Number.isInteger(id) && (id as number) >= 0 && (id as number) < vocab))
        throw new HttpError(400, `${where}[${i}] = ${JSON.stringify(id)} is not a token id of the vocabulary [0, ${vocab})`, 'invalid_request_error', 'prompt');
    });
    const tokens = Int32Array.from(ids as number[]);
    return { ids: tokens, text: engine.tokenizer?.decode(tokens) ?? '' };
  };
  if (typeof prompt === 'string') return [fromText(prompt)];
  if (!Array.isArray(prompt) || prompt.length === 0) throw new HttpError(400, `prompt must be ${PROMPT_FORMS}`, 'invalid_request_error', 'prompt');
  if (prompt.every((p) => typeof p === 'string')) return prompt.map(fromText);
  if (prompt.every((p) => typeof p === 'number')) return [fromIds(prompt, 'prompt')];
  if (prompt.every((p) => Array.isArray(p))) return prompt.map((p, i) => fromIds(p as unknown[], `prompt[${i}]`));
  throw new HttpError(400, `prompt must be ${PROMPT_FORMS} (not a mix)`, 'invalid_request_error', 'prompt');
}

/** What one choice has produced so far while streaming: text pieces and the logprobs not sent yet. */
class StreamedChoice {
  readonly text?: CompletionStream;
  pendingIds: number[] = [];
  pendingLogprobs: TokenLogprob[] = [];
  /** Characters of logprob token text sent so far (text_offset). */
  offset = 0;

  constructor(tokenizer: TextTokenizer | undefined, prompt: Int32Array, stops: string[]) {
    if (tokenizer) this.text = new CompletionStream(tokenizer, prompt, stops);
  }

  get stopped(): boolean {
    return this.text?.stopped ?? false;
  }

  /** Takes the ids (and logprobs) not handed out yet. */
  take(): { ids: number[]; logprobs: TokenLogprob[] } {
    const out = { ids: this.pendingIds, logprobs: this.pendingLogprobs };
    this.pendingIds = [];
    this.pendingLogprobs = [];
    return out;
  }
}

export function openaiRoutes(app: FastifyInstance, engine: RouterEngine): void {
  app.get('/v1/models', async () => ({
    object: 'list',
    data: [{ id: engine.modelName, object: 'model', created: 0, owned_by: 'switchyard', max_model_len: engine.model.config.max_position_embeddings }],
  }));

  const texts = tokenTexts(engine.tokenizer);

  app.post<{ Body: CompletionBody }>('/v1/completions', { schema: completionSchema, preValidation: openAiFields(UNSUPPORTED_COMPLETION_FIELDS) }, async (req, reply) => {
    const body = req.body;
    checkModel(engine, body.model);
    checkStreamOptions(body);
    if (body.best_of !== undefined && body.best_of !== body.n)
      throw new HttpError(400, `'best_of' other than n is not supported (best_of ${body.best_of}, n ${body.n}): every choice generated is returned`, 'invalid_request_error', 'best_of');
    const sampling = samplingOptions(body, engine.stopIds);
    // A bad request is a 400 whatever the state of the cluster (SamplingError: logit_bias or stop_token_ids outside the vocabulary).
    checkSampling(sampling, engine.model.config.vocab_size);
    const stops = stopsOf(body.stop, engine);
    const prompts = promptsOf(body.prompt, engine);
    if (prompts.length * body.n > MAX_CHOICES)
      throw new HttpError(400, `${prompts.length} prompts × n ${body.n} = ${prompts.length * body.n} choices, more than the ${MAX_CHOICES} one request may ask for`, 'invalid_request_error', 'n');
    const context = engine.model.config.max_position_embeddings;
    for (const p of prompts)
      if (p.ids.length > context) throw new HttpError(400, `prompt of ${p.ids.length} tokens exceeds the model's context of ${context}`, 'invalid_request_error', 'prompt');
    if (!engine.ready()) throw new OverloadError('not every expert has a shard yet', 'unavailable');

    const id = `cmpl-${randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const n = body.n;
    const withLogprobs = body.logprobs !== undefined;
    const returnIds = body.return_token_ids || !engine.tokenizer;
    const specs = choicesOf(prompts.map((p) => p.ids), n, sampling);
    const promptOf = (index: number) => prompts[Math.floor(index / n)];
    const choices = specs.map((s) => new StreamedChoice(engine.tokenizer, s.prompt, stops));
    const head = { id, object: 'text_completion', created, model: engine.modelName };
    const includeUsage = body.stream && body.stream_options?.include_usage === true;
    const events = body.stream ? new EventStream(reply, String(req.id)) : undefined;
    const chunk = (index: number, text: string, logprobs: object | null, finish: string | null, extra: object = {}) =>
      events!.send({ ...head, choices: [{ index, text, logprobs, finish_reason: finish, ...extra }], ...(includeUsage ? { usage: null } : {}) });
    // Streamed echo: the prompt first (with its logprobs once the prefill has computed them).
    const sendEcho = (index: number, promptLogprobs?: Array<TokenLogprob | null>) => {
      const p = promptOf(index);
      const logprobs = promptLogprobs ? legacyLogprobs(Array.from(p.ids), promptLogprobs, texts, 0) : null;
      if (promptLogprobs) choices[index].offset = textLength(Array.from(p.ids), texts);
      chunk(index, p.text, logprobs, null, returnIds ? { prompt_token_ids: Array.from(p.ids) } : {});
    };
    const flush = (index: number, text: string, finish: string | null = null) => {
      const c = choices[index];
      const { ids, logprobs } = c.take();
      if (!text && !ids.length && finish === null) return;
      const lp = withLogprobs ? legacyLogprobs(ids, logprobs, texts, c.offset) : null;
      if (withLogprobs) c.offset += textLength(ids, texts);
      chunk(index, text, lp, finish, returnIds ? { token_ids: ids } : {});
    };
    if (events && body.echo && !withLogprobs) choices.forEach((_, i) => sendEcho(i));

    let gens: Generation[];
    try {
      gens = await runChoices(engine, specs, {
        requestId: String(req.id), deadline: req.deadline, signal: clientGone(reply),
        want: {
          ...(withLogprobs ? { logprobs: body.logprobs } : {}),
          ...(withLogprobs && body.echo ? { promptLogprobs: body.logprobs } : {}),
        },
        onToken: (index, next, logprob) => {
          const c = choices[index];
          c.pendingIds.push(next);
          if (logprob) c.pendingLogprobs.push(logprob);
          const piece = c.text?.push(next) ?? '';
          // Without a tokenizer every id is its own chunk (its token_ids); with one, text settles in pieces.
          if (events && (piece || !c.text)) flush(index, piece);
          return c.stopped || (events?.closed ?? false);
        },
      });
    } catch (err) {
      if (!events) throw err;
      events.fail(err);
      return reply;
    }
    const usage = usageOf(prompts.map((p) => p.ids), n, gens);
    const degraded = degradedOf(gens, events ? undefined : reply);
    const finishOf = (i: number) => (choices[i].stopped ? 'stop' : gens[i].finishReason);
    if (events) {
      gens.forEach((g, i) => {
        // Echo with logprobs of a generation that computed no prompt (impossible today) still echoes.
        if (body.echo && withLogprobs && !g.promptLogprobs) sendEcho(i);
        flush(i, choices[i].text?.rest() ?? '');
        chunk(i, '', null, finishOf(i));
      });
      events.finish(head, degraded, includeUsage ? usage : undefined);
      return reply;
    }
    return {
      ...head, ...degraded,
      choices: gens.map((g, i) => {
        const p = promptOf(i);
        const text = choices[i].text?.text ?? '';
        let logprobs = null;
        if (withLogprobs) {
          const ids = body.echo ? [...p.ids, ...g.ids] : g.ids;
          const lps = body.echo ? [...(g.promptLogprobs ?? Array.from(p.ids, () => null)), ...(g.logprobs ?? [])] : g.logprobs ?? [];
          logprobs = legacyLogprobs(ids, lps, texts, 0);
        }
        return {
          index: i, text: body.echo ? p.text + text : text, logprobs, finish_reason: finishOf(i),
          ...(returnIds ? { prompt_token_ids: Array.from(p.ids), token_ids: g.ids } : {}),
        };
      }),
      usage,
    };
  });

}
