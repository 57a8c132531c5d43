// `switchyard health <host:port>`: one grpc.health.v1 Check, for container health checks (compose,
// deploy/docker/Dockerfile.gpu). It dials with the services' own channel credentials, so it keeps
// working when SWITCHYARD_TLS_* turn on mTLS.
import { HealthClient, type CheckFn } from '../core/wire/health-probe.js';
import { channelCredentials } from '../core/wire/credentials.js';
import { CHANNEL_OPTIONS } from '../core/wire/protos.js';

export interface HealthFlags { timeoutMs: number }

/** Prints the service's status (or why there is none); exit code 0 only when it answers SERVING. */
export async function healthCommand(address: string, flags: HealthFlags): Promise<void> {
  const client = new HealthClient(address, channelCredentials(), CHANNEL_OPTIONS);
  try {
    const status = await new Promise<string>((resolve) => {
      (client as unknown as { Check: CheckFn }).Check({ service: '' }, { deadline: Date.now() + flags.timeoutMs }, (err, reply) =>
        resolve(err ? `no answer (${err.details || err.message})` : reply?.status ?? 'no status'));
    });
    process.stdout.write(`${address}: ${status}\n`);
    process.exitCode = status === 'SERVING' ? 0 : 1;
  } finally {
    client.close();
  }
}
