// The phone-number button: its detail goes to wxgate as it is. No wx.login() in this callback.
const api = require('../../api.js');

Page({
  data: { phone: '', error: '' },
  async onGetPhoneNumber(e) {
    try {
      const res = await api.sendPhone(e.detail);
      this.setData({ phone: res.phone_number });
    } catch (err) {
      this.setData({ error: err.code + ': ' + err.message });
    }
  },
});
