// The sampling fields every generating endpoint takes (OpenAI's names, vLLM's extensions): their JSON
// schema and their mapping to SamplingOptions, in one place.
import type { SamplingOptions } from '../core/sampling.js';

export const samplingFieldSchemas = {
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

/** The fields after validation (defaults applied). */
export interface SamplingFields {
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
}

/** SamplingOptions of a request: `stopIds` are the model's own stop ids (EOS), the request's are added. */
export function samplingOptions(f: SamplingFields, maxTokens: number, stopIds: readonly number[]): SamplingOptions {
  return {
    maxTokens, temperature: f.temperature, topP: f.top_p, seed: f.seed,
    ...(f.top_k !== undefined ? { topK: f.top_k } : {}),
    minP: f.min_p, repetitionPenalty: f.repetition_penalty, presencePenalty: f.presence_penalty, frequencyPenalty: f.frequency_penalty,
    ...(f.logit_bias !== undefined ? { logitBias: f.logit_bias } : {}),
    stopIds: [...new Set([...stopIds, ...(f.stop_token_ids ?? [])])],
  };
}
