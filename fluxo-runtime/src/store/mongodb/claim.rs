//! Claims: handing out runnable instances under a lease.
//!
//! Every claim of an instance is one `findOneAndUpdate` that matches only a
//! runnable instance and `$inc`s its lease token, so two claims can never
//! both take the same instance.
//!
//! Without transactions, each claim picks the next runnable instance in
//! the same update. With transactions, a claim first reads a few candidate
//! ids and then claims each one in a transaction of its own: a candidate
//! that another transaction holds (one in flight, or one whose process died
//! before finishing it, which the server aborts only after its transaction
//! lifetime limit) conflicts at once and is skipped, where a plain update
//! would wait for that transaction to end.

use ::mongodb::bson::{doc, Bson, Document};
use ::mongodb::options::{Hint, ReturnDocument};
use futures::TryStreamExt;

use super::super::*;
use super::codec::*;
use super::commit::{Failure, Step};
use super::MongoStore;

/// Candidates read per claim beyond the number still wanted, to make up
/// for those other workers take meanwhile.
const SPARE_CANDIDATES: usize = 8;

/// Most instances one claim hands out. Claiming takes a round trip or
/// more per instance, so a large batch would keep the first instances
/// waiting for the last; the worker claims again at once
/// ([`ClaimBatch::more`]).
pub(super) const BATCH: usize = 16;

/// What a claim looks for: instances whose lease expired (their holders
/// are gone), then unleased instances that are due.
struct Kind {
    filter: Document,
    /// The sort key, also the key of `index`.
    sort: Document,
    index: &'static str,
}

fn kinds(req: &ClaimRequest, now: Millis) -> [Kind; 2] {
    let workflows = workflows_filter(&req.workflows);
    [
        Kind {
            filter: doc! {
                LEASE_EXPIRES_AT: { "$lte": now },
                STATUS: RUNNING,
                "$or": workflows.clone(),
            },
            sort: doc! { LEASE_EXPIRES_AT: 1 },
            index: "lease_expiry",
        },
        Kind {
            filter: doc! {
                READY_AT: { "$lte": now },
                LEASE_OWNER: Bson::Null,
                STATUS: RUNNING,
                "$or": workflows,
            },
            sort: doc! { READY_AT: 1 },
            index: "runnable",
        },
    ]
}

fn lease_update(req: &ClaimRequest, now: Millis) -> Document {
    doc! {
        "$inc": { LEASE_TOKEN: 1_i64 },
        "$set": {
            LEASE_OWNER: req.owner.as_str(),
            LEASE_EXPIRES_AT: now.saturating_add(duration_millis(req.lease)),
        },
        "$unset": { READY_AT: "" },
    }
}

/// `filter` without the instances whose ids are in `ids`.
fn excluding(filter: &Document, ids: &[Bson]) -> Document {
    let mut filter = filter.clone();
    if !ids.is_empty() {
        // A lease granted by this very claim may be expired already.
        filter.insert(ID, doc! { "$nin": ids.to_vec() });
    }
    filter
}

impl MongoStore {
    /// Leases up to `req.limit` runnable instances; their documents as
    /// they are after the claim.
    pub(super) async fn claim_documents(
        &self,
        req: &ClaimRequest,
        now: Millis,
    ) -> StoreResult<Vec<Document>> {
        let update = lease_update(req, now);
        let limit = req.limit.min(BATCH);
        let mut docs = Vec::new();
        for kind in kinds(req, now) {
            if self.inner.transactions {
                self.claim_candidates(&kind, &update, limit, &mut docs)
                    .await?;
            } else {
                self.claim_next(&kind, &update, limit, &mut docs).await?;
            }
        }
        Ok(docs)
    }

    /// Claims the next runnable instance, one update each, until `docs`
    /// has `limit` documents or none is left.
    async fn claim_next(
        &self,
        kind: &Kind,
        update: &Document,
        limit: usize,
        docs: &mut Vec<Document>,
    ) -> StoreResult<()> {
        while docs.len() < limit {
            let taken: Vec<Bson> = docs.iter().filter_map(|d| d.get(ID).cloned()).collect();
            let claimed = self
                .inner
                .instances
                .find_one_and_update(excluding(&kind.filter, &taken), update.clone())
                .sort(kind.sort.clone())
                .hint(Hint::Name(kind.index.to_owned()))
                .return_document(ReturnDocument::After)
                .await
                .map_err(mongo_err)?;
            match claimed {
                Some(doc) => docs.push(doc),
                None => break,
            }
        }
        Ok(())
    }

    /// Reads candidates and claims them one transaction each, skipping
    /// those taken or held by another transaction, until `docs` has
    /// `limit` documents or no candidate is left.
    async fn claim_candidates(
        &self,
        kind: &Kind,
        update: &Document,
        limit: usize,
        docs: &mut Vec<Document>,
    ) -> StoreResult<()> {
        // Ids claimed by this call or found taken: not candidates again.
        let mut seen: Vec<Bson> = docs.iter().filter_map(|d| d.get(ID).cloned()).collect();
        while docs.len() < limit {
            let want = limit - docs.len();
            let found: Vec<Document> = self
                .inner
                .instances
                .find(excluding(&kind.filter, &seen))
                .sort(kind.sort.clone())
                .hint(Hint::Name(kind.index.to_owned()))
                .projection(doc! { ID: 1 })
                .limit(i64::try_from(want.saturating_add(SPARE_CANDIDATES)).unwrap_or(i64::MAX))
                .await
                .map_err(mongo_err)?
                .try_collect()
                .await
                .map_err(mongo_err)?;
            if found.is_empty() {
                break;
            }
            for candidate in found {
                if docs.len() >= limit {
                    break;
                }
                let Some(id) = candidate.get(ID).cloned() else {
                    continue;
                };
                seen.push(id.clone());
                if let Some(doc) = self.claim_one(&kind.filter, id, update).await? {
                    docs.push(doc);
                }
            }
        }
        Ok(())
    }

    /// Claims instance `id` if it still matches `filter`, in a transaction
    /// of its own; `None` if it does not, or if another transaction holds
    /// it.
    async fn claim_one(
        &self,
        filter: &Document,
        id: Bson,
        update: &Document,
    ) -> StoreResult<Option<Document>> {
        let mut filter = filter.clone();
        filter.insert(ID, id);
        let filter = &filter;
        let step = self
            .in_transaction(1, |mut session| {
                Box::pin(async move {
                    let result = self
                        .inner
                        .instances
                        .find_one_and_update(filter.clone(), update.clone())
                        .return_document(ReturnDocument::After)
                        .session(&mut session)
                        .await
                        .map_err(Failure::from)
                        .map(|doc| doc.map_or(Step::Refused, Step::Done));
                    (session, result)
                })
            })
            .await;
        match step {
            Ok(Step::Done(doc)) => Ok(Some(doc)),
            Ok(_) => Ok(None),
            Err(f) if f.is_transient() => Ok(None),
            Err(f) => Err(f.into()),
        }
    }
}
