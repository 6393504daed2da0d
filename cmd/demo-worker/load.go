package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tokenmgr/tokenmgr/internal/cli"
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
	Failures               map[string]int64 `json:"failures,omitempty"` // class (see failureClass) -> count
	// Errors holds the first message of each failure class, bounded and
	// on one line (cli.Shown): what an operator needs to act on it.
	Errors  map[string]string `json:"errors,omitempty"`
	Seconds float64           `json:"seconds"`
}

func (r *report) write(w io.Writer, format string) error {
	if format == "json" {
		return json.NewEncoder(w).Encode(r)
	}
	_, err := fmt.Fprintf(w, "requests=%d ok=%d failed=%d unauthorized_seen=%d unauthorized_after_retry=%d refreshes=%d reauth_required=%v seconds=%.1f %s\n",
		r.Requests, r.OK, r.Failed, r.UnauthorizedSeen, r.UnauthorizedAfterRetry, r.Refreshes, r.ReauthRequired, r.Seconds, r.failureSummary())
	return err
}

// failureSummary is the counts by class, then one line per class with its
// first message.
func (r *report) failureSummary() string {
	kinds := make([]string, 0, len(r.Failures))
	for k := range r.Failures {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	s, msgs := "", ""
	for _, k := range kinds {
		s += fmt.Sprintf("failure[%s]=%d ", k, r.Failures[k])
		if m := r.Errors[k]; m != "" {
			msgs += "\n  " + k + ": " + m
		}
	}
	return s + msgs
}

type loadSpec struct {
	client      *http.Client
	url         string
	concurrency int
	duration    time.Duration // 0: no time limit
	requests    int64         // 0: no count limit
	// counters, when set, are updated live (for the per-second lines).
	counters *liveCounters
	// log, when set, gets the first failure of each class.
	log *slog.Logger
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
		rep    = &report{Failures: map[string]int64{}, Errors: map[string]string{}}
		wg     sync.WaitGroup
	)
	fail := func(class, msg string, err error) {
		msg = cli.Shown(msg)
		mu.Lock()
		rep.Failures[class]++
		first := rep.Errors[class] == ""
		if first {
			rep.Errors[class] = msg
		}
		if errors.Is(err, tokenmgr.ErrReauthRequired) {
			rep.ReauthRequired = true
		}
		mu.Unlock()
		spec.counters.failed.Add(1)
		if first && spec.log != nil {
			spec.log.Warn("request failed", "class", class, "err", msg)
		}
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
					fail("config_error", err.Error(), err)
					return
				}
				resp, err := spec.client.Do(req)
				if err != nil {
					if ctx.Err() != nil {
						spec.counters.requests.Add(-1) // cut short by a signal, not a failure
						return
					}
					fail(failureClass(err), err.Error(), err)
					continue
				}
				_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					fail(fmt.Sprintf("api_status_%d", resp.StatusCode), "the API answered "+resp.Status, nil)
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

// failureClass names what made a request fail, for the report and the
// log: what to look at, not only that the transport failed.
func failureClass(err error) string {
	var (
		re      *tokenmgr.RefreshError
		corrupt *tokenmgr.CorruptRecordError
		ne      net.Error
	)
	switch {
	case errors.Is(err, tokenmgr.ErrReauthRequired):
		return "reauth_required"
	case errors.Is(err, tokenmgr.ErrGrantNotFound):
		return "not_found"
	case errors.As(err, &corrupt):
		return "corrupt_record" // a wrong encryption key reads as one too: the message says which
	case redis.IsAuthError(err) || redis.IsPermissionError(err):
		return "store_denied"
	case errors.Is(err, tokenmgr.ErrStoreUnavailable):
		return "store_unavailable"
	case errors.As(err, &re) && re.Config:
		return "config_error"
	case errors.As(err, &re):
		return "refresh_failed"
	case errors.Is(err, errBadToken):
		return "bad_token"
	case errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case isInvalidGrant(err):
		return "invalid_grant"
	}
	return "transport"
}

// errBadToken: the stored token cannot be sent as a header.
var errBadToken = errors.New("the grant's token or token type holds characters an HTTP header cannot carry (CR, LF or other controls): re-seed the grant")

// headerCheck refuses, with errBadToken, a request whose Authorization
// header cannot be sent, where net/http would say only "invalid header
// field value" and the failure would read as the network's.
type headerCheck struct{ base http.RoundTripper }

func (h headerCheck) RoundTrip(req *http.Request) (*http.Response, error) {
	for _, b := range []byte(req.Header.Get("Authorization")) {
		if b < ' ' && b != '\t' || b == 0x7f {
			if req.Body != nil {
				req.Body.Close()
			}
			return nil, errBadToken
		}
	}
	return h.base.RoundTrip(req)
}

// workerClient is m's client for grant, with the header check. The grant's
// handle binds its name once: each request's token is two atomic loads.
func workerClient(m *tokenmgr.Manager, grant string) *http.Client {
	return &http.Client{Transport: m.Grant(grant).Transport(headerCheck{http.DefaultTransport})}
}
