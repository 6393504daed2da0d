package tokenmgr

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
	"golang.org/x/oauth2"
)

func TestFleetMiniredis(t *testing.T) { testFleet(t, miniredisBackend) }
func TestFleetRealRedis(t *testing.T) { testFleet(t, realBackend) }

// testFleet: 3 Managers (as 3 pods) x 50 goroutines call Token() and the API
// through the managed client across at least 20 rotations of a strict
// provider, which revokes the previous access token at once. The fake clock
// runs fast so rotations come every ~100ms of real time.
func testFleet(t *testing.T, b backend) {
	const (
		managers   = 3
		goroutines = 50
		rotations  = 20
	)
	e := newEnv(t, b, tokenmgrtest.Strict)
	e.idp.Close()
	e.idp = tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Strict, AuthStyle: oauth2.AuthStyleInHeader,
		AccessTTL: time.Minute, Now: e.clock.Now})
	t.Cleanup(e.idp.Close)
	ms := make([]*Manager, managers)
	for i := range ms {
		ms[i] = e.manager(Strict, func(o *Options) { o.Holder = fmt.Sprintf("pod-%d", i) })
	}
	e.seed(ms[0])

	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Go(func() { // the clock: 1s of token time every 2ms
		for !stop.Load() && ctx.Err() == nil {
			e.clock.Advance(time.Second)
			time.Sleep(2 * time.Millisecond)
			if e.idp.Stats().Rotations >= rotations {
				stop.Store(true)
			}
		}
	})
	var calls, failed atomic.Int64
	var firstErr atomic.Value
	for _, m := range ms {
		client := m.Client(e.grant)
		for range goroutines {
			wg.Go(func() {
				for !stop.Load() && ctx.Err() == nil {
					calls.Add(1)
					if _, err := m.Token(ctx, e.grant); err != nil {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
						continue
					}
					req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.idp.APIURL(), nil)
					resp, err := client.Do(req)
					if err != nil {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
						continue
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, resp.Status)
					}
				}
			})
		}
	}
	wg.Wait()
	if ctx.Err() != nil {
		t.Fatalf("fleet did not reach %d rotations in time: %+v", rotations, e.idp.Stats())
	}
	s := e.idp.Stats()
	var unauthorized, retried int64
	for _, m := range ms {
		st := m.Stats()
		unauthorized += st.Unauthorized
		retried += st.Unauthorized - st.UnauthorizedAfterRetry
	}
	t.Logf("%s fleet: %d managers x %d goroutines, %d calls, %d rotations, IdP refreshes ok=%d failed=%d, reuse=%d, API 200=%d 401=%d, 401s retried=%d/%d, failed calls=%d",
		b, managers, goroutines, calls.Load(), s.Rotations, s.RefreshOK, s.RefreshFailed, s.ReuseDetected, s.API200, s.API401, retried, unauthorized, failed.Load())
	if s.RefreshOK != s.Rotations || s.RefreshFailed != 0 || s.ReuseDetected != 0 {
		t.Errorf("IdP refresh calls %d (failed %d, reuse %d) for %d rotations: want exactly one call per rotation", s.RefreshOK, s.RefreshFailed, s.ReuseDetected, s.Rotations)
	}
	if failed.Load() != 0 {
		t.Errorf("%d failed calls, first: %v", failed.Load(), firstErr.Load())
	}
	if st := e.status(ms[0]); st.Version != s.Rotations+1 {
		t.Errorf("stored version %d after %d rotations, want %d", st.Version, s.Rotations, s.Rotations+1)
	}
}
