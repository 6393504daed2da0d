package tokenmgr

import (
	"errors"
	"net/http"
	"testing"
	"time"

	"golang.org/x/oauth2"
)

var testPolicy = policy{refreshBefore: 5 * time.Minute, maxFraction: 0.2, minForcedAge: 5 * time.Second, maxBackoff: time.Minute}

// The refresh margin never exceeds a fraction of a short token's lifetime.
func TestRefreshMarginShortTokens(t *testing.T) {
	p := testPolicy
	now := time.Unix(1_700_000_000, 0)
	for _, tc := range []struct {
		life, want time.Duration
	}{
		{time.Hour, 5 * time.Minute},
		{10 * time.Minute, 2 * time.Minute},
		{5 * time.Second, time.Second},
	} {
		rec := &record{RotatedAt: now, Expiry: now.Add(tc.life)}
		if got := p.margin(rec); got != tc.want {
			t.Errorf("lifetime %s: margin %s, want %s", tc.life, got, tc.want)
		}
		for range 100 {
			soft, _, hard := p.deadlines(rec, randomSpread())
			if soft.Before(rec.Expiry.Add(-tc.want)) || !soft.Before(hard) || !hard.Before(rec.Expiry) {
				t.Fatalf("lifetime %s: soft %s hard %s expiry %s out of order", tc.life, soft.Sub(now), hard.Sub(now), tc.life)
			}
		}
	}
}

func TestDeadlines(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	hour := &record{RotatedAt: now, Expiry: now.Add(time.Hour)}
	for _, tc := range []struct {
		name       string
		rec        *record
		spread     float64
		soft, hard time.Duration // from now
	}{
		{"full margin", hour, 1, 55 * time.Minute, time.Hour - 10*time.Second},
		{"half margin", hour, 0.5, time.Hour - 150*time.Second, time.Hour - 10*time.Second},
		{"skew is a quarter of a short margin", &record{RotatedAt: now, Expiry: now.Add(20 * time.Second)}, 1, 16 * time.Second, 19 * time.Second},
		{"no rotation time: the whole RefreshBefore", &record{Expiry: now.Add(time.Hour)}, 1, 55 * time.Minute, time.Hour - 10*time.Second},
	} {
		soft, _, hard := testPolicy.deadlines(tc.rec, tc.spread)
		if got, want := soft.Sub(now), tc.soft; got != want {
			t.Errorf("%s: soft at %s, want %s", tc.name, got, want)
		}
		if got, want := hard.Sub(now), tc.hard; got != want {
			t.Errorf("%s: hard at %s, want %s", tc.name, got, want)
		}
	}
	if soft, _, hard := testPolicy.deadlines(&record{}, 1); !soft.Equal(farFuture) || !hard.Equal(farFuture) {
		t.Errorf("a token without expiry: deadlines %v %v, want never", soft, hard)
	}
}

func TestDueUsableNeedsRefresh(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	at := func(d time.Duration) time.Time { return now.Add(d) }
	rec := func(v int64, rotated, expiry time.Duration, status string) *record {
		return &record{V: v, Status: status, RotatedAt: at(rotated), Expiry: at(expiry)}
	}
	for _, tc := range []struct {
		name          string
		rec           *record
		w             want
		due, usable   bool
		refreshNeeded bool
	}{
		{"fresh", rec(3, -time.Minute, time.Hour, StatusOK), want{}, false, true, false},
		{"due, still usable", rec(3, -56*time.Minute, 4*time.Minute, StatusOK), want{}, true, true, true},
		{"past the hard deadline", rec(3, -time.Hour, 5*time.Second, StatusOK), want{}, true, false, true},
		{"dead is never usable", rec(3, -time.Minute, time.Hour, StatusReauthRequired), want{}, false, false, false},
		{"401 on this version, old enough", rec(3, -time.Minute, time.Hour, StatusOK), want{mode: wantNewer, rejected: 3}, false, true, true},
		{"401 on this version, too young", rec(3, -time.Second, time.Hour, StatusOK), want{mode: wantNewer, rejected: 3}, false, true, false},
		{"401 on this version, too young but forced", rec(3, -time.Second, time.Hour, StatusOK), want{mode: wantForced, rejected: 3}, false, true, true},
		{"401 on this version, too young but expired", rec(3, -time.Second, 0, StatusOK), want{mode: wantNewer, rejected: 3}, true, false, true},
		{"401 on an older version", rec(4, -time.Minute, time.Hour, StatusOK), want{mode: wantNewer, rejected: 3}, false, true, false},
		{"401 on an older version of a due token", rec(4, -56*time.Minute, 4*time.Minute, StatusOK), want{mode: wantNewer, rejected: 3}, true, true, false},
	} {
		if got := testPolicy.due(tc.rec, now); got != tc.due {
			t.Errorf("%s: due = %v, want %v", tc.name, got, tc.due)
		}
		if got := testPolicy.usable(tc.rec, now); got != tc.usable {
			t.Errorf("%s: usable = %v, want %v", tc.name, got, tc.usable)
		}
		if got := testPolicy.needsRefresh(tc.rec, tc.w, now); got != tc.refreshNeeded {
			t.Errorf("%s: needsRefresh = %v, want %v", tc.name, got, tc.refreshNeeded)
		}
	}
}

func TestBackoff(t *testing.T) {
	for attempts, want := range map[int64]time.Duration{0: time.Second, 1: time.Second, 2: 2 * time.Second, 4: 8 * time.Second, 7: time.Minute, 100: time.Minute} {
		if got := testPolicy.backoff(attempts); got != want {
			t.Errorf("backoff(%d) = %s, want %s", attempts, got, want)
		}
	}
	for range 1000 {
		if d := jitter(100 * time.Millisecond); d < 50*time.Millisecond || d > 100*time.Millisecond {
			t.Fatalf("jitter(100ms) = %s, want [50ms, 100ms]", d)
		}
	}
}

func TestClassify(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	answer := func(status int, code string, retryAfter string) error {
		h := http.Header{}
		if retryAfter != "" {
			h.Set("Retry-After", retryAfter)
		}
		return &oauth2.RetrieveError{Response: &http.Response{StatusCode: status, Header: h}, ErrorCode: code}
	}
	for _, tc := range []struct {
		name  string
		err   error
		class failClass
		retry time.Duration
	}{
		{"network error", errors.New("dial tcp: connection refused"), failTransient, 0},
		{"invalid_grant 400", answer(400, "invalid_grant", ""), failDead, 0},
		{"invalid_grant 403 (Atlassian)", answer(403, "invalid_grant", ""), failDead, 0},
		{"invalid_client", answer(401, "invalid_client", ""), failConfig, 0},
		{"unauthorized_client", answer(400, "unauthorized_client", ""), failConfig, 0},
		{"access_denied (Atlassian's wrong secret)", answer(403, "access_denied", ""), failConfig, 0},
		{"429 with Retry-After", answer(429, "", "30"), failTransient, 30 * time.Second},
		{"503 with an HTTP date", answer(503, "", now.Add(time.Minute).Format(http.TimeFormat)), failTransient, time.Minute},
		{"500 without a code", answer(500, "", ""), failTransient, 0},
		{"invalid_request (Hydra under contention)", answer(400, "invalid_request", ""), failTransient, 0},
		{"an unknown code", answer(400, "server_busy", ""), failTransient, 0},
		{"4xx without a code", answer(400, "", ""), failTransient, 0},
	} {
		class, retry := classify(tc.err, now)
		if class != tc.class || retry != tc.retry {
			t.Errorf("%s: classify = %d, %s; want %d, %s", tc.name, class, retry, tc.class, tc.retry)
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		in   string
		want time.Duration
	}{
		{"", 0}, {"30", 30 * time.Second}, {"-1", 0}, {"soon", 0},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
	} {
		if got := parseRetryAfter(tc.in, now); got != tc.want {
			t.Errorf("parseRetryAfter(%q) = %s, want %s", tc.in, got, tc.want)
		}
	}
}
