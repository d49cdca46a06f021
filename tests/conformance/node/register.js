// Registers one device with the official Azure IoT Node provisioning client, unmodified, and
// prints one JSON line with the outcome. Driven by the conformance suite (test_device_amqp.py).
//
//   node register.js '{"transport":"amqp"|"amqpws"|"http", "attestation":"symkey"|"x509"|"tpm",
//                      "host":"localhost", "idScope":"0ne…", "registrationId":"…",
//                      "key":"<base64>" | "certFile":"…","keyFile":"…", "payload":{…}}'
//   node register.js '{"operation":"tpm-info"}'   prints the TPM's endorsement key and the
//                                                  registration ID derived from it
//
// The TPM client (azure-iot-security-tpm through tss.js) uses /dev/tpm0 when present, else a
// TPM simulator on TCP 127.0.0.1:2323 (swtpm, started by the test).
// The server's CA comes from NODE_EXTRA_CA_CERTS. The AMQP transport dials 5671, AMQP over
// WebSocket and HTTP dial 443.
'use strict';

const fs = require('fs');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');

const TIMEOUT_MS = 60000;

function transportFor(name) {
  switch (name) {
    case 'amqp': return new (require('azure-iot-provisioning-device-amqp').Amqp)();
    case 'amqpws': return new (require('azure-iot-provisioning-device-amqp').AmqpWs)();
    case 'http': return new (require('azure-iot-provisioning-device-http').Http)();
    default: throw new Error(`unknown transport ${name}`);
  }
}

function securityFor(args) {
  switch (args.attestation) {
    case 'symkey': {
      const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
      return new SymmetricKeySecurityClient(args.registrationId, args.key);
    }
    case 'x509': {
      const { X509Security } = require('azure-iot-security-x509');
      return new X509Security(args.registrationId, {
        cert: fs.readFileSync(args.certFile, 'utf8'),
        key: fs.readFileSync(args.keyFile, 'utf8'),
      });
    }
    case 'tpm': {
      const { TpmSecurityClient } = require('azure-iot-security-tpm');
      return new TpmSecurityClient(args.registrationId);
    }
    default: throw new Error(`unknown attestation ${args.attestation}`);
  }
}

function tpmInfo() {
  const { TpmSecurityClient } = require('azure-iot-security-tpm');
  const client = new TpmSecurityClient();
  client.getEndorsementKey((err, ek) => {
    if (err) return finish({ ok: false, error: describeError(err) });
    client.getRegistrationId((err2, registrationId) => {
      if (err2) return finish({ ok: false, error: describeError(err2) });
      finish({ ok: true, endorsementKey: ek.toString('base64'), registrationId });
    });
  });
}

function describeError(err) {
  if (!err) return null;
  const out = { name: err.name || null, message: String(err.message || err) };
  for (const field of ['result', 'transportError', 'amqpError', 'response', 'responseBody']) {
    if (err[field] !== undefined) {
      try { out[field] = JSON.parse(JSON.stringify(err[field])); } catch (_) { out[field] = String(err[field]); }
    }
  }
  return out;
}

function finish(outcome) {
  process.stdout.write(JSON.stringify(outcome) + '\n');
  process.exit(0);
}

const args = JSON.parse(process.argv[2]);
if (args.operation === 'tpm-info') {
  setTimeout(() => finish({ ok: false, error: { name: 'Timeout', message: 'the TPM did not answer' } }), TIMEOUT_MS);
  tpmInfo();
  return;
}
const timer = setTimeout(() => finish({ ok: false, error: { name: 'Timeout', message: `no answer within ${TIMEOUT_MS} ms` } }), TIMEOUT_MS);
const client = ProvisioningDeviceClient.create(args.host, args.idScope, transportFor(args.transport), securityFor(args));
if (args.payload !== undefined) client.setProvisioningPayload(args.payload);
client.register((err, result) => {
  clearTimeout(timer);
  if (err) {
    finish({ ok: false, error: describeError(err) });
    return;
  }
  finish({
    ok: true,
    status: result.status || null,
    assignedHub: result.assignedHub || null,
    deviceId: result.deviceId || null,
    substatus: result.substatus || null,
    payload: result.payload === undefined ? null : result.payload,
    registrationState: result.registrationState || null,
  });
});
