//! Compile-time assertions on the types that cross the journal.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Attribute, Type};

/// An anonymous constant that only type-checks when every listed type is a
/// payload (`Serialize + DeserializeOwned + Send + 'static`). Each assertion
/// is spanned at the user's type, so a violation is reported where the type
/// is written.
pub fn assertions(types: &[&Type], cfgs: &[&Attribute]) -> TokenStream {
    if types.is_empty() {
        return TokenStream::new();
    }
    let calls = types.iter().map(|ty| {
        quote_spanned! {ty.span()=>
            ::fluxo::__private::assert_payload::<#ty>();
        }
    });
    quote! {
        #(#cfgs)*
        const _: () = {
            #[allow(dead_code, clippy::all)]
            fn __fluxo_assert_payloads() {
                #(#calls)*
            }
        };
    }
}
