'use strict';
// Starts the real thing for the client tests: the wxgate binary, its mock WeChat and its sample
// backend, each a process on 127.0.0.1 port 0; and a fake `wx` whose request() is real HTTP.

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');

const BIN = process.env.WXGATE_BIN || path.resolve(__dirname, '../../../target/debug/wxgate');
const APPID = 'wx5555555555555555';
const SECRET = 'sdk-test-secret';

/** Spawns `wxgate args...` and waits (at most 20 s) for a line of `stream` matching `pattern`. */
function start(args, pattern, stream = 'stdout') {
  const child = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'info' } });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`wxgate ${args[0]} did not start`)), 20000);
    child.on('error', reject);
    child.on('exit', (code) => reject(new Error(`wxgate ${args[0]} exited with ${code}`)));
    readline.createInterface({ input: child[stream] }).on('line', (line) => {
      const match = line.match(pattern);
      if (match) {
        clearTimeout(timer);
        resolve({ child, match });
      }
    });
    // Drain the other stream so the process never blocks on a full pipe.
    child[stream === 'stdout' ? 'stderr' : 'stdout'].resume();
  });
}

/** Mock WeChat + sample backend + wxgate. `accessTtl` shortens access tokens for expiry tests. */
async function startStack({ accessTtl = '2h' } = {}) {
  const mock = await start(['mock-wechat', '--app', `${APPID}:${SECRET}`], /listening on (http:\/\/\S+)/);
  const backend = await start(['sample-backend'], /listening on (http:\/\/\S+)/);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wxgate-sdk-'));
  const config = path.join(dir, 'wxgate.toml');
  fs.writeFileSync(
    config,
    `[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_timeout = "1s"
[upstream]
url = "${backend.match[1]}"
[wechat]
api_base = "${mock.match[1]}"
[[apps]]
name = "shop"
kind = "miniprogram"
appid = "${APPID}"
secret = "${SECRET}"
[identity]
store = "sqlite://${dir}/identities.db"
[session]
signing_key = "sdk-test-signing-key-0123456789abcdef"
access_ttl = "${accessTtl}"
[[routes]]
prefix = "/api/public/"
auth = "public"
[[routes]]
prefix = "/"
auth = "required"
`,
  );
  const gate = await start(['--config', config], /wxgate ready listen=(\S+) admin=(\S+)/, 'stderr');
  return {
    gateURL: `http://${gate.match[1]}`,
    adminURL: `http://${gate.match[2]}`,
    mockURL: mock.match[1],
    async stop() {
      for (const p of [gate, backend, mock]) p.child.kill('SIGTERM');
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A fake `wx` for `user`: real HTTP for request(), the mock WeChat for login(), memory for storage. */
function fakeWx(stack, user) {
  const storage = new Map();
  const wx = {
    logins: 0,
    storage,
    request({ url, method = 'GET', data, header = {}, success, fail }) {
      const headers = { ...header };
      let body;
      if (data !== undefined && method !== 'GET' && method !== 'HEAD') {
        body = typeof data === 'string' ? data : JSON.stringify(data);
        headers['content-type'] = headers['content-type'] || 'application/json';
      }
      fetch(url, { method, headers, body })
        .then(async (r) => {
          const text = await r.text();
          let parsed = text;
          try {
            parsed = JSON.parse(text);
          } catch (e) {
            // wx.request hands over non-JSON bodies as strings
          }
          const h = {};
          r.headers.forEach((v, k) => (h[k] = v));
          success({ statusCode: r.status, data: parsed, header: h });
        })
        .catch((e) => fail({ errMsg: 'request:fail ' + e.message }));
    },
    login({ success, fail }) {
      wx.logins += 1;
      fetch(`${stack.mockURL}/__mock/login`, { method: 'POST', body: JSON.stringify({ appid: APPID, user }) })
        .then((r) => r.json())
        .then((r) => success({ code: r.code, errMsg: 'login:ok' }))
        .catch((e) => fail({ errMsg: 'login:fail ' + e.message }));
    },
    checkSession({ success }) {
      success({ errMsg: 'checkSession:ok' });
    },
    getStorageSync: (key) => storage.get(key) || '',
    setStorageSync: (key, value) => storage.set(key, value),
    removeStorageSync: (key) => storage.delete(key),
  };
  return wx;
}

/** A counter from wxgate's /metrics, e.g. requests of route `auth_refresh` with status 200. */
async function requestCount(stack, route, status) {
  const text = await (await fetch(`${stack.adminURL}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`wxgate_http_requests_total{route="${route}",status="${status}"}`));
  return line ? Number(line.split(' ').pop()) : 0;
}

/** Calls the mock WeChat has received, by endpoint. */
async function mockCalls(stack, endpoint) {
  const calls = await (await fetch(`${stack.mockURL}/__mock/calls`)).json();
  return calls[endpoint] || 0;
}

module.exports = { APPID, startStack, fakeWx, requestCount, mockCalls };
