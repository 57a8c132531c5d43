// Open Inference Protocol (KServe v2, as Triton serves it): server metadata, health, model metadata and
// readiness, infer (JSON and the binary tensor data extension) and the generate extension, DESIGN §9 and
// docs/serving.md "Open Inference Protocol (KServe v2)". Errors on /v2 paths are `{"error": "<message>"}`
// (http.ts decides the body by path).
import { createRequire } from 'node:module';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { HttpError } from './errors.js';
import type { RouterEngine } from './engine.js';
import { CompletionStream } from './completion-stream.js';
import { clientGone, stopsOf } from './openai-common.js';
import { SAMPLING_FIELD_SCHEMAS, samplingOptions, type SamplingFields } from './sampling-fields.js';
import { OverloadError } from '../core/overload.js';
import { checkSampling } from '../core/sampling.js';
import { servingMetrics } from '../core/metrics/serving.js';

/** The extensions GET /v2 announces: exactly those implemented here. */
export const OIP_EXTENSIONS = ['binary_tensor_data', 'generate'] as const;
/** The one version of the served model; a path naming another answers 404. */
export const MODEL_VERSION = '1';
const OUTPUT_NAMES = ['logits', 'routing_experts', 'routing_weights'] as const;
type OutputName = (typeof OUTPUT_NAMES)[number];
const BINARY_HEADER = 'inference-header-content-length';

function packageVersion(): string {
  return (createRequire(import.meta.url)('../../../package.json') as { version: string }).version;
}

/**
 * The binary tensor extension: a JSON header of `inference-header-content-length` bytes followed by
 * the raw little-endian data of each input that declares `parameters.binary_data_size`, in order.
 * Turned into the JSON form before schema validation, so both forms are validated alike.
 */
function parseBinaryRequest(body: Buffer, headerLength: string | undefined): unknown {
  const n = Number(headerLength);
  // Triton's raw binary request (no JSON header) needs an input with at most one variable dimension.
  if (headerLength !== undefined && n === 0)
    throw new HttpError(400, `a raw binary request (${BINARY_HEADER} 0) cannot give input_ids: its shape [-1, -1] has two variable dimensions; send a JSON header with the shape`);
  if (!Number.isInteger(n) || n < 0 || n > body.length)
    throw new HttpError(400, `${BINARY_HEADER} must be the JSON header's byte length (1..${body.length}), got ${headerLength ?? 'none'}`);
  let header: { inputs?: Array<{ datatype?: string; data?: unknown; parameters?: { binary_data_size?: number } }> };
  try {
    header = JSON.parse(body.subarray(0, n).toString('utf8'));
  } catch (err) {
    throw new HttpError(400, `binary request: the JSON header is not valid JSON (${(err as Error).message})`);
  }
  if (typeof header !== 'object' || header === null) throw new HttpError(400, 'binary request: the JSON header must be an inference request object');
  let offset = n;
  for (const input of Array.isArray(header.inputs) ? header.inputs : []) {
    const size = input?.parameters?.binary_data_size;
    if (size === undefined) continue;
    const width = input.datatype === 'INT64' ? 8 : input.datatype === 'INT32' ? 4 : 0;
    if (!width) throw new HttpError(400, `binary input of datatype ${String(input.datatype)}: input_ids must be INT64 or INT32`);
    if (!Number.isInteger(size) || size % width !== 0 || offset + size > body.length)
      throw new HttpError(400, `binary_data_size ${size} does not fit the ${body.length - offset} bytes left for ${input.datatype} data`);
    const view = new DataView(body.buffer, body.byteOffset + offset, size);
    input.data = Array.from({ length: size / width }, (_, i) => (width === 8 ? Number(view.getBigInt64(8 * i, true)) : view.getInt32(4 * i, true)));
    offset += size;
  }
  if (offset !== body.length) throw new HttpError(400, `binary request has ${body.length - offset} bytes after its declared data`);
  return header;
}

/** Tensor data may be nested row-major arrays ([[1, 2], [3, 4]]) as well as flat: flattened before validation. */
function flattenInputData(body: unknown): void {
  const inputs = (body as { inputs?: unknown } | null)?.inputs;
  if (!Array.isArray(inputs)) return;
  for (const input of inputs) {
    const data = (input as { data?: unknown } | null)?.data;
    if (Array.isArray(data) && data.some(Array.isArray)) (input as { data: unknown[] }).data = data.flat(Infinity);
  }
}

const modelParams = {
  type: 'object',
  properties: { model: { type: 'string' }, version: { type: 'string' } },
  required: ['model'],
} as const;

const inferSchema = {
  params: modelParams,
  body: {
    type: 'object',
    required: ['inputs'],
    properties: {
      id: { type: 'string' },
      inputs: {
        type: 'array', minItems: 1, maxItems: 1,
        items: {
          type: 'object',
          required: ['name', 'datatype', 'shape', 'data'],
          properties: {
            name: { const: 'input_ids' },
            datatype: { enum: ['INT64', 'INT32'] },
            shape: { type: 'array', items: { type: 'integer', minimum: 1 }, minItems: 2, maxItems: 2 },
            data: { type: 'array', items: { type: 'integer' } },
            parameters: { type: 'object' },
          },
        },
      },
      outputs: {
        type: 'array',
        items: {
          type: 'object', required: ['name'],
          properties: {
            name: { enum: OUTPUT_NAMES },
            parameters: { type: 'object', properties: { binary_data: { type: 'boolean' } } },
          },
        },
      },
      // binary_data_output: every output in binary unless the output says otherwise; other parameters are ignored.
      parameters: { type: 'object', properties: { binary_data_output: { type: 'boolean' } } },
    },
  },
} as const;

interface InferBody {
  id?: string;
  inputs: Array<{ name: string; datatype: string; shape: number[]; data: number[] }>;
  outputs?: Array<{ name: OutputName; parameters?: { binary_data?: boolean } }>;
  parameters?: { binary_data_output?: boolean };
}

interface OutputTensor { name: OutputName; datatype: 'FP32' | 'INT32'; shape: number[]; values: Float32Array | Int32Array }

/** Generate parameters: the shared sampling fields (logit_bias excepted: the spec's values are scalars), stop, and Triton's stream flag. */
const { logit_bias: _logitBias, ...shared } = SAMPLING_FIELD_SCHEMAS;
// No `default`s in this schema: a field may come at the top level or in `parameters`, and samplingOptions applies the defaults.
const GENERATE_PARAMETERS: Record<string, object> = {
  ...Object.fromEntries(Object.entries(shared).map(([name, schema]) => {
    const { default: _default, ...rest } = schema as { default?: unknown };
    return [name, rest];
  })),
  stop: { anyOf: [{ type: 'string' }, { type: 'array', items: { type: 'string' }, maxItems: 5 }] },
  // Triton's examples send it; the URL decides (generate or generate_stream), so its value does not matter.
  stream: { type: 'boolean' },
};
const GENERATE_PARAMETER_NAMES = Object.keys(GENERATE_PARAMETERS);
const GENERATE_FIELDS = ['id', 'text_input', 'parameters'];

const generateSchema = {
  params: modelParams,
  body: {
    type: 'object',
    required: ['text_input'],
    properties: {
      id: { type: 'string' },
      text_input: { type: 'string' },
      parameters: { type: 'object', properties: GENERATE_PARAMETERS },
      ...GENERATE_PARAMETERS,
    },
  },
};

type GenerateParameters = SamplingFields & { stop?: string | string[]; stream?: boolean };
type GenerateBody = GenerateParameters & { id?: string; text_input: string; parameters?: GenerateParameters };

const names = (list: string[]) => list.map((n) => `'${n}'`).join(', ');

/**
 * Unknown names are refused, not ignored (a misspelt `max_token` would otherwise silently generate 16
 * tokens). As Triton passes the request's other properties on as parameters, a parameter may also come
 * at the top level, but not in both places.
 */
function checkGenerateNames(body: unknown): void {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return; // the schema refuses it
  const top = Object.keys(body);
  const unknownTop = top.filter((k) => !GENERATE_FIELDS.includes(k) && !GENERATE_PARAMETER_NAMES.includes(k));
  const parameters = (body as { parameters?: unknown }).parameters;
  const inParameters = typeof parameters === 'object' && parameters !== null && !Array.isArray(parameters) ? Object.keys(parameters) : [];
  const unknown = [...unknownTop, ...inParameters.filter((k) => !GENERATE_PARAMETER_NAMES.includes(k))];
  if (unknown.length)
    throw new HttpError(400, `unknown generate parameter${unknown.length > 1 ? 's' : ''} ${names(unknown)} (supported: ${names(GENERATE_PARAMETER_NAMES)})`);
  const twice = inParameters.filter((k) => top.includes(k));
  if (twice.length) throw new HttpError(400, `${names(twice)} given both at the top level and in parameters`);
}

export function oipRoutes(app: FastifyInstance, engine: RouterEngine): void {
  const config = engine.model.config;
  const k = config.num_experts_per_tok;
  // Routing outputs cover the MoE layers in order (DeepSeek-MoE's dense layers route nothing).
  const moeLayers = engine.model.family.moeLayers.length;
  const version = packageVersion();
  /** The served model, and version '1' when the path names one (404 otherwise). */
  const checkModel = (params: { model: string; version?: string }) => {
    if (params.model !== engine.modelName) throw new HttpError(404, `model '${params.model}' is not served here (serving '${engine.modelName}')`, 'not_found_error');
    if (params.version !== undefined && params.version !== MODEL_VERSION)
      throw new HttpError(404, `model '${params.model}' has no version '${params.version}' (versions: ${MODEL_VERSION})`, 'not_found_error');
  };
  type ModelRequest = FastifyRequest<{ Params: { model: string; version?: string } }>;
  const modelPaths = (suffix: string) => [`/v2/models/:model${suffix}`, `/v2/models/:model/versions/:version${suffix}`];

  // One plugin context, so its body parsing stays on /v2: whatever the content type (Triton's curl
  // examples send none but JSON), a body is JSON, unless it is binary (the header, or octet-stream).
  void app.register(async (v2) => {
    v2.removeAllContentTypeParsers();
    const json = v2.getDefaultJsonParser('error', 'ignore');
    v2.addContentTypeParser('*', { parseAs: 'buffer' }, (req, body, done) => {
      if (req.headers[BINARY_HEADER] !== undefined || String(req.headers['content-type']).startsWith('application/octet-stream')) return done(null, body);
      json(req, (body as Buffer).toString('utf8'), done);
    });

    v2.get('/v2', async () => ({ name: 'switchyard', version, extensions: OIP_EXTENSIONS }));
    v2.get('/v2/health/live', async () => ({ live: true }));
    v2.get('/v2/health/ready', async (_req, reply) => {
      const ready = engine.ready();
      return reply.code(ready ? 200 : 503).send({ ready });
    });

    const metadata = {
      name: engine.modelName, versions: [MODEL_VERSION], platform: 'switchyard',
      inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [-1, -1] }],
      outputs: [
        { name: 'logits', datatype: 'FP32', shape: [-1, -1, config.vocab_size] },
        { name: 'routing_experts', datatype: 'INT32', shape: [moeLayers, -1, -1, k] },
        { name: 'routing_weights', datatype: 'FP32', shape: [moeLayers, -1, -1, k] },
      ],
    };
    for (const path of modelPaths('')) v2.get(path, { schema: { params: modelParams } }, async (req: ModelRequest) => {
      checkModel(req.params);
      return metadata;
    });
    for (const path of modelPaths('/ready')) v2.get(path, { schema: { params: modelParams } }, async (req: ModelRequest, reply) => {
      checkModel(req.params);
      const ready = engine.ready();
      return reply.code(ready ? 200 : 503).send({ name: engine.modelName, ready });
    });

    for (const path of modelPaths('/infer')) v2.post<{ Params: { model: string; version?: string }; Body: InferBody }>(path, {
      schema: inferSchema,
      preValidation: async (req) => {
        if (Buffer.isBuffer(req.body)) req.body = parseBinaryRequest(req.body, req.headers[BINARY_HEADER] as string | undefined) as InferBody;
        flattenInputData(req.body);
      },
    }, (req, reply) => infer(req, reply));

    for (const [path, stream] of [...modelPaths('/generate').map((p) => [p, false] as const), ...modelPaths('/generate_stream').map((p) => [p, true] as const)])
      v2.post<{ Params: { model: string; version?: string }; Body: GenerateBody }>(path, {
        schema: generateSchema,
        preValidation: async (req) => checkGenerateNames(req.body),
      }, (req, reply) => generate(req, reply, stream));
  });

  async function infer(req: FastifyRequest<{ Params: { model: string; version?: string }; Body: InferBody }>, reply: FastifyReply) {
    checkModel(req.params);
    if (!engine.ready()) throw new OverloadError('not every expert has a shard yet', 'unavailable');
    const input = req.body.inputs[0];
    const [batch, tokens] = input.shape;
    if (!Array.isArray(input.data) || input.data.length !== batch * tokens)
      throw new HttpError(400, `input_ids has ${Array.isArray(input.data) ? input.data.length : 0} values for shape [${batch}, ${tokens}]`);
    if (tokens > config.max_position_embeddings)
      throw new HttpError(400, `sequence length ${tokens} exceeds the model's context of ${config.max_position_embeddings}`);
    const bad = input.data.findIndex((id) => id < 0 || id >= config.vocab_size);
    if (bad >= 0) throw new HttpError(400, `input_ids[${bad}] = ${input.data[bad]} is outside the vocabulary [0, ${config.vocab_size})`);
    const { logits, routing } = await engine.infer(Int32Array.from(input.data), batch, tokens, String(req.id), req.deadline);
    const reasons = [...new Set(routing.flatMap((l) => l.degradedReasons ?? []))];
    // No `outputs`: every output the model has, as the protocol says.
    const requested = req.body.outputs ?? OUTPUT_NAMES.map((name) => ({ name, parameters: undefined }));
    const routingOf = (field: 'expert' | 'weight'): Float32Array | Int32Array => {
      const out = field === 'expert' ? new Int32Array(moeLayers * batch * tokens * k) : new Float32Array(moeLayers * batch * tokens * k);
      routing.forEach((layer, l) => {
        let at = l * batch * tokens * k;
        for (const plan of layer.plans) {
          out.set(plan[field], at);
          at += plan[field].length;
        }
      });
      return out;
    };
    const outputs: OutputTensor[] = requested.map(({ name }) =>
      name === 'logits' ? { name, datatype: 'FP32', shape: [batch, tokens, config.vocab_size], values: logits }
        : name === 'routing_experts' ? { name, datatype: 'INT32', shape: [moeLayers, batch, tokens, k], values: routingOf('expert') }
          : { name, datatype: 'FP32', shape: [moeLayers, batch, tokens, k], values: routingOf('weight') });
    const allBinary = req.body.parameters?.binary_data_output === true;
    const binary = requested.map((o) => o.parameters?.binary_data ?? allBinary);
    // Some rows could not reach their experts (drop or reroute policy): Open Inference response parameters say so.
    if (reasons.length) {
      reply.header('x-switchyard-degraded', 'true');
      servingMetrics.degraded.inc();
    }
    const head = {
      model_name: engine.modelName, model_version: MODEL_VERSION, ...(req.body.id !== undefined ? { id: req.body.id } : {}),
      ...(reasons.length ? { parameters: { degraded: true, degraded_reasons: reasons.join('; ') } } : {}),
    };
    if (!binary.some(Boolean))
      return { ...head, outputs: outputs.map((o) => ({ name: o.name, datatype: o.datatype, shape: o.shape, data: Array.from(o.values) })) };
    // Binary extension: JSON header, then the raw little-endian bytes of each binary output in order.
    const json = Buffer.from(JSON.stringify({
      ...head,
      outputs: outputs.map((o, i) => binary[i]
        ? { name: o.name, datatype: o.datatype, shape: o.shape, parameters: { binary_data_size: o.values.byteLength } }
        : { name: o.name, datatype: o.datatype, shape: o.shape, data: Array.from(o.values) }),
    }));
    const parts = [json, ...outputs.flatMap((o, i) => (binary[i] ? [Buffer.from(o.values.buffer, o.values.byteOffset, o.values.byteLength)] : []))];
    return reply.header('content-type', 'application/octet-stream').header(BINARY_HEADER, String(json.length)).send(Buffer.concat(parts));
  }

  async function generate(req: FastifyRequest<{ Params: { model: string; version?: string }; Body: GenerateBody }>, reply: FastifyReply, stream: boolean) {
    checkModel(req.params);
    const tokenizer = engine.tokenizer;
    if (!tokenizer) throw new HttpError(400, 'the router runs without a tokenizer (--skip-tokenizer): generate takes text; send token ids to infer instead');
    const { id, text_input: text, parameters, ...topLevel } = req.body;
    const fields: GenerateParameters = { ...topLevel, ...parameters };
    const sampling = samplingOptions(fields, engine.stopIds);
    // A bad request is a 400 whatever the state of the cluster (SamplingError: stop_token_ids outside the vocabulary).
    checkSampling(sampling, config.vocab_size);
    if (!engine.ready()) throw new OverloadError('not every expert has a shard yet', 'unavailable');
    const prompt = tokenizer.encode(text);
    if (prompt.length === 0) throw new HttpError(400, 'text_input encodes to no tokens');
    if (prompt.length > config.max_position_embeddings)
      throw new HttpError(400, `text_input of ${prompt.length} tokens exceeds the model's context of ${config.max_position_embeddings}`);
    const stops = stopsOf(fields.stop, engine);
    const completion = new CompletionStream(tokenizer, prompt, stops);
    const head = { model_name: engine.modelName, model_version: MODEL_VERSION, ...(id !== undefined ? { id } : {}) };
    const event = (body: object) => `data: ${JSON.stringify(body)}\n\n`;
    // The stream's headers (status 200) go out with the first generated id: a request refused before
    // inference begins (queue full, deadline while waiting) still gets its JSON error and status.
    let started = false;
    const start = () => {
      if (started) return;
      started = true;
      reply.hijack();
      reply.raw.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-request-id': String(req.id) });
    };
    const gone = clientGone(reply);
    let result: Awaited<ReturnType<RouterEngine['complete']>>;
    try {
      result = await engine.complete(prompt, sampling, (next) => {
        const piece = completion.push(next);
        if (stream && !gone.aborted) {
          start();
          if (piece) reply.raw.write(event({ ...head, text_output: piece, done: false }));
        }
        return completion.stopped || gone.aborted;
      }, String(req.id), req.deadline, gone);
    } catch (err) {
      if (!started) throw err;
      // Headers are sent: the failure is the stream's last event.
      if (err instanceof OverloadError) servingMetrics.rejections.inc({ reason: err.reason });
      if (!gone.aborted) reply.raw.end(event({ error: (err as Error).message }));
      return reply;
    }
    if (result.degraded) servingMetrics.degraded.inc();
    const last = {
      finish_reason: completion.stopped ? 'stop' : result.finishReason,
      num_input_tokens: prompt.length, num_output_tokens: result.ids.length,
      // Some rows could not reach their experts (drop or reroute policy): response parameters say so, as infer's do.
      ...(result.degraded ? { parameters: { degraded: true, degraded_reasons: result.degraded.join('; ') } } : {}),
    };
    if (stream) {
      start(); // a generation of no tokens has not started the stream yet
      reply.raw.end(gone.aborted ? undefined : event({ ...head, text_output: completion.rest(), done: true, ...last }));
      return reply;
    }
    if (result.degraded) reply.header('x-switchyard-degraded', 'true');
    return { ...head, text_output: completion.text, ...last };
  }
}
