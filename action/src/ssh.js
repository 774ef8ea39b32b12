'use strict';
// SSH key pairs made on the runner for `ssh_cert` credentials: the private key never leaves
// the runner; only the public key goes to the broker, which signs a certificate for it.
// Node's crypto makes the Ed25519 pair; the files are written in OpenSSH's own formats
// (PROTOCOL.key: `openssh-key-v1`, unencrypted) so `ssh -i key -o CertificateFile=cert` reads
// them without conversion.

const crypto = require('node:crypto');

function u32(n) {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

/** An SSH wire string: uint32 length, then the bytes. */
function str(buf) {
  const b = Buffer.isBuffer(buf) ? buf : Buffer.from(buf);
  return Buffer.concat([u32(b.length), b]);
}

/**
 * A fresh Ed25519 pair: `{publicLine, privateKey}`: the `ssh-ed25519 AAAA… comment` line and
 * the `-----BEGIN OPENSSH PRIVATE KEY-----` text.
 */
function ed25519KeyPair(comment = 'broker-action') {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('ed25519');
  // The raw 32-byte keys are the last 32 bytes of their SPKI / PKCS#8 DER encodings.
  const pub = publicKey.export({ type: 'spki', format: 'der' }).subarray(-32);
  const seed = privateKey.export({ type: 'pkcs8', format: 'der' }).subarray(-32);
  const blob = Buffer.concat([str('ssh-ed25519'), str(pub)]);
  const check = crypto.randomBytes(4);
  let priv = Buffer.concat([
    check, check,
    str('ssh-ed25519'), str(pub), str(Buffer.concat([seed, pub])), str(comment),
  ]);
  // Pad to the cipher block size ("none": 8) with 1, 2, 3, ...
  const pad = [];
  for (let i = 1; (priv.length + pad.length) % 8 !== 0; i++) pad.push(i);
  priv = Buffer.concat([priv, Buffer.from(pad)]);
  const body = Buffer.concat([
    Buffer.from('openssh-key-v1\0'),
    str('none'), str('none'), str(''), u32(1), str(blob), str(priv),
  ]).toString('base64');
  const lines = body.match(/.{1,70}/g).join('\n');
  return {
    publicLine: `ssh-ed25519 ${blob.toString('base64')} ${comment}`,
    privateKey: `-----BEGIN OPENSSH PRIVATE KEY-----\n${lines}\n-----END OPENSSH PRIVATE KEY-----\n`,
  };
}

module.exports = { ed25519KeyPair };
