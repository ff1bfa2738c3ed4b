//! `#[signal]`: makes a struct or enum a typed message for workflows.

use proc_macro2::TokenStream;
use quote::{quote, ToTokens};
use syn::{Attribute, Generics, Ident, Item, LitStr, Type};

use crate::attrs::SignalArgs;
use crate::payload;
use crate::sig;

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let parsed: Item = match syn::parse2(item.clone()) {
        Ok(parsed) => parsed,
        Err(err) => return sig::with_errors(item, err),
    };
    let (attrs, ident, generics) = match parts(&parsed) {
        Ok(parts) => parts,
        Err(err) => return sig::with_errors(item, err),
    };
    if let Err(err) = check_generics(ident, generics) {
        return sig::with_errors(item, err);
    }
    let args = match SignalArgs::parse(args) {
        Ok(args) => args,
        Err(err) => return sig::with_errors(item, err),
    };

    let name = args
        .name
        .unwrap_or_else(|| LitStr::new(&sig::unraw(ident), ident.span()));
    let cfgs = sig::cfg_attrs(attrs);
    let ty: Type = syn::parse_quote!(#ident);
    let assertions = payload::assertions(&[&ty], &cfgs);
    quote! {
        #parsed

        #(#cfgs)*
        impl ::fluxo::Signal for #ident {
            const NAME: &'static str = #name;
        }

        #assertions
    }
}

/// The attributes, name and generics of a struct or enum.
fn parts(item: &Item) -> syn::Result<(&[Attribute], &Ident, &Generics)> {
    match item {
        Item::Struct(s) => Ok((&s.attrs, &s.ident, &s.generics)),
        Item::Enum(e) => Ok((&e.attrs, &e.ident, &e.generics)),
        other => Err(syn::Error::new_spanned(
            other,
            "`#[fluxo::signal]` goes on a struct or an enum that derives `Serialize` and \
             `Deserialize`",
        )),
    }
}

fn check_generics(ident: &Ident, generics: &Generics) -> syn::Result<()> {
    if generics.params.is_empty() && generics.where_clause.is_none() {
        return Ok(());
    }
    let span = if generics.params.is_empty() {
        generics.where_clause.to_token_stream()
    } else {
        generics.to_token_stream()
    };
    Err(syn::Error::new_spanned(
        span,
        format!(
            "a signal type cannot be generic: workflows declare and receive signals by concrete \
             type; define one concrete type per signal, e.g. `struct {ident} {{ .. }}` with \
             concrete fields"
        ),
    ))
}
