// Open Inference Protocol (KServe v2 / Triton) conformance, written from the specifications rather than
// from the router's code: the KServe "Open Inference Protocol" REST API (health, server and model
// metadata, model ready, infer), Triton's binary tensor data extension and Triton's generate extension
// (generate, generate_stream). Against a real cluster: a coordinator, two expert shards and a router as
// child processes. Answers the cluster cannot be made to give on demand (401, 413, 503, 500, a failure in
// the middle of a stream, no tokenizer) are checked on the router's HTTP app in this process.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { OverloadError } from '../services/core/overload.js';
import type { SamplingOptions } from '../services/core/sampling.js';
import { RouterEngine } from '../services/router/engine.js';
import { samplingOptions } from '../services/router/sampling-fields.js';
import { buildHttpApp } from '../services/router/http.js';
import { startCluster, type TestCluster } from './support/cluster.js';
import { repoRoot } from './support/paths.js';

await initBackend();
const tiny = preset('tiny');
const MODEL = 'oip-tiny';
let root: string;
let checkpoint: string;
let cluster: TestCluster;
let base: string;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'switchyard-oip-'));
  checkpoint = join(root, MODEL);
  const model = MixtralModel.initialize(tiny.model, 17);
  await saveModel(checkpoint, model);
  model.dispose();
  cluster = await startCluster(checkpoint, ['spread:0/2', 'spread:1/2'], [[]]);
  base = cluster.routers[0].base;
});

after(async () => {
  await cluster?.stop();
  await rm(root, { recursive: true, force: true });
});

interface MetadataTensor { name: string; datatype: string; shape: number[] }
interface ModelMetadata { name: string; versions?: string[]; platform: string; inputs: MetadataTensor[]; outputs: MetadataTensor[] }
interface ResponseOutput extends MetadataTensor { data?: number[]; parameters?: { binary_data_size?: number } }
interface InferResponse { model_name: string; model_version?: string; id?: string; outputs: ResponseOutput[] }

const get = async (path: string) => {
  const res = await fetch(`${base}${path}`);
  return { status: res.status, type: res.headers.get('content-type'), body: (await res.json()) as unknown };
};
const postJson = (path: string, body: unknown) =>
  fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });

/** The protocol's error object: exactly `{"error": <string>}`, served as JSON. */
async function assertError(res: Response, status: number, message: RegExp): Promise<void> {
  const text = await res.text();
  assert.equal(res.status, status, text);
  assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
  const body = JSON.parse(text) as Record<string, unknown>;
  assert.deepEqual(Object.keys(body), ['error'], text);
  assert.equal(typeof body.error, 'string', text);
  assert.match(body.error as string, message);
}

let metadata: ModelMetadata;
const ids = Array.from({ length: 2 * 7 }, (_, i) => (i * 29 + 5) % 256);
const [B, T] = [2, 7];

/** An output as the metadata declares it: same datatype and rank, fixed dimensions equal, -1 dimensions the request's. */
function assertDeclared(out: MetadataTensor, batch: number, tokens: number): void {
  const declared = metadata.outputs.find((o) => o.name === out.name);
  assert.ok(declared, `output ${out.name} is declared in the model metadata`);
  assert.equal(out.datatype, declared.datatype, `${out.name} datatype`);
  assert.equal(out.shape.length, declared.shape.length, `${out.name} rank`);
  // The variable dimensions are, in order, the request's batch and sequence length.
  const variable = [batch, tokens];
  declared.shape.forEach((d, i) => assert.equal(out.shape[i], d === -1 ? variable.shift() : d, `${out.name} dimension ${i}`));
}
const elements = (shape: number[]) => shape.reduce((a, b) => a * b, 1);
const BYTES: Record<string, number> = { FP32: 4, INT32: 4, INT64: 8 };

test('server metadata, liveness and readiness', async () => {
  const version = (JSON.parse(await readFile(join(repoRoot, 'package.json'), 'utf8')) as { version: string }).version;
  const server = await get('/v2');
  assert.equal(server.status, 200);
  assert.deepEqual(server.body, { name: 'switchyard', version, extensions: ['binary_tensor_data', 'generate'] });
  assert.deepEqual(await get('/v2/health/live'), { status: 200, type: 'application/json; charset=utf-8', body: { live: true } });
  assert.deepEqual(await get('/v2/health/ready'), { status: 200, type: 'application/json; charset=utf-8', body: { ready: true } });
});

test('model metadata lists the input and every output, plain and versioned; model ready', async () => {
  const plain = await get(`/v2/models/${MODEL}`);
  assert.equal(plain.status, 200);
  metadata = plain.body as ModelMetadata;
  assert.equal(metadata.name, MODEL);
  assert.ok(metadata.versions?.includes('1'), 'version 1 may be requested');
  assert.equal(typeof metadata.platform, 'string');
  assert.deepEqual(metadata.inputs, [{ name: 'input_ids', datatype: 'INT64', shape: [-1, -1] }]);
  const { vocab_size: V, num_hidden_layers: L, num_experts_per_tok: k } = tiny.model;
  assert.deepEqual(metadata.outputs, [
    { name: 'logits', datatype: 'FP32', shape: [-1, -1, V] },
    { name: 'routing_experts', datatype: 'INT32', shape: [L, -1, -1, k] },
    { name: 'routing_weights', datatype: 'FP32', shape: [L, -1, -1, k] },
  ]);
  for (const v of metadata.versions!) assert.deepEqual(await get(`/v2/models/${MODEL}/versions/${v}`), plain);
  for (const path of [`/v2/models/${MODEL}/ready`, `/v2/models/${MODEL}/versions/1/ready`])
    assert.deepEqual((await get(path)).body, { name: MODEL, ready: true }, path);
});

test('infer (JSON): requested outputs, id echoed, shapes and datatypes as declared, data lengths', async () => {
  const request = { id: 'req-42', inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [B, T], data: ids }] };
  for (const path of [`/v2/models/${MODEL}/infer`, `/v2/models/${MODEL}/versions/1/infer`]) {
    // No `outputs`: every output of the model.
    const all = (await (await postJson(path, request)).json()) as InferResponse;
    assert.equal(all.model_name, MODEL);
    assert.equal(all.id, 'req-42');
    assert.deepEqual(all.outputs.map((o) => o.name), metadata.outputs.map((o) => o.name));
    for (const out of all.outputs) {
      assertDeclared(out, B, T);
      assert.equal(out.data?.length, elements(out.shape), `${out.name} data length`);
    }
    // Only the outputs asked for, in the order asked.
    const two = (await (await postJson(path, { ...request, outputs: [{ name: 'routing_weights' }, { name: 'logits' }] })).json()) as InferResponse;
    assert.deepEqual(two.outputs.map((o) => o.name), ['routing_weights', 'logits']);
    assert.deepEqual(two.outputs[1].data, all.outputs[0].data, 'the same logits');
  }
  // Tensor data may be given nested (row-major) instead of flat; no id asked, none echoed as another's.
  const nested = { inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [B, T], data: [ids.slice(0, T), ids.slice(T)] }], outputs: [{ name: 'routing_experts' }] };
  const res = await postJson(`/v2/models/${MODEL}/infer`, nested);
  assert.equal(res.status, 200);
  const body = (await res.json()) as InferResponse;
  assert.ok(body.id === undefined || body.id === '', 'no id');
  assertDeclared(body.outputs[0], B, T);
  assert.ok(body.outputs[0].data!.every((e) => Number.isInteger(e) && e >= 0 && e < tiny.model.num_local_experts));
});

test('infer with the binary tensor data extension, both directions', async () => {
  const json = (await (await postJson(`/v2/models/${MODEL}/infer`, { inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [B, T], data: ids }] })).json()) as InferResponse;
  const binaryInfer = async (header: object) => {
    const head = Buffer.from(JSON.stringify(header));
    const data = Buffer.alloc(ids.length * 8);
    ids.forEach((id, i) => data.writeBigInt64LE(BigInt(id), i * 8));
    const res = await fetch(`${base}/v2/models/${MODEL}/infer`, {
      method: 'POST', headers: { 'content-type': 'application/octet-stream', 'inference-header-content-length': String(head.length) }, body: Buffer.concat([head, data]),
    });
    assert.equal(res.status, 200);
    const bytes = Buffer.from(await res.arrayBuffer());
    const length = Number(res.headers.get('inference-header-content-length'));
    assert.ok(Number.isInteger(length) && length > 0 && length <= bytes.length, 'Inference-Header-Content-Length gives the JSON header');
    const response = JSON.parse(bytes.subarray(0, length).toString('utf8')) as InferResponse;
    // The binary outputs follow the header in output order, each of exactly binary_data_size bytes.
    let at = length;
    const values = new Map<string, number[]>();
    for (const out of response.outputs) {
      assertDeclared(out, B, T);
      const size = out.parameters?.binary_data_size;
      if (size === undefined) {
        values.set(out.name, out.data!);
        continue;
      }
      assert.equal(out.data, undefined, `${out.name}: binary outputs carry no JSON data`);
      assert.equal(size, elements(out.shape) * BYTES[out.datatype], `${out.name} binary_data_size`);
      const chunk = bytes.buffer.slice(bytes.byteOffset + at, bytes.byteOffset + at + size);
      values.set(out.name, Array.from(out.datatype === 'INT32' ? new Int32Array(chunk) : new Float32Array(chunk)));
      at += size;
    }
    assert.equal(at, bytes.length, 'the body is the header and the binary outputs, nothing else');
    return { response, values };
  };
  const input = { name: 'input_ids', datatype: 'INT64', shape: [B, T], parameters: { binary_data_size: ids.length * 8 } };
  // Per output: logits and routing_weights binary, routing_experts JSON.
  const mixed = await binaryInfer({ id: 'bin-1', inputs: [input], outputs: [{ name: 'logits', parameters: { binary_data: true } }, { name: 'routing_experts' }, { name: 'routing_weights', parameters: { binary_data: true } }] });
  assert.equal(mixed.response.id, 'bin-1');
  assert.deepEqual(mixed.response.outputs.map((o) => o.parameters?.binary_data_size !== undefined), [true, false, true]);
  // binary_data_output: every output binary unless an output says otherwise.
  const all = await binaryInfer({ inputs: [input], parameters: { binary_data_output: true }, outputs: [{ name: 'logits' }, { name: 'routing_experts' }, { name: 'routing_weights', parameters: { binary_data: false } }] });
  assert.deepEqual(all.response.outputs.map((o) => o.parameters?.binary_data_size !== undefined), [true, true, false]);
  for (const got of [mixed.values, all.values])
    for (const out of json.outputs) {
      const values = got.get(out.name)!;
      assert.equal(values.length, out.data!.length);
      const diff = values.reduce((m, v, i) => Math.max(m, Math.abs(v - out.data![i])), 0);
      assert.ok(diff <= 1e-6, `${out.name}: binary equals JSON (max |Δ| ${diff})`);
    }
});

interface GenerateResponse { model_name: string; model_version?: string; id?: string; text_output: string; finish_reason?: string; num_input_tokens?: number; num_output_tokens?: number; done?: boolean; error?: string }

/** The server-sent events of a generate_stream answer, each `data: <json>`. */
async function events(res: Response): Promise<GenerateResponse[]> {
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /^text\/event-stream/);
  const chunks = (await res.text()).split('\n\n');
  assert.equal(chunks.pop(), '', 'every event ends with a blank line');
  return chunks.map((e) => {
    assert.ok(e.startsWith('data: '), e);
    return JSON.parse(e.slice('data: '.length)) as GenerateResponse;
  });
}

test('generate and generate_stream: the stream concatenates to the generated text', async () => {
  const request = { id: 'gen-1', text_input: 'Call me Ishmael.', parameters: { max_tokens: 12, temperature: 0, seed: 3 } };
  const res = await postJson(`/v2/models/${MODEL}/generate`, request);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
  const whole = (await res.json()) as GenerateResponse;
  assert.equal(whole.model_name, MODEL);
  assert.equal(whole.model_version, '1');
  assert.equal(whole.id, 'gen-1');
  assert.equal(typeof whole.text_output, 'string');
  assert.ok(whole.text_output.length > 0);
  assert.ok(whole.finish_reason === 'length' || whole.finish_reason === 'stop');
  assert.ok(whole.num_output_tokens! >= 1 && whole.num_output_tokens! <= 12);
  assert.deepEqual(await (await postJson(`/v2/models/${MODEL}/versions/1/generate`, request)).json(), whole);
  for (const path of [`/v2/models/${MODEL}/generate_stream`, `/v2/models/${MODEL}/versions/1/generate_stream`]) {
    const stream = await events(await postJson(path, request));
    assert.ok(stream.length >= 2, 'the text comes in pieces');
    for (const [i, e] of stream.entries()) {
      assert.equal(e.error, undefined);
      assert.equal(e.model_name, MODEL);
      assert.equal(e.model_version, '1');
      // KServe's GenerateStreamResponse: `done` on every event, true on the last only.
      assert.equal(e.done, i === stream.length - 1);
      assert.equal(e.id, 'gen-1');
      assert.equal(typeof e.text_output, 'string');
    }
    assert.equal(stream.map((e) => e.text_output).join(''), whole.text_output);
    assert.equal(stream.at(-1)!.finish_reason, whole.finish_reason, 'the last event carries the finish reason');
  }
  // A stop sequence ends the text before it, with finish reason stop, streamed or not.
  const stop = whole.text_output.slice(2, 4);
  const cut = whole.text_output.slice(0, whole.text_output.indexOf(stop));
  const stopped = { ...request, parameters: { ...request.parameters, stop: [stop] } };
  const short = (await (await postJson(`/v2/models/${MODEL}/generate`, stopped)).json()) as GenerateResponse;
  assert.deepEqual([short.text_output, short.finish_reason], [cut, 'stop']);
  const shortStream = await events(await postJson(`/v2/models/${MODEL}/generate_stream`, stopped));
  assert.equal(shortStream.map((e) => e.text_output).join(''), cut);
  // No tokens at all: the stream is its one last event.
  const none = await events(await postJson(`/v2/models/${MODEL}/generate_stream`, { text_input: 'x', parameters: { max_tokens: 0 } }));
  assert.deepEqual(none.map((e) => [e.text_output, e.done, e.finish_reason, e.num_output_tokens]), [['', true, 'length', 0]]);
  // Triton's curl example sends the JSON as a form (curl -d): the body is JSON whatever its content type.
  const curl = await fetch(`${base}/v2/models/${MODEL}/generate`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: JSON.stringify(request) });
  assert.equal(((await curl.json()) as GenerateResponse).text_output, whole.text_output);
  // As Triton passes a request's other properties on as parameters, they may come at the top level too.
  const { parameters, ...rest } = request;
  assert.equal(((await (await postJson(`/v2/models/${MODEL}/generate`, { ...rest, ...parameters })).json()) as GenerateResponse).text_output, whole.text_output);
});

test('errors are the protocol\'s error object', async () => {
  const infer = (path: string, inputs: unknown) => postJson(path, { inputs });
  const good = [{ name: 'input_ids', datatype: 'INT64', shape: [1, 2], data: [1, 2] }];
  await assertError(await fetch(`${base}/v2/models/nope`), 404, /nope/);
  await assertError(await fetch(`${base}/v2/models/nope/ready`), 404, /nope/);
  await assertError(await infer('/v2/models/nope/infer', good), 404, /nope/);
  await assertError(await postJson('/v2/models/nope/generate', { text_input: 'x' }), 404, /nope/);
  await assertError(await infer(`/v2/models/${MODEL}/infer`, [{ name: 'input_ids', datatype: 'INT64', shape: [1, 3], data: [1, 2] }]), 400, /shape/);
  await assertError(await infer(`/v2/models/${MODEL}/infer`, [{ name: 'input_ids', datatype: 'FP32', shape: [1, 2], data: [1, 2] }]), 400, /datatype/);
  await assertError(await postJson(`/v2/models/${MODEL}/infer`, { inputs: good, outputs: [{ name: 'hidden_states' }] }), 400, /outputs/);
  await assertError(await fetch(`${base}/v2/models/${MODEL}/infer`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"inputs": [' }), 400, /JSON/i);
  await assertError(await fetch(`${base}/v2/models/${MODEL}/versions/2`), 404, /version/);
  await assertError(await fetch(`${base}/v2/models/${MODEL}/versions/2/ready`), 404, /version/);
  await assertError(await infer(`/v2/models/${MODEL}/versions/2/infer`, good), 404, /version/);
  await assertError(await postJson(`/v2/models/${MODEL}/versions/2/generate_stream`, { text_input: 'x' }), 404, /version/);
  await assertError(await fetch(`${base}/v2/repository/index`, { method: 'POST' }), 404, /repository/);
  await assertError(await fetch(`${base}/v2/models/${MODEL}/stats`), 404, /stats/);
  await assertError(await postJson(`/v2/models/${MODEL}/generate`, { text_input: 'x', parameters: { max_tokens: 2, best_of: 2 } }), 400, /best_of/);
  await assertError(await postJson(`/v2/models/${MODEL}/generate_stream`, { text_input: 'x', parameters: { max_tokns: 2 } }), 400, /max_tokns/);
  await assertError(await postJson(`/v2/models/${MODEL}/generate`, { text_input: 'x', parameters: { temperature: -1 } }), 400, /temperature/);
  await assertError(await postJson(`/v2/models/${MODEL}/generate`, { parameters: { max_tokens: 2 } }), 400, /text_input/);
  // OpenAI paths keep OpenAI's error object.
  const openai = (await (await postJson('/v1/completions', { prompt: 'x', model: 'nope' })).json()) as { error: { message: string; type: string } };
  assert.equal(typeof openai.error.message, 'string');
  assert.equal(openai.error.type, 'not_found_error');
});

test('in process: 401, 413, 503 (with Retry-After), 500, a failure mid-stream and no tokenizer', async () => {
  // A router over the same checkpoint without shards: never ready, so inference answers 503.
  const engine = await RouterEngine.load(checkpoint, MODEL);
  const apps: Array<ReturnType<typeof buildHttpApp>> = [];
  try {
    const app = buildHttpApp(engine, { apiToken: 'tok' });
    apps.push(app);
    const auth = { authorization: 'Bearer tok', 'content-type': 'application/json' };
    const body = (payload: object) => JSON.stringify(payload);
    const oipError = (res: { statusCode: number; body: string; headers: Record<string, unknown> }, status: number, message: RegExp) => {
      assert.equal(res.statusCode, status, res.body);
      const parsed = JSON.parse(res.body) as Record<string, unknown>;
      assert.deepEqual(Object.keys(parsed), ['error']);
      assert.match(parsed.error as string, message);
    };
    oipError(await app.inject({ method: 'GET', url: `/v2/models/${MODEL}` }), 401, /bearer/);
    oipError(await app.inject({ method: 'GET', url: '/v2' }), 401, /bearer/);
    assert.equal((await app.inject({ method: 'GET', url: '/v2/health/live' })).statusCode, 200, 'probes need no token');
    const tooLarge = await app.inject({ method: 'POST', url: `/v2/models/${MODEL}/infer`, headers: auth, payload: 'x'.repeat(9 * 1024 * 1024) });
    oipError(tooLarge, 413, /limit/);
    const unavailable = await app.inject({ method: 'POST', url: `/v2/models/${MODEL}/infer`, headers: auth, payload: body({ inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [1, 1], data: [1] }] }) });
    oipError(unavailable, 503, /shard/);
    assert.equal(unavailable.headers['retry-after'], '1');
    oipError(await app.inject({ method: 'POST', url: `/v2/models/${MODEL}/generate`, headers: auth, payload: body({ text_input: 'x' }) }), 503, /shard/);
    oipError(await app.inject({ method: 'GET', url: '/v2/models/x/y/z', headers: auth }), 404, /no route/);
    // OpenAI's object on /v1, for the same refusals.
    const v1 = await app.inject({ method: 'POST', url: '/v1/completions', payload: body({ prompt: 'x' }), headers: { 'content-type': 'application/json' } });
    assert.equal(v1.statusCode, 401);
    assert.equal((JSON.parse(v1.body) as { error: { type: string } }).error.type, 'authentication_error');
    const v1Busy = await app.inject({ method: 'POST', url: '/v1/completions', headers: auth, payload: body({ prompt: 'x' }) });
    assert.deepEqual([v1Busy.statusCode, (JSON.parse(v1Busy.body) as { error: { type: string; reason: string } }).error.type], [503, 'overloaded']);

    // A ready stand-in whose inference fails: 500 before anything is sent, a final error event once the stream has begun.
    let failure: Error = new Error('boom');
    const failing = Object.assign(Object.create(engine) as RouterEngine, {
      ready: () => true,
      infer: async () => { throw new Error('boom'); },
      complete: async (_p: Int32Array, _s: unknown, onToken?: (id: number) => boolean | void) => {
        if (failure instanceof OverloadError) throw failure;
        for (const id of [72, 105, 33, 32, 72, 105, 33, 32]) onToken?.(id);
        throw failure;
      },
    });
    const failingApp = buildHttpApp(failing);
    apps.push(failingApp);
    const json = { 'content-type': 'application/json' };
    oipError(await failingApp.inject({ method: 'POST', url: `/v2/models/${MODEL}/infer`, headers: json, payload: body({ inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [1, 1], data: [1] }] }) }), 500, /boom/);
    oipError(await failingApp.inject({ method: 'POST', url: `/v2/models/${MODEL}/generate`, headers: json, payload: body({ text_input: 'x' }) }), 500, /boom/);
    failure = new Error('shard lost');
    const broken = await failingApp.inject({ method: 'POST', url: `/v2/models/${MODEL}/generate_stream`, headers: json, payload: body({ text_input: 'x' }) });
    assert.equal(broken.statusCode, 200);
    const last = broken.body.split('\n\n').filter(Boolean).at(-1)!;
    assert.deepEqual(JSON.parse(last.slice('data: '.length)), { error: 'shard lost' });
    // Refused before the first token: a JSON error with its status, not a stream.
    failure = new OverloadError('the queue is full', 'queue_full');
    const refused = await failingApp.inject({ method: 'POST', url: `/v2/models/${MODEL}/generate_stream`, headers: json, payload: body({ text_input: 'x' }) });
    oipError(refused, 503, /queue is full/);
    assert.equal(refused.headers['retry-after'], '1');

    // Generate parameters reach the engine as the same sampling options OpenAI's fields give (defaults included).
    const seen: SamplingOptions[] = [];
    const recording = Object.assign(Object.create(engine) as RouterEngine, {
      ready: () => true,
      complete: async (_p: Int32Array, sampling: SamplingOptions) => {
        seen.push(sampling);
        return { ids: [], finishReason: 'length' as const, cachedPromptTokens: 0, seed: 0 };
      },
    });
    const recordingApp = buildHttpApp(recording);
    apps.push(recordingApp);
    const generate = async (payload: object) => {
      const res = await recordingApp.inject({ method: 'POST', url: `/v2/models/${MODEL}/generate`, headers: json, payload: body({ text_input: 'x', ...payload }) });
      assert.equal(res.statusCode, 200, res.body);
      return seen.at(-1)!;
    };
    const fields = { max_tokens: 3, temperature: 0.5, top_p: 0.9, top_k: 40, min_p: 0.05, repetition_penalty: 1.1, presence_penalty: 0.5, frequency_penalty: -0.5, stop_token_ids: [10], seed: 42 };
    assert.deepEqual(await generate({ parameters: fields }), samplingOptions(fields, engine.stopIds));
    assert.deepEqual(await generate({ parameters: fields }), {
      maxTokens: 3, temperature: 0.5, topP: 0.9, topK: 40, minP: 0.05, repetitionPenalty: 1.1, presencePenalty: 0.5, frequencyPenalty: -0.5,
      seed: 42, stopIds: [...new Set([...engine.stopIds, 10])],
    });
    assert.deepEqual(await generate({}), {
      maxTokens: 16, temperature: 1, topP: 1, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0, seed: undefined, stopIds: [...engine.stopIds],
    });
    oipError(await recordingApp.inject({ method: 'POST', url: `/v2/models/${MODEL}/generate`, headers: json, payload: body({ text_input: 'x', parameters: { stop_token_ids: [999] } }) }), 400, /stop_token_ids/);
    oipError(await recordingApp.inject({ method: 'POST', url: `/v2/models/${MODEL}/generate`, headers: json, payload: body({ text_input: 'x', max_tokens: 2, parameters: { max_tokens: 3 } }) }), 400, /both/);

    // Without a tokenizer generate cannot take text.
    const noTokenizer = Object.assign(Object.create(engine) as RouterEngine, { ready: () => true, tokenizer: undefined });
    const bare = buildHttpApp(noTokenizer);
    apps.push(bare);
    oipError(await bare.inject({ method: 'POST', url: `/v2/models/${MODEL}/generate`, headers: json, payload: body({ text_input: 'x' }) }), 400, /without a tokenizer/);
  } finally {
    for (const app of apps) await app.close();
    engine.close();
  }
});
