// `switchyard health <host:port>`: one grpc.health.v1 Check, for container health checks (compose,
// deploy/docker/Dockerfile.gpu). It dials with the services' own channel credentials, so it keeps
// working when SWITCHYARD_TLS_* turn on mTLS.
import { checkHealth, healthClient } from '../core/wire/health-probe.js';

export interface HealthFlags { timeoutMs: number }

/** Prints the service's status (or why there is none); exit code 0 only when it answers SERVING. */
export async function healthCommand(address: string, flags: HealthFlags): Promise<void> {
  const client = healthClient(address);
  try {
    const status = await new Promise<string>((resolve) => checkHealth(client, flags.timeoutMs, (err, reply) =>
      resolve(err ? `no answer (${err.details || err.message})` : reply ?? 'no status')));
    process.stdout.write(`${address}: ${status}\n`);
    process.exitCode = status === 'SERVING' ? 0 : 1;
  } finally {
    client.close();
  }
}
