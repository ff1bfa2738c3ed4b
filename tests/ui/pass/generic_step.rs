//! Generic steps, a fully qualified `Result` return type, and steps called
//! directly, outside any workflow.
#![deny(warnings)]

use std::collections::BTreeMap;

use fluxo::StepError;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[fluxo::step(retry(max_attempts = 2))]
async fn echo<T>(value: T) -> Result<T, StepError>
where
    T: Serialize + DeserializeOwned + Clone + Send + 'static,
{
    Ok(value)
}

#[fluxo::step]
async fn count<K: Ord + Clone + Send + Sync>(
    map: &BTreeMap<K, u32>,
    min: u32,
) -> Result<usize, StepError> {
    Ok(map.values().filter(|v| **v >= min).count())
}

#[fluxo::step]
async fn first_word(text: &str) -> std::result::Result<String, StepError> {
    match text.split_whitespace().next() {
        Some(word) => Ok(word.to_owned()),
        None => Err(StepError::fatal("empty text")),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert_eq!(echo(5u8).await.unwrap(), 5);
    assert_eq!(echo(String::from("hi")).await.unwrap(), "hi");
    let map: BTreeMap<&str, u32> = [("a", 1), ("b", 5)].into_iter().collect();
    assert_eq!(count(&map, 2).await.unwrap(), 1);
    assert_eq!(first_word("hello world").await.unwrap(), "hello");
    assert!(first_word("  ").await.is_err());
}
