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
	RollbacksRepaired      int64 `json:"rollbacks_repaired"`       // stored records older than this process's newest pair (a failover lost writes), repaired by a fenced write of that pair
	OlderRefused           int64 `json:"older_refused"`            // reads of a record older than one already served, not installed
	AnswersLost            int64 `json:"answers_lost"`             // grants marked for re-consent because an answer that may have rotated the token was lost
	ReplicaAckTimeouts     int64 `json:"replica_ack_timeouts"`     // writes that fewer than Options.MinReplicas replicas acknowledged in time
	LeftToRefresher        int64 `json:"left_to_refresher"`        // background refreshes left to a live refresher
	Forced401Refused       int64 `json:"forced_401_refused"`       // 401s that did not force a refresh: the version was already forced for the same reason, or forced refreshes are backing off
	SecretFallbacks        int64 `json:"secret_fallbacks"`         // refreshes that the provider accepted only with Options.PreviousClientSecret
	Adopted                int64 `json:"adopted"`                  // new versions installed from a rotation message, without a read
	WaitedForHolder        int64 `json:"waited_for_holder"`        // refreshes that found the lease held and waited for its holder's message instead of trying it
}

// counters are the live Stats; each is named after its Stats field.
type counters struct {
	refreshes, refreshFailures, leases, lockWaits, leasesLost, writeConflicts, pendingWrites atomic.Int64
	restores, markedDead, reads, rotationMessages, unauthorized, unauthorizedAfterRetry      atomic.Int64
	rollbacksRepaired, olderRefused, answersLost, replicaAckTimeouts, leftToRefresher        atomic.Int64
	forced401Refused, secretFallbacks, adopted, waitedForHolder                              atomic.Int64
}

func (c *counters) snapshot() Stats {
	return Stats{
		Refreshes: c.refreshes.Load(), RefreshFailures: c.refreshFailures.Load(),
		Leases: c.leases.Load(), LockWaits: c.lockWaits.Load(), LeasesLost: c.leasesLost.Load(),
		WriteConflicts: c.writeConflicts.Load(), PendingWrites: c.pendingWrites.Load(),
		Restores: c.restores.Load(), MarkedDead: c.markedDead.Load(),
		Reads: c.reads.Load(), RotationMessages: c.rotationMessages.Load(),
		Unauthorized: c.unauthorized.Load(), UnauthorizedAfterRetry: c.unauthorizedAfterRetry.Load(),
		RollbacksRepaired: c.rollbacksRepaired.Load(), OlderRefused: c.olderRefused.Load(),
		AnswersLost: c.answersLost.Load(), ReplicaAckTimeouts: c.replicaAckTimeouts.Load(),
		LeftToRefresher: c.leftToRefresher.Load(), Forced401Refused: c.forced401Refused.Load(),
		SecretFallbacks: c.secretFallbacks.Load(), Adopted: c.adopted.Load(), WaitedForHolder: c.waitedForHolder.Load(),
	}
}
