// A protected page: the first request logs in by itself (wx.login + /auth/login), then retries.
const api = require('../../api.js');

Page({
  data: { userId: '', error: '' },
  async onLoad() {
    try {
      const res = await api.request({ url: '/api/orders' });
      this.setData({ userId: res.data.headers['x-user-id'][0] });
    } catch (e) {
      // login_blocked, rate_limited, network_error: the things a user has to be told.
      this.setData({ error: e.code + ': ' + e.message });
    }
  },
  openPhone() {
    wx.navigateTo({ url: '/pages/phone/phone' });
  },
  async logout() {
    await api.logout();
    wx.navigateBack();
  },
});
