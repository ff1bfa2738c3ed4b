//! The statements of the Postgres store, built once per schema.
//!
//! Every statement is one round trip: work that belongs together (a fenced
//! update and the journal entries it guards, a signal and the wake-up of its
//! instance) is written by one statement whose parts are data-modifying
//! `WITH` queries. A statement outside an explicit transaction is its own
//! transaction, so most operations cost one round trip and one WAL flush.

use crate::store::HISTORY_FORMAT;

/// Milliseconds since the Unix epoch by the server's clock. The value is the
/// same for the whole statement, and (being stable, unlike
/// `clock_timestamp()`) usable as an index bound.
pub(super) const NOW: &str = "(floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint)";

/// The columns [`super::record_from_row`] decodes, in order.
const RECORD_COLUMN_NAMES: [&str; 12] = [
    "id",
    "workflow",
    "version",
    "status",
    "input",
    "output",
    "failure",
    "parent_id",
    "cancel_requested",
    "history_format",
    "created_at",
    "updated_at",
];

/// Number of record columns.
pub(super) const RECORD_COLUMNS: usize = RECORD_COLUMN_NAMES.len();

fn record_columns(alias: &str) -> String {
    RECORD_COLUMN_NAMES
        .iter()
        .map(|c| format!("{alias}{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The state change a commit statement applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    None = 0,
    Park = 1,
    Release = 2,
    Finish = 3,
}

/// Which parts a commit statement has. Each shape is its own statement (and
/// prepared statement), so no statement carries parts it does not need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Shape {
    pub kind: Kind,
    /// Journal entries to insert (and a journal position to check).
    pub events: bool,
    /// A signal to delete (never with [`Kind::Finish`], which empties the
    /// whole inbox).
    pub consume: bool,
    /// Child instances to create.
    pub children: bool,
    /// Instances to request cancellation of.
    pub cancels: bool,
}

impl Shape {
    const COUNT: usize = 64;

    /// Journal entries and nothing else: a step's completion.
    pub const SINGLE_ENTRY: Shape = Shape {
        kind: Kind::None,
        events: true,
        consume: false,
        children: false,
        cancels: false,
    };

    fn index(self) -> usize {
        (self.kind as usize) << 4
            | usize::from(self.events) << 3
            | usize::from(self.consume) << 2
            | usize::from(self.children) << 1
            | usize::from(self.cancels)
    }

    fn all() -> impl Iterator<Item = Shape> {
        (0..Self::COUNT).map(|i| Shape {
            kind: match i >> 4 {
                0 => Kind::None,
                1 => Kind::Park,
                2 => Kind::Release,
                _ => Kind::Finish,
            },
            events: i & 8 != 0,
            consume: i & 4 != 0,
            children: i & 2 != 0,
            cancels: i & 1 != 0,
        })
    }
}

/// Every statement of one schema.
pub(super) struct Statements {
    /// The LISTEN/NOTIFY channel of the schema.
    pub channel: String,
    pub create: String,
    /// [`Statements::create`] for many instances at once: the same
    /// parameters as arrays, one row (the id) per instance created, and
    /// one notification if any was. Rows are inserted in id order, so two
    /// groups with ids in common lock them in the same order.
    pub create_many: String,
    pub get: String,
    pub list_all: String,
    pub list_by_workflow: String,
    pub list_by_status: String,
    pub list_by_both: String,
    pub load_history: String,
    pub claim: String,
    /// $1 owner, $2 lease in ms, $3 instance ids.
    pub renew: String,
    /// $1 owner.
    pub end_leases: String,
    pub send_signal: String,
    pub next_signal: String,
    pub request_cancel: String,
    pub status: String,
    pub diagnose: String,
    pub cancel_many: String,
    pub wake_many: String,
    pub batch: String,
    pub continue_as_new: String,
    /// The commit of one journal entry and nothing else (a step's
    /// completion, the most common commit), with scalar parameters: the
    /// server binds and plans it for less than the array form
    /// [`Statements::commit`] gives [`Shape::SINGLE_ENTRY`] (for a commit
    /// of exactly one entry).
    pub single_entry: String,
    commits: Vec<String>,
}

impl Statements {
    /// Statements for `schema`, which must be a validated plain identifier.
    pub(super) fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        let channel = format!("{schema}_work");
        let notify = format!("pg_notify('{channel}', '') IS NOT NULL");
        let record = record_columns("");
        let workflows = "(workflow, version) IN (SELECT w.workflow, w.version \
             FROM unnest($3::text[], $4::bigint[]) AS w(workflow, version))";
        let list = |filter: &str| {
            format!(
                "SELECT {record} FROM {s}.instances {filter} \
                 ORDER BY created_at DESC, created_seq DESC LIMIT $1"
            )
        };
        let mut commits = vec![String::new(); Shape::COUNT];
        for shape in Shape::all() {
            commits[shape.index()] = commit_sql(&s, &notify, shape);
        }
        let single_entry = single_entry_sql(&s);
        Statements {
            single_entry,
            continue_as_new: format!(
                "WITH upd AS (UPDATE {s}.instances SET input = $1, next_event_id = 0, \
                 lease_owner = NULL, ready_at = {NOW}, updated_at = {NOW} \
                 WHERE id = $2 AND lease_token = $3 AND lease_owner IS NOT NULL \
                 AND status = 'running' RETURNING id, cancel_requested), \
                 del AS (DELETE FROM {s}.history WHERE instance_id IN (SELECT id FROM upd)) \
                 SELECT cancel_requested, {notify} FROM upd"
            ),
            create_many: format!(
                "WITH ins AS ({}), \
                 woken AS (SELECT {notify} AS notified WHERE EXISTS (SELECT 1 FROM ins)) \
                 SELECT ins.id, woken.notified FROM ins LEFT JOIN woken ON true",
                insert_new_instances(&s, ["$1", "$2", "$3", "$4", "$5"], "ORDER BY n.id", "id")
            ),
            create: format!(
                "WITH ins AS (INSERT INTO {s}.instances (id, workflow, version, status, input, \
                   parent_id, history_format, ready_at, created_at, updated_at) \
                 VALUES ($1, $2, $3, 'running', $4, $5, {HISTORY_FORMAT}, {NOW}, {NOW}, {NOW}) \
                 ON CONFLICT (id) DO NOTHING RETURNING 1) \
                 SELECT {notify} FROM ins"
            ),
            get: format!("SELECT {record} FROM {s}.instances WHERE id = $1"),
            list_all: list(""),
            list_by_workflow: list("WHERE workflow = $2"),
            list_by_status: list("WHERE status = $2"),
            list_by_both: list("WHERE workflow = $2 AND status = $3"),
            // One row of NULLs for an instance without entries, no row for an
            // unknown instance.
            load_history: format!(
                "SELECT h.event_id, h.seq, h.kind, h.data FROM {s}.instances i \
                 LEFT JOIN {s}.history h ON h.instance_id = i.id \
                 WHERE i.id = $1 ORDER BY h.event_id"
            ),
            // Expired leases first, then due instances by wake-up time; rows
            // another claim (or a commit) holds are skipped, not waited for.
            // The next wake-up comes back in the same statement, on a row of
            // its own when nothing was claimed.
            // $1 owner, $2 lease (ms), $3/$4 workflows and versions, $5 limit.
            claim: format!(
                "WITH cand AS ( \
                   SELECT id FROM (SELECT id FROM {s}.instances \
                     WHERE lease_owner IS NOT NULL AND lease_expires_at <= {NOW} \
                       AND status = 'running' AND {workflows} \
                     ORDER BY lease_expires_at LIMIT $5 FOR UPDATE SKIP LOCKED) AS expired \
                   UNION ALL \
                   SELECT id FROM (SELECT id FROM {s}.instances \
                     WHERE status = 'running' AND lease_owner IS NULL AND ready_at <= {NOW} \
                       AND {workflows} \
                     ORDER BY ready_at LIMIT $5 FOR UPDATE SKIP LOCKED) AS due), \
                 claimed AS (UPDATE {s}.instances AS i \
                   SET lease_token = i.lease_token + 1, lease_owner = $1, \
                       lease_expires_at = {NOW} + $2 \
                   FROM (SELECT id FROM cand LIMIT $5) AS c WHERE i.id = c.id \
                   RETURNING {}, i.lease_token, i.next_event_id, i.inbox_seq) \
                 SELECT claimed.*, nw.next_wake FROM \
                   (SELECT min(ready_at) AS next_wake FROM {s}.instances \
                    WHERE status = 'running' AND lease_owner IS NULL AND ready_at > {NOW} \
                      AND {workflows}) AS nw \
                 LEFT JOIN claimed ON true",
                record_columns("i.")
            ),
            renew: format!(
                "WITH r AS (UPDATE {s}.instances SET lease_expires_at = {NOW} + $2 \
                   WHERE id = ANY($3) AND lease_owner = $1 RETURNING id, cancel_requested) \
                 SELECT id FROM r WHERE cancel_requested ORDER BY id"
            ),
            end_leases: format!(
                "UPDATE {s}.instances SET lease_expires_at = {NOW} WHERE lease_owner = $1"
            ),
            send_signal: format!(
                "WITH w AS (UPDATE {s}.instances \
                   SET inbox_seq = inbox_seq + 1, ready_at = {NOW}, updated_at = {NOW} \
                   WHERE id = $1 AND status = 'running' RETURNING id), \
                 ins AS (INSERT INTO {s}.signals (instance_id, name, payload, created_at) \
                   SELECT w.id, $2, $3, {NOW} FROM w RETURNING signal_id) \
                 SELECT signal_id, {notify} FROM ins"
            ),
            // The oldest signal of a name and the inbox sequence, read together.
            next_signal: format!(
                "SELECT i.inbox_seq, s.signal_id, s.payload FROM {s}.instances i \
                 LEFT JOIN LATERAL (SELECT signal_id, payload FROM {s}.signals \
                   WHERE instance_id = i.id AND name = $2 ORDER BY signal_id LIMIT 1) s ON true \
                 WHERE i.id = $1"
            ),
            request_cancel: format!(
                "WITH c AS (UPDATE {s}.instances \
                   SET cancel_requested = true, inbox_seq = inbox_seq + 1, \
                       ready_at = {NOW}, updated_at = {NOW} \
                   WHERE id = $1 AND status = 'running' RETURNING 1) \
                 SELECT {notify} FROM c"
            ),
            status: format!("SELECT status FROM {s}.instances WHERE id = $1"),
            // Why a fenced update matched nothing.
            diagnose: format!(
                "SELECT lease_token, lease_owner IS NOT NULL, status, next_event_id \
                 FROM {s}.instances WHERE id = $1"
            ),
            // Cancel requests as a statement of their own, for a commit that
            // also creates or is one of the instances it cancels.
            cancel_many: format!(
                "WITH w AS (UPDATE {s}.instances AS o \
                   SET cancel_requested = true, inbox_seq = o.inbox_seq + x.bumps, \
                       ready_at = {NOW}, updated_at = {NOW} \
                   FROM (SELECT t.id, count(*) AS bumps FROM unnest($1::text[]) AS t(id) \
                         GROUP BY t.id) AS x \
                   WHERE o.id = x.id AND o.status = 'running' RETURNING 1) \
                 SELECT CASE WHEN EXISTS (SELECT 1 FROM w) THEN {notify} ELSE false END"
            ),
            // Parents woken by children finishing in a group written by
            // `batch`, when the parent is in the group too.
            wake_many: format!(
                "WITH w AS (UPDATE {s}.instances AS o \
                   SET inbox_seq = o.inbox_seq + x.bumps, ready_at = {NOW}, updated_at = {NOW} \
                   FROM (SELECT t.id, count(*) AS bumps FROM unnest($1::text[]) AS t(id) \
                         GROUP BY t.id) AS x \
                   WHERE o.id = x.id AND o.status = 'running' RETURNING 1) \
                 SELECT CASE WHEN EXISTS (SELECT 1 FROM w) THEN {notify} ELSE false END"
            ),
            batch: batch_sql(&s, &notify),
            channel,
            commits,
        }
    }

    /// The commit statement of a shape. Parameters: `$1` instance id, `$2`
    /// lease token, then, each group only when the shape has it: the journal
    /// (first event id, event ids, seqs, kinds, data), the transition (park:
    /// seen inbox, wake-up time; finish: status, output, failure), the
    /// consumed signal id, the children (ids, workflows, versions, inputs,
    /// parents), the ids to cancel. It returns no row when the fence did not
    /// match (nothing was written), else `inbox_seq, cancel_requested` (and
    /// whether it notified).
    pub(super) fn commit(&self, shape: Shape) -> &str {
        &self.commits[shape.index()]
    }
}

/// Inserts running instances from the arrays `params` (ids, workflows,
/// versions, inputs, parent ids; rows `n`), filtered or ordered by
/// `clause`, skipping ids that exist, returning `returning` per row
/// inserted.
fn insert_new_instances(s: &str, params: [&str; 5], clause: &str, returning: &str) -> String {
    let [ids, workflows, versions, inputs, parents] = params;
    format!(
        "INSERT INTO {s}.instances (id, workflow, version, status, input, parent_id, \
           history_format, ready_at, created_at, updated_at) \
         SELECT n.id, n.workflow, n.version, 'running', n.input, n.parent_id, \
           {HISTORY_FORMAT}, {NOW}, {NOW}, {NOW} \
         FROM unnest({ids}::text[], {workflows}::text[], {versions}::bigint[], \
           {inputs}::bytea[], {parents}::text[]) AS n(id, workflow, version, input, parent_id) \
         {clause} \
         ON CONFLICT (id) DO NOTHING RETURNING {returning}"
    )
}

/// [`Statements::single_entry`]: what [`commit_sql`] builds for
/// [`Shape::SINGLE_ENTRY`], with the entry's event id, sequence number,
/// kind and data as `$3`..`$6` instead of arrays.
fn single_entry_sql(s: &str) -> String {
    format!(
        "WITH f AS (UPDATE {s}.instances AS i \
           SET updated_at = {NOW}, next_event_id = i.next_event_id + 1 \
           WHERE i.id = $1 AND i.lease_token = $2 AND i.lease_owner IS NOT NULL \
             AND i.status = 'running' AND i.next_event_id = $3::bigint \
           RETURNING i.id, i.inbox_seq, i.cancel_requested), \
         h AS (INSERT INTO {s}.history (instance_id, event_id, seq, kind, data, created_at) \
           SELECT f.id, $3::bigint, $4::bigint, $5::text, $6::bytea, {NOW} FROM f) \
         SELECT f.inbox_seq, f.cancel_requested FROM f"
    )
}

/// Builds the commit statement of one shape: the fenced update `f`, then the
/// parts that only write when `f` matched.
fn commit_sql(s: &str, notify: &str, shape: Shape) -> String {
    let mut n = 2;
    let mut param = || {
        n += 1;
        format!("${n}")
    };
    let mut set = format!("updated_at = {NOW}");
    let mut fence = String::from(
        "i.id = $1 AND i.lease_token = $2 AND i.lease_owner IS NOT NULL AND i.status = 'running'",
    );
    let mut parts: Vec<String> = Vec::new();
    // Conditions under which the commit made work runnable at once.
    let mut wakes: Vec<String> = Vec::new();

    if shape.events {
        let (first, ids, seqs, kinds, data) = (param(), param(), param(), param(), param());
        set.push_str(&format!(
            ", next_event_id = i.next_event_id + cardinality({ids}::bigint[])"
        ));
        fence.push_str(&format!(" AND i.next_event_id = {first}"));
        parts.push(format!(
            "h AS (INSERT INTO {s}.history (instance_id, event_id, seq, kind, data, created_at) \
             SELECT f.id, e.event_id, e.seq, e.kind, e.data, {NOW} FROM f CROSS JOIN \
             unnest({ids}::bigint[], {seqs}::bigint[], {kinds}::text[], {data}::bytea[]) \
               AS e(event_id, seq, kind, data))"
        ));
    }
    match shape.kind {
        Kind::None => {}
        Kind::Park => {
            // Decided inside the update: a concurrent signal that commits
            // first is seen here (the row is re-read after its lock is
            // released), so the park is refused instead of losing it.
            let (seen, wake) = (param(), param());
            set.push_str(&format!(
                ", lease_owner = CASE WHEN i.inbox_seq = {seen} THEN NULL ELSE i.lease_owner END, \
                 ready_at = CASE WHEN i.inbox_seq = {seen} THEN {wake}::bigint ELSE i.ready_at END"
            ));
            wakes.push(format!("(f.released AND {wake}::bigint <= {NOW})"));
        }
        Kind::Release => {
            set.push_str(&format!(", lease_owner = NULL, ready_at = {NOW}"));
            wakes.push("true".to_owned());
        }
        Kind::Finish => {
            let (status, output, failure) = (param(), param(), param());
            set.push_str(&format!(
                ", status = {status}, output = {output}, failure = {failure}, \
                 lease_owner = NULL, ready_at = NULL"
            ));
            // A finished instance takes no more signals: its inbox goes, a
            // consumed signal with it.
            parts.push(format!(
                "d AS (DELETE FROM {s}.signals WHERE instance_id = $1 AND EXISTS (SELECT 1 FROM f))"
            ));
        }
    }
    if shape.consume {
        let sid = param();
        parts.push(format!(
            "cs AS (DELETE FROM {s}.signals \
             WHERE signal_id = {sid} AND instance_id = $1 AND EXISTS (SELECT 1 FROM f))"
        ));
    }
    if shape.children {
        let (ids, workflows, versions, inputs, parents) =
            (param(), param(), param(), param(), param());
        parts.push(format!(
            "c AS ({})",
            insert_new_instances(
                s,
                [&ids, &workflows, &versions, &inputs, &parents],
                "WHERE EXISTS (SELECT 1 FROM f)",
                "1"
            )
        ));
        wakes.push("EXISTS (SELECT 1 FROM c)".to_owned());
    }
    // Cancel requests and the parent's wake-up, in one update so that an
    // instance named twice is bumped twice, as if woken one after the other.
    let mut targets: Vec<String> = Vec::new();
    if shape.cancels {
        let ids = param();
        targets.push(format!(
            "SELECT t.id, true FROM unnest({ids}::text[]) AS t(id)"
        ));
    }
    if shape.kind == Kind::Finish {
        targets.push("SELECT f.parent_id, false FROM f WHERE f.parent_id IS NOT NULL".to_owned());
    }
    if !targets.is_empty() {
        parts.push(format!(
            "w AS (UPDATE {s}.instances AS o \
               SET cancel_requested = o.cancel_requested OR x.cancel, \
                   inbox_seq = o.inbox_seq + x.bumps, ready_at = {NOW}, updated_at = {NOW} \
               FROM (SELECT u.id, bool_or(u.cancel) AS cancel, count(*) AS bumps \
                     FROM ({}) AS u(id, cancel) WHERE EXISTS (SELECT 1 FROM f) \
                     GROUP BY u.id) AS x \
               WHERE o.id = x.id AND o.status = 'running' AND o.id <> $1 RETURNING 1)",
            targets.join(" UNION ALL ")
        ));
        wakes.push("EXISTS (SELECT 1 FROM w)".to_owned());
    }

    let mut sql = format!(
        "WITH f AS (UPDATE {s}.instances AS i SET {set} WHERE {fence} \
           RETURNING i.id, i.inbox_seq, i.cancel_requested, i.parent_id, \
             i.lease_owner IS NULL AS released)"
    );
    for part in &parts {
        sql.push_str(", ");
        sql.push_str(part);
    }
    sql.push_str(" SELECT f.inbox_seq, f.cancel_requested");
    if !wakes.is_empty() {
        sql.push_str(&format!(
            ", CASE WHEN {} THEN {notify} ELSE false END",
            wakes.join(" OR ")
        ));
    }
    sql.push_str(" FROM f");
    sql
}

/// Builds the statement that applies a group of commits to distinct
/// instances, without children or cancel requests, at once: one row of
/// parameters per commit (`$1`..`$11`), the journal entries of all of them
/// flattened (`$12`..`$16`). Each commit is fenced on its own: the update
/// only touches the rows whose fence matches, and only their entries,
/// signals and parents are written. It returns one row per applied commit:
/// `id, inbox_seq, cancel_requested, parent_id, kind`. A parent that is
/// itself in the group is not woken here (a statement updates a row once):
/// `wake_many` does that after it.
fn batch_sql(s: &str, notify: &str) -> String {
    let (none, park, release, finish) = (
        Kind::None as i32,
        Kind::Park as i32,
        Kind::Release as i32,
        Kind::Finish as i32,
    );
    format!(
        "WITH c AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], \
           $5::int[], $6::bigint[], $7::bigint[], $8::text[], $9::bytea[], $10::bytea[], \
           $11::bigint[]) \
           AS c(id, token, first, n, kind, seen, wake, status, output, failure, consume)), \
         f AS (UPDATE {s}.instances AS i SET \
             next_event_id = i.next_event_id + c.n, \
             updated_at = {NOW}, \
             lease_owner = CASE c.kind WHEN {none} THEN i.lease_owner \
               WHEN {park} THEN (CASE WHEN i.inbox_seq = c.seen THEN NULL ELSE i.lease_owner END) \
               ELSE NULL END, \
             ready_at = CASE c.kind WHEN {none} THEN i.ready_at \
               WHEN {park} THEN (CASE WHEN i.inbox_seq = c.seen THEN c.wake ELSE i.ready_at END) \
               WHEN {release} THEN {NOW} ELSE NULL END, \
             status = CASE WHEN c.kind = {finish} THEN c.status ELSE i.status END, \
             output = CASE WHEN c.kind = {finish} THEN c.output ELSE i.output END, \
             failure = CASE WHEN c.kind = {finish} THEN c.failure ELSE i.failure END \
           FROM c \
           WHERE i.id = c.id AND i.lease_token = c.token AND i.lease_owner IS NOT NULL \
             AND i.status = 'running' AND (c.first IS NULL OR i.next_event_id = c.first) \
           RETURNING i.id, i.inbox_seq, i.cancel_requested, i.parent_id, c.kind, c.consume, \
             c.wake, i.lease_owner IS NULL AS released), \
         h AS (INSERT INTO {s}.history (instance_id, event_id, seq, kind, data, created_at) \
           SELECT e.instance_id, e.event_id, e.seq, e.kind, e.data, {NOW} \
           FROM unnest($12::text[], $13::bigint[], $14::bigint[], $15::text[], $16::bytea[]) \
             AS e(instance_id, event_id, seq, kind, data) \
           WHERE e.instance_id IN (SELECT f.id FROM f)), \
         d AS (DELETE FROM {s}.signals AS g USING f \
           WHERE g.instance_id = f.id AND (f.kind = {finish} OR g.signal_id = f.consume)), \
         w AS (UPDATE {s}.instances AS o \
             SET inbox_seq = o.inbox_seq + x.bumps, ready_at = {NOW}, updated_at = {NOW} \
           FROM (SELECT f.parent_id AS id, count(*) AS bumps FROM f \
                 WHERE f.kind = {finish} AND f.parent_id IS NOT NULL GROUP BY f.parent_id) AS x \
           WHERE o.id = x.id AND o.status = 'running' AND o.id <> ALL($1::text[]) RETURNING 1) \
         SELECT f.id, f.inbox_seq, f.cancel_requested, f.parent_id, f.kind, \
           (SELECT CASE WHEN EXISTS (SELECT 1 FROM w) OR EXISTS (SELECT 1 FROM f \
               WHERE f.kind = {release} OR (f.kind = {park} AND f.released AND f.wake <= {NOW})) \
             THEN {notify} ELSE false END) \
         FROM f"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_indexed_one_to_one() {
        let mut seen = std::collections::HashSet::new();
        for shape in Shape::all() {
            assert!(seen.insert(shape.index()));
            assert_eq!(Shape::all().nth(shape.index()), Some(shape));
        }
        assert_eq!(seen.len(), Shape::COUNT);
    }

    #[test]
    fn parameters_are_numbered_densely() {
        let sql = Statements::new("fluxo");
        let texts = Shape::all()
            .map(|shape| (format!("{shape:?}"), sql.commit(shape)))
            .chain([
                ("single_entry".to_owned(), sql.single_entry.as_str()),
                ("create_many".to_owned(), sql.create_many.as_str()),
            ]);
        for (name, text) in texts {
            let max = (1..40)
                .filter(|i| text.contains(&format!("${i}")))
                .max()
                .unwrap_or(0);
            assert!(max > 0, "{name} takes parameters");
            for i in 1..=max {
                assert!(text.contains(&format!("${i}")), "{name} misses ${i}");
            }
        }
    }
}
