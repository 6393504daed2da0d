// Package tokenmgrprom exports a tokenmgr.Manager's metrics to Prometheus,
// for every process that links the library, workers as well as the
// refresher.
//
// Two collectors, registered with your registry:
//
//   - [NewCollector]: the Manager's counters ([tokenmgr.Stats]), one
//     tokenmgr_*_total counter each, read once per scrape;
//   - [NewObserver]: histograms of provider-call latency by outcome and of
//     lease wait by whether the lease was taken. It is also the Manager's
//     [tokenmgr.Observer], so set it in [tokenmgr.Options.Observer] before
//     calling [tokenmgr.New].
//
// Both take constant labels (for example the client registration, when a
// process runs several Managers); no metric is labelled with a grant name
// (a process may serve thousands) nor carries a token or secret.
//
//	obs := tokenmgrprom.NewObserver(tokenmgrprom.Opts{})
//	m, err := tokenmgr.New(ctx, tokenmgr.Options{..., Observer: obs})
//	prometheus.MustRegister(obs, tokenmgrprom.NewCollector(m, tokenmgrprom.Opts{}))
//
// # Metrics
//
// Counters (NewCollector), each the [tokenmgr.Stats] field of the same
// meaning:
//
//	tokenmgr_provider_refreshes_total              Refreshes
//	tokenmgr_provider_refresh_failures_total       RefreshFailures
//	tokenmgr_leases_total                          Leases
//	tokenmgr_lock_waits_total                      LockWaits
//	tokenmgr_leases_lost_total                     LeasesLost
//	tokenmgr_write_conflicts_total                 WriteConflicts
//	tokenmgr_pending_writes_total                  PendingWrites
//	tokenmgr_restores_total                        Restores
//	tokenmgr_grants_marked_dead_total              MarkedDead
//	tokenmgr_record_reads_total                    Reads
//	tokenmgr_rotation_messages_total               RotationMessages
//	tokenmgr_unauthorized_total                    Unauthorized
//	tokenmgr_unauthorized_after_retry_total        UnauthorizedAfterRetry
//	tokenmgr_rollbacks_repaired_total              RollbacksRepaired
//	tokenmgr_older_records_refused_total           OlderRefused
//	tokenmgr_answers_lost_total                    AnswersLost
//	tokenmgr_replica_ack_timeouts_total            ReplicaAckTimeouts
//	tokenmgr_refreshes_left_to_refresher_total     LeftToRefresher
//	tokenmgr_forced_refreshes_refused_total        Forced401Refused
//	tokenmgr_secret_fallbacks_total                SecretFallbacks
//	tokenmgr_rotations_adopted_total               Adopted
//	tokenmgr_waits_for_holder_total                WaitedForHolder
//
// Histograms (NewObserver), in seconds:
//
//	tokenmgr_provider_call_duration_seconds{outcome}   ok, transient, refused (invalid_grant), config (client rejected)
//	tokenmgr_lease_wait_duration_seconds{acquired}     true, false (another holder rotated meanwhile, or the wait ran out)
//
// Alert on, for example, rate(tokenmgr_unauthorized_after_retry_total[5m])
// > 0 (401s the 401 rule could not cure), increase of
// tokenmgr_grants_marked_dead_total (a grant needs re-consent), and
// tokenmgr_secret_fallbacks_total still rising after a client-secret
// rotation (some process runs with the old secret only).
package tokenmgrprom
