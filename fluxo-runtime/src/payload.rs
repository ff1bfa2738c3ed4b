//! How user values are encoded in the journal and in instance rows (JSON).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Error;

/// A value that can cross the journal: an input, output, signal or step
/// result. Implemented for every `Serialize + DeserializeOwned` type.
pub trait Payload: Serialize + DeserializeOwned + Send + 'static {}

impl<T: Serialize + DeserializeOwned + Send + 'static> Payload for T {}

/// Encodes a value.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|e| Error::Encode {
        type_name: std::any::type_name::<T>().to_owned(),
        message: e.to_string(),
    })
}

/// Decodes a value; the error message is the decoder's.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}
