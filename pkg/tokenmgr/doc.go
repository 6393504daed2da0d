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
//  1. Fenced writes. The stored version v rises by exactly 1 per rotation.
//     A rotated pair is written only by a compare-and-set on the v its
//     refresh token was read at (scripts/rotate.lua, store.rotate). The
//     lease saves provider calls; the stored state rests on the CAS.
//  2. One refresh per rotation. Only a lease holder calls the provider, and
//     only after re-reading under the lease and seeing that the record still
//     needs it (refresh.go: Manager.refresh). Callers in one process share
//     one flight (cache.go: obtain); other processes wait for the rotation
//     message or the lease, then re-read (lease.go: leases.acquire).
//  3. Leases outlive calls. The HTTP timeout is well below the lease TTL,
//     the lease is extended while a call is in flight (lease.go:
//     lease.keepAlive), and options whose lease, timeout and reuse leeway
//     do not fit are refused by New (options.go: withDefaults).
//  4. Nothing lost. A successful provider answer is written even when the
//     lease was lost meanwhile (the CAS decides); when Redis refuses it, the
//     pair is held, served and retried (pending.go). Before the call the
//     holder records an intent (scripts/intent.lua), so that after a crash
//     the next holder knows the token may be spent. A record Redis lost is
//     restored from the newest pair a process holds, never an older one
//     (refresh.go: readOrRestore, scripts/restore.lua).
//  5. Stale workers re-read, never refresh. On a 401 the worker compares the
//     version it used with the stored one: a newer stored version is retried
//     at once; the same version gets one fenced, fleet-wide refresh
//     (transport.go, policy.go: needsRefresh). invalid_grant is re-checked
//     against Redis before the grant is declared dead (failure.go).
//  6. Dead grants fail fast. A grant that needs re-consent is marked in its
//     record (scripts/mark.lua) and every worker returns one
//     [ReauthRequiredError] at once, without calling the provider, until it
//     is seeded again. Transient provider errors back the whole fleet off
//     (failure.go, retry_at in the record).
//  7. The hot path does no I/O. [Manager.Token] on a fresh cached token is
//     an atomic load and a clock read: no Redis, no lock, no allocation
//     (manager.go: current). Staleness is bounded by the rotation message,
//     with a version poll while the subscription is down (subscribe.go).
//  8. Secrets stay secret. Tokens are encrypted at rest ([Keyring]) and
//     never appear in logs, errors, metrics or %v output (secret.go);
//     callers never receive the refresh token (cache.go: install).
//
// # Files
//
// manager.go (Manager, Token, the grant registry), handle.go (Grant),
// cache.go (the in-process entry and its single flight), policy.go (timing
// and error classes), refresh.go (the protocol), lease.go (the lease),
// pending.go (held writes), failure.go (provider errors), store.go (every
// Redis command), record.go (the record and its codec), admin.go (Admin),
// subscribe.go (rotation messages and the poll), transport.go (the 401
// rule), options.go and provider.go (configuration), keyring.go and
// secret.go (encryption and redaction).
package tokenmgr
