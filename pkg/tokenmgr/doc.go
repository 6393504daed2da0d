// Package tokenmgr lets a horizontally scaled fleet of workers share one
// OAuth 2.0 grant whose refresh tokens rotate (Jira Cloud 3LO is the
// archetype) without ever losing the grant.
//
// Every worker reads its tokens from Redis. Only the holder of a Redlock
// lease calls the provider, and it writes the new pair with a
// compare-and-set on a version counter, so a stale or paused holder can
// never overwrite a newer pair, and stale workers see the higher version
// and re-read instead of refreshing. Rotations are pushed to every process
// over pub/sub.
//
// A worker process builds one [Manager] and asks it for tokens:
//
//	m, err := tokenmgr.New(ctx, tokenmgr.Options{Redis: rdb, OAuth2: cfg, Provider: tokenmgr.Atlassian, Sealer: keyring})
//	jira := m.Grant("jira-prod")
//	resp, err := jira.Client().Get(url) // the token on every request, and the 401 rule
//
// Operators seed grants and read their state with an [Admin] (or the same
// methods on a Manager); the refresher service pre-rotates grants from the
// schedule with [Manager.RefreshIfDue].
//
// # Invariants
//
// The protocol keeps these; each names where it is enforced, and each has
// a test that fails without it. docs/design.md has the reasoning, the Redis
// layout and the failure table.
//
//  1. Fenced writes. The stored version v rises by exactly 1 per write that
//     changes the pair or kills it. A rotated pair is written only by a
//     compare-and-set on the version and token family its refresh token was
//     read at (scripts/rotate.lua, store.rotate). The lease saves provider
//     calls; the stored state rests on the CAS.
//  2. One refresh per rotation. Only a lease holder calls the provider, and
//     only after re-reading under the lease and seeing that the record still
//     needs it (refresh.go: Manager.refresh). Callers in one process share
//     one flight (cache.go: obtain); other processes wait for the rotation
//     message or the lease, then re-read (lease.go: leases.acquire).
//  3. Leases outlive calls. The lease is short and kept alive while its
//     holder lives (lease.go: lease.keepAlive), so a dead holder is replaced
//     within one LeaseTTL; options whose lease, timeout and reuse leeway do
//     not fit are refused by New (options.go: withDefaults,
//     recoveryWindow).
//  4. Nothing lost. A successful provider answer is written even when the
//     lease was lost meanwhile (the CAS decides); when Redis refuses it, the
//     pair is held, served and retried (pending.go). Before the call the
//     holder records an intent (scripts/intent.lua), so that after a crash
//     the next holder knows the token may be spent. A record Redis lost is
//     restored from the newest pair a process holds (refresh.go: read,
//     scripts/restore.lua).
//  5. Stale workers re-read, never refresh. On a 401 the worker compares the
//     version it used with the stored one: a newer stored version is retried
//     at once; the same version gets one fenced, fleet-wide refresh
//     (transport.go, policy.go: needsRefresh). invalid_grant is re-checked
//     against Redis before the grant is declared dead (failure.go).
//  6. Dead grants fail fast. A grant that needs re-consent is marked in its
//     record (scripts/mark.lua) and every worker returns one
//     [ReauthRequiredError] at once, without calling the provider, until it
//     is seeded again; the rotation message and the poll, which compares
//     status as well as version, tell every process (subscribe.go).
//     Transient provider errors back the whole fleet off (failure.go,
//     retry_at in the record).
//  7. The hot path does no I/O. [Manager.Token] on a fresh cached token is
//     atomic loads: no Redis, no lock, no allocation, and no clock read:
//     each entry turns due and expired by timers at its deadlines
//     (cache.go: publish, manager.go: current). Staleness is bounded by the
//     rotation message, which carries the new record (subscribe.go: adopt),
//     with a poll while the subscription is down and one comparison of every
//     grant each time it comes back (subscribe.go).
//  8. Secrets stay secret. Tokens are encrypted at rest ([Keyring]) and
//     never appear in logs, errors, metrics or %v output (secret.go);
//     callers never receive the refresh token (cache.go: publish).
//  9. Monotonic and self-repairing. No process installs a record older
//     than one it has served or written (cache.go: install). A stored record
//     older than the newest a process holds, as after a failover that lost
//     writes, is repaired by a fenced restore of the newer record and never
//     obeyed (refresh.go: read, scripts/restore.lua). Records are ordered by
//     token family, then version: a seed names a new family after the Redis
//     server's clock (scripts/seed.lua), so versions of a grant never repeat
//     and a held pair of one family never lands on the next. A Cluster
//     client reloads its slot map on the first failed command (store.go:
//     reloadOnFailure), so the repair reaches a promoted replica at once.
//     A record whose tokens alone were lost (a LayoutPair pair key evicted)
//     is repaired the same way, by a process holding that version's pair.
//  10. Replay only inside the leeway. A refresh token that an earlier attempt
//     may have spent (its outcome unknown: scripts/intent.lua) is presented
//     again only while the provider's reuse leeway covers a whole call, or,
//     for a provider without one, when that attempt was this process's own
//     and its answer is known lost (refresh.go: decideOnDoubt). Otherwise
//     the successor waits for the earlier holder's held write, then marks the
//     grant as an answer lost, keeping the version so a late write revives
//     it. The lease stays held while a rotated pair is held unwritten
//     (pending.go), and a mark after the provider refused a token takes a
//     new version and is marked refused, so no held pair resurrects a
//     revoked family: not a write decided before it, and not a restore of a
//     pair held from before a rollback (record.go: newerThan).
//  11. The refresher calls the provider. While a live refresher announces
//     itself for a grant (refresher.go, scripts/refreshers.lua), workers
//     leave a token above its floor (the last 30% of the margin) to it, and
//     refresh themselves only at the floor or when no refresher is live
//     (cache.go: refreshInBackground): the processes most likely to be
//     SIGKILLed rarely hold the only copy of a new pair.
//  12. Bounded everything. Background refreshes run at most once per
//     backoff step (cache.go: refreshInBackground); a corrupt record is read
//     once per re-check interval (cache.go: installCorrupt); a 401 on a
//     version a 401 with the same challenge already forced rotates nothing,
//     insufficient_scope never does, and forced refreshes back off per grant
//     (refresh.go: refuseForced, transport.go); a provider's token lifetime
//     and Retry-After are clamped (policy.go: clampAccessTTL,
//     maxRetryAfter); every wait is bounded by a context or a timer that
//     starts after the wake-up channel is taken (refresh.go:
//     waitForChange).
//
// # Files
//
// manager.go (Manager, Token, the grant registry), handle.go (Grant),
// cache.go (the in-process entry and its single flight), policy.go (timing
// and error classes), refresh.go (the protocol), lease.go (the lease),
// pending.go (held writes), failure.go (provider errors), refresher.go (a
// live refresher's announcement), store.go (every Redis command),
// record.go (the record and its codec), admin.go (Admin),
// subscribe.go (rotation messages and the poll), transport.go (the 401
// rule), options.go and provider.go (configuration), keyring.go and
// secret.go (encryption and redaction).
package tokenmgr
