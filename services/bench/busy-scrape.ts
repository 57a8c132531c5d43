// The busy share of each service over a bench's timed window: its /metrics scraped right before and right
// after, the difference of `switchyard_busy_seconds_total{measure}` over the bench's wall time between the
// two scrapes (services/core/metrics/busy.ts defines the metric).
import type { BusyMeasure } from '../core/metrics/busy.js';

export interface BusyScrape {
  /** Busy seconds since the service started, by measure. */
  seconds: Record<BusyMeasure, number>;
  /** The service's own trailing-window gauge, when it exports one. */
  ratio: Partial<Record<BusyMeasure, number>>;
}

const SERIES = /^switchyard_busy_(seconds_total|ratio)\{measure="(event_loop|cpu)"\} (\S+)$/gm;

/** The busy series of one Prometheus text exposition; throws when the counters are missing. */
export function busyFromText(text: string): BusyScrape {
  const seconds: Partial<Record<BusyMeasure, number>> = {};
  const ratio: Partial<Record<BusyMeasure, number>> = {};
  for (const m of text.matchAll(SERIES)) (m[1] === 'ratio' ? ratio : seconds)[m[2] as BusyMeasure] = Number(m[3]);
  if (seconds.event_loop === undefined || seconds.cpu === undefined) throw new Error('no switchyard_busy_seconds_total{measure="event_loop"|"cpu"} series');
  return { seconds: seconds as Record<BusyMeasure, number>, ratio };
}

export interface ServiceScrape extends BusyScrape {
  /** performance.now() (ms) in this process when the answer arrived. */
  at: number;
}

export async function scrapeBusy(url: string): Promise<ServiceScrape> {
  const res = await fetch(url);
  if (res.status !== 200) throw new Error(`GET ${url}: ${res.status}`);
  const text = await res.text();
  try {
    return { ...busyFromText(text), at: performance.now() };
  } catch (err) {
    throw new Error(`GET ${url}: ${(err as Error).message}`);
  }
}

/** Busy seconds per wall second between two scrapes of one service. */
export function busyShare(before: ServiceScrape, after: ServiceScrape): Record<BusyMeasure, number> {
  const wall = (after.at - before.at) / 1000;
  return {
    event_loop: (after.seconds.event_loop - before.seconds.event_loop) / wall,
    cpu: (after.seconds.cpu - before.seconds.cpu) / wall,
  };
}

/** Scrapes every named service at once. */
export async function scrapeAll(urls: Record<string, string>): Promise<Record<string, ServiceScrape>> {
  const entries = await Promise.all(Object.entries(urls).map(async ([name, url]) => [name, await scrapeBusy(url)] as const));
  return Object.fromEntries(entries);
}
