//! `#[step]`: makes an async fn a journaled, retried unit of work.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::{FnArg, ItemFn, LitStr, Pat, PatIdent, ReturnType, Type};

use crate::attrs::StepArgs;
use crate::sig::{self, display};

const RUNS_AGAIN: &str = "a step may run several times (once per attempt)";

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut func: ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(err) => return sig::with_errors(item, sig::not_a_fn("#[fluxo::step]", err)),
    };
    let args = match StepArgs::parse(args) {
        Ok(args) => args,
        Err(err) => return sig::with_errors(func.into_token_stream(), err),
    };
    let clones = match check_signature(&func) {
        Ok(clones) => clones,
        Err(err) => return sig::with_errors(func.into_token_stream(), err),
    };

    let name = args
        .name
        .clone()
        .unwrap_or_else(|| LitStr::new(&sig::unraw(&func.sig.ident), func.sig.ident.span()));
    let options = args.options_expr();
    let fake_return = fake_return(&func.sig.output);
    let body = &func.block;
    let rebinds = clones.iter().map(|param| {
        let ident = &param.ident;
        let mutability = &param.mutability;
        quote! {
            #[allow(
                clippy::clone_on_copy,
                clippy::redundant_clone,
                clippy::used_underscore_binding
            )]
            let #mutability #ident = ::core::clone::Clone::clone(&#ident);
        }
    });
    // Type errors of the generated call (an output that is not a payload,
    // an error type other than `StepError`) are reported at the return type.
    let ReturnType::Type(_, ret_ty) = &func.sig.output else {
        unreachable!("checked by check_signature")
    };
    let ok_ty = sig::result_ok_type(&func.sig.output).expect("checked by check_signature");
    let run_step = quote_spanned!(ok_ty.span()=> ::fluxo::__private::run_step);
    // Naming the result type makes a wrong error type a plain mismatch.
    let result_ty = (!contains_impl_trait(ok_ty)).then(
        || quote_spanned!(ret_ty.span()=> : ::core::result::Result<#ok_ty, ::fluxo::StepError>),
    );
    let new_body = quote_spanned! {ret_ty.span()=> {
        let __fluxo_result #result_ty = #run_step(#name, #options, move || {
            #(#rebinds)*
            async move {
                #fake_return
                #body
            }
        })
        .await;
        __fluxo_result
    }};

    // The parameters are only read (cloned) by the new body: `mut` moves to
    // the per-attempt copies.
    for arg in &mut func.sig.inputs {
        if let FnArg::Typed(param) = arg {
            if let Pat::Ident(ident) = &mut *param.pat {
                ident.mutability = None;
            }
        }
    }
    func.block = syn::parse2(new_body).expect("the generated step body is a block");
    func.into_token_stream()
}

/// Checks the signature and returns the parameters to clone for each attempt.
fn check_signature(func: &ItemFn) -> syn::Result<Vec<&PatIdent>> {
    let sig = &func.sig;
    let mut errors = Vec::new();
    let mut clones = Vec::new();

    if sig.asyncness.is_none() {
        errors.push(syn::Error::new_spanned(
            sig.fn_token,
            format!(
                "a `#[fluxo::step]` function must be async; write `async fn {}(...)`",
                sig::unraw(&sig.ident)
            ),
        ));
    }

    for arg in &sig.inputs {
        match arg {
            FnArg::Receiver(receiver) => {
                // `&self` and `self: &Self` both have a shared reference type.
                let shared_ref =
                    matches!(&*receiver.ty, Type::Reference(r) if r.mutability.is_none());
                if !shared_ref {
                    let found = display(receiver);
                    errors.push(syn::Error::new_spanned(
                        receiver,
                        format!(
                            "{RUNS_AGAIN}, so it cannot take `{found}`; take `&self` instead \
                             and clone what the body needs to own"
                        ),
                    ));
                }
            }
            FnArg::Typed(param) => {
                if let Type::Reference(reference) = &*param.ty {
                    if reference.mutability.is_some() {
                        errors.push(syn::Error::new_spanned(
                            &param.ty,
                            format!(
                                "{RUNS_AGAIN}, so it cannot take `&mut` arguments; take `&{}` or \
                                 a `Clone` value, and return what changed",
                                display(&reference.elem)
                            ),
                        ));
                        continue;
                    }
                }
                match &*param.pat {
                    Pat::Ident(ident) if ident.by_ref.is_none() && ident.subpat.is_none() => {
                        clones.push(ident);
                    }
                    Pat::Wild(_) => {}
                    pat => errors.push(syn::Error::new_spanned(
                        pat,
                        format!(
                            "{RUNS_AGAIN} and its arguments are cloned for each attempt, so each \
                             parameter must be a plain name; write `arg: {}` and destructure it \
                             in the body",
                            display(&param.ty)
                        ),
                    )),
                }
            }
        }
    }

    if sig::result_ok_type(&sig.output).is_none() {
        let msg = "a step must return `Result<T, StepError>`";
        errors.push(match &sig.output {
            ReturnType::Default => syn::Error::new(
                sig::missing_return_span(sig),
                format!("{msg}; add `-> Result<(), StepError>`"),
            ),
            ReturnType::Type(_, ty) => syn::Error::new_spanned(
                ty,
                format!("{msg}; write `-> Result<{}, StepError>`", display(ty)),
            ),
        });
    }

    match sig::combine(errors) {
        Some(err) => Err(err),
        None => Ok(clones),
    }
}

/// An unreachable `return` of the declared return type, which pins the
/// output type of the async block so `?` and `return` in the body resolve
/// exactly as they do in the original function.
fn fake_return(output: &ReturnType) -> TokenStream {
    let ReturnType::Type(_, ty) = output else {
        return TokenStream::new();
    };
    // `impl Trait` cannot be the type of a local: let the body infer it.
    if contains_impl_trait(ty) {
        return TokenStream::new();
    }
    quote! {
        #[allow(
            unknown_lints,
            unreachable_code,
            clippy::diverging_sub_expression,
            clippy::empty_loop,
            clippy::let_unit_value,
            clippy::let_with_type_underscore,
            clippy::needless_return,
            clippy::unreachable
        )]
        if false {
            let __fluxo_return: #ty = loop {};
            return __fluxo_return;
        }
    }
}

fn contains_impl_trait(ty: &Type) -> bool {
    let mut finder = ImplTraitFinder(false);
    finder.visit_type(ty);
    finder.0
}

struct ImplTraitFinder(bool);

impl<'ast> Visit<'ast> for ImplTraitFinder {
    fn visit_type_impl_trait(&mut self, _: &'ast syn::TypeImplTrait) {
        self.0 = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(args: TokenStream, item: TokenStream) -> String {
        expand(args, item).to_string()
    }

    #[test]
    fn wraps_the_body_in_run_step() {
        let out = expand_str(
            quote!(timeout = "10s"),
            quote!(
                async fn charge(order: &Order, mut n: u32) -> Result<PaymentId, StepError> {
                    n += 1;
                    Ok(PaymentId(n))
                }
            ),
        );
        assert!(!out.contains("compile_error"), "{out}");
        assert!(
            out.contains("async fn charge (order : & Order , n : u32)"),
            "{out}"
        );
        assert!(
            out.contains(":: fluxo :: __private :: run_step (\"charge\""),
            "{out}"
        );
        assert!(
            out.contains("let order = :: core :: clone :: Clone :: clone (& order)"),
            "{out}"
        );
        assert!(
            out.contains("let mut n = :: core :: clone :: Clone :: clone (& n)"),
            "{out}"
        );
        assert!(
            out.contains("let __fluxo_return : Result < PaymentId , StepError > = loop { }"),
            "{out}"
        );
    }

    #[test]
    fn rejects_what_cannot_run_twice() {
        let out = expand_str(
            quote!(),
            quote!(
                fn charge(self, a: &mut Order, (x, y): (u8, u8)) -> PaymentId {
                    todo!()
                }
            ),
        );
        assert!(out.contains("must be async"), "{out}");
        assert!(out.contains("cannot take `self`"), "{out}");
        assert!(
            out.contains("cannot take `&mut` arguments; take `&Order`"),
            "{out}"
        );
        assert!(out.contains("plain name; write `arg: (u8, u8)`"), "{out}");
        assert!(out.contains("must return `Result<T, StepError>`"), "{out}");
        assert!(!out.contains("run_step"), "{out}");
    }

    #[test]
    fn accepts_shared_self() {
        let out = expand_str(
            quote!(),
            quote!(
                async fn charge(&self) -> Result<(), StepError> {
                    Ok(())
                }
            ),
        );
        assert!(!out.contains("compile_error"), "{out}");
        let out = expand_str(
            quote!(),
            quote!(
                async fn charge(&mut self) -> Result<(), StepError> {
                    Ok(())
                }
            ),
        );
        assert!(out.contains("cannot take `&mut self`"), "{out}");
    }
}
