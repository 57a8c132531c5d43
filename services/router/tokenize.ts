// vLLM's /tokenize and /detokenize: the router's tokenizer (and chat template) as a service, so clients
// count tokens and build token-id prompts with exactly the ids the model will see.
import type { FastifyInstance } from 'fastify';
import { HttpError } from './errors.js';
import { normalizeChatMessages } from '../core/tokenizer/index.js';
import type { RouterEngine } from './engine.js';
import { tokenTexts } from './openai-logprobs.js';
import { checkModel } from './openai-common.js';

const tokenizeSchema = {
  body: {
    type: 'object',
    additionalProperties: false,
    properties: {
      model: { type: 'string' },
      prompt: { type: 'string' },
      messages: { type: 'array', minItems: 1 },
      // Default: true for a prompt (BOS as completions add it), false for messages (the template writes it).
      add_special_tokens: { type: 'boolean' },
      add_generation_prompt: { type: 'boolean', default: true },
      continue_final_message: { type: 'boolean', default: false },
      chat_template_kwargs: { type: 'object' },
      return_token_strs: { type: 'boolean', default: false },
    },
  },
} as const;

interface TokenizeBody {
  model?: string;
  prompt?: string;
  messages?: unknown[];
  add_special_tokens?: boolean;
  add_generation_prompt: boolean;
  continue_final_message: boolean;
  chat_template_kwargs?: Record<string, unknown>;
  return_token_strs: boolean;
}

const detokenizeSchema = {
  body: {
    type: 'object',
    required: ['tokens'],
    additionalProperties: false,
    properties: {
      model: { type: 'string' },
      tokens: { type: 'array', items: { type: 'integer' } },
    },
  },
} as const;

export function tokenizeRoutes(app: FastifyInstance, engine: RouterEngine): void {
  const texts = tokenTexts(engine.tokenizer);
  app.post<{ Body: TokenizeBody }>('/tokenize', { schema: tokenizeSchema }, async (req) => {
    const body = req.body;
    checkModel(engine, body.model);
    const tokenizer = engine.textTokenizer('/tokenize');
    if ((body.prompt === undefined) === (body.messages === undefined))
      throw new HttpError(400, "give exactly one of 'prompt' (text) and 'messages' (a chat)", 'invalid_request_error', 'prompt');
    let tokens: Int32Array;
    if (body.prompt !== undefined) {
      tokens = tokenizer.encode(body.prompt, { addSpecialTokens: body.add_special_tokens ?? true });
    } else {
      const messages = normalizeChatMessages(body.messages);
      const text = engine.chatTemplate!.render(messages, {
        addGenerationPrompt: body.continue_final_message ? false : body.add_generation_prompt,
        continueFinalMessage: body.continue_final_message, kwargs: body.chat_template_kwargs,
      });
      tokens = tokenizer.encode(text, { addSpecialTokens: body.add_special_tokens ?? false });
    }
    const ids = Array.from(tokens);
    return {
      count: ids.length, max_model_len: engine.model.config.max_position_embeddings, tokens: ids,
      token_strs: body.return_token_strs ? ids.map((id) => texts.text(id)) : null,
    };
  });

  app.post<{ Body: { model?: string; tokens: number[] } }>('/detokenize', { schema: detokenizeSchema }, async (req) => {
    checkModel(engine, req.body.model);
    const tokenizer = engine.textTokenizer('/detokenize');
    const vocab = engine.model.config.vocab_size;
    const bad = req.body.tokens.findIndex((id) => id < 0 || id >= vocab);
    if (bad >= 0) throw new HttpError(400, `tokens[${bad}] = ${req.body.tokens[bad]} is outside the vocabulary [0, ${vocab})`, 'invalid_request_error', 'tokens');
    return { prompt: tokenizer.decode(req.body.tokens) };
  });
}
