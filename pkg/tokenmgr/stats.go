package tokenmgr

import "sync/atomic"

// Stats are a Manager's counters since it was built. Exported as Prometheus
// metrics by the services; read directly by tests and the demo.
type Stats struct {
	Refreshes              int64 `json:"refreshes"`                // provider refresh calls that succeeded, made by this Manager
	RefreshFailures        int64 `json:"refresh_failures"`         // provider refresh calls that failed
	Leases                 int64 `json:"leases"`                   // refresh leases taken
	LockWaits              int64 `json:"lock_waits"`               // attempts that found the lease held (or the lock servers down) and waited
	LeasesLost             int64 `json:"leases_lost"`              // leases that could not be extended during a call
	WriteConflicts         int64 `json:"write_conflicts"`          // fenced writes refused because the version moved on
	PendingWrites          int64 `json:"pending_writes"`           // rotated pairs held because Redis refused them
	Restores               int64 `json:"restores"`                 // records put back after Redis lost them
	MarkedDead             int64 `json:"marked_dead"`              // grants this Manager declared in need of re-consent
	Reads                  int64 `json:"reads"`                    // record reads by flights (loads and re-reads under the lease), each of which may restore
	RotationMessages       int64 `json:"rotation_messages"`        // rotation messages received
	Unauthorized           int64 `json:"unauthorized"`             // 401s received by managed clients (retries included)
	UnauthorizedAfterRetry int64 `json:"unauthorized_after_retry"` // 401s returned to the caller: not cured by the 401 rule
}

// counters are the live Stats; each is named after its Stats field.
type counters struct {
	refreshes, refreshFailures, leases, lockWaits, leasesLost, writeConflicts, pendingWrites atomic.Int64
	restores, markedDead, reads, rotationMessages, unauthorized, unauthorizedAfterRetry      atomic.Int64
}

func (c *counters) snapshot() Stats {
	return Stats{
		Refreshes: c.refreshes.Load(), RefreshFailures: c.refreshFailures.Load(),
		Leases: c.leases.Load(), LockWaits: c.lockWaits.Load(), LeasesLost: c.leasesLost.Load(),
		WriteConflicts: c.writeConflicts.Load(), PendingWrites: c.pendingWrites.Load(),
		Restores: c.restores.Load(), MarkedDead: c.markedDead.Load(),
		Reads: c.reads.Load(), RotationMessages: c.rotationMessages.Load(),
		Unauthorized: c.unauthorized.Load(), UnauthorizedAfterRetry: c.unauthorizedAfterRetry.Load(),
	}
}
