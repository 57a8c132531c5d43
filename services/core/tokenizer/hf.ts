// Hugging Face tokenizer.json (+ tokenizer_config.json) read by @huggingface/tokenizers, the pure-JS
// port of the Rust tokenizers library: nothing is fetched, the files come from the checkpoint folder.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import type { ModelConfig } from '../config.js';
import { TokenizerError, type EncodeOptions, type SpecialTokens, type TextTokenizer } from './types.js';

export const TOKENIZER_FILE = 'tokenizer.json';
export const TOKENIZER_CONFIG_FILE = 'tokenizer_config.json';

/** The fields of tokenizer_config.json this project reads (this file is the one reader of it). */
interface TokenizerConfig {
  add_bos_token?: unknown;
  bos_token?: unknown;
  eos_token?: unknown;
  clean_up_tokenization_spaces?: unknown;
  chat_template?: unknown;
  [field: string]: unknown;
}

/** The named special tokens of transformers' special_tokens_map, in its order. */
const SPECIAL_TOKEN_FIELDS = ['bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token'] as const;

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

/** The special tokens the file sets, as strings (null and missing ones are left out, as transformers does). */
function specialTokensOf(settings: TokenizerConfig): SpecialTokens {
  const tokens: SpecialTokens = {};
  for (const field of SPECIAL_TOKEN_FIELDS) {
    const content = tokenContent(settings[field]);
    if (content !== undefined) tokens[field] = content;
  }
  if (Array.isArray(settings.additional_special_tokens)) {
    const additional = settings.additional_special_tokens.map(tokenContent).filter((t): t is string => t !== undefined);
    if (additional.length > 0) tokens.additional_special_tokens = additional;
  }
  return tokens;
}

/** `chat_template`: a string, or a list of `{name, template}` (kept by name). */
function chatTemplateOf(settings: TokenizerConfig, configPath: string): string | Record<string, string> | undefined {
  const value = settings.chat_template;
  if (value === undefined || value === null) return undefined;
  if (typeof value === 'string') return value;
  const invalid = () => new TokenizerError(`invalid ${configPath}: chat_template must be a string or a list of {"name", "template"} strings`);
  if (!Array.isArray(value)) throw invalid();
  const byName: Record<string, string> = {};
  for (const entry of value as unknown[]) {
    const { name, template } = (typeof entry === 'object' && entry !== null ? entry : {}) as { name?: unknown; template?: unknown };
    if (typeof name !== 'string' || typeof template !== 'string') throw invalid();
    byName[name] = template;
  }
  return byName;
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
  const chatTemplate = chatTemplateOf(settings, configPath);
  // Special tokens by id (decode skips them, logprob listings name them) and byte-fallback pieces by id.
  const specials = new Map<number, string>();
  for (const t of Array.isArray(json.added_tokens) ? json.added_tokens as Array<{ id?: unknown; content?: unknown; special?: unknown }> : [])
    if (t.special === true && typeof t.id === 'number' && typeof t.content === 'string') specials.set(t.id, t.content);
  const byteOf = new Map<number, number>();
  const model = json.model as { vocab?: unknown; byte_fallback?: unknown };
  if (model.byte_fallback === true) {
    const entries: Array<[string, number]> = Array.isArray(model.vocab)
      ? (model.vocab as Array<[string, number]>).map(([piece], id) => [piece, id])
      : Object.entries((model.vocab ?? {}) as Record<string, number>);
    for (const [piece, id] of entries) {
      const m = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
      if (m) byteOf.set(id, parseInt(m[1], 16));
    }
  }

  return {
    source: path,
    vocabSize,
    bosId,
    eosId,
    stopIds: [...new Set([eosId, config.eos_token_id].filter((id): id is number => id !== undefined))],
    encode(text: string, options?: EncodeOptions): Int32Array {
      // Added tokens written in the text (<s>, <|im_start|>) are their ids either way.
      if (options?.addSpecialTokens === false) return Int32Array.from(tokenizer.encode(text, { add_special_tokens: false }).ids);
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
    specialTokens: specialTokensOf(settings),
    ...(chatTemplate === undefined ? {} : { chatTemplate }),
    specialText: (id) => specials.get(id),
    rawBytes: (id) => (byteOf.has(id) ? [byteOf.get(id)!] : undefined),
  };
}
