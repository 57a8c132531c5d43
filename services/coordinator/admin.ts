// The coordinator's HTTP side: GET /metrics (open, for scrapers) and the placement admin endpoint
// (bearer token required): show the placement, plan a new one (dry run), apply it.
import Fastify, { type FastifyInstance } from 'fastify';
import { bearerMatches } from '../core/auth.js';
import { expertKeyText } from '../core/placement.js';
import { metricsText } from '../core/metrics/registry.js';
import type { Membership } from './membership.js';
import { PlacementInfeasible } from './planner.js';
import type { Rebalancer } from './rebalancer.js';

export interface AdminOptions {
  /** Without a token the admin routes answer 403: moving experts is never open to anyone. */
  token?: string;
}

/** The placement as operators read it: shards with what they serve and what they are assigned, demand, imbalance. */
export function placementReport(membership: Membership, rebalancer?: Rebalancer) {
  const table = membership.placement();
  return {
    version: table.version,
    generation: rebalancer?.generation ?? 0,
    model: membership.shape ?? null,
    routers: table.routers ?? 0,
    shards: membership.list('expert-shard').map((m) => ({
      shard_id: m.memberId, address: m.address, max_experts: m.maxExperts, draining: Boolean(m.draining),
      serving: membership.serving(m).map(expertKeyText).join(' '),
      assigned: m.assigned?.map(expertKeyText).join(' ') ?? null,
      rows_per_second: m.rowsPerSecond ?? 0,
    })),
    replicated: table.entries.filter((e) => e.shardIds.length > 1).map((e) => ({ layer: e.layer, expert: e.expert, shards: e.shardIds })),
    predicted_max_over_mean: rebalancer?.predictedImbalance() ?? 0,
    measured_max_over_mean: rebalancer?.measuredImbalance() ?? 0,
  };
}

export function buildAdminApp(membership: Membership, rebalancer: Rebalancer | undefined, o: AdminOptions): FastifyInstance {
  const app = Fastify({ logger: false });
  app.get('/metrics', async (_req, reply) => {
    const { contentType, body } = await metricsText();
    return reply.type(contentType).send(body);
  });
  // By the matched route, not the raw URL: the router decodes %-escapes (/%61dmin/... matches /admin/...).
  app.addHook('onRequest', async (req, reply) => {
    if (!req.routeOptions.url?.startsWith('/admin/')) return;
    if (!o.token) return reply.code(403).send({ error: { message: 'the admin endpoint is disabled: start the coordinator with --admin-token-file (or SWITCHYARD_ADMIN_TOKEN)', type: 'forbidden' } });
    if (!bearerMatches(req.headers.authorization, o.token))
      return reply.code(401).header('www-authenticate', 'Bearer').send({ error: { message: 'missing or wrong bearer token (Authorization: Bearer <token>)', type: 'authentication_error' } });
  });
  const needRebalancer = () => {
    if (!rebalancer) throw Object.assign(new Error('this coordinator runs a training job: placement changes happen at step boundaries, not on demand'), { statusCode: 409 });
    return rebalancer;
  };
  app.get('/admin/placement', async () => placementReport(membership, rebalancer));
  app.post('/admin/placement/plan', async () => ({ plan: needRebalancer().plan().summary }));
  app.post('/admin/placement/apply', async () => needRebalancer().rebalance('operator request'));
  app.setErrorHandler((err: Error & { statusCode?: number }, _req, reply) => {
    const code = err instanceof PlacementInfeasible ? 409 : err.statusCode && err.statusCode < 500 ? err.statusCode : 500;
    void reply.code(code).send({ error: { message: err.message, type: code === 409 ? 'conflict' : 'error' } });
  });
  app.setNotFoundHandler((req, reply) => void reply.code(404).send({ error: { message: `no route ${req.method} ${req.url}`, type: 'not_found' } }));
  return app;
}
