//! Open-data cryptography, as `shared/docs/wechat-protocol.md` describes it: AES-128-CBC with strict
//! PKCS#7 for `encryptedData`, the `sha1(rawData + session_key)` signature, the watermark, and the
//! checksession HMAC. Every input is checked (base64, lengths, padding, JSON) before use, and every
//! failure is a [`CryptoError`] naming the field — never a panic.

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha1::{Digest, Sha1};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type Aes128CbcDec = cbc::Decryptor<aes::Aes128>;
type Aes128CbcEnc = cbc::Encryptor<aes::Aes128>;

/// Why open data could not be used. The message names the field and is safe to show a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("{0} is not valid base64")]
    Base64(&'static str),
    #[error("the session_key is not 16 bytes")]
    KeyLength,
    #[error("iv is not 16 bytes")]
    IvLength,
    #[error("encryptedData is not a non-zero multiple of 16 bytes")]
    CiphertextLength,
    /// Wrong key, or the data was tampered with.
    #[error("encryptedData does not decrypt with this session_key")]
    Padding,
    #[error("the decrypted data is not a JSON object")]
    NotJson,
}

/// Base64 as clients send it: standard alphabet, padding optional, and a space read as `+` (a `+`
/// becomes a space when someone URL-decodes a JSON body).
pub fn decode_base64(field: &'static str, text: &str) -> Result<Vec<u8>, CryptoError> {
    let text = text.trim().replace(' ', "+");
    STANDARD
        .decode(&text)
        .or_else(|_| STANDARD_NO_PAD.decode(&text))
        .map_err(|_| CryptoError::Base64(field))
}

/// Decrypts `encryptedData` with a session_key (its base64 text) and an iv (base64).
pub fn decrypt(session_key: &str, iv: &str, encrypted: &str) -> Result<Vec<u8>, CryptoError> {
    let key: [u8; 16] = decode_base64("session_key", session_key)?
        .try_into()
        .map_err(|_| CryptoError::KeyLength)?;
    let iv: [u8; 16] = decode_base64("iv", iv)?
        .try_into()
        .map_err(|_| CryptoError::IvLength)?;
    let data = decode_base64("encryptedData", encrypted)?;
    if data.is_empty() || data.len() % 16 != 0 {
        return Err(CryptoError::CiphertextLength);
    }
    Aes128CbcDec::new(&key.into(), &iv.into())
        .decrypt_padded_vec::<Pkcs7>(&data)
        .map_err(|_| CryptoError::Padding)
}

/// [`decrypt`], then parse the plaintext as a JSON object.
pub fn decrypt_json(session_key: &str, iv: &str, encrypted: &str) -> Result<Value, CryptoError> {
    let plain = decrypt(session_key, iv, encrypted)?;
    serde_json::from_slice::<Value>(&plain)
        .ok()
        .filter(Value::is_object)
        .ok_or(CryptoError::NotJson)
}

/// Encrypts `plaintext` as WeChat does (the mock uses this); returns base64 `encryptedData`.
pub fn encrypt(session_key: &str, iv: &[u8; 16], plaintext: &[u8]) -> Result<String, CryptoError> {
    let key: [u8; 16] = decode_base64("session_key", session_key)?
        .try_into()
        .map_err(|_| CryptoError::KeyLength)?;
    let data = Aes128CbcEnc::new(&key.into(), iv.into()).encrypt_padded_vec::<Pkcs7>(plaintext);
    Ok(STANDARD.encode(data))
}

/// Why a watermark was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatermarkError {
    #[error("the data was issued for another app")]
    OtherApp,
    #[error("the data is too old, or from the future")]
    Stale,
    #[error("the data carries no watermark")]
    Missing,
}

/// Checks `watermark.appid == appid` and that `watermark.timestamp` lies within `max_age` seconds
/// before `now` (and at most a minute after, for clock differences).
pub fn check_watermark(
    data: &Value,
    appid: &str,
    now: u64,
    max_age: u64,
) -> Result<(), WatermarkError> {
    let watermark = data.get("watermark").ok_or(WatermarkError::Missing)?;
    let wm_appid = watermark
        .get("appid")
        .and_then(Value::as_str)
        .ok_or(WatermarkError::Missing)?;
    if wm_appid != appid {
        return Err(WatermarkError::OtherApp);
    }
    let timestamp = watermark
        .get("timestamp")
        .and_then(|t| {
            t.as_u64()
                .or_else(|| t.as_str().and_then(|s| s.parse().ok()))
        })
        .ok_or(WatermarkError::Missing)?;
    if timestamp + max_age < now || timestamp > now + 60 {
        return Err(WatermarkError::Stale);
    }
    Ok(())
}

/// `lowercase_hex(sha1(rawData + session_key))`, where session_key is its base64 text.
pub fn raw_data_signature(raw_data: &str, session_key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(raw_data.as_bytes());
    sha.update(session_key.as_bytes());
    hex::encode(sha.finalize())
}

/// Whether `signature` is [`raw_data_signature`], compared in constant time (hex case ignored).
pub fn signature_matches(raw_data: &str, session_key: &str, signature: &str) -> bool {
    let expected = raw_data_signature(raw_data, session_key);
    let given = signature.trim().to_ascii_lowercase();
    expected.len() == given.len() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

/// The checksession signature: `lowercase_hex(HMAC-SHA256(key = session_key text, message))`.
pub fn session_hmac(session_key: &str, message: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(session_key.as_bytes()).expect("HMAC takes any key length");
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // WeChat's official demo vector (wechat-protocol.md).
    const APPID: &str = "wx4f4bc4dec97d474b";
    const KEY: &str = "tiihtNczf5v6AKRyjwEUhQ==";
    const IV: &str = "r7BXXKkLb8qrSNn05n0qiA==";
    const DATA: &str = "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zAo6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqOyuxINew==";
    const PLAIN: &str = r#"{"openId":"oGZUI0egBJY1zhBYw2KhdUfwVJJE","nickName":"Band","gender":1,"language":"zh_CN","city":"Guangzhou","province":"Guangdong","country":"CN","avatarUrl":"http://wx.qlogo.cn/mmopen/vi_32/aSKcBBPpibyKNicHNTMM0qJVh8Kjgiak2AHWr8MHM4WgMEm7GFhsf8OYrySdbvAMvTsw3mo8ibKicsnfN5pRjl1p8HQ/0","unionId":"ocMvos6NjeKLIBqg5Mr9QjxrP1FA","watermark":{"timestamp":1477314187,"appid":"wx4f4bc4dec97d474b"}}"#;

    #[test]
    fn the_official_vector_decrypts_to_exactly_its_plaintext() {
        assert_eq!(decrypt(KEY, IV, DATA).unwrap(), PLAIN.as_bytes());
        let value = decrypt_json(KEY, IV, DATA).unwrap();
        assert_eq!(value["unionId"], "ocMvos6NjeKLIBqg5Mr9QjxrP1FA");
        assert_eq!(check_watermark(&value, APPID, 1477314187 + 10, 600), Ok(()));
        assert_eq!(
            check_watermark(&value, "wx0000000000000000", 1477314187, 600),
            Err(WatermarkError::OtherApp)
        );
        assert_eq!(
            check_watermark(&value, APPID, 1477314187 + 601, 600),
            Err(WatermarkError::Stale)
        );
        assert_eq!(
            check_watermark(&value, APPID, 1477314187 - 61, 600),
            Err(WatermarkError::Stale)
        );
    }

    #[test]
    fn a_plus_turned_into_a_space_still_decodes() {
        assert_eq!(
            decrypt(KEY, IV, &DATA.replace('+', " ")).unwrap(),
            PLAIN.as_bytes()
        );
    }

    #[test]
    fn the_official_raw_data_signature() {
        let raw = r#"{"nickName":"Band","gender":1,"language":"zh_CN","city":"Guangzhou","province":"Guangdong","country":"CN","avatarUrl":"http://wx.qlogo.cn/mmopen/vi_32/1vZvI39NWFQ9XM4LtQpFrQJ1xlgZxx3w7bQxKARol6503Iuswjjn6nIGBiaycAjAtpujxyzYsrztuuICqIM5ibXQ/0"}"#;
        let key = "HyVFkGl5F5OQWJZZaNzBBg==";
        assert_eq!(
            raw_data_signature(raw, key),
            "75e81ceda165f4ffa64f4068af58c64b8f54b88c"
        );
        assert!(signature_matches(
            raw,
            key,
            "75E81CEDA165F4FFA64F4068AF58C64B8F54B88C"
        ));
        assert!(!signature_matches(
            raw,
            key,
            "75e81ceda165f4ffa64f4068af58c64b8f54b88d"
        ));
        assert!(!signature_matches(
            &raw.replace("Band", "Bend"),
            key,
            "75e81ceda165f4ffa64f4068af58c64b8f54b88c"
        ));
        assert!(!signature_matches(raw, key, ""));
    }

    #[test]
    fn the_official_checksession_value() {
        assert_eq!(
            session_hmac("o0q0otL8aEzpcZL/FT9WsQ==", br#"{"foo":"bar"}"#),
            "654571f79995b2ce1e149e53c0a33dc39c0a74090db514261454e8dbe432aa0b"
        );
    }

    #[test]
    fn every_bad_input_is_a_named_error() {
        assert_eq!(
            decrypt("not base64!", IV, DATA),
            Err(CryptoError::Base64("session_key"))
        );
        assert_eq!(decrypt("AAAA", IV, DATA), Err(CryptoError::KeyLength));
        assert_eq!(decrypt(KEY, "AAAA", DATA), Err(CryptoError::IvLength));
        assert_eq!(
            decrypt(KEY, IV, "%%%"),
            Err(CryptoError::Base64("encryptedData"))
        );
        assert_eq!(decrypt(KEY, IV, ""), Err(CryptoError::CiphertextLength));
        assert_eq!(
            decrypt(KEY, IV, "AAAAAAAAAAAAAAAAAAAA"),
            Err(CryptoError::CiphertextLength)
        );
        assert_eq!(
            decrypt("HyVFkGl5F5OQWJZZaNzBBg==", IV, DATA),
            Err(CryptoError::Padding),
            "wrong key"
        );
        let not_json = encrypt(KEY, &[3; 16], b"plain text").unwrap();
        assert_eq!(
            decrypt_json(KEY, &STANDARD.encode([3u8; 16]), &not_json),
            Err(CryptoError::NotJson)
        );
        let round = encrypt(KEY, &[9; 16], b"{\"a\":1}").unwrap();
        assert_eq!(
            decrypt(KEY, &STANDARD.encode([9u8; 16]), &round).unwrap(),
            b"{\"a\":1}"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(key in any::<Vec<u8>>(), iv in any::<Vec<u8>>(), data in any::<Vec<u8>>(), text in ".*") {
            let _ = decrypt(&STANDARD.encode(&key), &STANDARD.encode(&iv), &STANDARD.encode(&data));
            let _ = decrypt_json(KEY, IV, &STANDARD.encode(&data));
            let _ = decrypt_json(&text, &text, &text);
            let _ = decrypt(KEY, IV, &text);
        }
    }
}
