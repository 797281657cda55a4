// Protobuf payloads of mappings/protos/hvac.proto made by protobufjs, an
// encoder independent of the bridge's decoder, for the bridge's tests.
// Prints one JSON object: name -> hex payload.
//   cd tests/protobuf && npm install && node fixtures.js > fixtures.json
const protobuf = require('protobufjs');
// keepCase: the .proto's own field names (protobufjs would camelCase them).
const root = new protobuf.Root().loadSync(`${__dirname}/../../mappings/protos/hvac.proto`, { keepCase: true });
const Telemetry = root.lookupType('hvac.v1.Telemetry');
const hex = (message) => Buffer.from(Telemetry.encode(Telemetry.create(message)).finish()).toString('hex');
const out = {
  telemetry: hex({
    ts: 1764000000000, ambient_c: 21.5, target_c: 22, humidity_pct: 40,
    air_quality_ppm: 600, blower_pct: 55, load_pct: 48, energy_kwh: 1234.5, mode: 'heat',
  }),
  // Every reading at 0 (proto3 sends none of them) and no mode.
  zeros: hex({ ts: 1764000000001 }),
  // Out of the schema's range: 150 % humidity.
  out_of_range: hex({ ts: 1764000000002, humidity_pct: 150 }),
};
process.stdout.write(JSON.stringify(out, null, 2) + '\n');
