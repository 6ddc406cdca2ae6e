//! Open data: `POST /auth/userinfo`, and the same fields carried by `POST /auth/login`. Decrypting user
//! info is how an app that is not bound to an Open Platform account learns the unionid, and learning a
//! unionid is how two users are found to be one person (identity rule 4).

use std::sync::Arc;

use http::{HeaderMap, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::service::{AuthService, no_store};
use crate::body::{self, Body};
use crate::config::Secret;
use crate::error::Error;
use crate::identity::LoginIds;
use crate::session::Session;
use crate::wechat::crypto::{self, CryptoError, WatermarkError};

/// The fields `wx.getUserInfo` (and the legacy phone button) hand the client.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenData {
    pub encrypted_data: Option<String>,
    pub iv: Option<String>,
    pub raw_data: Option<String>,
    pub signature: Option<String>,
}

/// Profile fields returned to the client (not identity: since 2021 WeChat anonymises them).
const PROFILE_FIELDS: [&str; 7] = [
    "nickName",
    "avatarUrl",
    "gender",
    "language",
    "city",
    "province",
    "country",
];

impl OpenData {
    pub fn is_present(&self) -> bool {
        self.encrypted_data.is_some() || self.iv.is_some()
    }

    /// Decrypts with the first of `keys` (newest first) that fits, then checks the watermark, that the
    /// data is this user's, and the rawData signature when one is given.
    pub fn open(
        &self,
        keys: &[Secret],
        appid: &str,
        openid: &str,
        now: u64,
        max_age: u64,
    ) -> Result<Value, Error> {
        let (Some(encrypted), Some(iv)) = (&self.encrypted_data, &self.iv) else {
            return Err(Error::BadRequest(
                "Send both encryptedData and iv, as wx.getUserInfo() returns them.",
            ));
        };
        let mut opened = Err(Error::DecryptFailed(CryptoError::Padding));
        for key in keys {
            match crypto::decrypt_json(key.expose(), iv, encrypted) {
                Ok(value) => {
                    opened = Ok((value, key));
                    break;
                }
                // Another key may fit: WeChat rotates the session_key on every wx.login().
                Err(CryptoError::Padding | CryptoError::NotJson) => continue,
                Err(e) => return Err(Error::DecryptFailed(e)),
            }
        }
        let (value, key) = opened?;
        crypto::check_watermark(&value, appid, now, max_age).map_err(Error::WatermarkMismatch)?;
        if value
            .get("openId")
            .and_then(Value::as_str)
            .is_some_and(|o| o != openid)
        {
            return Err(Error::WatermarkMismatch(WatermarkError::OtherApp));
        }
        match (&self.raw_data, &self.signature) {
            (Some(raw), Some(signature)) => {
                if !crypto::signature_matches(raw, key.expose(), signature) {
                    return Err(Error::SignatureMismatch);
                }
            }
            (None, None) => {}
            _ => {
                return Err(Error::BadRequest(
                    "Send rawData and signature together, or neither.",
                ));
            }
        }
        Ok(value)
    }
}

/// The profile fields of decrypted user info.
pub fn profile(data: &Value) -> Value {
    let mut profile = Map::new();
    for field in PROFILE_FIELDS {
        if let Some(v) = data.get(field) {
            profile.insert(field.to_owned(), v.clone());
        }
    }
    Value::Object(profile)
}

/// The unionid in decrypted user info, if any.
pub fn unionid(data: &Value) -> Option<&str> {
    data.get("unionId")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
}

impl AuthService {
    /// Opens `data` the client got in this session, with the session_keys WeChat issued for its
    /// (appid, openid), newest first.
    pub(super) async fn open_for_session(
        &self,
        session: &Session,
        data: &OpenData,
        now: u64,
    ) -> Result<Value, Error> {
        let keys = self
            .sessions
            .session_keys(session)
            .await
            .map_err(|e| Error::AuthUnavailable(Box::new(e)))?;
        data.open(
            &keys,
            session.appid(),
            session.openid(),
            now,
            self.watermark_max_age,
        )
    }

    pub(super) async fn userinfo(
        &self,
        headers: &HeaderMap,
        data: OpenData,
        now: u64,
    ) -> Result<Response<Body>, Error> {
        let (session, _) = self.mini_program_session(headers, now).await?;
        let opened = self.open_for_session(&session, &data, now).await?;
        let user_id = match unionid(&opened) {
            Some(unionid) => self.learn_unionid(&session, unionid).await?,
            None => session.user_id().to_owned(),
        };
        let mut view = json!({ "user_id": user_id, "profile": profile(&opened) });
        if let Some(unionid) = unionid(&opened).or(session.unionid()) {
            view["unionid"] = json!(unionid);
        }
        Ok(no_store(body::json(StatusCode::OK, &view)))
    }

    /// Links a unionid learned after login to the session's user (identity rule 4): when the unionid
    /// belongs to another user, this user is merged into that one, and every live session of the
    /// merged users carries the survivor from the next request on. Returns the user's id.
    pub(super) async fn learn_unionid(
        &self,
        session: &Arc<Session>,
        unionid: &str,
    ) -> Result<String, Error> {
        if session.unionid() == Some(unionid) {
            return Ok(session.user_id().to_owned());
        }
        let resolved = self
            .resolve_identity(LoginIds {
                appid: session.appid(),
                openid: session.openid(),
                unionid: Some(unionid),
            })
            .await?;
        // This session's own user: it now has the unionid, or was itself merged into the survivor.
        self.repoint(session.user_id(), &resolved.user_id, Some(unionid))
            .await?;
        Ok(resolved.user_id)
    }
}
