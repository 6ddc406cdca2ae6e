//! `POST /auth/phone`: a phone number WeChat verified for the user. The current form sends the phone
//! button's `code`, exchanged at `getuserphonenumber` with the app's access_token and bound to the
//! user's openid; the legacy form sends `encryptedData` and `iv`, decrypted like user info. The number
//! is returned, recorded on the user, and sent upstream only when `[headers] phone` is configured.

use http::{HeaderMap, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::open_data::OpenData;
use super::service::{AuthService, no_store};
use crate::body::{self, Body};
use crate::error::Error;
use crate::identity::Phone;
use crate::session::UserChange;
use crate::wechat::access_token::with_token;
use crate::wechat::client::{PhoneInfo, WechatError};
use crate::wechat::crypto::{self, CryptoError};

pub(super) const PHONE_EXPECTED: &str = "The body must be JSON like {\"code\": \"<code from the phone button>\"}, or {\"encryptedData\", \"iv\"} from an old client.";

#[derive(Deserialize)]
pub(super) struct PhoneRequest {
    code: Option<String>,
    #[serde(flatten)]
    open_data: OpenData,
}

/// A phone-button code: 64 hex digits (allow some slack).
fn looks_like_phone_code(code: &str) -> bool {
    (16..=128).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn phone_error(e: WechatError) -> Error {
    match e {
        WechatError::Api { errcode: 40029 } => Error::InvalidCode,
        WechatError::Api { errcode: 45011 } => Error::RateLimited,
        other => Error::WechatUnavailable(other),
    }
}

impl AuthService {
    pub(super) async fn phone(
        &self,
        headers: &HeaderMap,
        request: PhoneRequest,
        now: u64,
    ) -> Result<Response<Body>, Error> {
        let (session, app) = self.mini_program_session(headers, now).await?;
        let info: PhoneInfo = match (request.code, request.open_data.is_present()) {
            (Some(code), _) => {
                if !looks_like_phone_code(&code) {
                    return Err(Error::InvalidCode);
                }
                let info = with_token(&*self.access_tokens, &app.config, |access_token| {
                    let (code, openid) = (code.clone(), session.openid().to_owned());
                    async move {
                        self.wechat
                            .user_phone_number(&access_token, &code, &openid)
                            .await
                    }
                })
                .await
                .map_err(phone_error)?;
                let watermark = json!({ "watermark": info.watermark });
                crypto::check_watermark(&watermark, &app.config.appid, now, self.watermark_max_age)
                    .map_err(Error::WatermarkMismatch)?;
                info
            }
            (None, true) => {
                let opened = self
                    .open_for_session(&session, &request.open_data, now)
                    .await?;
                serde_json::from_value(opened)
                    .map_err(|_| Error::DecryptFailed(CryptoError::NotJson))?
            }
            (None, false) => return Err(Error::BadRequest(PHONE_EXPECTED)),
        };
        let phone = Phone {
            phone_number: info.phone_number.clone(),
            country_code: info.country_code.clone(),
            verified_at: now as i64,
        };
        self.identities
            .set_phone(session.user_id(), &phone)
            .await
            .map_err(|e| Error::IdentityUnavailable(Box::new(e)))?;
        self.sessions
            .update_session(
                &session.sid,
                UserChange {
                    unionid: None,
                    phone: Some(&info.phone_number),
                },
            )
            .await
            .map_err(|e| Error::AuthUnavailable(Box::new(e)))?;
        tracing::info!(user_id = %session.user_id(), "phone number verified");
        Ok(no_store(body::json(
            StatusCode::OK,
            &json!({
                "phone_number": info.phone_number,
                "pure_phone_number": info.pure_phone_number,
                "country_code": info.country_code,
            }),
        )))
    }
}
