'use strict';
// The client against a real wxgate, the project's mock WeChat and the sample backend.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { createClient } = require('../wxgate.js');
const { APPID, startStack, fakeWx, requestCount, mockCalls } = require('./harness.js');

let stack;
before(async () => {
  stack = await startStack({ accessTtl: '1s' });
});
after(async () => {
  await stack.stop();
});

function client(user) {
  const wx = fakeWx(stack, user);
  return { wx, api: createClient({ baseURL: stack.gateURL, wx }) };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

test('anonymous users browse public routes without logging in', async () => {
  const { wx, api } = client('anon');
  const res = await api.request({ url: '/api/public/products' });
  assert.equal(res.statusCode, 200);
  assert.equal(res.data.path, '/api/public/products');
  assert.equal(res.data.headers['x-user-id'], undefined);
  assert.equal(wx.logins, 0);
});

test('a protected call logs in exactly once and reaches the backend as the user', async () => {
  const { wx, api } = client('alice');
  const before = await mockCalls(stack, '/sns/jscode2session');
  const res = await api.request({ url: '/api/orders' });
  assert.equal(res.statusCode, 200);
  assert.equal(wx.logins, 1);
  assert.equal(await mockCalls(stack, '/sns/jscode2session'), before + 1);
  assert.ok(res.data.headers['x-user-id'][0].startsWith('u_'));
  assert.equal(res.data.headers['x-user-id'][0], api.userId());
  assert.equal(res.data.headers.authorization, undefined, 'the token never reaches the backend');
  // Logged in now: public routes carry the token too, and nothing logs in again.
  assert.equal((await api.request({ url: '/api/orders' })).statusCode, 200);
  assert.equal(wx.logins, 1);
});

test('ten concurrent calls after the token expired cause exactly one refresh', async () => {
  const { wx, api } = client('bob');
  assert.equal((await api.request({ url: '/api/orders' })).statusCode, 200);
  const refreshesBefore = await requestCount(stack, 'auth_refresh', 200);
  const loginsBefore = await requestCount(stack, 'auth_login', 200);
  const exchangesBefore = await mockCalls(stack, '/sns/jscode2session');
  await sleep(6500); // access_ttl 1s, plus wxgate's 5 s leeway
  const results = await Promise.all(Array.from({ length: 10 }, (_, i) => api.request({ url: `/api/orders/${i}` })));
  for (const res of results) assert.equal(res.statusCode, 200);
  assert.equal(await requestCount(stack, 'auth_refresh', 200), refreshesBefore + 1, 'one refresh at wxgate');
  assert.equal(await requestCount(stack, 'auth_login', 200), loginsBefore, 'no login');
  assert.equal(await mockCalls(stack, '/sns/jscode2session'), exchangesBefore, 'WeChat not asked again');
  assert.equal(wx.logins, 1);
});

test('a replayed refresh token ends the session, and the client logs in again by itself', async () => {
  const { wx, api } = client('carol');
  assert.equal((await api.request({ url: '/api/orders' })).statusCode, 200);
  const stolen = { ...wx.storage.get('wxgate.tokens') };
  // The thief refreshes first with the copied token...
  const thief = await fetch(`${stack.gateURL}/auth/refresh`, {
    method: 'POST',
    body: JSON.stringify({ refresh_token: stolen.refresh_token }),
  });
  assert.equal(thief.status, 200);
  // ...so when the real client's token expires, its refresh is a replay: wxgate revokes the session.
  wx.storage.set('wxgate.tokens', { ...stolen, access_token: 'expired.or.garbage' });
  const res = await api.request({ url: '/api/orders' });
  assert.equal(res.statusCode, 200);
  assert.equal(wx.logins, 2, 'the refresh failed, so the client logged in afresh');
  const thiefAccess = (await thief.json()).access_token;
  const thiefCall = await fetch(`${stack.gateURL}/api/orders`, { headers: { Authorization: `Bearer ${thiefAccess}` } });
  assert.equal(thiefCall.status, 401, "the thief's session was revoked too");
});

test('logout ends the session at wxgate and forgets the tokens', async () => {
  const { wx, api } = client('dave');
  assert.equal((await api.request({ url: '/api/orders' })).statusCode, 200);
  const { access_token } = wx.storage.get('wxgate.tokens');
  await api.logout();
  assert.equal(wx.storage.get('wxgate.tokens'), undefined);
  const old = await fetch(`${stack.gateURL}/api/orders`, { headers: { Authorization: `Bearer ${access_token}` } });
  assert.equal(old.status, 401);
  assert.equal((await old.json()).error, 'invalid_token');
  // Browsing on is anonymous; the next protected call logs in again.
  assert.equal((await api.request({ url: '/api/public/x' })).statusCode, 200);
  assert.equal(wx.logins, 1);
  assert.equal((await api.request({ url: '/api/orders' })).statusCode, 200);
  assert.equal(wx.logins, 2);
});

test('errors the user must act on reject with their code', async () => {
  const { api } = client('erin');
  await fetch(`${stack.mockURL}/__mock/faults`, {
    method: 'POST',
    body: JSON.stringify({ endpoint: '/sns/jscode2session', errcode: 40226 }),
  });
  await assert.rejects(api.request({ url: '/api/orders' }), { name: 'WxgateError', code: 'login_blocked', statusCode: 403 });
});

test('a network failure rejects with network_error, and nothing loops', async () => {
  const wx = fakeWx(stack, 'frank');
  const api = createClient({ baseURL: 'http://127.0.0.1:9', wx });
  await assert.rejects(api.request({ url: '/api/orders' }), { code: 'network_error' });
  assert.equal(wx.logins, 0);
});

test('the user-info and phone helpers never call wx.login()', async () => {
  const { wx, api } = client('gina');
  assert.equal((await api.request({ url: '/api/orders' })).statusCode, 200);
  const info = await (
    await fetch(`${stack.mockURL}/__mock/userinfo`, { method: 'POST', body: JSON.stringify({ appid: APPID, user: 'gina' }) })
  ).json();
  const sent = await api.sendUserInfo({ ...info, errMsg: 'getUserInfo:ok' });
  assert.equal(sent.user_id, api.userId());
  assert.ok(sent.unionid);
  const { code } = await (
    await fetch(`${stack.mockURL}/__mock/phone_code`, {
      method: 'POST',
      body: JSON.stringify({ appid: APPID, user: 'gina', phone: '13580006666' }),
    })
  ).json();
  const phone = await api.sendPhone({ code, errMsg: 'getPhoneNumber:ok' });
  assert.equal(phone.phone_number, '13580006666');
  assert.equal(wx.logins, 1);
  // Not logged in at all: the helpers refuse rather than log in.
  const fresh = client('hank');
  await assert.rejects(fresh.api.sendPhone({ code }), { code: 'login_required' });
  assert.equal(fresh.wx.logins, 0);
  await assert.rejects(api.sendPhone({ errMsg: 'getPhoneNumber:fail user deny' }), { code: 'no_phone' });
});
