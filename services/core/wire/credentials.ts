// Transport security between services (DESIGN §7): plaintext by default; mutual TLS when
// SWITCHYARD_TLS_CERT, SWITCHYARD_TLS_KEY and SWITCHYARD_TLS_CA name PEM files — every server then
// requires a client certificate signed by that CA, and every client presents its own.
import * as grpc from '@grpc/grpc-js';
import { readFileSync } from 'node:fs';

interface TlsFiles { cert: Buffer; key: Buffer; ca: Buffer }

let cached: TlsFiles | null | undefined;

export class TlsConfigError extends Error {
  override name = 'ConfigError';
}

function tlsFiles(): TlsFiles | null {
  if (cached !== undefined) return cached;
  const { SWITCHYARD_TLS_CERT: cert, SWITCHYARD_TLS_KEY: key, SWITCHYARD_TLS_CA: ca } = process.env;
  const given = [cert, key, ca].filter(Boolean).length;
  if (given === 0) return (cached = null);
  if (given !== 3) throw new TlsConfigError('mTLS needs all of SWITCHYARD_TLS_CERT, SWITCHYARD_TLS_KEY and SWITCHYARD_TLS_CA (PEM file paths)');
  const read = (name: string, path: string) => {
    try {
      return readFileSync(path);
    } catch (err) {
      throw new TlsConfigError(`${name}=${path}: ${(err as Error).message}`);
    }
  };
  cached = { cert: read('SWITCHYARD_TLS_CERT', cert!), key: read('SWITCHYARD_TLS_KEY', key!), ca: read('SWITCHYARD_TLS_CA', ca!) };
  return cached;
}

export const tlsEnabled = (): boolean => tlsFiles() !== null;

export function channelCredentials(): grpc.ChannelCredentials {
  const t = tlsFiles();
  return t ? grpc.credentials.createSsl(t.ca, t.key, t.cert) : grpc.credentials.createInsecure();
}

export function serverCredentials(): grpc.ServerCredentials {
  const t = tlsFiles();
  return t ? grpc.ServerCredentials.createSsl(t.ca, [{ cert_chain: t.cert, private_key: t.key }], true) : grpc.ServerCredentials.createInsecure();
}
