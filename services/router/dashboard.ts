// The router's live load-balance page (DESIGN §11): GET /dashboard is one self-contained HTML page (no
// CDN, no build step) that follows GET /dashboard/events (server-sent events, one snapshot a second);
// GET /dashboard/data is the same snapshot as JSON for scripts.
import type { ServerResponse } from 'node:http';
import type { FastifyInstance } from 'fastify';
import type { RouterEngine } from './engine.js';

const INTERVAL_MS = 1_000;

function snapshot(engine: RouterEngine) {
  return {
    model: engine.modelName,
    time: new Date().toISOString(),
    queue: engine.scheduler.depth,
    shardsDown: engine.transport.health.downAddresses().length,
    layers: engine.routing.view(),
  };
}

const PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Switchyard — expert load</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #f7f8fa; }
 h1 { font-size: 1.3em; margin: 0 0 .2em; } .meta { color: #5b6475; margin-bottom: 1em; }
 .layer { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: .8em 1em; margin-bottom: 1em; }
 .layer h2 { font-size: 1em; margin: 0 0 .5em; display: flex; gap: 1.5em; }
 .layer h2 span { font-weight: normal; color: #5b6475; }
 .bars { display: flex; align-items: flex-end; gap: 3px; height: 140px; border-bottom: 1px solid #c9ced8; }
 .bar { flex: 1; position: relative; background: #3b6fd8; min-width: 4px; }
 .bar.hot { background: #d8583b; } .bar .drop { position: absolute; left: 0; right: 0; top: 0; background: #f0b400; }
 .labels { display: flex; gap: 3px; font-size: 11px; color: #5b6475; } .labels div { flex: 1; text-align: center; min-width: 4px; }
 .legend span { display: inline-block; width: .8em; height: .8em; margin: 0 .3em 0 1em; vertical-align: -1px; }
</style></head>
<body>
<h1>Switchyard — expert load</h1>
<div class="meta" id="meta">connecting…</div>
<div class="legend">routed tokens/s per expert<span style="background:#3b6fd8"></span>load<span style="background:#d8583b"></span>above 1.5 × mean<span style="background:#f0b400"></span>dropped</div>
<div id="layers"></div>
<script>
const fmt = (x) => x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
function render(s) {
  document.getElementById('meta').textContent = s.model + ' · ' + new Date(s.time).toLocaleTimeString() +
    ' · waiting ' + s.queue.waiting + ' · running ' + s.queue.running + ' · shards down ' + s.shardsDown;
  const root = document.getElementById('layers');
  root.replaceChildren(...s.layers.map((l) => {
    const box = document.createElement('div');
    box.className = 'layer';
    box.dataset.layer = l.layer;
    const max = Math.max(1e-9, ...l.load);
    const mean = l.load.reduce((a, b) => a + b, 0) / l.load.length;
    const title = document.createElement('h2');
    title.innerHTML = 'Layer ' + l.layer + ' <span>max/mean ' + fmt(l.imbalanceMaxOverMean) + '</span><span>CV ' + fmt(l.imbalanceCv) +
      '</span><span>' + (l.utilization === null ? 'dropless' : 'capacity used ' + (100 * l.utilization).toFixed(0) + '%') + '</span><span>dropped ' + fmt(l.drops.reduce((a, b) => a + b, 0)) + '/s</span>';
    const bars = document.createElement('div');
    bars.className = 'bars';
    const labels = document.createElement('div');
    labels.className = 'labels';
    l.load.forEach((v, e) => {
      const bar = document.createElement('div');
      bar.className = 'bar' + (mean > 0 && v > 1.5 * mean ? ' hot' : '');
      bar.style.height = (100 * v / max) + '%';
      bar.dataset.expert = e;
      bar.dataset.load = v;
      bar.title = 'expert ' + e + ': ' + fmt(v) + ' tokens/s, dropped ' + fmt(l.drops[e]) + '/s';
      if (l.drops[e] > 0 && v > 0) {
        const drop = document.createElement('div');
        drop.className = 'drop';
        drop.style.height = Math.min(100, 100 * l.drops[e] / v) + '%';
        bar.append(drop);
      }
      bars.append(bar);
      const label = document.createElement('div');
      label.textContent = e;
      labels.append(label);
    });
    box.append(title, bars, labels);
    return box;
  }));
}
const source = new EventSource('dashboard/events');
source.onmessage = (m) => render(JSON.parse(m.data));
source.onerror = () => { document.getElementById('meta').textContent = 'reconnecting…'; };
</script>
</body></html>`;

export function dashboardRoutes(app: FastifyInstance, engine: RouterEngine): void {
  app.get('/dashboard', async (_req, reply) => reply.header('content-type', 'text/html; charset=utf-8').send(PAGE));
  app.get('/dashboard/data', async () => snapshot(engine));
  // One snapshot a second for all open pages, not one timer per page. A hijacked stream is never idle,
  // so app.close() would wait for every open tab: closing the app ends them.
  const streams = new Set<ServerResponse>();
  let timer: NodeJS.Timeout | undefined;
  const broadcast = () => {
    const event = `data: ${JSON.stringify(snapshot(engine))}\n\n`;
    for (const res of streams) res.write(event);
  };
  const drop = (res: ServerResponse) => {
    streams.delete(res);
    if (streams.size > 0) return;
    clearInterval(timer);
    timer = undefined;
  };
  app.get('/dashboard/events', (req, reply) => {
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
    res.write(`data: ${JSON.stringify(snapshot(engine))}\n\n`);
    streams.add(res);
    timer ??= setInterval(broadcast, INTERVAL_MS);
    req.raw.on('close', () => drop(res));
  });
  app.addHook('preClose', async () => {
    for (const res of streams) {
      drop(res);
      res.end();
    }
  });
}
