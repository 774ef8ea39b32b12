'use strict';
// How the action reaches the broker.
//
// - Proxy: the runner's HTTPS_PROXY / HTTP_PROXY (lower-case names first) and NO_PROXY, by the
//   rules of @actions/http-client (`getProxyUrl`), which `core.getIDToken` also follows, so the
//   token request and the exchange take the same path. Loopback hosts are never proxied. The
//   broker is reached through a CONNECT tunnel, so the proxy never sees the job token in clear
//   text when the broker URL is https.
// - Trust: with the `ca-certificate` input, the broker's certificate must chain to that bundle,
//   which REPLACES the system roots for the broker connection (a private CA pins the broker).
//   Without it, the system roots. Certificate checks are never switched off.
// - Nothing here prints; errors name the proxy by host and port only (a proxy URL may carry a
//   password).

const fs = require('node:fs');
const { X509Certificate } = require('node:crypto');
const { fetch, Agent, ProxyAgent } = require('undici');
const { getProxyUrl } = require('@actions/http-client/lib/proxy');

const PEM_BLOCK = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

/**
 * The `ca-certificate` input: PEM text, or the path of a PEM file. Returns the PEM bundle, or
 * null when the input is empty. Throws when it holds no valid certificate (fail closed: a typo
 * must not silently fall back to the system roots).
 */
function parseCaCertificate(input) {
  const raw = String(input || '').trim();
  if (!raw) return null;
  let text = raw;
  if (!raw.includes('-----BEGIN')) {
    try {
      text = fs.readFileSync(raw, 'utf8');
    } catch (e) {
      throw new Error(`ca-certificate: neither PEM text nor a readable file (${e.code || 'error'})`);
    }
  }
  const blocks = text.match(PEM_BLOCK) || [];
  if (blocks.length === 0) throw new Error('ca-certificate: no PEM certificate (-----BEGIN CERTIFICATE-----) found');
  blocks.forEach((b, i) => {
    try {
      // eslint-disable-next-line no-new
      new X509Certificate(b);
    } catch {
      throw new Error(`ca-certificate: certificate ${i + 1} does not parse`);
    }
  });
  return `${blocks.join('\n')}\n`;
}

/** `host:port` of a proxy URL, without its credentials. */
function proxyLabel(u) {
  return `${u.hostname}:${u.port || (u.protocol === 'https:' ? 443 : 80)}`;
}

/**
 * A `fetch` for the broker: proxy per the environment (read at each call), trust per `ca`.
 * Errors carry `via` (`host:port` of the proxy used, or null).
 */
function brokerFetch({ ca = null } = {}) {
  const tls = ca ? { ca } : {};
  const dispatchers = new Map();
  const dispatcherFor = (url) => {
    const proxy = getProxyUrl(new URL(url));
    const key = proxy ? proxy.href : '';
    if (!dispatchers.has(key)) {
      dispatchers.set(key, proxy
        ? new ProxyAgent({ uri: proxy.href, requestTls: tls })
        : new Agent({ connect: tls }));
    }
    return { dispatcher: dispatchers.get(key), via: proxy ? proxyLabel(proxy) : null };
  };
  const f = async (url, init) => {
    const { dispatcher, via } = dispatcherFor(url);
    try {
      return await fetch(url, { ...init, dispatcher });
    } catch (e) {
      if (e && typeof e === 'object') e.via = via;
      throw e;
    }
  };
  f.close = () => Promise.all([...dispatchers.values()].map((d) => d.close().catch(() => {})));
  return f;
}

module.exports = { parseCaCertificate, brokerFetch, proxyLabel };
