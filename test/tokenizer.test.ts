// Tokenizers: the hand-made Llama-style tokenizer.json in test/fixtures/tokenizer/ (expected ids worked
// out from its merges by hand, and the same as the Rust `tokenizers` library gives), the byte vocabulary,
// the loader's errors, and a real router + shard cluster serving a model with that tokenizer.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { cp, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, preset, type ModelConfig } from '../services/core/config.js';
import { encodeText } from '../services/core/data/bytes.js';
import { generate } from '../services/router/scheduler.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { assignmentSpec, spreadExperts } from '../services/core/placement.js';
import { CompletionText, loadTokenizer, TokenizerError, type TextTokenizer } from '../services/core/tokenizer/index.js';
import { CompletionStream } from '../services/router/completion-stream.js';
import { startCluster, type TestCluster } from './support/cluster.js';
import { runCli } from './support/cli.js';
import { fixturePath } from './support/paths.js';

const FIXTURE = fixturePath('tokenizer');
/** <unk>, <s>, </s>, 256 byte tokens, 8 single characters, 10 merges. */
const FIXTURE_VOCAB = 277;
const ids = {
  unk: 0, bos: 1, eos: 2, space: 259, o: 263, w: 264, '▁h': 267, ld: 275, '▁hello': 271, '▁w': 273, '▁world': 276,
};
const byteToken = (b: number): number => 3 + b;
const fitting = { vocab_size: FIXTURE_VOCAB, bos_token_id: ids.bos, eos_token_id: ids.eos };

const root = await mkdtemp(join(tmpdir(), 'switchyard-tokenizer-'));
after(() => rm(root, { recursive: true, force: true }));

/** A folder with the fixture's files, each optionally replaced (null: left out). */
async function variant(name: string, files: { tokenizer?: unknown; config?: unknown } = {}): Promise<string> {
  const dir = join(root, name);
  await mkdir(dir, { recursive: true });
  const write = async (file: string, content: unknown) => {
    if (content === null) return;
    if (content === undefined) await cp(join(FIXTURE, file), join(dir, file));
    else await writeFile(join(dir, file), typeof content === 'string' ? content : JSON.stringify(content));
  };
  await write('tokenizer.json', files.tokenizer);
  await write('tokenizer_config.json', files.config);
  return dir;
}

/** The text of `generated` behind `promptIds`, all ids pushed at once. */
function completionText(tok: TextTokenizer, promptIds: ArrayLike<number>, generated: ArrayLike<number>): string {
  const completion = new CompletionText(tok, promptIds);
  completion.push(...Array.from(generated));
  return completion.text;
}

const fixtureJson = async (): Promise<Record<string, unknown>> => JSON.parse(await readFile(join(FIXTURE, 'tokenizer.json'), 'utf8')) as Record<string, unknown>;

test('tokenizer.json encodes as its merges say, with BOS, and decodes back', async () => {
  const tok = await loadTokenizer(FIXTURE, fitting);
  assert.equal(tok.vocabSize, FIXTURE_VOCAB);
  assert.deepEqual([tok.bosId, tok.eosId, tok.stopIds], [ids.bos, ids.eos, [ids.eos]]);
  const cases: Array<[string, number[]]> = [
    // ▁hello▁world: every merge applies, in rank order.
    ['hello world', [ids.bos, ids['▁hello'], ids['▁world']]],
    // ▁hold: "▁ h" and "l d" merge, "▁h o" is no merge.
    ['hold', [ids.bos, ids['▁h'], ids.o, ids.ld]],
    // A leading space becomes a lone ▁ before the prepended one's word.
    [' world', [ids.bos, ids.space, ids['▁world']]],
    // "wow": ▁w + o + w (no "o w" merge); a newline and "x" are not pieces: byte tokens.
    ['wow  hello\nx', [ids.bos, ids['▁w'], ids.o, ids.w, ids.space, ids['▁hello'], byteToken(0x0a), byteToken(0x78)]],
  ];
  for (const [text, expected] of cases) {
    const encoded = tok.encode(text);
    assert.ok(encoded instanceof Int32Array);
    assert.deepEqual([...encoded], expected, text);
    assert.equal(tok.decode(encoded), text, `round trip of ${JSON.stringify(text)}`);
  }
  // Special tokens are skipped; ids the tokenizer does not have (a padded model vocabulary) are dropped.
  assert.equal(tok.decode([ids.bos, ids['▁hello'], ids.eos, ids.unk, ids['▁world'], FIXTURE_VOCAB + 5]), 'hello world');
  assert.equal(tok.decode([]), '');
});

test('characters outside the vocabulary fall back to their UTF-8 byte tokens and decode back exactly', async () => {
  const tok = await loadTokenizer(FIXTURE, fitting);
  const text = 'hé€😀';
  const bytes = [...new TextEncoder().encode('é€😀')];
  assert.equal(bytes.length, 9);
  assert.deepEqual([...tok.encode(text)], [ids.bos, ids['▁h'], ...bytes.map(byteToken)]);
  assert.equal(tok.decode(tok.encode(text)), text);
  // Half a character decodes to U+FFFD, the whole one to itself.
  assert.equal(tok.decode([byteToken(0xf0), byteToken(0x9f)]).endsWith('\uFFFD'), true);
  assert.equal(tok.decode([byteToken(0xf0), byteToken(0x9f), byteToken(0x98), byteToken(0x80)]), '😀');
});

test('BOS follows tokenizer_config, else the post-processor, else the Llama default; EOS from either file', async () => {
  const json = await fixtureJson();
  const noBos = await loadTokenizer(await variant('no-bos', { config: { add_bos_token: false, bos_token: '<s>', eos_token: '</s>' } }), fitting);
  assert.deepEqual([...noBos.encode('hello')], [ids['▁hello']]);
  // No tokenizer_config.json: the TemplateProcessing post-processor adds <s>; EOS comes from config.json.
  const byPostProcessor = await loadTokenizer(await variant('post-processor', { config: null }), fitting);
  assert.deepEqual([...byPostProcessor.encode('hello')], [ids.bos, ids['▁hello']]);
  assert.deepEqual([byPostProcessor.bosId, byPostProcessor.eosId, byPostProcessor.stopIds], [ids.bos, ids.eos, [ids.eos]]);
  const bare = await variant('bare', { tokenizer: { ...json, post_processor: null }, config: null });
  assert.deepEqual([...(await loadTokenizer(bare, fitting)).encode('hello')], [ids.bos, ids['▁hello']], 'Llama default: BOS when one is known');
  assert.deepEqual([...(await loadTokenizer(bare, { vocab_size: FIXTURE_VOCAB })).encode('hello')], [ids['▁hello']], 'no BOS known, none added');
  // tokenizer_config's eos_token and config.json's eos_token_id both end a generation.
  const both = await loadTokenizer(FIXTURE, { ...fitting, eos_token_id: ids.unk });
  assert.deepEqual([both.eosId, [...both.stopIds].sort()], [ids.eos, [ids.unk, ids.eos]]);
});

test('the byte vocabulary is what it was: no BOS, bytes in and out, EOS 257', async () => {
  const tok = await loadTokenizer(await variant('bytes', { tokenizer: null, config: null }), preset('tiny').model);
  assert.equal(tok.vocabSize, BYTE_VOCAB_SIZE);
  assert.deepEqual([tok.bosId, tok.eosId, tok.stopIds], [BOS_ID, EOS_ID, [EOS_ID]]);
  assert.deepEqual(tok.encode('hé€😀'), encodeText('hé€😀'));
  assert.equal(tok.decode([...encodeText('hé'), BOS_ID, EOS_ID]), 'hé');
});

test('a missing, malformed or too large tokenizer is refused with a message naming it', async () => {
  const refused = async (dir: string, config: Pick<ModelConfig, 'vocab_size' | 'bos_token_id' | 'eos_token_id'>, message: RegExp) => {
    await assert.rejects(loadTokenizer(dir, config), (err: Error) => {
      assert.ok(err instanceof TokenizerError, err.stack);
      assert.match(err.message, message);
      return true;
    });
  };
  await refused(FIXTURE, { ...fitting, vocab_size: 270 }, /tokenizer\.json has 277 token ids but the model's vocab_size is 270/);
  await refused(await variant('none', { tokenizer: null, config: null }), fitting, /none has no tokenizer\.json, and its vocab_size 277 is not the byte vocabulary's 259/);
  await refused(await variant('not-json', { tokenizer: '{"model": {' }), fitting, /invalid .*not-json\/tokenizer\.json: not valid JSON/);
  await refused(await variant('no-model', { tokenizer: { added_tokens: [] } }), fitting, /invalid .*no-model\/tokenizer\.json: no "model" object/);
  await refused(await variant('bad-decoder', { tokenizer: { ...(await fixtureJson()), decoder: { type: 'NoSuchDecoder' } } }), fitting,
    /invalid .*bad-decoder\/tokenizer\.json: Unknown Decoder type: NoSuchDecoder/);
  await refused(await variant('bad-config', { config: '[1, 2' }), fitting, /invalid .*bad-config\/tokenizer_config\.json: not valid JSON/);
  await refused(await variant('unknown-eos', { config: { eos_token: '<|end|>' } }), fitting, /tokenizer_config\.json: eos_token '<\|end\|>' is not a token of/);
});

test('completion text keeps the space before its first word and settles characters split over byte tokens', async () => {
  const tok = await loadTokenizer(FIXTURE, fitting);
  const prompt = tok.encode('hello');
  // Decoded alone, the SentencePiece decoder would strip the space ("world"); behind the prompt it stays.
  assert.equal(tok.decode([ids['▁world']]), 'world');
  assert.equal(completionText(tok, prompt, [ids['▁world']]), ' world');
  const pieces = (stream: CompletionStream, generated: number[]) => generated.map((id) => stream.push(id));
  const emoji = [0xf0, 0x9f, 0x98, 0x80].map(byteToken);
  const streamed = new CompletionStream(tok, prompt, []);
  // The emoji appears whole with its fourth byte, never as U+FFFD.
  assert.deepEqual(pieces(streamed, [ids['▁world'], ...emoji, ids['▁hello']]), [' world', '', '', '', '😀', ' hello']);
  assert.equal(streamed.rest(), '');
  assert.deepEqual([streamed.text, streamed.stopped], [' world😀 hello', false]);
  // A stop sequence over two tokens: its length less one (2 UTF-16 units) is held back, then it is cut.
  const stopping = new CompletionStream(tok, prompt, ['d😀']);
  assert.deepEqual(pieces(stopping, [ids['▁world'], ...emoji]), [' wor', 'l', '', '', '']);
  assert.deepEqual([stopping.text, stopping.stopped, stopping.rest()], [' worl', true, '']);
  // Two stops inside one token: the cut is at the one that comes first in the text, not in the list.
  const twoStops = new CompletionStream(tok, prompt, ['d', 'w']);
  assert.deepEqual(pieces(twoStops, [ids['▁world']]), [' ']);
  assert.deepEqual([twoStops.text, twoStops.stopped, twoStops.rest()], [' ', true, '']);
});

test('streamed text equals the final text when clean-up rewrites earlier text, and each id decodes a bounded window', async () => {
  const cleaning = await loadTokenizer(await variant('clean-up', { config: { bos_token: '<s>', eos_token: '</s>', clean_up_tokenization_spaces: true } }), fitting);
  assert.equal(cleaning.rewritableChars, 4);
  const decodedLengths: number[] = [];
  const tok: TextTokenizer = { ...cleaning, decode: (decoded) => { decodedLengths.push(decoded.length); return cleaning.decode(decoded); } };
  const prompt = tok.encode('hello');
  const [comma, apostrophe, n, t] = [',', "'", 'n', 't'].map((c) => byteToken(c.charCodeAt(0)));
  // " world , world n't world😀 ..." : clean-up removes the spaces before "," and "n't" once those arrive.
  const phrase = [ids['▁world'], ids.space, comma, ids['▁world'], ids.space, n, apostrophe, t, ids['▁w'], ids.o, ...[0xf0, 0x9f, 0x98, 0x80].map(byteToken)];
  const generated = Array.from({ length: 20 }, () => phrase).flat();
  const stream = new CompletionStream(tok, prompt, []);
  const pieces = generated.map((id) => stream.push(id));
  pieces.push(stream.rest());
  const whole = cleaning.decode([...prompt, ...generated]);
  assert.ok(whole.startsWith('hello world, worldn\'t wo😀 world,'), whole);
  assert.equal(stream.text, whole.slice('hello'.length));
  assert.equal(pieces.join(''), stream.text, 'the streamed pieces add up to the final text');
  assert.ok(pieces.filter(Boolean).length > 20, 'text is streamed as it settles, not all at the end');
  // Per id, decoding is bounded by the unsettled ids and the look-behind, not by the completion so far.
  assert.ok(Math.max(...decodedLengths) <= 16, `longest decode ${Math.max(...decodedLengths)} ids`);
});

test('the CLI and a router cluster serve a model with the tokenizer.json of its folder', async (t) => {
  await initBackend();
  const config: ModelConfig = { ...preset('tiny').model, vocab_size: FIXTURE_VOCAB, bos_token_id: ids.bos, eos_token_id: ids.eos };
  const checkpoint = join(root, 'tiny-tokenizer');
  const model = MixtralModel.initialize(config, 5);
  t.after(() => model.dispose());
  await saveModel(checkpoint, model);
  // Without its tokenizer the folder is refused, saying what is missing.
  const missing = await runCli(['generate', '--model', checkpoint, '--prompt', 'hello', '--max-tokens', '2']);
  assert.equal(missing.code, 2, missing.stderr);
  assert.match(missing.stderr, /has no tokenizer\.json/);
  for (const file of ['tokenizer.json', 'tokenizer_config.json']) await cp(join(FIXTURE, file), join(checkpoint, file));
  // Mixtral-Instruct's published chat template (it writes BOS itself and refuses non-alternating roles).
  await cp(fixturePath('chat-templates/templates/mixtral-8x7b-instruct-v0.1.jinja'), join(checkpoint, 'chat_template.jinja'));
  const imported = await runCli(['import', checkpoint]);
  assert.equal(imported.code, 0, imported.stderr);
  assert.match(imported.stdout, new RegExp(`tokenizer\\s+tokenizer\\.json \\(${FIXTURE_VOCAB} ids\\)\\n`));

  const tok: TextTokenizer = await loadTokenizer(checkpoint, config);
  const prompt = 'hello wé';
  const promptIds = tok.encode(prompt);
  assert.deepEqual([...promptIds], [ids.bos, ids['▁hello'], ids['▁w'], byteToken(0xc3), byteToken(0xa9)]);
  const local = await generate(model, promptIds, { maxTokens: 12, temperature: 0, topP: 1, seed: 0, stopIds: [...tok.stopIds] });
  assert.ok(local.ids.length > 0, 'the model generates something');
  assert.ok(local.ids.every((id) => id >= 0 && id < FIXTURE_VOCAB));
  const expected = completionText(tok, promptIds, local.ids);
  // With this seed the model emits mostly byte tokens, among them a character split over two of them.
  assert.match(expected, /[^\u0000-\u007f\uFFFD]/, 'a multi-byte character assembled from byte tokens');

  const cli = await runCli(['generate', '--model', checkpoint, '--prompt', prompt, '--max-tokens', '12', '--temperature', '0']);
  assert.equal(cli.code, 0, cli.stderr);
  assert.equal(cli.stdout, `${prompt}${expected}\n`);

  const layers = config.num_hidden_layers;
  const shardSpecs = spreadExperts(layers, config.num_local_experts, 2).map(assignmentSpec);
  let cluster: TestCluster | undefined;
  try {
    cluster = await startCluster(checkpoint, shardSpecs, [[]]);
    const base = cluster.routers[0].base;
    const post = (body: Record<string, unknown>) =>
      fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const res = await post({ prompt, max_tokens: 12, temperature: 0 });
    assert.equal(res.status, 200);
    const body = (await res.json()) as { choices: Array<{ text: string; finish_reason: string }>; usage: { prompt_tokens: number; completion_tokens: number } };
    assert.equal(body.usage.prompt_tokens, promptIds.length);
    assert.equal(body.usage.completion_tokens, local.ids.length);
    assert.equal(body.choices[0].text, expected);
    assert.equal(body.choices[0].finish_reason, local.finishReason);
    const streamed = await post({ prompt, max_tokens: 12, temperature: 0, stream: true });
    const events = (await streamed.text()).split('\n\n').filter(Boolean);
    assert.equal(events.at(-1), 'data: [DONE]');
    const chunks = events.slice(0, -1).map((e) => (JSON.parse(e.slice('data: '.length)) as { choices: Array<{ text: string }> }).choices[0].text);
    assert.equal(chunks.join(''), expected);
    assert.ok(chunks.slice(0, -2).every((c) => !c.endsWith('\uFFFD')), 'no chunk before the last ends inside a character');

    // Chat through the checkpoint's template: BOS once (the template's, none added by tokenizing), the
    // prompt /tokenize reports, and the same greedy reply as completing those ids.
    const json = async (path: string, payload: Record<string, unknown>) => {
      const r = await fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(payload) });
      return { status: r.status, body: (await r.json()) as any };
    };
    const messages = [{ role: 'user', content: 'hello' }];
    const tokenized = await json('/tokenize', { messages });
    assert.equal(tokenized.status, 200, JSON.stringify(tokenized.body));
    assert.equal(tokenized.body.tokens[0], ids.bos);
    assert.equal(tokenized.body.tokens.filter((id: number) => id === ids.bos).length, 1, 'BOS is not doubled');
    const chat = await json('/v1/chat/completions', { messages, max_tokens: 6, temperature: 0 });
    assert.equal(chat.status, 200, JSON.stringify(chat.body));
    assert.equal(chat.body.usage.prompt_tokens, tokenized.body.count);
    const byIds = await json('/v1/completions', { prompt: tokenized.body.tokens, max_tokens: 6, temperature: 0 });
    assert.equal(chat.body.choices[0].message.content, byIds.body.choices[0].text);
    const refused = await json('/v1/chat/completions', { messages: [{ role: 'assistant', content: 'x' }] });
    assert.equal(refused.status, 400);
    assert.match(refused.body.error.message, /roles must alternate/);
  } finally {
    await cluster?.stop();
  }
});
