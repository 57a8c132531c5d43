// A throwaway CA and one certificate for 127.0.0.1/localhost (server and client use), made with openssl,
// as the SWITCHYARD_TLS_* environment variables of services that talk mTLS.
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export function makeTlsEnv(dir: string): Record<string, string> {
  mkdirSync(dir, { recursive: true });
  const ssl = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  ssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=switchyard-test-ca');
  ssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'svc.key', '-out', 'svc.csr', '-subj', '/CN=localhost');
  writeFileSync(join(dir, 'ext.cnf'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n');
  ssl('x509', '-req', '-in', 'svc.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'svc.pem', '-days', '2', '-extfile', 'ext.cnf');
  return { SWITCHYARD_TLS_CERT: join(dir, 'svc.pem'), SWITCHYARD_TLS_KEY: join(dir, 'svc.key'), SWITCHYARD_TLS_CA: join(dir, 'ca.pem') };
}
