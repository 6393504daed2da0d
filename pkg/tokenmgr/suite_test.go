package tokenmgr

import (
	"testing"
)

// The behaviour suite runs on miniredis and again on a real redis-server.
var suite = []struct {
	name string
	run  func(*testing.T, backend)
}{
	{"SeedAndServe", testSeedAndServe},
	{"RotationOneRefreshAcrossManagers", testRotationOneRefresh},
	{"SingleFlightInProcess", testSingleFlight},
	{"FencedWriteRefusesStaleVersion", testFencedWrite},
	{"LeaseLostDuringCallStillFenced", testLeaseLost},
	{"InvalidGrantRecheckedAgainstRedis", testInvalidGrantRecheck},
	{"DeadGrantFailsFast", testDeadGrantFailsFast},
	{"DroppedResponseRecoveredWithinLeeway", testDroppedResponseAtlassian},
	{"DroppedResponseStrictNeedsReconsent", testDroppedResponseStrict},
	{"CrashedHolderIntentRecovered", testCrashedHolderIntent},
	{"RedisOutageServesCacheThenFailsClearly", testRedisOutage},
	{"RedisRefusesWriteHeldAndRetried", testPendingWrite},
	{"LostRecordRestoredNeverOlder", testRestore},
	{"NonRotatingKeepsRefreshToken", testNonRotating},
	{"UnauthorizedNewerVersionRetried", testUnauthorizedNewerVersion},
	{"UnauthorizedSameVersionRefreshesOnce", testUnauthorizedSameVersion},
	{"VersionPollWhenNoSubscription", testVersionPoll},
	{"TransientErrorBacksOffFleetWide", testTransientBackoff},
	{"ConfigErrorBacksOffFleetWide", testConfigErrorBackoff},
	{"CallersNeverGetTheRefreshToken", testNoRefreshTokenToCallers},
	{"TokenSourceWithNewClientFollowsRotation", testTokenSourceNewClient},
	{"CloseWritesHeldPair", testCloseWritesHeldPair},
	{"StatusShowsRefreshingAndLastHour", testStatusRefreshingAndLastHour},
	{"HeldPairKeepsTheLease", testHeldPairKeepsLease},
	{"DeadMarkFencesHeldPair", testDeadMarkFencesHeldPair},
	{"HeldPairOfOldFamilyNeverLands", testHeldPairOfOldFamilyNeverLands},
	{"StrictLostAnswerNotReplayed", testStrictLostAnswerNotReplayed},
	{"StrictWaitsForHeldAnswer", testStrictWaitsForHeldAnswer},
	{"LeewayReplayNeedsACallToSpare", testLeewayReplayNeedsACallToSpare},
	{"RollbackRepairedNeverObeyed", testRollbackRepaired},
	{"DeadMarkStandsAfterRollback", testDeadMarkStandsAfterRollback},
	{"ExpiryAnchoredAtSend", testExpiryAnchoredAtSend},
	{"PollSeesDeadMark", testPollSeesDeadMark},
	{"BackgroundRefreshBoundedUnderFaults", testBackgroundRefreshBounded},
	{"CorruptRecordReadOncePerRecheck", testCorruptRecordCached},
	{"Persistent401sRotateOnce", testPersistent401sRotateOnce},
	{"WorkersLeaveRefreshToLiveRefresher", testWorkersLeaveRefreshToRefresher},
	{"RetryableBadRequestIsTransient", testRetryableBadRequest},
	{"AwaitRotationNoLostWakeup", testAwaitRotationLostWakeup},
	{"OldCiphertextRefused", testOldCiphertextRefused},
	{"UnusableAccessTokenKeepsRefreshToken", testUnusableAccessToken},
	{"PreviousClientSecretDuringRotation", testPreviousClientSecret},
	{"AdoptionWithoutRead", testAdoptionWithoutRead},
	{"NoHerdWhenAllExpireAtOnce", testNoHerd},
	{"LostTokensRestored", testLostTokensRestored},
}

func TestMiniredis(t *testing.T) {
	for _, tc := range suite {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, miniredisBackend) })
	}
}

func TestRealRedis(t *testing.T) {
	for _, tc := range suite {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, realBackend) })
	}
}

// TestRealRedisSharded runs the suite again with each grant's rotation
// messages on its own sharded channel.
func TestRealRedisSharded(t *testing.T) {
	for _, tc := range suite {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, shardedBackend) })
	}
}

// TestRealRedisPairLayout runs the suite again with every record's sealed
// tokens in their own key (LayoutPair).
func TestRealRedisPairLayout(t *testing.T) {
	for _, tc := range suite {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, pairBackend) })
	}
}
