// Sparkplug B payloads made by Eclipse Tahu's JavaScript library
// (sparkplug-payload), an encoder independent of the bridge's, for the
// bridge's tests. Prints one JSON object: message name -> hex payload.
//   cd tests/sparkplug && npm install && node fixtures.js > fixtures.json
// NDATA/DDATA are encoded spec-style, by alias without datatype, through
// the package's generated protobuf module (its encodePayload requires a
// datatype on every metric).
const spb = require('sparkplug-payload').get('spBv1.0');
const P = require('sparkplug-payload/lib/sparkplugPayloadProto').org.eclipse.tahu.protobuf.Payload;
const Long = require('long');
const ts = 1764000000000;
const hex = (bytes) => Buffer.from(bytes).toString('hex');
const dataByAlias = (seq, metrics) => hex(P.encode(P.create({
  timestamp: Long.fromNumber(ts + seq), seq: Long.fromNumber(seq),
  metrics: metrics.map((m) => P.Metric.create(m)),
})).finish());
const out = {
  nbirth: hex(spb.encodePayload({
    timestamp: ts, seq: 0,
    metrics: [
      { name: 'bdSeq', type: 'UInt64', value: 7 },
      { name: 'Node Control/Rebirth', type: 'Boolean', value: false },
      { name: 'press/count', alias: 1, type: 'Int32', value: -42, timestamp: ts },
      { name: 'press/pressure', alias: 2, type: 'Double', value: 101.325, timestamp: ts },
      { name: 'press/label', alias: 5, type: 'String', value: 'line 3', timestamp: ts },
    ],
  })),
  ndata: dataByAlias(1, [
    { alias: Long.fromNumber(1), intValue: (-7 >>> 0) },
    { alias: Long.fromNumber(2), doubleValue: 99.5 },
  ]),
  dbirth: hex(spb.encodePayload({
    timestamp: ts, seq: 2,
    metrics: [
      { name: 'running', alias: 3, type: 'Boolean', value: true, timestamp: ts },
      { name: 'speed', alias: 4, type: 'Float', value: 1.5, timestamp: ts },
    ],
  })),
  ddata: dataByAlias(3, [
    { alias: Long.fromNumber(3), booleanValue: false },
    { alias: Long.fromNumber(4), floatValue: 2.25 },
  ]),
  // After ddata, continuing the node's seq: what follows a restart.
  ndata_after: dataByAlias(4, [{ alias: Long.fromNumber(2), doubleValue: 100.25 }]),
  ddeath_after: hex(spb.encodePayload({ timestamp: ts, seq: 5, metrics: [] })),
  ndata_gap: dataByAlias(9, [{ alias: Long.fromNumber(2), doubleValue: 1.0 }]),
  ndata_unknown_alias: dataByAlias(10, [{ alias: Long.fromNumber(99), intValue: 1 }]),
  ddeath: hex(spb.encodePayload({ timestamp: ts, seq: 11, metrics: [] })),
  ndeath: hex(spb.encodePayload({
    timestamp: ts, metrics: [{ name: 'bdSeq', type: 'UInt64', value: 7 }],
  })),
  ndeath_stale: hex(spb.encodePayload({
    timestamp: ts, metrics: [{ name: 'bdSeq', type: 'UInt64', value: 6 }],
  })),
};
process.stdout.write(JSON.stringify(out, null, 2) + '\n');
