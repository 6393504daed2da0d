package tokenmgr

import (
	"net/http"
	"testing"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// A Grant handle serves what the Manager serves for its name, follows
// rotations, and carries an invalid name's error to every call.
func TestGrantHandle(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	h := m.Grant(e.grant)
	if h.Name() != e.grant {
		t.Errorf("Name = %q, want %q", h.Name(), e.grant)
	}
	tok, err := h.Token(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	via, err := m.Token(t.Context(), e.grant)
	if err != nil || via.AccessToken != tok.AccessToken {
		t.Fatalf("handle and Manager disagree: %v", err)
	}
	if _, err := m.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	after, err := h.Token(t.Context())
	if err != nil || after.AccessToken == tok.AccessToken {
		t.Fatalf("the handle kept the old token after a rotation (%v)", err)
	}
	if st, err := h.Status(t.Context()); err != nil || st.Version != 2 {
		t.Errorf("Status = %+v, %v; want version 2", st, err)
	}
	resp, err := h.Client().Get(e.idp.APIURL())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("API through the handle's client: %d", resp.StatusCode)
	}
	if ts, err := h.TokenSource().Token(); err != nil || ts.AccessToken != after.AccessToken {
		t.Errorf("TokenSource: %v", err)
	}

	bad := m.Grant("bad{name}")
	if _, err := bad.Token(t.Context()); err == nil {
		t.Error("Token of an invalid name succeeded")
	}
	if _, err := bad.Client().Get(e.idp.APIURL()); err == nil {
		t.Error("a request through an invalid name's client succeeded")
	}
}
