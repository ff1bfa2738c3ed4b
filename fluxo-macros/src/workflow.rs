//! `#[workflow]`: turns an async fn into a workflow type.

use proc_macro2::{Ident, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, LitStr, PatType, Type};

use crate::attrs::WorkflowArgs;
use crate::determinism;
use crate::payload;
use crate::sig::{self, display};

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(err) => return sig::with_errors(item, sig::not_a_fn("#[fluxo::workflow]", err)),
    };
    let args = match WorkflowArgs::parse(args) {
        Ok(args) => args,
        Err(err) => return sig::with_errors(func.into_token_stream(), err),
    };
    let shape = match Shape::of(&func) {
        Ok(shape) => shape,
        Err(err) => {
            // Report the body lint too, so every problem shows at once.
            let all = sig::combine(std::iter::once(err).chain(determinism::check(&func.block)));
            return sig::with_errors(func.into_token_stream(), all.expect("at least one error"));
        }
    };
    let generated = generate(&func, &args, &shape);
    let lint = sig::combine(determinism::check(&func.block)).map(|err| err.to_compile_error());
    quote! {
        #func
        #generated
        #lint
    }
}

/// What the signature of a workflow fn says.
struct Shape<'a> {
    /// The generated type, `OrderFlow` for `order_flow`.
    type_name: Ident,
    /// The input type; `None` when the workflow takes only the context.
    input: Option<&'a Type>,
    output: &'a Type,
}

impl<'a> Shape<'a> {
    fn of(func: &'a ItemFn) -> syn::Result<Self> {
        let sig = &func.sig;
        let mut errors = Vec::new();
        let fn_name = sig::unraw(&sig.ident);

        if sig.asyncness.is_none() {
            errors.push(syn::Error::new_spanned(
                sig.fn_token,
                format!("a `#[fluxo::workflow]` function must be async; write `async fn {fn_name}(...)`"),
            ));
        }
        if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
            let generics = if sig.generics.params.is_empty() {
                sig.generics.where_clause.to_token_stream()
            } else {
                sig.generics.to_token_stream()
            };
            errors.push(syn::Error::new_spanned(
                generics,
                "a workflow function cannot be generic: its input and output are stored in the \
                 journal and must be concrete types; remove the generic parameters",
            ));
        }

        let mut params = Vec::new();
        for arg in &sig.inputs {
            match arg {
                FnArg::Receiver(receiver) => errors.push(syn::Error::new_spanned(
                    receiver,
                    "a workflow is a free function, not a method; remove `self` and define the \
                     function outside the `impl` block",
                )),
                FnArg::Typed(param) => params.push(param),
            }
        }

        let input = match params.as_slice() {
            [] => {
                if !sig
                    .inputs
                    .iter()
                    .any(|arg| matches!(arg, FnArg::Receiver(_)))
                {
                    errors.push(syn::Error::new(
                        sig.paren_token.span.join(),
                        format!(
                            "a workflow takes the workflow context as its first parameter; write \
                             `async fn {fn_name}(ctx: WorkflowContext)`"
                        ),
                    ));
                }
                None
            }
            [first, rest @ ..] => {
                if let Err(err) = check_ctx(&fn_name, first, rest.is_empty()) {
                    errors.push(err);
                }
                if rest.len() > 1 {
                    errors.push(too_many_inputs(&camel_case(&fn_name), rest));
                }
                rest.first().map(|input| {
                    check_input(input).unwrap_or_else(|err| {
                        errors.push(err);
                        &input.ty
                    })
                })
            }
        };

        let output = match sig::result_ok_type(&sig.output) {
            Some(output) => Some(output),
            None => {
                let msg = "a workflow must return `Result<T, WorkflowError>` (or `Result<T, E>` \
                           with `E: Into<WorkflowError>`)";
                errors.push(match &sig.output {
                    syn::ReturnType::Default => syn::Error::new(
                        sig::missing_return_span(sig),
                        format!("{msg}; add `-> Result<(), WorkflowError>`"),
                    ),
                    syn::ReturnType::Type(_, ty) => syn::Error::new_spanned(
                        ty,
                        format!("{msg}; write `-> Result<{}, WorkflowError>`", display(ty)),
                    ),
                });
                None
            }
        };

        let type_name = camel_case(&fn_name);
        if type_name == fn_name {
            errors.push(syn::Error::new_spanned(
                &sig.ident,
                format!(
                    "`#[fluxo::workflow]` generates a type named after the function in \
                     UpperCamelCase, which would clash with `{fn_name}`; name the function in \
                     snake_case"
                ),
            ));
        }

        match (sig::combine(errors), output) {
            (Some(err), _) => Err(err),
            (None, Some(output)) => Ok(Shape {
                type_name: Ident::new(&type_name, sig.ident.span()),
                input,
                output,
            }),
            (None, None) => unreachable!("a missing output is reported as an error"),
        }
    }
}

fn check_ctx(fn_name: &str, param: &PatType, only_param: bool) -> syn::Result<()> {
    let ty = &*param.ty;
    if sig::is_named(ty, "WorkflowContext") {
        return Ok(());
    }
    if let Type::Reference(reference) = ty {
        if sig::is_named(&reference.elem, "WorkflowContext") {
            return Err(syn::Error::new_spanned(
                ty,
                "take the workflow context by value: `ctx: WorkflowContext` (it is a cheap handle)",
            ));
        }
    }
    if only_param {
        return Err(syn::Error::new_spanned(
            param,
            format!(
                "a workflow takes the workflow context as its first parameter; write \
                 `async fn {fn_name}(ctx: WorkflowContext, {})`",
                display(param)
            ),
        ));
    }
    Err(syn::Error::new_spanned(
        ty,
        format!(
            "the first parameter of a workflow must be the workflow context, found `{}`; write \
             `ctx: WorkflowContext`",
            display(ty)
        ),
    ))
}

/// The error for the inputs after the first one, with the struct to write
/// instead.
fn too_many_inputs(type_name: &str, inputs: &[&PatType]) -> syn::Error {
    let fields: Vec<String> = inputs.iter().map(|input| display(*input)).collect();
    let message = format!(
        "a workflow takes a single input after the context; wrap the inputs in one struct that \
         derives `Serialize` and `Deserialize`, e.g. `struct {type_name}Input {{ {} }}`, and \
         take that instead",
        fields.join(", ")
    );
    let errors = inputs[1..]
        .iter()
        .map(|extra| syn::Error::new_spanned(extra, &message));
    sig::combine(errors).expect("at least two inputs")
}

fn check_input(param: &PatType) -> syn::Result<&Type> {
    let ty = &*param.ty;
    if let Type::Reference(reference) = ty {
        return Err(syn::Error::new_spanned(
            ty,
            format!(
                "a workflow input is stored in the journal and must be owned; take `{}` by value",
                display(&reference.elem)
            ),
        ));
    }
    if sig::is_named(ty, "WorkflowContext") {
        return Err(syn::Error::new_spanned(
            ty,
            "the workflow context is passed once, as the first parameter; remove this one",
        ));
    }
    Ok(ty)
}

fn generate(func: &ItemFn, args: &WorkflowArgs, shape: &Shape) -> TokenStream {
    let sig = &func.sig;
    let fn_ident = &sig.ident;
    let vis = &func.vis;
    let type_name = &shape.type_name;
    let output = shape.output;
    let unit: Type = syn::parse_quote!(());
    let input = shape.input.unwrap_or(&unit);
    let cfgs = sig::cfg_attrs(&func.attrs);
    let docs = sig::doc_attrs(&func.attrs);

    let fn_name = sig::unraw(fn_ident);
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| LitStr::new(&fn_name, fn_ident.span()));
    let version = args.version.unwrap_or(1);
    let separator = (!docs.is_empty()).then(|| quote!(#[doc = ""]));
    let type_doc = format!(
        "The workflow defined by the function `{fn_name}`, named `{}`, version {version}.\n\n\
         Start an instance with `{type_name}::start`, or reach an existing one by id with \
         `{type_name}::handle`.",
        name.value()
    );

    let (input_param, call) = match shape.input {
        Some(_) => (quote!(input), quote!(#fn_ident(ctx, input))),
        None => (quote!(_input), quote!(#fn_ident(ctx))),
    };
    let run_body = quote_spanned! {fn_ident.span()=>
        ::std::boxed::Box::pin(async move {
            #call.await.map_err(::core::convert::Into::into)
        })
    };

    let signal_impls = args.signals.iter().map(|signal| {
        quote_spanned! {signal.span()=>
            #(#cfgs)*
            impl ::fluxo::HasSignal<#signal> for #type_name {}
        }
    });

    let payloads: Vec<&Type> = shape
        .input
        .into_iter()
        .chain([output])
        .chain(&args.signals)
        .collect();
    let assertions = payload::assertions(&payloads, &cfgs);

    quote! {
        #(#cfgs)*
        #(#docs)*
        #separator
        #[doc = #type_doc]
        #[derive(::core::clone::Clone, ::core::marker::Copy, ::core::fmt::Debug, ::core::default::Default)]
        #[allow(dead_code)]
        #vis struct #type_name;

        #(#cfgs)*
        impl ::fluxo::Workflow for #type_name {
            type Input = #input;
            type Output = #output;
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;

            #[allow(clippy::useless_conversion)]
            fn run(
                ctx: ::fluxo::WorkflowContext,
                #input_param: <Self as ::fluxo::Workflow>::Input,
            ) -> ::fluxo::__private::BoxFuture<
                'static,
                ::core::result::Result<<Self as ::fluxo::Workflow>::Output, ::fluxo::WorkflowError>,
            > {
                #run_body
            }
        }

        #(#cfgs)*
        #[allow(dead_code)]
        impl #type_name {
            /// Starts a new instance of this workflow with default options and
            /// returns a handle to it.
            pub async fn start(
                fluxo: &::fluxo::Fluxo,
                input: #input,
            ) -> ::core::result::Result<::fluxo::WorkflowHandle<Self>, ::fluxo::Error> {
                ::fluxo::__private::start::<Self>(fluxo, input, ::core::default::Default::default()).await
            }

            /// Starts a new instance of this workflow with the given options
            /// (instance id, ...) and returns a handle to it.
            pub async fn start_with(
                fluxo: &::fluxo::Fluxo,
                input: #input,
                options: ::fluxo::StartOptions,
            ) -> ::core::result::Result<::fluxo::WorkflowHandle<Self>, ::fluxo::Error> {
                ::fluxo::__private::start::<Self>(fluxo, input, options).await
            }

            /// A handle to the existing instance of this workflow with the
            /// given id, to signal it, await its result or cancel it.
            pub fn handle(
                fluxo: &::fluxo::Fluxo,
                id: impl ::core::convert::Into<::std::string::String>,
            ) -> ::fluxo::WorkflowHandle<Self> {
                ::fluxo::__private::handle::<Self>(fluxo, ::core::convert::Into::into(id))
            }
        }

        #(#signal_impls)*

        #assertions
    }
}

/// `order_flow` -> `OrderFlow`, `v2_sync` -> `V2Sync`.
fn camel_case(snake: &str) -> String {
    snake
        .split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            let first = chars.next().map(|c| c.to_ascii_uppercase());
            first.into_iter().chain(chars).collect::<String>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camel_cases_function_names() {
        assert_eq!(camel_case("order_flow"), "OrderFlow");
        assert_eq!(camel_case("_private_flow_v2"), "PrivateFlowV2");
        assert_eq!(camel_case("sync"), "Sync");
        assert_eq!(camel_case("OrderFlow"), "OrderFlow");
    }

    fn expand_str(args: TokenStream, item: TokenStream) -> String {
        expand(args, item).to_string()
    }

    #[test]
    fn generates_the_workflow_type() {
        let out = expand_str(
            quote!(version = 2, signals(Approved)),
            quote!(
                pub async fn order_flow(
                    ctx: WorkflowContext,
                    order: Order,
                ) -> Result<Receipt, WorkflowError> {
                    Ok(Receipt)
                }
            ),
        );
        assert!(!out.contains("compile_error"), "{out}");
        assert!(out.contains("pub struct OrderFlow"), "{out}");
        assert!(out.contains("type Input = Order"), "{out}");
        assert!(out.contains("type Output = Receipt"), "{out}");
        assert!(
            out.contains("const NAME : & 'static str = \"order_flow\""),
            "{out}"
        );
        assert!(out.contains("const VERSION : u32 = 2u32"), "{out}");
        assert!(
            out.contains("impl :: fluxo :: HasSignal < Approved > for OrderFlow"),
            "{out}"
        );
    }

    #[test]
    fn reports_every_signature_problem() {
        let out = expand_str(
            quote!(),
            quote!(
                fn order_flow(ctx: &WorkflowContext, a: A, b: B) -> Receipt {
                    let t = Instant::now();
                }
            ),
        );
        assert!(out.contains("must be async"), "{out}");
        assert!(out.contains("by value"), "{out}");
        assert!(out.contains("wrap the inputs in one struct"), "{out}");
        assert!(
            out.contains("must return `Result<T, WorkflowError>`"),
            "{out}"
        );
        assert!(out.contains("ctx.now().await"), "{out}");
        assert!(!out.contains("impl :: fluxo :: Workflow"), "{out}");
    }
}
