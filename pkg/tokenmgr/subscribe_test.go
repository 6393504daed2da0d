package tokenmgr

import (
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// Invariant 7 fallback: with no subscription, a rotation is noticed by the
// version poll.
func testVersionPoll(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	rotator := e.manager(Strict, nil)
	worker := e.pollingManager(Strict, func(o *Options) { o.PollInterval = 20 * time.Millisecond })
	e.seed(rotator)
	if _, err := worker.Token(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	if _, err := rotator.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the poll to pick up version 2", func() bool {
		e := worker.lookup("jira-prod").entry.Load()
		return e != nil && e.v == 2
	})
}
