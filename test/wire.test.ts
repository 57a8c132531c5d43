import { test } from 'node:test';
import assert from 'node:assert/strict';
import { status } from '@grpc/grpc-js';
import { f32ToF16, f16ToF32 } from '../services/core/dtypes.js';
import { loadProtos, packageDefinition } from '../services/core/wire/protos.js';
import { fromWireTensor, toWireTensor, WireError } from '../services/core/wire/tensor.js';
import { Rng } from '../services/core/data/random.js';
import type { MethodDefinition } from '@grpc/proto-loader';

const rng = new Rng(5);
const randomRows = (rows: number, hidden: number) => Float32Array.from({ length: rows * hidden }, () => rng.normal());

test('F32 tensors go out without a copy and come back exact', () => {
  const values = randomRows(3, 8);
  const wire = toWireTensor(values, [3, 8]);
  assert.equal((wire.data as Buffer).buffer, values.buffer, 'encoding shares the rows\' memory');
  const back = fromWireTensor({ dtype: 'DTYPE_F32', shape: [3, 8], data: wire.data as Buffer }, 'rows', [null, 8]);
  assert.deepEqual(back.values, values);
  assert.equal(back.values.buffer, values.buffer, 'aligned bytes decode as a view');
  // grpc-js usually hands over unaligned bytes: decoding copies them once.
  const unaligned = Buffer.alloc(values.byteLength + 1);
  Buffer.from(values.buffer).copy(unaligned, 1);
  const copied = fromWireTensor({ dtype: 'DTYPE_F32', shape: [3, 8], data: unaligned.subarray(1) }, 'rows');
  assert.deepEqual(copied.values, values);
});

test('BF16 and F16 halve the bytes and round to nearest', () => {
  const values = Float32Array.from([1, -2.5, 3.140625, 65504, 1e-3, 0]);
  for (const dtype of ['BF16', 'F16'] as const) {
    const wire = toWireTensor(values, [6], dtype);
    assert.equal((wire.data as Buffer).byteLength, 12);
    const back = fromWireTensor({ dtype: dtype === 'BF16' ? 'DTYPE_BF16' : 'DTYPE_F16', shape: [6], data: wire.data as Buffer }, 'x').values;
    for (let i = 0; i < values.length; i++) {
      const tol = Math.abs(values[i]) * (dtype === 'BF16' ? 2 ** -8 : 2 ** -11);
      assert.ok(Math.abs(back[i] - values[i]) <= tol, `${dtype} ${values[i]} → ${back[i]}`);
    }
  }
  assert.equal(f16ToF32(f32ToF16(65520)), Infinity, 'overflow rounds to infinity');
  assert.equal(f16ToF32(f32ToF16(2 ** -24)), 2 ** -24, 'smallest subnormal');
  assert.equal(f16ToF32(f32ToF16(2 ** -26)), 0, 'below half the smallest subnormal rounds to zero');
  assert.ok(Number.isNaN(f16ToF32(f32ToF16(NaN))));
  assert.equal(f32ToF16(1 + 2 ** -11), f32ToF16(1), 'tie rounds to even');
});

test('malformed tensors are refused with INVALID_ARGUMENT', () => {
  const bad: Array<[Parameters<typeof fromWireTensor>[0], RegExp]> = [
    [null, /tensor missing/],
    [{ dtype: 'DTYPE_UNSPECIFIED', shape: [1], data: Buffer.alloc(4) }, /unsupported dtype/],
    [{ dtype: 'DTYPE_F32', shape: [2, 8], data: Buffer.alloc(60) }, /60 data bytes .* expected 64/],
    [{ dtype: 'DTYPE_F32', shape: [2, 7], data: Buffer.alloc(56) }, /does not match \[\*, 8\]/],
  ];
  for (const [tensor, message] of bad)
    assert.throws(() => fromWireTensor(tensor, 'rows', [null, 8]), (e: Error) => e instanceof WireError && e.code === status.INVALID_ARGUMENT && message.test(e.message));
  assert.throws(() => toWireTensor(new Float32Array(5), [2, 3]), WireError);
});

test('a dispatched row costs at most 1.02x its raw bytes at 64 rows', () => {
  const exchange = packageDefinition()['switchyard.v1.ExpertService'] as unknown as Record<string, MethodDefinition<object, object>>;
  const { requestSerialize, requestDeserialize } = exchange.Exchange;
  const hidden = 128;
  const ratioAt = (rows: number) => {
    const values = randomRows(rows, hidden);
    const message = { messageId: '42', passId: 'step7/L3', kind: 'ROW_KIND_FORWARD', batches: [{ layer: 3, expert: 5, rows: toWireTensor(values, [rows, hidden]) }] };
    const bytes = requestSerialize(message);
    const decoded = requestDeserialize(bytes) as { batches: Array<{ layer: number; expert: number; rows: Parameters<typeof fromWireTensor>[0] }>; messageId: string; kind: string };
    assert.equal(decoded.messageId, '42');
    assert.equal(decoded.kind, 'ROW_KIND_FORWARD');
    assert.deepEqual(fromWireTensor(decoded.batches[0].rows, 'rows', [rows, hidden]).values, values);
    return bytes.length / values.byteLength;
  };
  const at64 = ratioAt(64);
  assert.ok(at64 <= 1.02, `bytes per row at 64 rows: ${at64.toFixed(4)}x raw`);
  assert.ok(ratioAt(1) > at64, 'per-message overhead amortises over rows');
});

test('the contracts load as grpc-js services with the documented methods', () => {
  const protos = loadProtos();
  assert.deepEqual(Object.keys(protos.switchyard.v1.ExpertService.service), ['Exchange']);
  const exchange = protos.switchyard.v1.ExpertService.service.Exchange;
  assert.ok(exchange.requestStream && exchange.responseStream, 'Exchange is one bidirectional stream');
  assert.deepEqual(Object.keys(protos.switchyard.v1.Coordinator.service).sort(), ['AllReduce', 'Deregister', 'Drain', 'Heartbeat', 'Register', 'ReportHoldings', 'TrainSync', 'WatchPlacement']);
  assert.ok(protos.switchyard.v1.Coordinator.service.AllReduce.requestStream && protos.switchyard.v1.Coordinator.service.AllReduce.responseStream);
  assert.ok(protos.switchyard.v1.Coordinator.service.WatchPlacement.responseStream);
});
