package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// report is what one worker (or one fleet) saw. The JSON field names are
// a contract with the integration tests.
type report struct {
	Requests               int64            `json:"requests"`
	OK                     int64            `json:"ok"`
	Failed                 int64            `json:"failed"`
	UnauthorizedSeen       int64            `json:"unauthorized_seen"`
	UnauthorizedAfterRetry int64            `json:"unauthorized_after_retry"`
	Refreshes              int64            `json:"refreshes"`
	ReauthRequired         bool             `json:"reauth_required"`
	Failures               map[string]int64 `json:"failures,omitempty"` // kind -> count
	Seconds                float64          `json:"seconds"`
}

func (r *report) write(w io.Writer, format string) error {
	if format == "json" {
		return json.NewEncoder(w).Encode(r)
	}
	_, err := fmt.Fprintf(w, "requests=%d ok=%d failed=%d unauthorized_seen=%d unauthorized_after_retry=%d refreshes=%d reauth_required=%v seconds=%.1f %s\n",
		r.Requests, r.OK, r.Failed, r.UnauthorizedSeen, r.UnauthorizedAfterRetry, r.Refreshes, r.ReauthRequired, r.Seconds, r.failureSummary())
	return err
}

func (r *report) failureSummary() string {
	kinds := make([]string, 0, len(r.Failures))
	for k := range r.Failures {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	s := ""
	for _, k := range kinds {
		s += fmt.Sprintf("failure[%s]=%d ", k, r.Failures[k])
	}
	return s
}

type loadSpec struct {
	client      *http.Client
	url         string
	concurrency int
	duration    time.Duration // 0: no time limit
	requests    int64         // 0: no count limit
	// counters, when set, are updated live (for the per-second lines).
	counters *liveCounters
}

type liveCounters struct {
	requests, ok, failed atomic.Int64
}

// runLoad calls spec.url until the duration or the request budget is used
// up, or ctx ends.
func runLoad(ctx context.Context, spec loadSpec) *report {
	// The deadline stops new requests; requests in flight finish under ctx,
	// so that every answer the API gave is counted.
	until := ctx
	if spec.duration > 0 {
		var cancel context.CancelFunc
		until, cancel = context.WithTimeout(ctx, spec.duration)
		defer cancel()
	}
	if spec.counters == nil {
		spec.counters = &liveCounters{}
	}
	start := time.Now()
	var (
		issued atomic.Int64
		mu     sync.Mutex
		rep    = &report{Failures: map[string]int64{}}
		wg     sync.WaitGroup
	)
	fail := func(kind string, err error) {
		mu.Lock()
		rep.Failures[kind]++
		if errors.Is(err, tokenmgr.ErrReauthRequired) {
			rep.ReauthRequired = true
		}
		mu.Unlock()
		spec.counters.failed.Add(1)
	}
	for range spec.concurrency {
		wg.Go(func() {
			for until.Err() == nil {
				if spec.requests > 0 && issued.Add(1) > spec.requests {
					return
				}
				spec.counters.requests.Add(1)
				req, err := http.NewRequestWithContext(ctx, http.MethodGet, spec.url, nil)
				if err != nil {
					fail("bad_request", err)
					return
				}
				resp, err := spec.client.Do(req)
				if err != nil {
					if ctx.Err() != nil {
						spec.counters.requests.Add(-1) // cut short by a signal, not a failure
						return
					}
					fail(failureKind(err), err)
					continue
				}
				_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					fail(fmt.Sprintf("status_%d", resp.StatusCode), nil)
					continue
				}
				spec.counters.ok.Add(1)
			}
		})
	}
	wg.Wait()
	rep.Requests, rep.OK, rep.Failed = spec.counters.requests.Load(), spec.counters.ok.Load(), spec.counters.failed.Load()
	rep.Seconds = time.Since(start).Seconds()
	return rep
}

func failureKind(err error) string {
	var re *tokenmgr.RefreshError
	switch {
	case errors.Is(err, tokenmgr.ErrReauthRequired):
		return "reauth_required"
	case errors.Is(err, tokenmgr.ErrGrantNotFound):
		return "grant_not_found"
	case errors.Is(err, tokenmgr.ErrStoreUnavailable):
		return "store_unavailable"
	case errors.As(err, &re):
		return "refresh_failed"
	case isInvalidGrant(err):
		return "invalid_grant"
	}
	return "transport"
}
