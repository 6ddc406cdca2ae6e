-- The verified phone number of a user (from /auth/phone), with when it was verified.
ALTER TABLE users ADD COLUMN phone TEXT;
ALTER TABLE users ADD COLUMN phone_country_code TEXT;
ALTER TABLE users ADD COLUMN phone_verified_at INTEGER;
