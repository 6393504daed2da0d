package tokenmgr

import (
	"time"

	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

func TestKeyring(t *testing.T) {
	k1, _ := GenerateKey("k1")
	k2, _ := GenerateKey("k2")
	old, err := NewKeyring(k1)
	if err != nil {
		t.Fatal(err)
	}
	rotated, err := ParseKeyring("# keys, oldest first\n" + k1.Encode() + "\n" + k2.Encode() + "\n")
	if err != nil {
		t.Fatal(err)
	}
	if rotated.ActiveKeyID() != "k2" {
		t.Fatalf("active key %s, want the last (k2)", rotated.ActiveKeyID())
	}
	v1, err := old.Seal("jira", fAccess, []byte("AT-SECRET"))
	if err != nil || !strings.HasPrefix(v1, "enc:v1:k1:") || strings.Contains(v1, "AT-SECRET") {
		t.Fatalf("seal: %q %v", v1, err)
	}
	// The new keyring reads values sealed with the old key, and seals with the new one.
	if pt, err := rotated.Open("jira", fAccess, v1); err != nil || string(pt) != "AT-SECRET" {
		t.Errorf("open with rotated keyring: %q %v", pt, err)
	}
	v2, _ := rotated.Seal("jira", fAccess, []byte("AT-SECRET"))
	if !strings.HasPrefix(v2, "enc:v1:k2:") {
		t.Errorf("rotated keyring sealed with %q", v2[:10])
	}
	if v2 == v1 {
		t.Errorf("two seals of one value are equal: nonce reuse")
	}
	for _, tc := range []struct {
		name, grant, field, value, want string
	}{
		{"other grant", "other", fAccess, v1, "copied from another grant or field"},
		{"other field", "jira", fRefresh, v1, "copied from another grant or field"},
		{"unknown key", "jira", fAccess, v2, `key id "k2", which is not in the keyring (have k1)`},
		{"truncated", "jira", fAccess, v1[:20], "truncated"},
		{"tampered", "jira", fAccess, v1[:len(v1)-2] + "AA", "does not decrypt"},
		{"garbage", "jira", fAccess, "hello", "not an encrypted value"},
	} {
		if _, err := old.Open(tc.grant, tc.field, tc.value); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	if _, err := old.Open("jira", fAccess, "plain:injected"); err == nil || !strings.Contains(err.Error(), "plaintext") {
		t.Errorf("a plaintext value was accepted by a keyring: %v", err)
	}
	if pt, err := old.WithPlaintextReads().Open("jira", fAccess, "plain:legacy"); err != nil || string(pt) != "legacy" {
		t.Errorf("migration keyring on a plaintext value: %q %v", pt, err)
	}
	zero := Key{ID: "z", Secret: make([]byte, 32)}
	if _, err := NewKeyring(zero); err == nil || !strings.Contains(err.Error(), "random") {
		t.Errorf("an all-zero key was accepted: %v", err)
	}
	if _, err := ParseKeyring(k1.Encode()[3:] + ":k1"); err == nil || strings.Contains(err.Error(), k1.Encode()[3:13]) {
		t.Errorf("a swapped entry: %v (must not quote key material)", err)
	}
	for _, bad := range []string{"", "nocolon", "k1:!!!", "k1:" + strings.Repeat("A", 10), "bad id!:" + k1.Encode()[3:], k1.Encode() + "," + k1.Encode()} {
		if _, err := ParseKeyring(bad); err == nil {
			t.Errorf("ParseKeyring accepted %q", bad)
		} else if strings.Contains(err.Error(), k1.Encode()[3:]) {
			t.Errorf("a parse error quotes key material")
		}
	}
	if s := fmt.Sprintf("%v %+v %#v %s", k1, k1, k1, k1); strings.Contains(s, k1.Encode()[3:10]) {
		t.Errorf("key material printed: %s", s)
	}
}

// With a keyring, Redis holds no token in clear; with the wrong keyring
// the record is reported corrupt, naming the field, and left alone.
func TestEncryptedRecordsInRedis(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Atlassian)
	k1, _ := GenerateKey("k1")
	kr, _ := NewKeyring(k1)
	m := e.manager(Atlassian, func(o *Options) { o.Sealer = kr })
	tok := e.seed(m)
	e.clock.Advance(time.Hour)
	if _, err := m.Token(t.Context(), e.grant); err != nil { // one rotation, written encrypted
		t.Fatal(err)
	}
	raw, err := e.client().HGetAll(t.Context(), grantKeys("tm", e.grant).record).Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, issued := range append(e.idp.IssuedTokens(), tok.AccessToken) {
		for f, v := range raw {
			if strings.Contains(v, issued) {
				t.Errorf("field %s holds a token in clear", f)
			}
		}
	}
	if !strings.HasPrefix(raw[fAccess], "enc:v1:k1:") || raw[fV] != "2" || raw[fStatus] != StatusOK {
		t.Errorf("record %v: want encrypted tokens and readable metadata", raw)
	}
	other, _ := GenerateKey("k1")
	wrong, _ := NewKeyring(other)
	w := e.manager(Atlassian, func(o *Options) { o.Sealer = wrong })
	_, err = w.Token(t.Context(), e.grant)
	var ce *CorruptRecordError
	if !errors.As(err, &ce) || ce.Field != fAccess || ce.Grant != e.grant {
		t.Fatalf("Token with the wrong key = %v, want a CorruptRecordError for %s", err, fAccess)
	}
	after, _ := e.client().HGetAll(t.Context(), grantKeys("tm", e.grant).record).Result()
	if after[fAccess] != raw[fAccess] || after[fV] != raw[fV] {
		t.Errorf("a manager with the wrong key changed the record")
	}
}

func FuzzKeyringOpen(f *testing.F) {
	k1, _ := GenerateKey("k1")
	kr, _ := NewKeyring(k1)
	good, _ := kr.Seal("g", fAccess, []byte("x"))
	f.Add(good)
	f.Add("enc:v1:k1:")
	f.Add("plain:abc")
	f.Fuzz(func(t *testing.T, s string) {
		pt, err := kr.Open("g", fAccess, s)
		if err == nil && s != good && !strings.HasPrefix(s, plainPrefix) {
			// Only genuine ciphertexts open; anything else is an error.
			if _, err2 := kr.Open("g", fRefresh, s); err2 == nil {
				t.Fatalf("a value opened under two fields: %q -> %q", s, pt)
			}
		}
	})
}

// Rewrap moves a grant to the newest key, fenced on the version, and
// workers with only the new key can then read it; in either layout.
func TestRewrap(t *testing.T) {
	for _, layout := range []Layout{LayoutHash, LayoutPair} {
		t.Run(layout.String(), func(t *testing.T) { testRewrap(t, layout) })
	}
}

func testRewrap(t *testing.T, layout Layout) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Atlassian)
	e.layout = layout
	k1, _ := GenerateKey("k1")
	k2, _ := GenerateKey("k2")
	oldRing, _ := NewKeyring(k1)
	bothRing, _ := NewKeyring(k1, k2)
	newRing, _ := NewKeyring(k2)
	m := e.manager(Atlassian, func(o *Options) { o.Sealer = oldRing })
	seeded := e.seed(m)
	admin, err := NewAdmin(Options{Redis: e.client(), Sealer: bothRing, Layout: layout})
	if err != nil {
		t.Fatal(err)
	}
	if wrote, err := admin.Rewrap(t.Context(), e.grant); err != nil || !wrote {
		t.Fatalf("Rewrap = %v, %v; want a write", wrote, err)
	}
	if wrote, err := admin.Rewrap(t.Context(), e.grant); err != nil || wrote {
		t.Errorf("second Rewrap = %v, %v; want nothing to do", wrote, err)
	}
	k := grantKeys("tm", e.grant)
	at, rt := e.sealedPair(k, e.grant)
	if v := e.snapshot(k).hash[fV]; !strings.HasPrefix(at, "enc:v1:k2:") || !strings.HasPrefix(rt, "enc:v1:k2:") || v != "1" {
		t.Errorf("after rewrap: %.10s %.10s v=%s", at, rt, v)
	}
	w := e.manager(Atlassian, func(o *Options) { o.Sealer = newRing })
	tok, err := w.Token(t.Context(), e.grant)
	if err != nil || tok.AccessToken != seeded.AccessToken {
		t.Errorf("a worker with only the new key: %v", err)
	}
	if err := admin.Check(t.Context(), e.grant); err != nil {
		t.Errorf("Check: %v", err)
	}
	e.putSealedPair(k, at, "enc:v1:k2:AAAA")
	var ce *CorruptRecordError
	if err := admin.Check(t.Context(), e.grant); !errors.As(err, &ce) || ce.Field != fRefresh {
		t.Errorf("Check of a damaged record = %v, want the refresh_token field named", err)
	}
}

// An older sealed pair of the same grant copied back into the record (with
// redis-cli) does not open: token values are sealed for their record's
// family and version, so the spent refresh token is never presented.
func testOldCiphertextRefused(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	k1, _ := GenerateKey("k1")
	kr, _ := NewKeyring(k1)
	m := e.manager(Strict, func(o *Options) { o.Sealer = kr })
	e.seed(m)
	k := grantKeys("tm", e.grant)
	at1, rt1 := e.sealedPair(k, e.grant)
	if _, err := m.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	e.putSealedPair(k, at1, rt1)
	fresh := e.manager(Strict, func(o *Options) { o.Sealer = kr })
	e.clock.Advance(time.Hour)
	before := e.idp.Stats()
	_, err := fresh.Token(t.Context(), e.grant)
	var ce *CorruptRecordError
	if !errors.As(err, &ce) || ce.Field != fAccess {
		t.Fatalf("Token after an old pair was copied back = %v, want a CorruptRecordError for %s", err, fAccess)
	}
	if after := e.idp.Stats(); after.RefreshOK+after.RefreshFailed != before.RefreshOK+before.RefreshFailed || after.ReuseDetected != 0 {
		t.Errorf("the copied-back refresh token was presented: %+v", after)
	}
}

// Records from before families kept values sealed for the field alone:
// they still open, so an upgrade loses no grant.
func TestLegacySealedValuesOpen(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	k1, _ := GenerateKey("k1")
	kr, _ := NewKeyring(k1)
	tok := e.idp.NewGrant("")
	at, _ := kr.Seal(e.grant, fAccess, []byte(tok.AccessToken))
	rt, _ := kr.Seal(e.grant, fRefresh, []byte(tok.RefreshToken))
	if err := e.client().HSet(t.Context(), grantKeys("tm", e.grant).record, fV, "7", fStatus, StatusOK, fAccess, at, fRefresh, rt,
		fType, "Bearer", fExpiry, msString(e.clock.Now().Add(time.Hour))).Err(); err != nil {
		t.Fatal(err)
	}
	m := e.manager(Strict, func(o *Options) { o.Sealer = kr })
	got, err := m.Token(t.Context(), e.grant)
	if err != nil || got.AccessToken != tok.AccessToken {
		t.Fatalf("a record from before families: %v", err)
	}
	if v, err := m.Rotate(t.Context(), e.grant); err != nil || v != 8 {
		t.Errorf("rotating it: %d %v", v, err)
	}
}
