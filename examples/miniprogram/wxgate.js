'use strict';
/**
 * wxgate client for WeChat mini programs: every call goes through `client.request()`, which has the
 * shape of `wx.request` and returns a Promise. Login happens by itself when a protected route answers
 * 401, so page code never thinks about it.
 *
 *   const { createClient } = require('./wxgate.js');
 *   const api = createClient({ baseURL: 'https://api.example.com' });
 *   const res = await api.request({ url: '/api/orders' });   // logs in first if needed
 *
 * - Public and optional routes are sent with the token when there is one, without it otherwise.
 * - On 401 `login_required` / `invalid_token` / `token_expired` the client refreshes (or, without a
 *   usable refresh token, calls `wx.login()` and `POST /auth/login`), then retries the request once.
 * - One renewal at a time: when ten requests fail together, one refresh or login runs and all ten wait
 *   for it and retry.
 * - `sendUserInfo(detail)` and `sendPhone(detail)` take a button event's `detail` and never call
 *   `wx.login()` (it would rotate the session_key the data was encrypted with).
 * - Errors the user must act on reject with a `WxgateError` whose `code` is wxgate's error code
 *   (`login_blocked`, `rate_limited`, ...) or `network_error`.
 */

const RENEWABLE = new Set(['login_required', 'invalid_token', 'token_expired']);

class WxgateError extends Error {
  constructor(code, message, statusCode) {
    super(message || code);
    this.name = 'WxgateError';
    this.code = code;
    this.statusCode = statusCode;
  }
}

function errorFrom(res) {
  const data = (res && res.data) || {};
  return new WxgateError(data.error || 'http_' + res.statusCode, data.message, res.statusCode);
}

function createClient(options) {
  if (!options || !options.baseURL) throw new Error('createClient({ baseURL }) needs the wxgate base URL');
  const wxApi = options.wx || globalThis.wx;
  const base = options.baseURL.replace(/\/+$/, '');
  const storageKey = options.storageKey || 'wxgate.tokens';
  const app = options.app;
  let renewal = null; // the one refresh or login in flight

  const load = () => {
    try {
      return wxApi.getStorageSync(storageKey) || null;
    } catch (e) {
      return null;
    }
  };
  const save = (tokens) =>
    wxApi.setStorageSync(storageKey, {
      access_token: tokens.access_token,
      refresh_token: tokens.refresh_token,
      user_id: tokens.user_id,
    });
  const clear = () => wxApi.removeStorageSync(storageKey);
  const accessToken = () => {
    const stored = load();
    return stored ? stored.access_token : undefined;
  };

  /** One wx.request, as a Promise; network failures reject with `network_error`. */
  function send(opts, token) {
    return new Promise((resolve, reject) => {
      const header = Object.assign({}, opts.header);
      if (token) header.Authorization = 'Bearer ' + token;
      wxApi.request(
        Object.assign({}, opts, {
          url: /^https?:\/\//.test(opts.url) ? opts.url : base + opts.url,
          header,
          success: resolve,
          fail: (err) => reject(new WxgateError('network_error', (err && err.errMsg) || 'request failed')),
        }),
      );
    });
  }

  async function postAuth(path, data, token) {
    const res = await send({ url: path, method: 'POST', data, header: { 'content-type': 'application/json' } }, token);
    if (res.statusCode >= 200 && res.statusCode < 300) return res.data;
    throw errorFrom(res);
  }

  function wxLogin() {
    return new Promise((resolve, reject) =>
      wxApi.login({
        success: (r) => (r && r.code ? resolve(r.code) : reject(new WxgateError('wx_login_failed', 'wx.login() gave no code'))),
        fail: (e) => reject(new WxgateError('wx_login_failed', (e && e.errMsg) || 'wx.login() failed')),
      }),
    );
  }

  /** wx.login() and POST /auth/login. */
  async function login() {
    const code = await wxLogin();
    const tokens = await postAuth('/auth/login', app ? { code, app } : { code });
    save(tokens);
    return tokens;
  }

  /** One renewal at a time: every caller that needs a new token waits for the same one. */
  function renew(allowLogin) {
    if (!renewal) {
      renewal = (async () => {
        const stored = load();
        if (stored && stored.refresh_token) {
          try {
            const tokens = await postAuth('/auth/refresh', { refresh_token: stored.refresh_token });
            save(tokens);
            return tokens;
          } catch (e) {
            // wxgate or the network is down: logging in would not help.
            if (e.code === 'network_error' || (e.statusCode && e.statusCode >= 500)) throw e;
            clear(); // the refresh token is dead (expired, replayed, logged out)
          }
        }
        if (!allowLogin) throw new WxgateError('login_required', 'Log in before sending this.');
        return login();
      })().finally(() => {
        renewal = null;
      });
    }
    return renewal;
  }

  /**
   * Like wx.request, as a Promise of `{ statusCode, data, header }`. A 401 that a new token can cure
   * is retried once after a refresh or login; never more.
   */
  async function request(opts, { allowLogin = true } = {}) {
    const used = accessToken();
    const res = await send(opts, used);
    if (res.statusCode !== 401 || !RENEWABLE.has(res.data && res.data.error)) return res;
    const current = accessToken();
    // Another request may have renewed the token meanwhile: then use that one.
    if (!current || current === used) await renew(allowLogin);
    const retried = await send(opts, accessToken());
    if (retried.statusCode === 401) throw errorFrom(retried);
    return retried;
  }

  /** Ends the session at wxgate and forgets the tokens. */
  async function logout() {
    const stored = load();
    clear();
    if (stored && stored.access_token) {
      try {
        await send({ url: '/auth/logout', method: 'POST' }, stored.access_token);
      } catch (e) {
        // Offline: the tokens are forgotten here, and the session expires at wxgate by itself.
      }
    }
  }

  function checkSession() {
    return new Promise((resolve) => wxApi.checkSession({ success: () => resolve(true), fail: () => resolve(false) }));
  }

  async function postDetail(url, data) {
    const res = await request({ url, method: 'POST', data, header: { 'content-type': 'application/json' } }, { allowLogin: false });
    if (res.statusCode !== 200) throw errorFrom(res);
    return res.data;
  }

  /**
   * Sends `wx.getUserInfo()` / `<button open-type="getUserInfo">` detail to /auth/userinfo. Needed only
   * when the login said `unionid_known: false`. Never calls wx.login().
   */
  async function sendUserInfo(detail) {
    if (!detail || !detail.encryptedData) throw new WxgateError('no_user_info', (detail && detail.errMsg) || 'The user declined.');
    if (!(await checkSession())) {
      throw new WxgateError('session_key_expired', 'The WeChat session expired: call client.login(), then ask again.');
    }
    const { encryptedData, iv, rawData, signature } = detail;
    return postDetail('/auth/userinfo', { encryptedData, iv, rawData, signature });
  }

  /** Sends `<button open-type="getPhoneNumber">` detail to /auth/phone. Never calls wx.login(). */
  async function sendPhone(detail) {
    if (detail && detail.code) return postDetail('/auth/phone', { code: detail.code });
    if (!detail || !detail.encryptedData) throw new WxgateError('no_phone', (detail && detail.errMsg) || 'The user declined.');
    if (!(await checkSession())) {
      throw new WxgateError('session_key_expired', 'The WeChat session expired: call client.login(), then ask again.');
    }
    return postDetail('/auth/phone', { encryptedData: detail.encryptedData, iv: detail.iv });
  }

  return { request, login, logout, sendUserInfo, sendPhone, userId: () => (load() || {}).user_id };
}

module.exports = { createClient, WxgateError };
