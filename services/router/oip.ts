// Open Inference Protocol (KServe v2): health, model metadata and infer (JSON), DESIGN §9.
import type { FastifyInstance } from 'fastify';
import { HttpError } from './errors.js';
import type { RouterEngine } from './engine.js';
import { OverloadError } from '../core/overload.js';
import { servingMetrics } from '../core/metrics/serving.js';

const OUTPUT_NAMES = ['logits', 'routing_experts', 'routing_weights'] as const;
type OutputName = (typeof OUTPUT_NAMES)[number];
const BINARY_HEADER = 'inference-header-content-length';

/**
 * The binary tensor extension: a JSON header of `inference-header-content-length` bytes followed by
 * the raw little-endian data of each input that declares `parameters.binary_data_size`, in order.
 * Turned into the JSON form before schema validation, so both forms are validated alike.
 */
function parseBinaryRequest(body: Buffer, headerLength: string | undefined): unknown {
  const n = Number(headerLength);
  if (!Number.isInteger(n) || n < 0 || n > body.length)
    throw new HttpError(400, `${BINARY_HEADER} must be the JSON header's byte length (0..${body.length}), got ${headerLength ?? 'none'}`);
  let header: { inputs?: Array<{ datatype?: string; data?: unknown; parameters?: { binary_data_size?: number } }> };
  try {
    header = JSON.parse(body.subarray(0, n).toString('utf8'));
  } catch (err) {
    throw new HttpError(400, `binary request: the JSON header is not valid JSON (${(err as Error).message})`);
  }
  let offset = n;
  for (const input of header.inputs ?? []) {
    const size = input.parameters?.binary_data_size;
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

const inferSchema = {
  params: { type: 'object', properties: { model: { type: 'string' } }, required: ['model'] },
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
      parameters: { type: 'object' },
    },
  },
} as const;

interface InferBody {
  id?: string;
  inputs: Array<{ name: string; datatype: string; shape: number[]; data: number[] }>;
  outputs?: Array<{ name: OutputName; parameters?: { binary_data?: boolean } }>;
}

interface OutputTensor { name: OutputName; datatype: 'FP32' | 'INT32'; shape: number[]; values: Float32Array | Int32Array }

export function oipRoutes(app: FastifyInstance, engine: RouterEngine): void {
  const config = engine.model.config;
  const checkModel = (name: string) => {
    if (name !== engine.modelName) throw new HttpError(404, `model '${name}' is not served here (serving '${engine.modelName}')`, 'not_found_error');
  };
  app.get('/v2/health/live', async () => ({ live: true }));
  app.get('/v2/health/ready', async (_req, reply) => {
    const ready = engine.ready();
    return reply.code(ready ? 200 : 503).send({ ready });
  });
  app.get<{ Params: { model: string } }>('/v2/models/:model', async (req) => {
    checkModel(req.params.model);
    return {
      name: engine.modelName, platform: 'switchyard', versions: ['1'],
      inputs: [{ name: 'input_ids', datatype: 'INT64', shape: [-1, -1] }],
      outputs: [{ name: 'logits', datatype: 'FP32', shape: [-1, -1, config.vocab_size] }],
    };
  });
  app.get<{ Params: { model: string } }>('/v2/models/:model/ready', async (req, reply) => {
    checkModel(req.params.model);
    return reply.code(engine.ready() ? 200 : 503).send({ name: engine.modelName, ready: engine.ready() });
  });
  app.addContentTypeParser('application/octet-stream', { parseAs: 'buffer' }, (_req, body, done) => done(null, body));
  app.post<{ Params: { model: string }; Body: InferBody }>('/v2/models/:model/infer', {
    schema: inferSchema,
    preValidation: async (req) => {
      if (Buffer.isBuffer(req.body)) req.body = parseBinaryRequest(req.body, req.headers[BINARY_HEADER] as string | undefined) as InferBody;
    },
  }, async (req, reply) => {
    checkModel(req.params.model);
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
    const requested = req.body.outputs ?? [{ name: 'logits' as const }];
    const k = config.num_experts_per_tok;
    // Routing outputs cover the MoE layers in order (DeepSeek-MoE's dense layers route nothing).
    const layers = engine.model.family.moeLayers.length;
    const routingOf = (field: 'expert' | 'weight'): Float32Array | Int32Array => {
      const out = field === 'expert' ? new Int32Array(layers * batch * tokens * k) : new Float32Array(layers * batch * tokens * k);
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
        : name === 'routing_experts' ? { name, datatype: 'INT32', shape: [layers, batch, tokens, k], values: routingOf('expert') }
          : { name, datatype: 'FP32', shape: [layers, batch, tokens, k], values: routingOf('weight') });
    const binary = requested.map((o) => o.parameters?.binary_data === true);
    // Some rows could not reach their experts (drop or reroute policy): Open Inference response parameters say so.
    if (reasons.length) {
      reply.header('x-switchyard-degraded', 'true');
      servingMetrics.degraded.inc();
    }
    const head = {
      model_name: engine.modelName, model_version: '1', ...(req.body.id ? { id: req.body.id } : {}),
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
  });
}
