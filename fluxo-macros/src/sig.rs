//! Helpers shared by the macros: signature inspection and error output.

use proc_macro2::{Span, TokenStream};
use quote::{quote, ToTokens};
use syn::{Attribute, GenericArgument, PathArguments, ReturnType, Signature, Type};

/// The `T` of a `-> Result<T, E>` (or `-> Result<T>` through an alias)
/// return type, or `None` when the return type is not a `Result`.
pub fn result_ok_type(output: &ReturnType) -> Option<&Type> {
    let ReturnType::Type(_, ty) = output else {
        return None;
    };
    let Type::Path(path) = strip_parens(ty) else {
        return None;
    };
    if path.qself.is_some() {
        return None;
    }
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut types = args.args.iter().filter_map(|arg| match arg {
        GenericArgument::Type(ty) => Some(ty),
        _ => None,
    });
    let ok = types.next()?;
    (types.count() <= 1).then_some(ok)
}

/// Whether `ty` is a path whose last segment is `name` (`WorkflowContext`
/// matches `WorkflowContext` and `fluxo::WorkflowContext`).
pub fn is_named(ty: &Type, name: &str) -> bool {
    match strip_parens(ty) {
        Type::Path(path) => {
            path.qself.is_none() && path.path.segments.last().is_some_and(|s| s.ident == name)
        }
        _ => false,
    }
}

fn strip_parens(mut ty: &Type) -> &Type {
    while let Type::Paren(inner) = ty {
        ty = &inner.elem;
    }
    if let Type::Group(group) = ty {
        return strip_parens(&group.elem);
    }
    ty
}

/// The span to report a missing return type at: the closing parenthesis of
/// the parameter list.
pub fn missing_return_span(sig: &Signature) -> Span {
    sig.paren_token.span.close()
}

/// Tokens rendered the way a user would write them, for error messages.
pub fn display(tokens: &impl ToTokens) -> String {
    let text = tokens.to_token_stream().to_string();
    text.replace(" :: ", "::")
        .replace(":: ", "::")
        .replace(" <", "<")
        .replace("< ", "<")
        .replace(" >", ">")
        .replace(" ,", ",")
        .replace("& ", "&")
        .replace(" : ", ": ")
}

/// The `#[cfg(...)]` attributes of an item, to repeat on the items generated
/// next to it.
pub fn cfg_attrs(attrs: &[Attribute]) -> Vec<&Attribute> {
    attrs
        .iter()
        .filter(|attr| attr.path().is_ident("cfg"))
        .collect()
}

/// The `#[doc = ...]` attributes of an item.
pub fn doc_attrs(attrs: &[Attribute]) -> Vec<&Attribute> {
    attrs
        .iter()
        .filter(|attr| attr.path().is_ident("doc"))
        .collect()
}

/// The identifier as text, without a leading `r#`.
pub fn unraw(ident: &syn::Ident) -> String {
    let text = ident.to_string();
    text.strip_prefix("r#").map(str::to_owned).unwrap_or(text)
}

/// The error for an attribute that must go on a function but was put on
/// something else.
pub fn not_a_fn(attribute: &str, err: syn::Error) -> syn::Error {
    syn::Error::new(
        err.span(),
        format!("`{attribute}` goes on an `async fn`: {err}"),
    )
}

/// The item as written plus the errors: nothing else is generated, and the
/// item itself does not warn about being unused.
pub fn with_errors(item: TokenStream, err: syn::Error) -> TokenStream {
    let err = err.to_compile_error();
    quote! {
        #[allow(dead_code)]
        #item
        #err
    }
}

/// Joins errors into one, or `None` when there are none.
pub fn combine(errors: impl IntoIterator<Item = syn::Error>) -> Option<syn::Error> {
    errors.into_iter().reduce(|mut all, next| {
        all.combine(next);
        all
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::parse_quote;

    #[test]
    fn finds_the_ok_type() {
        let ret: ReturnType = parse_quote!(-> Result<Receipt, WorkflowError>);
        assert_eq!(display(result_ok_type(&ret).unwrap()), "Receipt");
        let ret: ReturnType = parse_quote!(-> ::core::result::Result<Vec<u8>, E>);
        assert_eq!(display(result_ok_type(&ret).unwrap()), "Vec<u8>");
        let ret: ReturnType = parse_quote!(-> fluxo::Result<()>);
        assert_eq!(display(result_ok_type(&ret).unwrap()), "()");
        for ret in [
            parse_quote!(),
            parse_quote!(-> Receipt),
            parse_quote!(-> Option<Receipt>),
            parse_quote!(-> Result),
            parse_quote!(-> Result<A, B, C>),
        ] {
            assert!(result_ok_type(&ret).is_none(), "{}", display(&ret));
        }
    }

    #[test]
    fn matches_last_segment() {
        assert!(is_named(&parse_quote!(WorkflowContext), "WorkflowContext"));
        assert!(is_named(
            &parse_quote!(fluxo::WorkflowContext),
            "WorkflowContext"
        ));
        assert!(!is_named(
            &parse_quote!(&WorkflowContext),
            "WorkflowContext"
        ));
        assert!(!is_named(&parse_quote!(Context), "WorkflowContext"));
    }
}
