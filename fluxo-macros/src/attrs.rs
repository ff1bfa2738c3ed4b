//! Parsing of the arguments of `#[workflow(...)]`, `#[step(...)]` and
//! `#[signal(...)]`.

use std::time::Duration;

use proc_macro2::{Literal, TokenStream};
use quote::{quote, quote_spanned};
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Lit, LitInt, LitStr, Token, Type};

/// Arguments of `#[workflow(...)]`.
#[derive(Default)]
pub struct WorkflowArgs {
    pub name: Option<LitStr>,
    pub version: Option<u32>,
    pub signals: Vec<Type>,
}

/// Arguments of `#[step(...)]`.
#[derive(Default)]
pub struct StepArgs {
    pub name: Option<LitStr>,
    pub retry: Option<RetryArgs>,
    pub timeout: Option<DurationArg>,
}

/// Arguments of `retry(...)` inside `#[step(...)]`.
#[derive(Default)]
pub struct RetryArgs {
    pub max_attempts: Option<u32>,
    pub initial: Option<DurationArg>,
    pub max: Option<DurationArg>,
    pub backoff: Option<f64>,
    pub jitter: Option<f64>,
    pub non_retryable: Option<Vec<LitStr>>,
}

/// Arguments of `#[signal(...)]`.
#[derive(Default)]
pub struct SignalArgs {
    pub name: Option<LitStr>,
}

/// A duration written as a string literal such as `"200ms"` or `"2days"`.
pub struct DurationArg {
    pub lit: LitStr,
    pub value: Duration,
}

const WORKFLOW_KEYS: &str = "`name = \"...\"`, `version = N`, `signals(A, B, ...)`";
const STEP_KEYS: &str = "`name = \"...\"`, `retry(...)`, `timeout = \"10s\"`";
const RETRY_KEYS: &str = "`max_attempts = N`, `initial = \"200ms\"`, `max = \"30s\"`, \
                          `backoff = 2.0`, `jitter = 0.1`, `non_retryable(\"Kind\", ...)`";
const SIGNAL_KEYS: &str = "`name = \"...\"`";

impl WorkflowArgs {
    pub fn parse(tokens: TokenStream) -> syn::Result<Self> {
        let mut args = Self::default();
        let mut seen_signals = false;
        let parser = syn::meta::parser(|meta| {
            match key(&meta).as_deref() {
                Some("name") => set_once(&meta, &mut args.name, parse_name)?,
                Some("version") => set_once(&meta, &mut args.version, parse_version)?,
                Some("signals") => {
                    if seen_signals {
                        return Err(duplicate(&meta));
                    }
                    seen_signals = true;
                    args.signals = parse_signal_list(&meta)?;
                }
                _ => return Err(unknown(&meta, "#[fluxo::workflow]", WORKFLOW_KEYS)),
            }
            Ok(())
        });
        parser.parse2(tokens)?;
        Ok(args)
    }
}

impl StepArgs {
    pub fn parse(tokens: TokenStream) -> syn::Result<Self> {
        let mut args = Self::default();
        let parser = syn::meta::parser(|meta| {
            match key(&meta).as_deref() {
                Some("name") => set_once(&meta, &mut args.name, parse_name)?,
                Some("retry") => set_once(&meta, &mut args.retry, RetryArgs::parse)?,
                Some("timeout") => set_once(&meta, &mut args.timeout, |meta| {
                    let timeout = parse_duration(meta)?;
                    if timeout.value.is_zero() {
                        return Err(syn::Error::new_spanned(
                            &timeout.lit,
                            "a step timeout must be greater than zero; remove `timeout` to let \
                             the step run without one",
                        ));
                    }
                    Ok(timeout)
                })?,
                _ => return Err(unknown(&meta, "#[fluxo::step]", STEP_KEYS)),
            }
            Ok(())
        });
        parser.parse2(tokens)?;
        Ok(args)
    }

    /// The `::fluxo::StepOptions` expression these arguments describe.
    pub fn options_expr(&self) -> TokenStream {
        let mut expr = quote!(::fluxo::StepOptions::new());
        if let Some(retry) = &self.retry {
            let policy = retry.policy_expr();
            expr = quote!(#expr.retry(#policy));
        }
        if let Some(timeout) = &self.timeout {
            let timeout = timeout.to_tokens();
            expr = quote!(#expr.timeout(#timeout));
        }
        expr
    }
}

impl RetryArgs {
    fn parse(meta: &ParseNestedMeta) -> syn::Result<Self> {
        let mut args = Self::default();
        meta.parse_nested_meta(|meta| {
            match key(&meta).as_deref() {
                Some("max_attempts") => set_once(&meta, &mut args.max_attempts, |meta| {
                    let lit: LitInt = meta.value()?.parse()?;
                    let attempts = lit.base10_parse::<u32>()?;
                    if attempts == 0 {
                        return Err(syn::Error::new_spanned(
                            lit,
                            "`max_attempts` counts the first attempt too and must be at least 1; \
                             use `max_attempts = 1` to disable retries",
                        ));
                    }
                    Ok(attempts)
                })?,
                Some("initial") => set_once(&meta, &mut args.initial, parse_duration)?,
                Some("max") => set_once(&meta, &mut args.max, parse_duration)?,
                Some("backoff") => set_once(&meta, &mut args.backoff, |meta| {
                    parse_float(
                        meta,
                        "backoff",
                        1.0,
                        f64::MAX,
                        "at least 1.0 (1.0 keeps a constant interval)",
                    )
                })?,
                Some("jitter") => set_once(&meta, &mut args.jitter, |meta| {
                    parse_float(
                        meta,
                        "jitter",
                        0.0,
                        1.0,
                        "between 0.0 and 1.0 (a fraction of the interval)",
                    )
                })?,
                Some("non_retryable") => set_once(&meta, &mut args.non_retryable, |meta| {
                    let content;
                    syn::parenthesized!(content in meta.input);
                    let kinds = Punctuated::<LitStr, Token![,]>::parse_terminated(&content)?;
                    Ok(kinds.into_iter().collect())
                })?,
                _ => return Err(unknown(&meta, "retry(...)", RETRY_KEYS)),
            }
            Ok(())
        })?;
        if let (Some(initial), Some(max)) = (&args.initial, &args.max) {
            if max.value < initial.value {
                return Err(syn::Error::new_spanned(
                    &max.lit,
                    format!(
                        "the maximum retry interval is shorter than the initial one (\"{}\"); \
                         make `max` at least as long as `initial`",
                        initial.lit.value()
                    ),
                ));
            }
        }
        Ok(args)
    }

    fn policy_expr(&self) -> TokenStream {
        let mut expr = quote!(::fluxo::RetryPolicy::default());
        if let Some(n) = self.max_attempts {
            let n = Literal::u32_suffixed(n);
            expr = quote!(#expr.max_attempts(#n));
        }
        if let Some(d) = &self.initial {
            let d = d.to_tokens();
            expr = quote!(#expr.initial_interval(#d));
        }
        if let Some(d) = &self.max {
            let d = d.to_tokens();
            expr = quote!(#expr.max_interval(#d));
        }
        if let Some(x) = self.backoff {
            let x = Literal::f64_suffixed(x);
            expr = quote!(#expr.backoff_coefficient(#x));
        }
        if let Some(x) = self.jitter {
            let x = Literal::f64_suffixed(x);
            expr = quote!(#expr.jitter(#x));
        }
        if let Some(kinds) = &self.non_retryable {
            expr = quote!(#expr.non_retryable(&[#(#kinds),*]));
        }
        expr
    }
}

impl SignalArgs {
    pub fn parse(tokens: TokenStream) -> syn::Result<Self> {
        let mut args = Self::default();
        let parser = syn::meta::parser(|meta| {
            match key(&meta).as_deref() {
                Some("name") => set_once(&meta, &mut args.name, parse_name)?,
                _ => return Err(unknown(&meta, "#[fluxo::signal]", SIGNAL_KEYS)),
            }
            Ok(())
        });
        parser.parse2(tokens)?;
        Ok(args)
    }
}

impl DurationArg {
    /// A `::core::time::Duration` expression, spanned at the literal.
    pub fn to_tokens(&self) -> TokenStream {
        // Checked when parsing: the value fits in `u64` nanoseconds.
        let nanos = Literal::u64_suffixed(self.value.as_nanos() as u64);
        quote_spanned!(self.lit.span()=> ::core::time::Duration::from_nanos(#nanos))
    }
}

/// The single identifier naming an argument, if it is one.
fn key(meta: &ParseNestedMeta) -> Option<String> {
    meta.path.get_ident().map(|ident| ident.to_string())
}

fn set_once<T>(
    meta: &ParseNestedMeta,
    slot: &mut Option<T>,
    parse: impl FnOnce(&ParseNestedMeta) -> syn::Result<T>,
) -> syn::Result<()> {
    if slot.is_some() {
        return Err(duplicate(meta));
    }
    *slot = Some(parse(meta)?);
    Ok(())
}

fn duplicate(meta: &ParseNestedMeta) -> syn::Error {
    let key = key(meta).unwrap_or_default();
    meta.error(format!(
        "`{key}` is given more than once; keep a single `{key}`"
    ))
}

fn unknown(meta: &ParseNestedMeta, attribute: &str, valid: &str) -> syn::Error {
    let path = &meta.path;
    let key = quote!(#path).to_string().replace(' ', "");
    meta.error(format!(
        "unknown argument `{key}` in `{attribute}`; the valid arguments are {valid}"
    ))
}

fn parse_name(meta: &ParseNestedMeta) -> syn::Result<LitStr> {
    let lit: LitStr = meta.value()?.parse()?;
    if lit.value().trim().is_empty() {
        return Err(syn::Error::new_spanned(
            lit,
            "the name cannot be empty; give a non-empty string or remove `name` to use the default",
        ));
    }
    Ok(lit)
}

fn parse_version(meta: &ParseNestedMeta) -> syn::Result<u32> {
    let lit: LitInt = meta.value()?.parse()?;
    let version = lit.base10_parse::<u32>()?;
    if version == 0 {
        return Err(syn::Error::new_spanned(
            lit,
            "workflow versions start at 1; write `version = 1`",
        ));
    }
    Ok(version)
}

fn parse_signal_list(meta: &ParseNestedMeta) -> syn::Result<Vec<Type>> {
    if !meta.input.peek(syn::token::Paren) {
        return Err(
            meta.error("list the signal types in parentheses: `signals(Approved, Rejected)`")
        );
    }
    let content;
    syn::parenthesized!(content in meta.input);
    let types = Punctuated::<Type, Token![,]>::parse_terminated(&content)?;
    Ok(types.into_iter().collect())
}

fn parse_duration(meta: &ParseNestedMeta) -> syn::Result<DurationArg> {
    let lit: LitStr = meta.value()?.parse()?;
    let value = parse_duration_lit(&lit)?;
    Ok(DurationArg { lit, value })
}

/// Parses a string literal such as `"200ms"`, `"30s"`, `"1h 30m"` or `"2days"`.
pub fn parse_duration_lit(lit: &LitStr) -> syn::Result<Duration> {
    let text = lit.value();
    let value = humantime::parse_duration(&text).map_err(|err| {
        syn::Error::new_spanned(
            lit,
            format!(
                "invalid duration \"{text}\": {err}; write a number followed by a unit, \
                 such as \"200ms\", \"30s\", \"5m\", \"1h 30m\" or \"2days\""
            ),
        )
    })?;
    if u64::try_from(value.as_nanos()).is_err() {
        return Err(syn::Error::new_spanned(
            lit,
            format!("the duration \"{text}\" is too long; use at most a few centuries"),
        ));
    }
    Ok(value)
}

fn parse_float(
    meta: &ParseNestedMeta,
    what: &str,
    min: f64,
    max: f64,
    expected: &str,
) -> syn::Result<f64> {
    let lit: Lit = meta.value()?.parse()?;
    let value = match &lit {
        Lit::Float(f) => f.base10_parse::<f64>()?,
        Lit::Int(i) => i.base10_parse::<f64>()?,
        _ => {
            return Err(syn::Error::new_spanned(
                &lit,
                format!("`{what}` takes a number, such as `{what} = {min:?}`"),
            ))
        }
    };
    if !(min..=max).contains(&value) || !value.is_finite() {
        return Err(syn::Error::new_spanned(
            &lit,
            format!("`{what}` must be {expected}"),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn step(tokens: TokenStream) -> syn::Result<StepArgs> {
        StepArgs::parse(tokens)
    }

    fn err(result: syn::Result<impl Sized>) -> String {
        match result {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn workflow_defaults() {
        let args = WorkflowArgs::parse(quote!()).unwrap();
        assert!(args.name.is_none());
        assert!(args.version.is_none());
        assert!(args.signals.is_empty());
    }

    #[test]
    fn workflow_all_arguments() {
        let args = WorkflowArgs::parse(quote!(
            version = 3,
            signals(Approved, crate::signals::Rejected),
            name = "orders"
        ))
        .unwrap();
        assert_eq!(args.version, Some(3));
        assert_eq!(args.name.unwrap().value(), "orders");
        assert_eq!(args.signals.len(), 2);
    }

    #[test]
    fn workflow_rejects_unknown_and_duplicate_keys() {
        let msg = err(WorkflowArgs::parse(quote!(versoin = 2)));
        assert!(msg.contains("unknown argument `versoin`"), "{msg}");
        assert!(msg.contains("`version = N`"), "{msg}");
        let msg = err(WorkflowArgs::parse(quote!(version = 1, version = 2)));
        assert!(msg.contains("more than once"), "{msg}");
        let msg = err(WorkflowArgs::parse(quote!(version = 0)));
        assert!(msg.contains("start at 1"), "{msg}");
        let msg = err(WorkflowArgs::parse(quote!(signals = Approved)));
        assert!(msg.contains("in parentheses"), "{msg}");
    }

    #[test]
    fn step_full_policy() {
        let args = step(quote!(
            name = "charge_card",
            retry(
                max_attempts = 5,
                initial = "200ms",
                max = "30s",
                backoff = 2.0,
                jitter = 0.1,
                non_retryable("Declined", "Fraud")
            ),
            timeout = "10s"
        ))
        .unwrap();
        assert_eq!(args.name.as_ref().unwrap().value(), "charge_card");
        let retry = args.retry.as_ref().unwrap();
        assert_eq!(retry.max_attempts, Some(5));
        assert_eq!(
            retry.initial.as_ref().unwrap().value,
            Duration::from_millis(200)
        );
        assert_eq!(retry.max.as_ref().unwrap().value, Duration::from_secs(30));
        assert_eq!(retry.backoff, Some(2.0));
        assert_eq!(retry.jitter, Some(0.1));
        assert_eq!(retry.non_retryable.as_ref().unwrap().len(), 2);
        assert_eq!(
            args.timeout.as_ref().unwrap().value,
            Duration::from_secs(10)
        );

        let expr = args.options_expr().to_string().replace(' ', "");
        assert!(
            expr.starts_with("::fluxo::StepOptions::new().retry("),
            "{expr}"
        );
        assert!(expr.contains(".max_attempts(5u32)"), "{expr}");
        assert!(
            expr.contains(".initial_interval(::core::time::Duration::from_nanos(200000000u64))"),
            "{expr}"
        );
        assert!(expr.contains(".backoff_coefficient(2f64)"), "{expr}");
        assert!(
            expr.contains(".non_retryable(&[\"Declined\",\"Fraud\"])"),
            "{expr}"
        );
        assert!(
            expr.ends_with(".timeout(::core::time::Duration::from_nanos(10000000000u64))"),
            "{expr}"
        );
    }

    #[test]
    fn step_defaults_to_plain_options() {
        let args = step(quote!()).unwrap();
        assert_eq!(
            args.options_expr().to_string().replace(' ', ""),
            "::fluxo::StepOptions::new()"
        );
    }

    #[test]
    fn long_durations_parse() {
        let args = step(quote!(timeout = "2days")).unwrap();
        assert_eq!(args.timeout.unwrap().value, Duration::from_secs(2 * 86_400));
        let args = step(quote!(timeout = "1h 30m")).unwrap();
        assert_eq!(args.timeout.unwrap().value, Duration::from_secs(5_400));
    }

    #[test]
    fn step_rejects_bad_values() {
        let msg = err(step(quote!(timeout = "10 parsecs")));
        assert!(msg.contains("invalid duration \"10 parsecs\""), "{msg}");
        assert!(msg.contains("\"200ms\""), "{msg}");
        let msg = err(step(quote!(timeout = "0s")));
        assert!(msg.contains("greater than zero"), "{msg}");
        let msg = err(step(quote!(retry(max_attempts = 0))));
        assert!(msg.contains("at least 1"), "{msg}");
        let msg = err(step(quote!(retry(backoff = 0.5))));
        assert!(msg.contains("at least 1.0"), "{msg}");
        let msg = err(step(quote!(retry(jitter = 1.5))));
        assert!(msg.contains("between 0.0 and 1.0"), "{msg}");
        let msg = err(step(quote!(retry(initial = "1m", max = "1s"))));
        assert!(
            msg.contains("make `max` at least as long as `initial`"),
            "{msg}"
        );
        let msg = err(step(quote!(retries = 3)));
        assert!(msg.contains("unknown argument `retries`"), "{msg}");
        assert!(msg.contains("`retry(...)`"), "{msg}");
        let msg = err(step(quote!(retry(attempts = 3))));
        assert!(msg.contains("`max_attempts = N`"), "{msg}");
        let msg = err(step(quote!(name = "")));
        assert!(msg.contains("cannot be empty"), "{msg}");
    }

    #[test]
    fn signal_arguments() {
        assert_eq!(
            SignalArgs::parse(quote!(name = "approved"))
                .unwrap()
                .name
                .unwrap()
                .value(),
            "approved"
        );
        let msg = err(SignalArgs::parse(quote!(version = 1)));
        assert!(msg.contains("unknown argument `version`"), "{msg}");
    }
}
