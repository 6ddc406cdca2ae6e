// A public page: browsable without login.
const api = require('../../api.js');

Page({
  data: { products: [], error: '' },
  async onLoad() {
    try {
      const res = await api.request({ url: '/api/public/products' });
      this.setData({ products: res.data.products || [{ name: 'The sample backend echoes: ' + res.data.path }] });
    } catch (e) {
      this.setData({ error: e.message });
    }
  },
  openOrders() {
    wx.navigateTo({ url: '/pages/orders/orders' });
  },
});
