//! Payme Merchant API wire format (JSON-RPC over HTTP 200): the envelope, error codes with
//! their `{ru, uz, en}` messages, and transaction states (providers.md §1).

use serde_json::{Value, json};

pub const PARSE_ERROR: i32 = -32700;
pub const INVALID_REQUEST: i32 = -32600;
pub const METHOD_NOT_FOUND: i32 = -32601;
pub const INVALID_PARAMS: i32 = -32602;
pub const NOT_POST: i32 = -32300;
pub const INTERNAL: i32 = -32400;
pub const UNAUTHORIZED: i32 = -32504;
pub const WRONG_AMOUNT: i32 = -31001;
pub const TX_NOT_FOUND: i32 = -31003;
pub const CANNOT_CANCEL: i32 = -31007;
pub const CANNOT_PERFORM: i32 = -31008;
pub const ACCOUNT_NOT_FOUND: i32 = -31050;

/// Payme's clock: milliseconds since the Unix epoch.
pub type Millis = i64;
/// A state-1 transaction older than this (from Payme's `time`) is cancelled with reason 4.
pub const TIMEOUT_MS: Millis = 43_200_000;
pub const REASON_TIMEOUT: i32 = 4;

/// A JSON-RPC failure: code, localised message, optional `data`.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: i32,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i32) -> Self {
        Self { code, data: None }
    }

    pub fn with_data(code: i32, data: impl Into<Value>) -> Self {
        Self {
            code,
            data: Some(data.into()),
        }
    }

    fn message(&self) -> Value {
        let (ru, uz, en) = match self.code {
            PARSE_ERROR => (
                "Ошибка разбора JSON",
                "JSON tahlil xatosi",
                "JSON parse error",
            ),
            INVALID_REQUEST => ("Неверный запрос", "Noto'g'ri so'rov", "Invalid request"),
            METHOD_NOT_FOUND => ("Метод не найден", "Usul topilmadi", "Method not found"),
            INVALID_PARAMS => (
                "Неверные параметры",
                "Noto'g'ri parametrlar",
                "Invalid parameters",
            ),
            NOT_POST => (
                "Метод запроса должен быть POST",
                "So'rov usuli POST bo'lishi kerak",
                "The request method must be POST",
            ),
            UNAUTHORIZED => (
                "Недостаточно привилегий",
                "Huquqlar yetarli emas",
                "Insufficient privileges",
            ),
            WRONG_AMOUNT => ("Неверная сумма", "Noto'g'ri summa", "Wrong amount"),
            TX_NOT_FOUND => (
                "Транзакция не найдена",
                "Tranzaksiya topilmadi",
                "Transaction not found",
            ),
            CANNOT_CANCEL => (
                "Невозможно отменить транзакцию: услуга оказана",
                "Tranzaksiyani bekor qilib bo'lmaydi: xizmat ko'rsatilgan",
                "Cannot cancel: the service has been provided",
            ),
            CANNOT_PERFORM => (
                "Невозможно выполнить операцию",
                "Amalni bajarib bo'lmaydi",
                "The operation cannot be performed",
            ),
            ACCOUNT_NOT_FOUND => ("Счёт не найден", "Hisob topilmadi", "Invoice not found"),
            _ => ("Системная ошибка", "Tizim xatosi", "System error"),
        };
        json!({"ru": ru, "uz": uz, "en": en})
    }

    pub fn into_body(self, id: &Value) -> Value {
        let mut error = json!({"code": self.code, "message": self.message()});
        if let Some(data) = self.data {
            error["data"] = data;
        }
        json!({"jsonrpc": "2.0", "id": id, "error": error})
    }
}

pub fn success(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// Our stored state <-> Payme's state number.
pub fn state_number(state: &str) -> i32 {
    match state {
        "CREATED" => 1,
        "PERFORMED" => 2,
        "CANCELLED_AFTER_PERFORM" => -2,
        _ => -1,
    }
}

/// A required integer parameter (Payme sends numbers, never strings).
pub fn int(params: &Value, name: &str) -> Result<i64, RpcError> {
    params
        .get(name)
        .and_then(Value::as_i64)
        .ok_or_else(|| RpcError::with_data(INVALID_PARAMS, name))
}

/// A required string parameter.
pub fn string<'a>(params: &'a Value, name: &str) -> Result<&'a str, RpcError> {
    params
        .get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .ok_or_else(|| RpcError::with_data(INVALID_PARAMS, name))
}
