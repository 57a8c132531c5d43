// The sampling fields the HTTP APIs share (OpenAI names, vLLM meanings; docs/serving.md "Sampling"): one
// JSON-schema for their ranges and defaults, and one mapping to SamplingOptions. OpenAI completions take
// them in the body, Open Inference generate in `parameters`.
import type { SamplingOptions } from '../core/sampling.js';

/** Largest max_tokens accepted; a generation also ends at the model's context. */
export const MAX_TOKENS_LIMIT = 1 << 20;

/** JSON-schema properties of the shared sampling fields (fastify/ajv; `default`s are applied by samplingOptions too). */
export const SAMPLING_FIELD_SCHEMAS = {
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
  // Token id (a decimal string, as JSON keys are) -> bias; ids beyond the vocabulary are refused by checkSampling.
  logit_bias: { type: 'object', propertyNames: { pattern: '^(0|[1-9][0-9]{0,9})$' }, additionalProperties: { type: 'number', minimum: -100, maximum: 100 } },
  // vLLM's extension: ids that end the generation besides the tokenizer's EOS.
  stop_token_ids: { type: 'array', items: { type: 'integer', minimum: 0 } },
} as const;

export type SamplingFieldName = keyof typeof SAMPLING_FIELD_SCHEMAS;
export const SAMPLING_FIELD_NAMES = Object.keys(SAMPLING_FIELD_SCHEMAS) as SamplingFieldName[];

/** The shared fields as a request gives them (validated against SAMPLING_FIELD_SCHEMAS); absent ones take their defaults. */
export interface SamplingFields {
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  seed?: number;
  top_k?: number;
  min_p?: number;
  repetition_penalty?: number;
  presence_penalty?: number;
  frequency_penalty?: number;
  logit_bias?: Record<string, number>;
  stop_token_ids?: number[];
}

const DEFAULTS = {
  max_tokens: SAMPLING_FIELD_SCHEMAS.max_tokens.default,
  temperature: SAMPLING_FIELD_SCHEMAS.temperature.default,
  top_p: SAMPLING_FIELD_SCHEMAS.top_p.default,
  min_p: SAMPLING_FIELD_SCHEMAS.min_p.default,
  repetition_penalty: SAMPLING_FIELD_SCHEMAS.repetition_penalty.default,
  presence_penalty: SAMPLING_FIELD_SCHEMAS.presence_penalty.default,
  frequency_penalty: SAMPLING_FIELD_SCHEMAS.frequency_penalty.default,
};

/**
 * SamplingOptions for the fields of a request; `stopIds` are the tokenizer's stop ids, joined by the
 * request's `stop_token_ids`; `maxTokens`, when given, replaces the fields' (chat's default and its
 * max_completion_tokens). Range checks against the vocabulary are checkSampling's (SamplingError: 400).
 */
export function samplingOptions(fields: SamplingFields, stopIds: readonly number[], maxTokens?: number): SamplingOptions {
  const f = { ...DEFAULTS, ...Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined)) } as typeof DEFAULTS & SamplingFields;
  // Without a seed the request's sampler draws a fresh one.
  return {
    maxTokens: maxTokens ?? f.max_tokens, temperature: f.temperature, topP: f.top_p, seed: f.seed,
    ...(f.top_k !== undefined ? { topK: f.top_k } : {}),
    minP: f.min_p, repetitionPenalty: f.repetition_penalty, presencePenalty: f.presence_penalty, frequencyPenalty: f.frequency_penalty,
    ...(f.logit_bias !== undefined ? { logitBias: f.logit_bias } : {}),
    stopIds: [...new Set([...stopIds, ...(f.stop_token_ids ?? [])])],
  };
}
