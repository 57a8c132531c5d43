// Chat templates: OpenAI chat `messages` → prompt text → prompt ids, as Hugging Face transformers'
// `apply_chat_template` does it, with the checkpoint's Jinja `chat_template` rendered by @huggingface/jinja
// in the environment transformers configures (trim_blocks, lstrip_blocks, raise_exception, strftime_now,
// the special tokens as variables). docs/serving.md "Chat templates" is the user-facing description.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Environment, Interpreter, Template } from '@huggingface/jinja';
import { TOKENIZER_CONFIG_FILE } from './hf.js';
import { TokenizerError, type SpecialTokens, type TextTokenizer } from './types.js';

/** The template file of a checkpoint folder; it takes precedence over tokenizer_config.json's. */
export const CHAT_TEMPLATE_FILE = 'chat_template.jinja';

/**
 * The template of checkpoints that have none (the byte-vocabulary models trained here, a base model
 * without `chat_template`): ChatML. Each message is `<|im_start|>{role}\n{content}<|im_end|>\n`; the
 * generation prompt is `<|im_start|>assistant\n`. No BOS is written.
 */
export const DEFAULT_CHAT_TEMPLATE =
  "{%- for message in messages %}\n" +
  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n" +
  '{%- endfor %}\n' +
  '{%- if add_generation_prompt %}\n' +
  "{{- '<|im_start|>assistant\\n' }}\n" +
  '{%- endif %}\n';

/** Where a completion written in the default template's format ends: the end of the assistant's message. */
export const DEFAULT_CHAT_STOP_STRINGS: readonly string[] = ['<|im_end|>'];

/** Which of the sources in order of precedence gave the template. */
export type ChatTemplateOrigin = 'override' | 'chat_template.jinja' | 'tokenizer_config.json' | 'default';

/**
 * A request's messages cannot be rendered: invalid messages, the template's `raise_exception(message)`
 * (`message` is the template's own text), or the template failing on them. The endpoint answers HTTP 400
 * with the message.
 */
export class ChatTemplateError extends Error {
  override name = 'ChatTemplateError';
  /** True when the template itself refused the conversation with raise_exception. */
  readonly raised: boolean;
  constructor(message: string, options: { raised?: boolean; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.raised = options.raised ?? false;
  }
}

/** A tool call of an assistant message, its `arguments` parsed from the JSON string OpenAI sends. */
export interface ChatToolCall {
  id?: string;
  type: 'function';
  function: { name: string; arguments: unknown };
}

/** A message as the template sees it: content is always a string (vLLM's "string" content format). */
export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | 'tool';
  content: string;
  name?: string;
  /** Role tool: the call it answers. */
  tool_call_id?: string;
  /** Role assistant: the calls it made (only when there are some). */
  tool_calls?: ChatToolCall[];
}

export interface ChatRenderOptions {
  /** Append the start of an assistant message (the template's `add_generation_prompt`). Default false. */
  addGenerationPrompt?: boolean;
  /**
   * Leave the last message open, for the model to continue it (a prefilled assistant reply): rendered
   * without its end and without a generation prompt, as transformers' `continue_final_message`.
   */
  continueFinalMessage?: boolean;
  /**
   * More template variables (vLLM's `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`). They may
   * replace the special-token variables, as in transformers; the names the renderer sets itself are refused.
   */
  kwargs?: Readonly<Record<string, unknown>>;
  /** The clock of `strftime_now` (tests); default the current local time, as Python's `datetime.now()`. */
  now?: () => Date;
}

/** Variables the renderer passes itself and Jinja's constants: chat_template_kwargs cannot replace them. */
const RESERVED_VARIABLES = new Set([
  'messages', 'add_generation_prompt', 'continue_final_message', 'tools', 'documents', 'raise_exception', 'strftime_now', 'range', 'namespace',
  'true', 'false', 'none', 'True', 'False', 'None',
]);

/** What transformers appends to the message to continue, to find where that message's text ends. */
const CONTINUE_TAG = 'CONTINUE_FINAL_MESSAGE_TAG ';

/** A compiled chat template with the special tokens of its tokenizer. */
export class ChatTemplate {
  readonly text: string;
  readonly origin: ChatTemplateOrigin;
  /** For logs: the file, `inline --chat-template`, or `built-in ChatML default`. */
  readonly source: string;
  /** Strings that end a completion in this template's format beyond the tokenizer's stop ids (default: `<|im_end|>`). */
  readonly stopStrings: readonly string[];
  readonly specialTokens: Readonly<SpecialTokens>;
  private readonly template: Template;

  /** Throws TokenizerError when the text is not a template @huggingface/jinja can parse. */
  constructor(text: string, init: { origin?: ChatTemplateOrigin; source?: string; specialTokens?: Readonly<SpecialTokens>; stopStrings?: readonly string[] } = {}) {
    this.text = text;
    this.origin = init.origin ?? 'override';
    this.source = init.source ?? 'inline template';
    this.specialTokens = init.specialTokens ?? {};
    this.stopStrings = init.stopStrings ?? (this.origin === 'default' ? DEFAULT_CHAT_STOP_STRINGS : []);
    try {
      this.template = new Template(text);
    } catch (err) {
      throw new TokenizerError(`chat template of ${this.source} does not parse: ${(err as Error).message}`);
    }
  }

  /** The prompt text of `messages` (see normalizeChatMessages). Throws ChatTemplateError. */
  render(messages: readonly ChatMessage[], options: ChatRenderOptions = {}): string {
    const kwargs = options.kwargs ?? {};
    for (const name of Object.keys(kwargs))
      if (RESERVED_VARIABLES.has(name))
        throw new ChatTemplateError(`chat_template_kwargs cannot set '${name}'`);
    if (messages.length === 0) throw new ChatTemplateError('messages must not be empty');
    const addGenerationPrompt = options.addGenerationPrompt ?? false;
    if (!options.continueFinalMessage) return this.run(messages, addGenerationPrompt, kwargs, options.now);

    // As transformers: mark the end of the last message's text, render, and cut the text there.
    if (addGenerationPrompt)
      throw new ChatTemplateError('continue_final_message and add_generation_prompt are not compatible: the first continues the last message, the second starts a new assistant message');
    if (!this.text.includes('content')) throw new ChatTemplateError("continue_final_message is set but the chat template does not use the messages' content");
    const last = messages[messages.length - 1];
    const marked = [...messages.slice(0, -1), { ...last, content: last.content + CONTINUE_TAG }];
    const rendered = this.run(marked, false, kwargs, options.now);
    const tag = CONTINUE_TAG.trim();
    if (!rendered.includes(last.content.trim()) || !rendered.includes(tag))
      throw new ChatTemplateError('continue_final_message is set but the chat template does not render the final message as it is, so it cannot be continued');
    const at = rendered.lastIndexOf(tag);
    // A template that trims the message's trailing space also trims the tag's: cut before any spacing then.
    return rendered.startsWith(CONTINUE_TAG, at) ? rendered.slice(0, at) : rendered.slice(0, at).trimEnd();
  }

  private run(messages: readonly ChatMessage[], addGenerationPrompt: boolean, kwargs: Readonly<Record<string, unknown>>, now: (() => Date) | undefined): string {
    const env = new Environment();
    // The globals of Python's Jinja that templates use, and transformers' two functions.
    for (const [name, value] of [['true', true], ['false', false], ['none', null], ['True', true], ['False', false], ['None', null]] as const) env.set(name, value);
    env.set('range', pythonRange);
    env.set('raise_exception', (message: unknown) => {
      throw new ChatTemplateError(String(message), { raised: true });
    });
    env.set('strftime_now', (format: unknown) => strftime(now ? now() : new Date(), String(format)));
    // transformers: render(messages=…, tools=None, documents=None, add_generation_prompt=…, **special_tokens_map | kwargs).
    const variables: Record<string, unknown> = { ...this.specialTokens, ...kwargs, messages, tools: null, documents: null, add_generation_prompt: addGenerationPrompt };
    for (const [name, value] of Object.entries(variables)) env.set(name, value);
    try {
      const result = new Interpreter(env).run(this.template.parsed);
      return String(result.value);
    } catch (err) {
      if (err instanceof ChatTemplateError) throw err;
      throw new ChatTemplateError(`the chat template failed on these messages: ${(err as Error).message}`, { cause: err });
    }
  }
}

/**
 * The template of a checkpoint folder, by precedence: `override` (a `--chat-template` flag: a template
 * when it contains `{` or a newline, else the path of a file), the folder's chat_template.jinja,
 * tokenizer_config.json's `chat_template` (of a list of named ones, `default`), else DEFAULT_CHAT_TEMPLATE.
 * The special-token variables are the tokenizer's (tokenizer_config.json). Throws TokenizerError when a
 * template cannot be read or parsed.
 */
export async function loadChatTemplate(checkpointDir: string, tokenizer: Pick<TextTokenizer, 'specialTokens' | 'chatTemplate'>, options: { override?: string } = {}): Promise<ChatTemplate> {
  const specialTokens = tokenizer.specialTokens ?? {};
  const read = async (path: string): Promise<string> => {
    try {
      return await readFile(path, 'utf8');
    } catch (err) {
      throw new TokenizerError(`cannot read chat template ${path}: ${(err as Error).message}`);
    }
  };
  const { override } = options;
  if (override !== undefined) {
    if (/[{\n]/.test(override)) return new ChatTemplate(override, { origin: 'override', source: 'inline --chat-template', specialTokens });
    return new ChatTemplate(await read(override), { origin: 'override', source: override, specialTokens });
  }
  const file = join(checkpointDir, CHAT_TEMPLATE_FILE);
  if (existsSync(file)) return new ChatTemplate(await read(file), { origin: 'chat_template.jinja', source: file, specialTokens });
  const configured = tokenizer.chatTemplate;
  const configPath = join(checkpointDir, TOKENIZER_CONFIG_FILE);
  if (typeof configured === 'string') return new ChatTemplate(configured, { origin: 'tokenizer_config.json', source: configPath, specialTokens });
  if (configured !== undefined) {
    const named = configured.default;
    if (named === undefined)
      throw new TokenizerError(`${configPath} has chat templates named ${Object.keys(configured).map((n) => `'${n}'`).join(', ')} but none named 'default'`);
    return new ChatTemplate(named, { origin: 'tokenizer_config.json', source: `${configPath} (template 'default')`, specialTokens });
  }
  return new ChatTemplate(DEFAULT_CHAT_TEMPLATE, { origin: 'default', source: 'built-in ChatML default', specialTokens });
}

/** The prompt of a conversation: its text and ids (no BOS added: the template writes it). */
export function encodeChat(template: ChatTemplate, tokenizer: Pick<TextTokenizer, 'encode'>, messages: readonly ChatMessage[], options: ChatRenderOptions = {}): { text: string; ids: Int32Array } {
  const text = template.render(messages, options);
  return { text, ids: tokenizer.encode(text, { addSpecialTokens: false }) };
}

const ROLES = ['system', 'user', 'assistant', 'developer', 'tool'] as const;

/**
 * OpenAI chat `messages` (a request body's, unchecked) → the messages a template sees. Roles system,
 * user, assistant; `developer` (OpenAI's newer name for system instructions) becomes `system`; `tool`
 * stays `tool` with its `tool_call_id` (templates without tool support refuse it themselves). `content`
 * is a string or a list of `{type: "text", text}` parts joined with "\n" (vLLM's "string" format);
 * an assistant message may have none (""). An assistant's `tool_calls` are kept with their `arguments`
 * parsed from JSON (as vLLM does). `name` is kept. Other fields are ignored. Throws ChatTemplateError.
 */
export function normalizeChatMessages(raw: unknown): ChatMessage[] {
  if (!Array.isArray(raw)) throw new ChatTemplateError('messages must be an array');
  if (raw.length === 0) throw new ChatTemplateError('messages must not be empty');
  return raw.map((entry: unknown, i): ChatMessage => {
    const where = `messages[${i}]`;
    if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) throw new ChatTemplateError(`${where} must be an object`);
    const m = entry as Record<string, unknown>;
    const role = m.role;
    if (typeof role !== 'string' || !(ROLES as readonly string[]).includes(role))
      throw new ChatTemplateError(`${where}.role must be one of ${ROLES.join(', ')}${typeof role === 'string' ? `, not '${role}'` : ''}`);
    const message: ChatMessage = { role: role === 'developer' ? 'system' : (role as ChatMessage['role']), content: contentText(m.content, role, where) };
    if (m.name !== undefined && m.name !== null) {
      if (typeof m.name !== 'string') throw new ChatTemplateError(`${where}.name must be a string`);
      message.name = m.name;
    }
    if (role === 'tool' && m.tool_call_id !== undefined && m.tool_call_id !== null) {
      if (typeof m.tool_call_id !== 'string') throw new ChatTemplateError(`${where}.tool_call_id must be a string`);
      message.tool_call_id = m.tool_call_id;
    }
    if (role === 'assistant' && m.tool_calls !== undefined && m.tool_calls !== null) {
      const calls = toolCalls(m.tool_calls, where);
      if (calls.length > 0) message.tool_calls = calls;
    }
    return message;
  });
}

function contentText(content: unknown, role: string, where: string): string {
  if (typeof content === 'string') return content;
  if (content === undefined || content === null) {
    if (role === 'assistant') return '';
    throw new ChatTemplateError(`${where}.content is required for role ${role}`);
  }
  if (!Array.isArray(content)) throw new ChatTemplateError(`${where}.content must be a string or an array of content parts`);
  return content
    .map((part: unknown, j) => {
      const type = typeof part === 'object' && part !== null ? (part as { type?: unknown }).type : undefined;
      if (type !== 'text') {
        const named = typeof type === 'string' ? `'${type}' is not supported` : 'has no type';
        throw new ChatTemplateError(`${where}.content[${j}]: content part ${named}: this model takes only text parts ({"type": "text", "text": ...})`);
      }
      const text = (part as { text?: unknown }).text;
      if (typeof text !== 'string') throw new ChatTemplateError(`${where}.content[${j}].text must be a string`);
      return text;
    })
    .join('\n');
}

function toolCalls(value: unknown, where: string): ChatToolCall[] {
  if (!Array.isArray(value)) throw new ChatTemplateError(`${where}.tool_calls must be an array`);
  return value.map((call: unknown, j): ChatToolCall => {
    const at = `${where}.tool_calls[${j}]`;
    const fn = typeof call === 'object' && call !== null ? (call as { function?: unknown }).function : undefined;
    const name = typeof fn === 'object' && fn !== null ? (fn as { name?: unknown }).name : undefined;
    if (typeof name !== 'string') throw new ChatTemplateError(`${at}.function.name must be a string`);
    let args = (fn as { arguments?: unknown }).arguments;
    // vLLM: a JSON string is parsed (templates expect an object); missing or empty is {}.
    if (args === undefined || args === null || args === '') args = {};
    else if (typeof args === 'string') {
      try {
        args = JSON.parse(args) as unknown;
      } catch {
        throw new ChatTemplateError(`${at}.function.arguments is not valid JSON`);
      }
    }
    const id = (call as { id?: unknown }).id;
    return { ...(typeof id === 'string' ? { id } : {}), type: 'function', function: { name, arguments: args } };
  });
}

/** Python's range(stop) / range(start, stop[, step]). */
function pythonRange(start: number, stop?: number, step = 1): number[] {
  if (stop === undefined) [start, stop] = [0, start];
  if (step === 0) throw new Error('range() arg 3 must not be zero');
  const out: number[] = [];
  for (let i = start; step > 0 ? i < stop : i > stop; i += step) out.push(i);
  return out;
}

const DAYS = ['Sunday', 'Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday'];
const MONTHS = ['January', 'February', 'March', 'April', 'May', 'June', 'July', 'August', 'September', 'October', 'November', 'December'];

/** Python's datetime.strftime in the C locale (the common directives; others are kept as written). */
export function strftime(date: Date, format: string): string {
  const pad = (n: number, width = 2) => String(n).padStart(width, '0');
  const hour12 = date.getHours() % 12 === 0 ? 12 : date.getHours() % 12;
  const dayOfYear = Math.round((Date.UTC(date.getFullYear(), date.getMonth(), date.getDate()) - Date.UTC(date.getFullYear(), 0, 1)) / 86_400_000) + 1;
  return format.replace(/%([aAbBdeHIjmMpSyY%])/g, (_, code: string) => {
    switch (code) {
      case 'a': return DAYS[date.getDay()].slice(0, 3);
      case 'A': return DAYS[date.getDay()];
      case 'b': return MONTHS[date.getMonth()].slice(0, 3);
      case 'B': return MONTHS[date.getMonth()];
      case 'd': return pad(date.getDate());
      case 'e': return String(date.getDate()).padStart(2, ' ');
      case 'H': return pad(date.getHours());
      case 'I': return pad(hour12);
      case 'j': return pad(dayOfYear, 3);
      case 'm': return pad(date.getMonth() + 1);
      case 'M': return pad(date.getMinutes());
      case 'p': return date.getHours() < 12 ? 'AM' : 'PM';
      case 'S': return pad(date.getSeconds());
      case 'y': return pad(date.getFullYear() % 100);
      case 'Y': return String(date.getFullYear());
      default: return '%';
    }
  });
}
