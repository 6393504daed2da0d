package tokenmgr

import (
	"io"
	"log/slog"
	"testing"

	"net/http"
	"sync/atomic"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"golang.org/x/oauth2"
)

type (
	oauth2Token         = oauth2.Token
	oauth2RetrieveError = oauth2.RetrieveError
)

// apiTransport stands between a managed client and the API: it can run a
// step before each request, or answer 401 a number of times.
type apiTransport struct {
	before    func()
	status401 *atomic.Int64
	// respond200 answers 200 itself instead of calling the real API.
	respond200 bool
}

func (a *apiTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if a.before != nil {
		a.before()
	}
	if a.status401 != nil && a.status401.Add(-1) >= 0 {
		if r.Body != nil {
			r.Body.Close()
		}
		return &http.Response{StatusCode: http.StatusUnauthorized, Status: "401 Unauthorized", Body: http.NoBody, Header: http.Header{}, Request: r}, nil
	}
	if a.respond200 {
		return &http.Response{StatusCode: http.StatusOK, Status: "200 OK", Body: http.NoBody, Header: http.Header{}, Request: r}, nil
	}
	return http.DefaultTransport.RoundTrip(r)
}

// onlyReader hides any other method, so http.NewRequest cannot set GetBody.
type onlyReader struct{ io.Reader }

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

func newBenchRedis(b *testing.B) *redis.Client {
	mr := miniredis.RunT(b)
	c := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	b.Cleanup(func() { c.Close() })
	return c
}
