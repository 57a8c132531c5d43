// Hugging Face tokenizer.json (+ tokenizer_config.json) read by @huggingface/tokenizers, the pure-JS
// port of the Rust tokenizers library: nothing is fetched, the files come from the checkpoint folder.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import type { ModelConfig } from '../config.js';
import { TokenizerError, type TextTokenizer } from './types.js';

export const TOKENIZER_FILE = 'tokenizer.json';
export const TOKENIZER_CONFIG_FILE = 'tokenizer_config.json';

/** The fields of tokenizer_config.json this project reads. */
interface TokenizerConfig {
  add_bos_token?: unknown;
  bos_token?: unknown;
  eos_token?: unknown;
  clean_up_tokenization_spaces?: unknown;
}

async function readJsonObject(path: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new TokenizerError(`cannot read ${path}: ${(err as Error).message}`);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new TokenizerError(`invalid ${path}: not valid JSON (${(err as Error).message})`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new TokenizerError(`invalid ${path}: not a JSON object`);
  return value as Record<string, unknown>;
}

/** bos_token / eos_token are a string or, in older files, an AddedToken object with `content`. */
function tokenContent(value: unknown): string | undefined {
  if (typeof value === 'string') return value;
  if (typeof value === 'object' && value !== null && typeof (value as { content?: unknown }).content === 'string') return (value as { content: string }).content;
  return undefined;
}

/** The largest id the tokenizer knows, plus one (model vocabulary and added tokens). */
function idCount(tokenizer: Tokenizer): number {
  let max = -1;
  for (const id of tokenizer.get_vocab(true).values()) if (id > max) max = id;
  return max + 1;
}

export async function loadHfTokenizer(dir: string, config: Pick<ModelConfig, 'vocab_size' | 'bos_token_id' | 'eos_token_id'>): Promise<TextTokenizer> {
  const path = join(dir, TOKENIZER_FILE);
  const json = await readJsonObject(path);
  const configPath = join(dir, TOKENIZER_CONFIG_FILE);
  const settings: TokenizerConfig = existsSync(configPath) ? await readJsonObject(configPath) : {};
  if (typeof json.model !== 'object' || json.model === null) throw new TokenizerError(`invalid ${path}: no "model" object`);
  let tokenizer: Tokenizer;
  try {
    // The library wants every pipeline key present; tokenizer.json files may leave out the null ones.
    const complete = { normalizer: null, pre_tokenizer: null, post_processor: null, decoder: null, added_tokens: [], ...json };
    tokenizer = new Tokenizer(complete, settings);
  } catch (err) {
    throw new TokenizerError(`invalid ${path}: ${(err as Error).message}`);
  }
  const vocabSize = idCount(tokenizer);
  if (vocabSize > config.vocab_size)
    throw new TokenizerError(`${path} has ${vocabSize} token ids but the model's vocab_size is ${config.vocab_size}`);

  const idOf = (field: 'bos_token' | 'eos_token'): number | undefined => {
    const content = tokenContent(settings[field]);
    if (content === undefined) return undefined;
    const id = tokenizer.token_to_id(content);
    if (id === undefined) throw new TokenizerError(`${configPath}: ${field} '${content}' is not a token of ${path}`);
    return id;
  };
  const bosId = idOf('bos_token') ?? config.bos_token_id;
  const eosId = idOf('eos_token') ?? config.eos_token_id;
  for (const [name, id] of [['bos', bosId], ['eos', eosId]] as const)
    if (id !== undefined && id >= config.vocab_size) throw new TokenizerError(`the ${name} token id ${id} is outside the model's vocab_size ${config.vocab_size}`);

  // BOS as transformers does it: tokenizer_config's add_bos_token when given; else the tokenizer.json
  // post-processor (a Llama TemplateProcessing adds <s>); else Llama-style, BOS whenever one is known.
  const addBos = typeof settings.add_bos_token === 'boolean' ? settings.add_bos_token : undefined;
  if (addBos === true && bosId === undefined) throw new TokenizerError(`${configPath} sets add_bos_token but names no bos_token (and config.json has no bos_token_id)`);
  const usePostProcessor = addBos === undefined && json.post_processor != null;
  const prependBos = usePostProcessor ? false : addBos ?? bosId !== undefined;
  // Only when tokenizer_config asks for it (as transformers does); the Rust library never cleans up.
  const cleanUp = settings.clean_up_tokenization_spaces === true;

  return {
    source: path,
    vocabSize,
    bosId,
    eosId,
    stopIds: [...new Set([eosId, config.eos_token_id].filter((id): id is number => id !== undefined))],
    encode(text: string): Int32Array {
      const ids = tokenizer.encode(text, { add_special_tokens: usePostProcessor }).ids;
      return Int32Array.from(prependBos ? [bosId!, ...ids] : ids);
    },
    decode(ids: ArrayLike<number>): string {
      // Ids past the tokenizer (a model vocab padded beyond it) have no text.
      const known = Array.from(ids).filter((id) => id >= 0 && id < vocabSize);
      if (known.length === 0) return '';
      return tokenizer.decode(known, { skip_special_tokens: true, clean_up_tokenization_spaces: cleanUp });
    },
    // The longest clean-up pattern is " n't": a space up to 4 characters from the end can still go.
    rewritableChars: cleanUp ? 4 : 0,
  };
}
