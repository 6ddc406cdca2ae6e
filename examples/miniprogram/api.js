// The one place the mini program learns where wxgate is. Point baseURL at your deployment (HTTPS, on
// the mini program's request-domain whitelist), or at `cargo run --example demo -- --serve` with
// "do not verify domain names" ticked in WeChat DevTools.
const { createClient } = require('./wxgate.js');

module.exports = createClient({ baseURL: 'http://127.0.0.1:8080' });
