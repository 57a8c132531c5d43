// Chat templates: the real published templates of Mixtral, Mistral, Llama 3 / 3.1, Qwen2 / 2.5 / 3 and
// DeepSeek (test/fixtures/chat-templates/templates, sources in templates.json) rendered by
// @huggingface/jinja and compared with what Python's jinja2 renders in the environment transformers
// configures (expected.json, written by render.py: this test needs no Python). Then where templates come
// from, the special-token variables, message normalization, errors, and the prompt ids.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { cp, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { preset } from '../services/core/config.js';
import { encodeText } from '../services/core/data/bytes.js';
import {
  ChatTemplate, ChatTemplateError, DEFAULT_CHAT_TEMPLATE, encodeChat, loadChatTemplate, loadTokenizer, normalizeChatMessages, TokenizerError,
  type ChatRenderOptions, type SpecialTokens,
} from '../services/core/tokenizer/index.js';
import { fixturePath } from './support/paths.js';

const FIXTURES = fixturePath('chat-templates');
const TOKENIZER = fixturePath('tokenizer');
const readJson = async <T>(path: string): Promise<T> => JSON.parse(await readFile(path, 'utf8')) as T;
const templateText = (name: string): Promise<string> => readFile(join(FIXTURES, 'templates', `${name}.jinja`), 'utf8');

interface Case {
  name: string;
  template: string;
  conversation: string;
  add_generation_prompt?: boolean;
  continue_final_message?: boolean;
  kwargs?: Record<string, unknown>;
}
type Expected = { text: string } | { error: { type: 'TemplateError' | 'ValueError'; message: string } };

const templates = await readJson<Record<string, { model: string; source: string; special_tokens: SpecialTokens }>>(join(FIXTURES, 'templates.json'));
const { conversations, cases } = await readJson<{ conversations: Record<string, unknown[]>; cases: Case[] }>(join(FIXTURES, 'cases.json'));
const { expected } = await readJson<{ expected: Record<string, Expected> }>(join(FIXTURES, 'expected.json'));

const root = await mkdtemp(join(tmpdir(), 'switchyard-chat-template-'));
after(() => rm(root, { recursive: true, force: true }));

/** A checkpoint folder with the tokenizer fixture's files, tokenizer_config.json replaced when given. */
async function folder(name: string, files: { config?: Record<string, unknown>; tokenizer?: Record<string, unknown> | null; jinja?: string } = {}): Promise<string> {
  const dir = join(root, name);
  await mkdir(dir, { recursive: true });
  if (files.tokenizer !== null) {
    if (files.tokenizer) await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(files.tokenizer));
    else await cp(join(TOKENIZER, 'tokenizer.json'), join(dir, 'tokenizer.json'));
    if (files.config) await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify(files.config));
    else await cp(join(TOKENIZER, 'tokenizer_config.json'), join(dir, 'tokenizer_config.json'));
  }
  if (files.jinja !== undefined) await writeFile(join(dir, 'chat_template.jinja'), files.jinja);
  return dir;
}

const fixtureConfig = async (): Promise<Record<string, unknown>> => readJson(join(TOKENIZER, 'tokenizer_config.json'));
/** The tokenizer fixture's model ids: 277, BOS 1, EOS 2. */
const fitting = { vocab_size: 277, bos_token_id: 1, eos_token_id: 2 };

test('the published templates render as Python jinja2 renders them (multi-turn, system, generation prompt, parts, continue, kwargs, errors)', async () => {
  assert.ok(cases.length >= 30);
  const covered = new Set<string>();
  for (const c of cases) {
    const meta = templates[c.template];
    const template = new ChatTemplate(await templateText(c.template), { source: meta.model, specialTokens: meta.special_tokens });
    const options: ChatRenderOptions = { addGenerationPrompt: c.add_generation_prompt, continueFinalMessage: c.continue_final_message, kwargs: c.kwargs };
    const want = expected[c.name];
    assert.ok(want, `expected.json has no "${c.name}": run render.py`);
    const render = () => template.render(normalizeChatMessages(conversations[c.conversation]), options);
    if ('text' in want) {
      assert.equal(render(), want.text, c.name);
    } else {
      assert.throws(render, (err: Error) => {
        assert.ok(err instanceof ChatTemplateError, `${c.name}: ${err.stack}`);
        // The template's raise_exception message reaches the client as written.
        if (want.error.type === 'TemplateError') assert.deepEqual([err.raised, err.message], [true, want.error.message], c.name);
        else assert.equal(err.raised, false, c.name);
        return true;
      });
    }
    covered.add(c.template);
  }
  assert.deepEqual([...covered].sort(), Object.keys(templates).sort(), 'every template fixture has cases');
  // A few renderings spelled out, so the fixture file is not the only place they are visible.
  assert.deepEqual(expected['mixtral continue final message'], { text: '<s> [INST] Write a haiku about routers. [/INST] Packets drift like leaves' });
  assert.deepEqual(expected['qwen3 enable_thinking false'], {
    text: "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm well, thank you. How can I help?<|im_end|>\n" +
      '<|im_start|>user\n  Name three experts: é, 专家, 😀.  <|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n',
  });
  assert.deepEqual(expected['mixtral roles must alternate'], {
    error: { type: 'TemplateError', message: 'After the optional system message, conversation roles must alternate user/assistant/user/assistant/...' },
  });
});

test('the default template is the documented ChatML, stops at <|im_end|>, and is what a folder without a template gets', async () => {
  assert.equal(DEFAULT_CHAT_TEMPLATE, await templateText('switchyard-default'));
  // The byte vocabulary of models trained here: no tokenizer files at all.
  const bytesDir = await folder('bytes', { tokenizer: null });
  const bytes = await loadTokenizer(bytesDir, preset('tiny').model);
  const chat = await loadChatTemplate(bytesDir, bytes);
  assert.deepEqual([chat.origin, chat.source, chat.stopStrings], ['default', 'built-in ChatML default', ['<|im_end|>']]);
  const { text, ids } = encodeChat(chat, bytes, normalizeChatMessages([{ role: 'user', content: 'hi' }]), { addGenerationPrompt: true });
  assert.equal(text, '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n');
  // No special ids in the byte vocabulary: the markers are their bytes, and no BOS.
  assert.deepEqual(ids, encodeText(text));
  // A Hugging Face tokenizer whose tokenizer_config.json has no chat_template gets it too.
  const plain = await folder('no-template');
  const hfChat = await loadChatTemplate(plain, await loadTokenizer(plain, fitting));
  assert.deepEqual([hfChat.origin, hfChat.stopStrings], ['default', ['<|im_end|>']]);
});

test('template sources by precedence: --chat-template, chat_template.jinja, tokenizer_config.json (string or named list), default', async () => {
  const config = await fixtureConfig();
  const messages = normalizeChatMessages([{ role: 'user', content: 'x' }]);
  const load = async (dir: string, override?: string) => loadChatTemplate(dir, await loadTokenizer(dir, fitting), { override });
  const first = (chat: ChatTemplate) => chat.render(messages);

  const fromConfig = await folder('config-string', { config: { ...config, chat_template: 'config:{{ messages[0].content }}' } });
  const configChat = await load(fromConfig);
  assert.deepEqual([configChat.origin, configChat.source, configChat.stopStrings, first(configChat)], ['tokenizer_config.json', join(fromConfig, 'tokenizer_config.json'), [], 'config:x']);

  // The list transformers writes for several templates: 'default' is used.
  const named = await folder('config-list', {
    config: { ...config, chat_template: [{ name: 'tool_use', template: 'tools' }, { name: 'default', template: 'default:{{ messages[0].content }}' }] },
  });
  const namedChat = await load(named);
  assert.deepEqual([namedChat.origin, first(namedChat)], ['tokenizer_config.json', 'default:x']);
  const noDefault = await folder('config-list-no-default', { config: { ...config, chat_template: [{ name: 'tool_use', template: 'tools' }] } });
  await assert.rejects(load(noDefault), (err: Error) => err instanceof TokenizerError && /chat templates named 'tool_use' but none named 'default'/.test(err.message));
  const badType = await folder('config-bad-type', { config: { ...config, chat_template: 42 } });
  await assert.rejects(loadTokenizer(badType, fitting), (err: Error) => err instanceof TokenizerError && /invalid .*tokenizer_config\.json: chat_template must be/.test(err.message));

  // chat_template.jinja beats tokenizer_config.json, as transformers loads them.
  const both = await folder('both', { config: { ...config, chat_template: 'config' }, jinja: 'jinja:{{ messages[0].content }}' });
  const jinjaChat = await load(both);
  assert.deepEqual([jinjaChat.origin, jinjaChat.source, first(jinjaChat)], ['chat_template.jinja', join(both, 'chat_template.jinja'), 'jinja:x']);

  // The override beats both: a template when it has `{` or a newline, else a file path.
  const inline = await load(both, 'inline:{{ messages[0].content }}');
  assert.deepEqual([inline.origin, inline.source, first(inline)], ['override', 'inline --chat-template', 'inline:x']);
  const file = join(root, 'override.jinja');
  await writeFile(file, 'file:{{ messages[0].content }}');
  const fromFile = await load(both, file);
  assert.deepEqual([fromFile.origin, fromFile.source, first(fromFile)], ['override', file, 'file:x']);
  await assert.rejects(load(both, join(root, 'missing.jinja')), (err: Error) => err instanceof TokenizerError && /cannot read chat template .*missing\.jinja/.test(err.message));
  // A template that does not parse is refused when loaded, not at the first request.
  await assert.rejects(load(both, '{% for m in messages %}never closed'), (err: Error) => err instanceof TokenizerError && /chat template of inline --chat-template does not parse/.test(err.message));
});

test("tokenizer_config.json's special tokens are the template's variables; kwargs can replace them, not the renderer's own", async () => {
  const dir = await folder('special-tokens', {
    config: { bos_token: { content: '<s>', lstrip: false, normalized: false, rstrip: false, single_word: false, __type: 'AddedToken' }, eos_token: '</s>', unk_token: '<unk>', pad_token: null },
  });
  const tokenizer = await loadTokenizer(dir, fitting);
  assert.deepEqual(tokenizer.specialTokens, { bos_token: '<s>', eos_token: '</s>', unk_token: '<unk>' });
  const chat = await loadChatTemplate(dir, tokenizer, { override: '{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token is defined }}|{{ add_generation_prompt }}|{{ tools is none }}' });
  const messages = normalizeChatMessages([{ role: 'user', content: 'x' }]);
  // pad_token null is not passed at all (undefined in the template), as transformers' special_tokens_map.
  assert.equal(chat.render(messages, { addGenerationPrompt: true }), '<s>|</s>|<unk>|false|true|true');
  assert.equal(chat.render(messages, { kwargs: { bos_token: '[BOS]', pad_token: '<pad>' } }), '[BOS]|</s>|<unk>|true|false|true');
  for (const name of ['messages', 'add_generation_prompt', 'raise_exception', 'tools'])
    assert.throws(() => chat.render(messages, { kwargs: { [name]: 1 } }), (err: Error) => err instanceof ChatTemplateError && err.message === `chat_template_kwargs cannot set '${name}'`);
});

test('strftime_now formats the clock as Python does in the C locale; a template failing otherwise is a ChatTemplateError', () => {
  const chat = new ChatTemplate("{{ strftime_now('%d %b %Y|%a %A %B|%H:%M:%S %I%p|%j %y %m %%') }}");
  const now = () => new Date(2024, 6, 26, 9, 5, 3);
  assert.equal(chat.render(normalizeChatMessages([{ role: 'user', content: 'x' }]), { now }), '26 Jul 2024|Fri Friday July|09:05:03 09AM|208 24 07 %');
  const failing = new ChatTemplate('{{ messages[0].content.no_such_method() }}');
  assert.throws(() => failing.render(normalizeChatMessages([{ role: 'user', content: 'x' }])), (err: Error) =>
    err instanceof ChatTemplateError && !err.raised && /^the chat template failed on these messages: /.test(err.message));
});

test('messages are normalized as documented, and what cannot be is refused naming the field', () => {
  assert.deepEqual(
    normalizeChatMessages([
      { role: 'developer', content: 'Be brief.' },
      { role: 'user', content: [{ type: 'text', text: 'a' }, { type: 'text', text: 'b' }], name: 'alice', extra: 1 },
      { role: 'assistant', content: null, tool_calls: [{ id: 'c1', type: 'function', function: { name: 'f', arguments: '{"x": [1]}' } }] },
      { role: 'tool', tool_call_id: 'c1', content: '42' },
      { role: 'assistant', tool_calls: [] },
    ]),
    [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'a\nb', name: 'alice' },
      { role: 'assistant', content: '', tool_calls: [{ id: 'c1', type: 'function', function: { name: 'f', arguments: { x: [1] } } }] },
      { role: 'tool', content: '42', tool_call_id: 'c1' },
      { role: 'assistant', content: '' },
    ],
  );
  const refused = (messages: unknown, message: RegExp) =>
    assert.throws(() => normalizeChatMessages(messages), (err: Error) => err instanceof ChatTemplateError && message.test(err.message), String(message));
  refused({ role: 'user' }, /^messages must be an array$/);
  refused([], /^messages must not be empty$/);
  refused(['hi'], /^messages\[0\] must be an object$/);
  refused([{ role: 'function', content: 'x' }], /^messages\[0\]\.role must be one of system, user, assistant, developer, tool, not 'function'$/);
  refused([{ content: 'x' }], /^messages\[0\]\.role must be one of/);
  refused([{ role: 'user' }], /^messages\[0\]\.content is required for role user$/);
  refused([{ role: 'user', content: 7 }], /^messages\[0\]\.content must be a string or an array of content parts$/);
  refused([{ role: 'user', content: [{ type: 'text', text: 'look' }, { type: 'image_url', image_url: { url: 'http://x' } }] }],
    /^messages\[0\]\.content\[1\]: content part 'image_url' is not supported: this model takes only text parts/);
  refused([{ role: 'user', content: [{ text: 'x' }] }], /^messages\[0\]\.content\[0\]: content part has no type/);
  refused([{ role: 'user', content: [{ type: 'text', text: 3 }] }], /^messages\[0\]\.content\[0\]\.text must be a string$/);
  refused([{ role: 'user', content: 'x', name: 5 }], /^messages\[0\]\.name must be a string$/);
  refused([{ role: 'assistant', tool_calls: [{ type: 'function', function: { name: 'f', arguments: '{' } }] }], /^messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON$/);
  assert.throws(() => new ChatTemplate(DEFAULT_CHAT_TEMPLATE).render([]), /messages must not be empty/);
});

test('prompt ids: special tokens written by the template are single ids, and BOS is not added again', async () => {
  const dir = await folder('mixtral', { jinja: await templateText('mixtral-8x7b-instruct-v0.1') });
  const tokenizer = await loadTokenizer(dir, fitting);
  const chat = await loadChatTemplate(dir, tokenizer);
  assert.equal(chat.origin, 'chat_template.jinja');
  const messages = normalizeChatMessages([{ role: 'user', content: 'hello' }, { role: 'assistant', content: 'world' }, { role: 'user', content: 'hello' }]);
  const { text, ids } = encodeChat(chat, tokenizer, messages, { addGenerationPrompt: true });
  assert.equal(text, '<s> [INST] hello [/INST] world</s> [INST] hello [/INST]');
  // The fixture's ids (test/tokenizer.test.ts): <s> 1, </s> 2, ▁ 259, ▁hello 271, ▁world 276, byte b at 3 + b.
  // Its normalizer prepends ▁ to each stretch of text between special tokens.
  const bytes = (s: string) => [...new TextEncoder().encode(s)].map((b) => 3 + b);
  const inst = [259, 259, ...bytes('[INST]'), 271, 259, ...bytes('[/INST]')];
  assert.deepEqual([...ids], [1, ...inst, 276, 2, ...inst]);
  // The tokenizer's own encode would put its BOS in front of the template's.
  assert.deepEqual([...tokenizer.encode(text)].slice(0, 3), [1, 1, 259]);
  assert.deepEqual([...tokenizer.encode(text, { addSpecialTokens: true })], [...tokenizer.encode(text)]);

  // ChatML markers that are added tokens of the tokenizer (as in Qwen's) become one id each.
  const json = await readJson<{ added_tokens: unknown[] }>(join(TOKENIZER, 'tokenizer.json'));
  const added = (id: number, content: string) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
  const chatml = await folder('chatml', { tokenizer: { ...json, added_tokens: [...json.added_tokens, added(277, '<|im_start|>'), added(278, '<|im_end|>')] } });
  const chatmlTokenizer = await loadTokenizer(chatml, { ...fitting, vocab_size: 279 });
  const defaultChat = await loadChatTemplate(chatml, chatmlTokenizer);
  const prompt = encodeChat(defaultChat, chatmlTokenizer, normalizeChatMessages([{ role: 'user', content: 'hello' }]), { addGenerationPrompt: true });
  assert.equal(prompt.text, '<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n');
  // user\nhello: ▁ u s e(261) r(265) \n h(260) e ll(268) o(263) — no "▁h" merge since "h" follows a newline.
  assert.deepEqual([...prompt.ids], [277, 259, ...bytes('us'), 261, 265, ...bytes('\n'), 260, 261, 268, 263, 278, 259, ...bytes('\n'), 277, 259, ...bytes('assistant\n')]);
});
