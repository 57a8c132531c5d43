// Open Inference Protocol (KServe v2): health, model metadata and infer (JSON), DESIGN §9.
import type { FastifyInstance } from 'fastify';
import { HttpError } from './errors.js';
import type { RouterEngine } from './engine.js';

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
          },
        },
      },
      outputs: { type: 'array', items: { type: 'object', properties: { name: { const: 'logits' } } } },
    },
  },
} as const;

interface InferBody {
  id?: string;
  inputs: Array<{ name: string; datatype: string; shape: number[]; data: number[] }>;
}

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
  app.post<{ Params: { model: string }; Body: InferBody }>('/v2/models/:model/infer', { schema: inferSchema }, async (req) => {
    checkModel(req.params.model);
    if (!engine.ready()) throw new HttpError(503, 'not every expert has a shard yet', 'unavailable');
    const input = req.body.inputs[0];
    const [batch, tokens] = input.shape;
    if (input.data.length !== batch * tokens)
      throw new HttpError(400, `input_ids has ${input.data.length} values for shape [${batch}, ${tokens}]`);
    if (tokens > config.max_position_embeddings)
      throw new HttpError(400, `sequence length ${tokens} exceeds the model's context of ${config.max_position_embeddings}`);
    const bad = input.data.findIndex((id) => id < 0 || id >= config.vocab_size);
    if (bad >= 0) throw new HttpError(400, `input_ids[${bad}] = ${input.data[bad]} is outside the vocabulary [0, ${config.vocab_size})`);
    const logits = await engine.infer(Int32Array.from(input.data), batch, tokens);
    return {
      model_name: engine.modelName, model_version: '1', ...(req.body.id ? { id: req.body.id } : {}),
      outputs: [{ name: 'logits', datatype: 'FP32', shape: [batch, tokens, config.vocab_size], data: Array.from(logits) }],
    };
  });
}
