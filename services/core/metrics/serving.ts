// The serving router's HTTP and dispatch metrics (DESIGN §11): base units, `_total` counters, label sets
// bounded by routes, statuses, reasons, layers and experts. Exported once a router engine or its HTTP app
// registers them (servingMetricGroup), never by shards, coordinators or training processes.
import { Counter, Gauge, Histogram } from 'prom-client';
import { MetricGroup } from './registry.js';

const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

export const servingMetrics = {
  requests: new Counter({ name: 'switchyard_http_requests_total', help: 'HTTP requests answered, by route and status', labelNames: ['route', 'status'], registers: [] }),
  latency: new Histogram({ name: 'switchyard_http_request_duration_seconds', help: 'HTTP request latency, by route', labelNames: ['route'], buckets: LATENCY_BUCKETS, registers: [] }),
  inFlight: new Gauge({ name: 'switchyard_http_requests_in_flight', help: 'HTTP requests being answered', registers: [] }),
  rejections: new Counter({ name: 'switchyard_router_rejections_total', help: 'Requests answered 503 (or 401/413/4xx refusals), by reason', labelNames: ['reason'], registers: [] }),
  degraded: new Counter({ name: 'switchyard_router_degraded_responses_total', help: 'Responses flagged degraded (some rows could not reach their experts)', registers: [] }),
  unservedRows: new Counter({
    name: 'switchyard_router_unserved_rows_total', help: 'Rows that could not reach their expert as routed, by reason (then dropped, rerouted or rejected per the overflow policy)',
    labelNames: ['layer', 'expert', 'reason'], registers: [],
  }),
  shardsDown: new Gauge({ name: 'switchyard_router_shards_down', help: 'Shards this router currently considers down', registers: [] }),
  dispatchSeconds: new Histogram({ name: 'switchyard_dispatch_duration_seconds', help: 'Time from sending a shard its rows to its reply', labelNames: ['shard'], buckets: LATENCY_BUCKETS, registers: [] }),
  dispatchBytes: new Counter({ name: 'switchyard_dispatch_bytes_total', help: 'Row bytes sent to each shard', labelNames: ['shard'], registers: [] }),
};

// Known label values start at zero, so dashboards and rules find the series before the first event.
for (const reason of ['queue_full', 'deadline', 'unavailable', 'at_capacity', 'shutting_down', 'unauthorized']) servingMetrics.rejections.inc({ reason }, 0);

// The router's busy share (event loop, CPU) rides with its serving group.
export const servingMetricGroup = new MetricGroup([...Object.values(servingMetrics), ...MetricGroup.busy]);
