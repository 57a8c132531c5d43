// Which shards are down, from the router's side: a broken stream or failed call marks a shard down at
// once; while down it is probed with grpc.health.v1 and comes back when it answers SERVING. Probes are
// the only traffic a down shard gets, so a dead address costs nothing per request.
import * as grpc from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
import { CHANNEL_OPTIONS } from './protos.js';
import { channelCredentials } from './credentials.js';

const HealthClient = grpc.makeClientConstructor(healthService, 'grpc.health.v1.Health');
type CheckFn = (req: { service: string }, options: grpc.CallOptions, cb: (err: grpc.ServiceError | null, reply?: { status: string }) => void) => void;

/** A grpc.health.v1 client with the services' credentials (the router's probes, `switchyard health`). */
export function healthClient(address: string): grpc.Client {
  return new HealthClient(address, channelCredentials(), CHANNEL_OPTIONS);
}

/** One Check of the whole server: its status ('SERVING', ...), or the error when it did not answer in time. */
export function checkHealth(client: grpc.Client, timeoutMs: number, done: (err: grpc.ServiceError | null, status?: string) => void): void {
  // makeClientConstructor does not type the methods it adds.
  (client as unknown as { Check: CheckFn }).Check({ service: '' }, { deadline: new Date(Date.now() + timeoutMs) }, (err, reply) => done(err, reply?.status));
}

export class HealthProbe {
  private readonly down = new Map<string, { since: number; reason: string }>();
  private readonly clients = new Map<string, grpc.Client>();
  private timer?: NodeJS.Timeout;
  /** Called when a shard goes down or comes back. */
  onChange?: (address: string, down: boolean, reason: string) => void;

  constructor(readonly intervalMs = 250) {}

  isDown(address: string): boolean {
    return this.down.has(address);
  }

  downAddresses(): string[] {
    return [...this.down.keys()];
  }

  markDown(address: string, reason: string): void {
    if (this.down.has(address)) return;
    this.down.set(address, { since: Date.now(), reason });
    this.onChange?.(address, true, reason);
    this.timer ??= setInterval(() => this.probe(), this.intervalMs);
  }

  private probe(): void {
    if (this.down.size === 0) {
      clearInterval(this.timer);
      this.timer = undefined;
      return;
    }
    for (const address of this.down.keys()) {
      let client = this.clients.get(address);
      if (!client) {
        client = healthClient(address);
        this.clients.set(address, client);
      }
      checkHealth(client, this.intervalMs, (err, status) => {
        if (err || status !== 'SERVING' || !this.down.has(address)) return;
        this.down.delete(address);
        this.clients.get(address)?.close();
        this.clients.delete(address);
        this.onChange?.(address, false, 'answers health checks again');
      });
    }
  }

  close(): void {
    clearInterval(this.timer);
    this.timer = undefined;
    for (const c of this.clients.values()) c.close();
    this.clients.clear();
  }
}
