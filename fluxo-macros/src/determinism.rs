//! The lint that rejects non-deterministic calls in a workflow body.
//!
//! A workflow is replayed from its journal after a crash, so its body must
//! take the same path every time it runs. Reading the clock, drawing random
//! numbers, spawning tasks or sleeping outside the context breaks that; each
//! has a journaled equivalent on the workflow context.

use syn::punctuated::Punctuated;
use syn::visit::{self, Visit};
use syn::{Attribute, Block, Expr, ExprPath, Macro, Path, Token};

/// One forbidden call: the path suffix that identifies it and what to write
/// instead.
struct Rule {
    suffix: &'static [&'static str],
    why: &'static str,
    instead: &'static str,
}

const CLOCK: &str = "reads the clock, which returns another value when the workflow is replayed";
const RANDOM: &str = "returns other values when the workflow is replayed";
const SPAWN: &str = "starts work that the journal does not track and that is lost on a restart";
const SLEEP: &str = "waits in memory only, so the wait is lost when the worker restarts";
const BLOCKING_SLEEP: &str =
    "blocks the worker thread, and the wait is lost when the worker restarts";

const NOW: &str = "use `ctx.now().await`, a journaled timestamp, or move the call into a \
                   `#[fluxo::step]`";
const RAND: &str = "use `ctx.random().await`, a journaled random value, or move the call into a \
                    `#[fluxo::step]`";
const UUID: &str = "use `ctx.uuid().await`, a journaled id, or move the call into a \
                    `#[fluxo::step]`";
const JOIN: &str = "run steps concurrently with `ctx.join(a, b).await`, or start a child \
                    workflow with `ctx.child(..)`";
const DURABLE_SLEEP: &str = "use `ctx.sleep(duration).await`, a durable timer";

const RULES: &[Rule] = &[
    Rule {
        suffix: &["SystemTime", "now"],
        why: CLOCK,
        instead: NOW,
    },
    Rule {
        suffix: &["Instant", "now"],
        why: CLOCK,
        instead: NOW,
    },
    Rule {
        suffix: &["Utc", "now"],
        why: CLOCK,
        instead: NOW,
    },
    Rule {
        suffix: &["Local", "now"],
        why: CLOCK,
        instead: NOW,
    },
    Rule {
        suffix: &["rand", "random"],
        why: RANDOM,
        instead: RAND,
    },
    Rule {
        suffix: &["rand", "rng"],
        why: RANDOM,
        instead: RAND,
    },
    Rule {
        suffix: &["thread_rng"],
        why: RANDOM,
        instead: RAND,
    },
    Rule {
        suffix: &["Uuid", "new_v4"],
        why: RANDOM,
        instead: UUID,
    },
    Rule {
        suffix: &["Uuid", "now_v7"],
        why: RANDOM,
        instead: UUID,
    },
    Rule {
        suffix: &["tokio", "spawn"],
        why: SPAWN,
        instead: JOIN,
    },
    Rule {
        suffix: &["task", "spawn"],
        why: SPAWN,
        instead: JOIN,
    },
    Rule {
        suffix: &["task", "spawn_local"],
        why: SPAWN,
        instead: JOIN,
    },
    Rule {
        suffix: &["task", "spawn_blocking"],
        why: SPAWN,
        instead: JOIN,
    },
    Rule {
        suffix: &["thread", "spawn"],
        why: SPAWN,
        instead: JOIN,
    },
    Rule {
        suffix: &["time", "sleep"],
        why: SLEEP,
        instead: DURABLE_SLEEP,
    },
    Rule {
        suffix: &["time", "sleep_until"],
        why: SLEEP,
        instead: DURABLE_SLEEP,
    },
    Rule {
        suffix: &["task", "sleep"],
        why: SLEEP,
        instead: DURABLE_SLEEP,
    },
    Rule {
        suffix: &["thread", "sleep"],
        why: BLOCKING_SLEEP,
        instead: DURABLE_SLEEP,
    },
];

/// Every non-deterministic call in `body`, as one error each, spanned at the
/// offending path.
pub fn check(body: &Block) -> Vec<syn::Error> {
    let mut lint = Lint { errors: Vec::new() };
    lint.visit_block(body);
    lint.errors
}

struct Lint {
    errors: Vec<syn::Error>,
}

impl Lint {
    fn check_path(&mut self, path: &Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        let Some(rule) = RULES.iter().find(|rule| ends_with(&segments, rule.suffix)) else {
            return;
        };
        let written = segments.join("::");
        let prefix = if path.leading_colon.is_some() {
            "::"
        } else {
            ""
        };
        self.errors.push(syn::Error::new_spanned(
            path,
            format!(
                "`{prefix}{written}` cannot be used in a workflow body: it {}; {}",
                rule.why, rule.instead
            ),
        ));
    }
}

fn ends_with(segments: &[String], suffix: &[&str]) -> bool {
    segments.len() >= suffix.len()
        && segments[segments.len() - suffix.len()..]
            .iter()
            .zip(suffix)
            .all(|(have, want)| have == want)
}

/// Steps are allowed to be non-deterministic: their result is journaled.
fn is_step(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path()
            .segments
            .last()
            .is_some_and(|segment| segment.ident == "step")
    })
}

impl<'ast> Visit<'ast> for Lint {
    fn visit_expr_path(&mut self, expr: &'ast ExprPath) {
        self.check_path(&expr.path);
        visit::visit_expr_path(self, expr);
    }

    fn visit_macro(&mut self, mac: &'ast Macro) {
        // Look into macros whose arguments are expressions (`println!`,
        // `vec!`, `assert_eq!`, ...) or statements; leave the others alone.
        if let Ok(args) = mac.parse_body_with(Punctuated::<Expr, Token![,]>::parse_terminated) {
            for arg in &args {
                self.visit_expr(arg);
            }
        } else if let Ok(stmts) = mac.parse_body_with(Block::parse_within) {
            for stmt in &stmts {
                self.visit_stmt(stmt);
            }
        }
        visit::visit_macro(self, mac);
    }

    fn visit_item_fn(&mut self, item: &'ast syn::ItemFn) {
        if !is_step(&item.attrs) {
            visit::visit_item_fn(self, item);
        }
    }

    fn visit_impl_item_fn(&mut self, item: &'ast syn::ImplItemFn) {
        if !is_step(&item.attrs) {
            visit::visit_impl_item_fn(self, item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(body: Block) -> Vec<String> {
        check(&body).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn flags_each_rule_with_its_replacement() {
        let errors = messages(syn::parse_quote!({
            let a = std::time::SystemTime::now();
            let b = Instant::now();
            let c = chrono::Utc::now();
            let d = rand::random::<u8>();
            let e = rand::thread_rng();
            let f = uuid::Uuid::new_v4();
            tokio::spawn(async {});
            tokio::time::sleep(d).await;
            std::thread::sleep(d);
        }));
        assert_eq!(errors.len(), 9, "{errors:#?}");
        assert!(
            errors[0].starts_with("`std::time::SystemTime::now` cannot be used in a workflow body")
        );
        assert!(errors[0].contains("ctx.now().await"));
        assert!(errors[1].contains("ctx.now().await"));
        assert!(errors[2].contains("ctx.now().await"));
        assert!(errors[3].contains("ctx.random().await"));
        assert!(errors[4].contains("ctx.random().await"));
        assert!(errors[5].contains("ctx.uuid().await"));
        assert!(errors[6].contains("ctx.join(a, b).await"));
        assert!(errors[7].contains("ctx.sleep(duration).await"));
        assert!(errors[8].contains("blocks the worker thread"));
    }

    #[test]
    fn looks_into_closures_async_blocks_and_macros() {
        let errors = messages(syn::parse_quote!({
            let f = || async { Instant::now() };
            println!("{:?}", SystemTime::now());
            let v = vec![rand::random::<u8>(); 3];
            let g = thread::spawn;
        }));
        assert_eq!(errors.len(), 4, "{errors:#?}");
    }

    #[test]
    fn ignores_context_calls_lookalikes_and_steps() {
        let errors = messages(syn::parse_quote!({
            let now = ctx.now().await;
            let r = ctx.random().await;
            ctx.sleep(hours(1)).await;
            let t = my::now();
            let s = sleep_well();
            #[fluxo::step]
            async fn stamp() -> Result<u64, StepError> {
                Ok(SystemTime::now().elapsed().as_secs())
            }
        }));
        assert!(errors.is_empty(), "{errors:#?}");
    }
}
