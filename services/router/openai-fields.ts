// What the OpenAI-compatible endpoints do with fields before schema validation: null means "not given"
// (as in OpenAI's and vLLM's APIs), and fields Switchyard does not implement are refused by name unless
// they carry the value that means "off". Unknown fields are refused by the schemas (additionalProperties).
import type { FastifyRequest } from 'fastify';
import { HttpError } from './errors.js';

/** Field -> the values that are accepted because they ask for nothing (absent and null always are). */
export type UnsupportedFields = Record<string, { accepts: (value: unknown) => boolean; why: string }>;

const never = () => false;

/** Fields of /v1/completions that Switchyard does not implement. */
export const UNSUPPORTED_COMPLETION_FIELDS: UnsupportedFields = {
  suffix: { accepts: (v) => v === '', why: 'insertion (suffix) needs a fill-in-the-middle model' },
};

/** Fields of /v1/chat/completions that Switchyard does not implement. */
export const UNSUPPORTED_CHAT_FIELDS: UnsupportedFields = {
  tools: { accepts: (v) => Array.isArray(v) && v.length === 0, why: 'tool calling is not implemented' },
  tool_choice: { accepts: (v) => v === 'none', why: 'tool calling is not implemented' },
  parallel_tool_calls: { accepts: never, why: 'tool calling is not implemented' },
  functions: { accepts: (v) => Array.isArray(v) && v.length === 0, why: 'function calling is not implemented' },
  function_call: { accepts: (v) => v === 'none', why: 'function calling is not implemented' },
  response_format: { accepts: (v) => isObject(v) && v.type === 'text' && Object.keys(v).length === 1, why: 'structured output (json_object, json_schema) is not implemented' },
  audio: { accepts: never, why: 'audio output is not implemented' },
  modalities: { accepts: (v) => Array.isArray(v) && v.length === 1 && v[0] === 'text', why: 'only text output is implemented' },
  prediction: { accepts: never, why: 'predicted outputs are not implemented' },
  reasoning_effort: { accepts: never, why: 'reasoning effort applies to OpenAI reasoning models only' },
  web_search_options: { accepts: never, why: 'web search is not implemented' },
  store: { accepts: (v) => v === false, why: 'stored completions are not implemented' },
  metadata: { accepts: never, why: 'stored completions (metadata) are not implemented' },
  service_tier: { accepts: (v) => v === 'auto' || v === 'default', why: 'there is one service tier' },
  verbosity: { accepts: never, why: 'verbosity applies to OpenAI reasoning models only' },
};

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A preValidation hook: drops top-level nulls, then refuses unsupported fields that ask for something. */
export function openAiFields(unsupported: UnsupportedFields): (req: FastifyRequest) => Promise<void> {
  return async (req) => {
    const body = req.body;
    if (!isObject(body)) return; // the schema answers
    for (const [field, value] of Object.entries(body)) {
      if (value === null) {
        delete body[field];
        continue;
      }
      const rule = unsupported[field];
      if (rule && !rule.accepts(value)) throw new HttpError(400, `'${field}' is not supported by this server: ${rule.why}`, 'invalid_request_error', field);
    }
  };
}

/** stream_options are only meaningful with stream: true (OpenAI and vLLM refuse them otherwise). */
export function checkStreamOptions(body: { stream?: boolean; stream_options?: unknown }): void {
  if (body.stream_options !== undefined && !body.stream)
    throw new HttpError(400, "'stream_options' is only allowed with 'stream': true", 'invalid_request_error', 'stream_options');
}

/** Most choices per prompt (`n`). */
export const MAX_N = 16;

/** Fields completions and chat both take besides the sampling fields (sampling-fields.ts). */
export const OPENAI_GENERATION_FIELDS = {
  model: { type: 'string' },
  n: { type: 'integer', minimum: 1, maximum: MAX_N, default: 1 },
  stop: { anyOf: [{ type: 'string' }, { type: 'array', items: { type: 'string' }, maxItems: 4 }] },
  stream: { type: 'boolean', default: false },
  stream_options: { type: 'object', additionalProperties: false, properties: { include_usage: { type: 'boolean' } } },
  // Accepted and not used (OpenAI's end-user id for abuse monitoring).
  user: { type: 'string' },
  // vLLM: choices also carry token_ids (completions: prompt_token_ids too).
  return_token_ids: { type: 'boolean', default: false },
} as const;
