// Picks the tokenizer of a checkpoint folder: its tokenizer.json, else the byte vocabulary when the
// model was built for it.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { BYTE_VOCAB_SIZE, type ModelConfig } from '../config.js';
import { byteTokenizer } from './bytes.js';
import { loadHfTokenizer, TOKENIZER_FILE } from './hf.js';
import { TokenizerError, type TextTokenizer } from './types.js';

export { byteTokenizer } from './bytes.js';
export { loadHfTokenizer, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE } from './hf.js';
export { CompletionText } from './completion.js';
export { TokenizerError, type EncodeOptions, type SpecialTokens, type TextTokenizer } from './types.js';
export {
  ChatTemplate, ChatTemplateError, CHAT_TEMPLATE_FILE, DEFAULT_CHAT_STOP_STRINGS, DEFAULT_CHAT_TEMPLATE, encodeChat, loadChatTemplate, normalizeChatMessages,
  type ChatMessage, type ChatRenderOptions, type ChatTemplateOrigin, type ChatToolCall,
} from './chat-template.js';

export async function loadTokenizer(checkpointDir: string, config: Pick<ModelConfig, 'vocab_size' | 'bos_token_id' | 'eos_token_id'>): Promise<TextTokenizer> {
  if (existsSync(join(checkpointDir, TOKENIZER_FILE))) return loadHfTokenizer(checkpointDir, config);
  if (config.vocab_size === BYTE_VOCAB_SIZE) return byteTokenizer(config);
  throw new TokenizerError(
    `${checkpointDir} has no ${TOKENIZER_FILE}, and its vocab_size ${config.vocab_size} is not the byte vocabulary's ${BYTE_VOCAB_SIZE}: put the model's ${TOKENIZER_FILE} in the folder`,
  );
}
