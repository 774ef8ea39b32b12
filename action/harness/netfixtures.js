'use strict';
// Network stand-ins for testing the action's proxy and TLS handling (test code, not bundled):
// - proxy(): a forwarding proxy that answers CONNECT host:port by tunnelling to
//   127.0.0.1:port and records every tunnel. Test host names (broker.test) resolve nowhere, so
//   a request that reaches them went through this proxy. Anything but CONNECT is refused.
// - makeCa(): a throwaway CA and a server certificate it signed for broker.test and
//   127.0.0.1 (openssl, at test time).
// - tlsFront(): a TLS-terminating forwarder: TLS with that certificate outside, plain TCP to
//   127.0.0.1:port inside. The broker serves plain HTTP, so this plays a TLS load balancer in
//   front of it.
//
// CLI (used by integration/tests/suite/pipelines.rs):
//   node action/harness/netfixtures.js DIR BROKER_PORT
// writes DIR/fixtures.json ({proxy_url, tls_port, ca_path}) once listening, rewrites
// DIR/tunnels.json at every tunnel the proxy opens, and runs until killed.

const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');
const path = require('node:path');
const tls = require('node:tls');
const { execFileSync } = require('node:child_process');

function listen(srv) {
  return new Promise((resolve) => srv.listen(0, '127.0.0.1', () => resolve(srv.address().port)));
}

function track(sockets, ...ss) {
  for (const s of ss) {
    sockets.add(s);
    s.on('error', () => {});
    s.on('close', () => sockets.delete(s));
  }
}

async function proxy({ onTunnel = () => {} } = {}) {
  const tunnels = [];
  const refused = [];
  const sockets = new Set();
  const srv = http.createServer((req, res) => {
    refused.push(req.url);
    res.writeHead(405);
    res.end();
  });
  srv.on('connect', (req, client, head) => {
    const [host, port] = req.url.split(':');
    tunnels.push({ host, port: Number(port), auth: req.headers['proxy-authorization'] || null });
    onTunnel(tunnels);
    const upstream = net.connect(Number(port), '127.0.0.1', () => {
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      if (head && head.length) upstream.write(head);
      upstream.pipe(client);
      client.pipe(upstream);
    });
    track(sockets, client, upstream);
    upstream.on('error', () => client.destroy());
  });
  const port = await listen(srv);
  return {
    url: `http://127.0.0.1:${port}`,
    tunnels,
    refused,
    close: () => {
      for (const s of sockets) s.destroy();
      srv.closeAllConnections();
      srv.close();
    },
  };
}

function makeCa(dir, name) {
  const run = (args) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  run(['req', '-x509', ...ec, '-keyout', `${name}-ca.key`, '-out', `${name}-ca.pem`, '-days', '1',
    '-subj', `/CN=${name} test CA`, '-addext', 'basicConstraints=critical,CA:TRUE',
    '-addext', 'keyUsage=critical,keyCertSign']);
  run(['req', ...ec, '-keyout', `${name}-srv.key`, '-out', `${name}-srv.csr`, '-subj', '/CN=broker.test']);
  fs.writeFileSync(path.join(dir, `${name}-ext`), 'subjectAltName=DNS:broker.test,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  run(['x509', '-req', '-in', `${name}-srv.csr`, '-CA', `${name}-ca.pem`, '-CAkey', `${name}-ca.key`,
    '-CAcreateserial', '-out', `${name}-srv.pem`, '-days', '1', '-extfile', `${name}-ext`]);
  const read = (f) => fs.readFileSync(path.join(dir, f), 'utf8');
  return {
    ca: read(`${name}-ca.pem`),
    caPath: path.join(dir, `${name}-ca.pem`),
    cert: read(`${name}-srv.pem`),
    key: read(`${name}-srv.key`),
  };
}

async function tlsFront(targetPort, { cert, key }) {
  const sockets = new Set();
  const srv = tls.createServer({ cert, key }, (client) => {
    const upstream = net.connect(targetPort, '127.0.0.1');
    track(sockets, client, upstream);
    upstream.on('error', () => client.destroy());
    client.pipe(upstream);
    upstream.pipe(client);
  });
  srv.on('tlsClientError', () => {});
  const port = await listen(srv);
  return {
    port,
    close: () => {
      for (const s of sockets) s.destroy();
      srv.close();
    },
  };
}

async function cli(dir, brokerPort) {
  const pki = makeCa(dir, 'broker');
  const front = await tlsFront(Number(brokerPort), pki);
  const tunnelsFile = path.join(dir, 'tunnels.json');
  fs.writeFileSync(tunnelsFile, '[]');
  const px = await proxy({ onTunnel: (t) => fs.writeFileSync(tunnelsFile, JSON.stringify(t)) });
  // Written last and whole, so the reader never sees a partial file.
  const tmp = path.join(dir, 'fixtures.json.tmp');
  fs.writeFileSync(tmp, JSON.stringify({ proxy_url: px.url, tls_port: front.port, ca_path: pki.caPath }));
  fs.renameSync(tmp, path.join(dir, 'fixtures.json'));
}

module.exports = { proxy, makeCa, tlsFront };

if (require.main === module) {
  cli(process.argv[2], process.argv[3]).catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
