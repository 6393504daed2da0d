package tokenmgr

import (
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// A LayoutPair record keeps its tokens out of the hash, so Redis keeps the
// hash a listpack under the default hash-max-listpack-value (64 B); a
// record first written in LayoutHash (a hashtable, which Redis never turns
// back) becomes one at its first LayoutPair write, its metadata intact.
func TestPairLayoutKeepsRecordCompact(t *testing.T) {
	e := newEnv(t, realBackend, tokenmgrtest.Atlassian)
	k := grantKeys("tm", e.grant)
	rdb := e.client()
	encoding := func() string {
		t.Helper()
		enc, err := rdb.ObjectEncoding(t.Context(), k.record).Result()
		if err != nil {
			t.Fatal(err)
		}
		return enc
	}
	key, _ := GenerateKey("k1")
	kr, _ := NewKeyring(key)
	sealed := func(o *Options) { o.Sealer = kr } // sealed tokens are longer than 64 B
	old := e.manager(Atlassian, sealed)          // LayoutHash, as before LayoutPair
	e.seed(old)
	for range 2 {
		if _, err := old.Rotate(t.Context(), e.grant); err != nil {
			t.Fatal(err)
		}
	}
	if enc := encoding(); enc != "hashtable" {
		t.Fatalf("a LayoutHash record is a %s; this test expects the tokens to make it a hashtable", enc)
	}
	before := e.snapshot(k).hash

	e.layout = LayoutPair
	m := e.manager(Atlassian, sealed)
	if _, err := m.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	tok, err := m.Token(t.Context(), e.grant)
	if err != nil {
		t.Fatal(err)
	}
	after := e.snapshot(k)
	if enc := encoding(); enc != "listpack" {
		t.Errorf("after a LayoutPair rotation the record is a %s, want a listpack", enc)
	}
	if _, ok := after.hash[fAccess]; ok {
		t.Errorf("the access token is still in the hash")
	}
	if _, ok := after.hash[fRefresh]; ok {
		t.Errorf("the refresh token is still in the hash")
	}
	if after.pair == "" {
		t.Fatalf("no pair key after a LayoutPair rotation")
	}
	for _, f := range []string{fFamily, fScope, fAbsExpiry, fType} {
		if after.hash[f] != before[f] || before[f] == "" {
			t.Errorf("field %s: %q before the first LayoutPair write, %q after", f, before[f], after.hash[f])
		}
	}
	if c, _ := strconv.Atoi(before[fCount]); after.hash[fCount] != strconv.Itoa(c+1) {
		t.Errorf("refresh_count %s after %s", after.hash[fCount], before[fCount])
	}
	if !e.idp.AccessTokenValid(tok.AccessToken) {
		t.Errorf("the rotated token is not the IdP's current one")
	}
	// A process of either layout reads it; a LayoutHash write moves the
	// tokens back into the hash and leaves no pair key behind.
	w := e.manager(Atlassian, func(o *Options) { o.Layout, o.Sealer = LayoutHash, kr })
	if got, err := w.Token(t.Context(), e.grant); err != nil || got.AccessToken != tok.AccessToken {
		t.Fatalf("a LayoutHash process reading a LayoutPair record: %v", err)
	}
	if _, err := w.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	back := e.snapshot(k)
	if back.pair != "" || back.hash[fAccess] == "" || back.hash[fRefresh] == "" {
		t.Errorf("after a LayoutHash write: pair key %q, tokens in the hash %v", back.pair, back.hash[fAccess] != "")
	}
	if s := e.idp.Stats(); s.ReuseDetected != 0 || s.FamiliesRevoked != 0 {
		t.Errorf("a spent refresh token was presented: %+v", s)
	}
}

// A fleet in both layouts at once, as while LayoutPair rolls out: every
// rotation by either is read by the other, one refresh per rotation, and
// no spent refresh token is presented.
func TestMixedLayoutsShareTheGrant(t *testing.T) {
	for _, b := range []backend{miniredisBackend, realBackend} {
		t.Run(string(b), func(t *testing.T) {
			e := newEnv(t, b, tokenmgrtest.Strict)
			hash := e.manager(Strict, nil)
			pair := e.manager(Strict, func(o *Options) { o.Layout = LayoutPair })
			e.seed(hash)
			ms := []*Manager{hash, pair}
			for i := range 6 {
				writer, reader := ms[i%2], ms[(i+1)%2]
				if _, err := writer.Rotate(t.Context(), e.grant); err != nil {
					t.Fatalf("rotation %d: %v", i, err)
				}
				tok, err := writer.Token(t.Context(), e.grant)
				if err != nil {
					t.Fatal(err)
				}
				reader.pollOnce(nil)
				got, err := reader.Token(t.Context(), e.grant)
				if err != nil || got.AccessToken != tok.AccessToken {
					t.Fatalf("rotation %d by the %s process: the other read %v", i, writer.opts.Layout.String(), err)
				}
			}
			s := e.idp.Stats()
			if s.RefreshOK != 6 || s.ReuseDetected != 0 || s.FamiliesRevoked != 0 {
				t.Errorf("IdP saw %+v, want 6 refreshes and no reuse", s)
			}
		})
	}
}

// A process of a release before LayoutPair writes the tokens into the hash
// and knows nothing of the pair key: its write, the newer, wins over the
// pair key it left behind.
func TestHashTokensWinOverStalePair(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	e.layout = LayoutPair
	m := e.manager(Strict, nil)
	e.seed(m)
	k := grantKeys("tm", e.grant)
	stale := e.snapshot(k).pair
	if _, err := m.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	tok, err := m.Token(t.Context(), e.grant)
	if err != nil {
		t.Fatal(err)
	}
	// The older release's rotation: the tokens of the stored version in
	// the hash, the pair key left as it was (a pair of an older version).
	at, rt := e.sealedPair(k, e.grant)
	rdb := e.client()
	if err := rdb.Set(t.Context(), k.pair, stale, 0).Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.HSet(t.Context(), k.record, fAccess, at, fRefresh, rt).Err(); err != nil {
		t.Fatal(err)
	}
	fresh := e.manager(Strict, nil)
	got, err := fresh.Token(t.Context(), e.grant)
	if err != nil || got.AccessToken != tok.AccessToken {
		t.Fatalf("Token = %v; want the pair in the hash", err)
	}
	if err := e.admin().Check(t.Context(), e.grant); err != nil {
		t.Errorf("Check: %v", err)
	}
}

// A damaged pair key is a corrupt record, named as such, never a Redis
// error every read repeats; a dead grant's status still shows through it.
func TestDamagedPairKey(t *testing.T) {
	for _, b := range []backend{miniredisBackend, realBackend} {
		t.Run(string(b), func(t *testing.T) {
			e := newEnv(t, b, tokenmgrtest.Strict)
			e.layout = LayoutPair
			m := e.manager(Strict, nil)
			e.seed(m)
			k := grantKeys("tm", e.grant)
			rdb := e.client()
			for _, damage := range []struct {
				name string
				do   func() error
			}{
				{"garbage", func() error { return rdb.Set(t.Context(), k.pair, "no length here", 0).Err() }},
				{"length past the end", func() error { return rdb.Set(t.Context(), k.pair, "900:plain:at-in-clearplain:rt-in-clear", 0).Err() }},
				{"empty", func() error { return rdb.Set(t.Context(), k.pair, "", 0).Err() }},
				{"a list", func() error {
					if err := rdb.Del(t.Context(), k.pair).Err(); err != nil {
						return err
					}
					return rdb.RPush(t.Context(), k.pair, "x").Err()
				}},
			} {
				if err := damage.do(); err != nil {
					t.Fatal(err)
				}
				fresh := e.manager(Strict, nil)
				var ce *CorruptRecordError
				_, err := fresh.Token(t.Context(), e.grant)
				if !errors.As(err, &ce) || ce.Field != fPair {
					t.Errorf("%s: Token = %v, want a CorruptRecordError naming the pair", damage.name, err)
				}
				if err != nil && strings.Contains(err.Error(), "plain:") {
					t.Errorf("%s: the error quotes the stored tokens: %v", damage.name, err)
				}
				if _, err := fresh.Status(t.Context(), e.grant); !errors.As(err, &ce) || ce.Field != fPair {
					t.Errorf("%s: Status = %v, want a CorruptRecordError naming the pair", damage.name, err)
				}
				if err := e.admin().Check(t.Context(), e.grant); !errors.As(err, &ce) || ce.Field != fPair {
					t.Errorf("%s: Check = %v, want a CorruptRecordError naming the pair", damage.name, err)
				}
			}
			if err := rdb.HSet(t.Context(), k.record, fStatus, StatusReauthRequired, fReason, "refused").Err(); err != nil {
				t.Fatal(err)
			}
			if _, err := e.manager(Strict, nil).Token(t.Context(), e.grant); !errors.Is(err, ErrReauthRequired) {
				t.Errorf("a dead grant with a damaged pair key: Token = %v, want ErrReauthRequired", err)
			}
			if s := e.idp.Stats(); s.RefreshOK+s.RefreshFailed != 0 {
				t.Errorf("%d provider calls for a damaged record", s.RefreshOK+s.RefreshFailed)
			}
		})
	}
}

func TestSplitPair(t *testing.T) {
	for _, tc := range []struct {
		in, at, rt string
		ok         bool
	}{
		{"3:abcdef", "abc", "def", true},
		{"6:abcdef", "abcdef", "", true},
		{"0:abc", "", "", false},
		{"7:abcdef", "", "", false},
		{"-1:abc", "", "", false},
		{"+3:abcdef", "", "", false},
		{"abc", "", "", false},
		{"", "", "", false},
		{"1234567:" + strings.Repeat("a", 1234567), "", "", false},
	} {
		at, rt, err := splitPair(tc.in)
		if (err == nil) != tc.ok || at != tc.at || rt != tc.rt {
			t.Errorf("splitPair(%.20q) = %q, %q, %v", tc.in, at, rt, err)
		}
	}
}

func FuzzDecodePair(f *testing.F) {
	f.Add("12:plain:accessplain:refresh", StatusOK)
	f.Add("5:plain:", StatusOK)
	f.Add("x", StatusReauthRequired)
	f.Add("\x1b[31m:", StatusOK)
	f.Fuzz(func(t *testing.T, pair, status string) {
		h := map[string]string{fV: "2", fStatus: status, fExpiry: strconv.FormatInt(time.Now().UnixMilli(), 10)}
		err := withPair("g", h, pair, false)
		if err != nil {
			var ce *CorruptRecordError
			if !errors.As(err, &ce) || (ce.Field != fPair && ce.Field != fTokens) {
				t.Fatalf("error %v, want a CorruptRecordError naming the pair or the tokens", err)
			}
			if len(pair) > 8 && strings.Contains(err.Error(), pair[4:]) {
				t.Fatalf("the error quotes the stored value: %v", err)
			}
			if msg := err.Error(); len(msg) > 600 || strings.ContainsAny(msg, "\r\n\x1b") {
				t.Fatalf("an error a person reads is unbounded or carries control characters: %q", msg)
			}
			return
		}
		at, hasAT := h[fAccess]
		rt := h[fRefresh]
		if hasAT && strconv.Itoa(len(at))+":"+at+rt != pair {
			t.Fatalf("split %q into %q and %q", pair, at, rt)
		}
		if _, err := decodeRecord("g", h, plaintext{}); err != nil {
			var ce *CorruptRecordError
			if !errors.As(err, &ce) {
				t.Fatalf("decode error of type %T", err)
			}
		}
	})
}

// A record that keeps its metadata but loses its tokens (LayoutPair: the
// pair key evicted or deleted; LayoutHash: the token fields deleted) is
// not a lost grant: the first process to find it so tells the fleet, a
// process holding that version's pair puts it back at once, keeping the
// record's newer metadata, and the finder adopts it from the message.
// Until then it is a corrupt record naming the tokens, and nobody calls
// the provider.
func testLostTokensRestored(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	holder := e.manager(Strict, func(o *Options) { o.PollInterval = time.Hour })
	e.seed(holder)
	if _, err := holder.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	k := grantKeys("tm", e.grant)
	rdb := e.client()
	retryAt := strconv.FormatInt(e.clock.Now().Add(time.Minute).UnixMilli(), 10)
	if err := rdb.HSet(t.Context(), k.record, fRetry, retryAt).Err(); err != nil { // newer than the holder's copy
		t.Fatal(err)
	}
	if err := rdb.Del(t.Context(), k.pair).Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.HDel(t.Context(), k.record, fAccess, fRefresh).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := e.admin().Status(t.Context(), e.grant); err == nil {
		t.Errorf("Status of a record without tokens: no error")
	} else if ce := (*CorruptRecordError)(nil); !errors.As(err, &ce) || ce.Field != fTokens {
		t.Errorf("Status of a record without tokens = %v, want a CorruptRecordError naming the tokens", err)
	}
	fresh := e.manager(Strict, func(o *Options) { o.PollInterval = time.Hour })
	var ce *CorruptRecordError
	if _, err := fresh.Token(t.Context(), e.grant); !errors.As(err, &ce) || ce.Field != fTokens {
		t.Fatalf("Token of a record without tokens = %v, want a CorruptRecordError naming the tokens", err)
	}
	eventually(t, "the holder to put the pair back", func() bool { return holder.Stats().Restores == 1 })
	held, err := holder.Token(t.Context(), e.grant)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the finder to adopt the restored pair", func() bool {
		got, err := fresh.Token(t.Context(), e.grant)
		return err == nil && got.AccessToken == held.AccessToken
	})
	st := e.status(holder)
	if st.Version != 2 || !st.Restored || !st.HasRefreshToken {
		t.Errorf("after the repair: v%d restored=%v has_refresh_token=%v, want v2 restored with its refresh token", st.Version, st.Restored, st.HasRefreshToken)
	}
	if got := e.snapshot(k).hash; got[fRetry] != retryAt || got[fCount] != "1" {
		t.Errorf("the repair replaced the record's metadata: retry_at %q (want %s), refresh_count %q (want 1)", got[fRetry], retryAt, got[fCount])
	}
	if s := e.idp.Stats(); s.ReuseDetected != 0 || s.FamiliesRevoked != 0 || s.RefreshOK != 1 {
		t.Errorf("IdP saw %+v, want the one rotation and no reuse", s)
	}
}

// A process that does not hold the lost pair announces the loss once per
// version, however often it reads: no storm of messages or reads.
func TestLostTokensAnnouncedOnce(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	seeder := e.manager(Strict, nil)
	e.seed(seeder)
	k := grantKeys("tm", e.grant)
	if err := e.client().HDel(t.Context(), k.record, fAccess, fRefresh).Err(); err != nil {
		t.Fatal(err)
	}
	sub := e.client().Subscribe(t.Context(), "tm:rotated")
	t.Cleanup(func() { sub.Close() })
	if _, err := sub.Receive(t.Context()); err != nil {
		t.Fatal(err)
	}
	m := e.pollingManager(Strict, nil)
	g, err := m.state(e.grant)
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		_, _ = m.read(t.Context(), g)
	}
	// The channel keeps order: whatever the reads published arrives before
	// this end mark, so no wait for silence is needed.
	const end = "end of the test"
	if err := e.client().Publish(t.Context(), "tm:rotated", end).Err(); err != nil {
		t.Fatal(err)
	}
	var heard []string
	for {
		msg, err := sub.ReceiveMessage(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if msg.Payload == end {
			break
		}
		if strings.HasSuffix(msg.Payload, " "+lostTokensTail) {
			heard = append(heard, msg.Payload)
		}
	}
	if len(heard) != 1 || heard[0] != e.grant+" 1 "+lostTokensTail {
		t.Errorf("heard %q, want one %q", heard, e.grant+" 1 "+lostTokensTail)
	}
}

// A value longer than hash-max-listpack-value anywhere in the record (a
// long holder name in rotated_by, a mark's long reason) makes it a
// hashtable; once the value is gone a LayoutPair write makes it a listpack
// again.
func TestPairLayoutCompactsAfterLongValue(t *testing.T) {
	e := newEnv(t, realBackend, tokenmgrtest.Strict)
	e.layout = LayoutPair
	e.seed(e.manager(Strict, nil))
	k := grantKeys("tm", e.grant)
	enc := func() string {
		t.Helper()
		s, err := e.client().ObjectEncoding(t.Context(), k.record).Result()
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	for _, tc := range []struct {
		long string // what makes the record long
		make func() error
	}{
		{"a 70-byte holder in rotated_by", func() error {
			_, err := e.manager(Strict, func(o *Options) { o.Holder = strings.Repeat("h", 70) }).Rotate(t.Context(), e.grant)
			return err
		}},
		{"a 100-byte reason", func() error {
			return e.client().HSet(t.Context(), k.record, fReason, strings.Repeat("r", 100)).Err()
		}},
	} {
		if err := tc.make(); err != nil {
			t.Fatal(err)
		}
		if got := enc(); got != "hashtable" {
			t.Fatalf("with %s the record is a %s; this test expects a hashtable", tc.long, got)
		}
		if _, err := e.manager(Strict, nil).Rotate(t.Context(), e.grant); err != nil { // a short holder; the reason cleared
			t.Fatal(err)
		}
		if got := enc(); got != "listpack" {
			t.Errorf("after %s, the next rotation left a %s, want a listpack", tc.long, got)
		}
	}
}

// Rewrap moves tokens into the Admin's layout even when they are under the
// active key already: the way to move every grant at once, and back.
func TestRewrapMovesLayout(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	key, _ := GenerateKey("k1")
	kr, _ := NewKeyring(key)
	m := e.manager(Strict, func(o *Options) { o.Sealer = kr })
	seeded := e.seed(m)
	k := grantKeys("tm", e.grant)
	for _, tc := range []struct {
		layout Layout
		inHash bool
	}{{LayoutPair, false}, {LayoutHash, true}} {
		a, err := NewAdmin(Options{Redis: e.client(), Sealer: kr, Layout: tc.layout})
		if err != nil {
			t.Fatal(err)
		}
		if wrote, err := a.Rewrap(t.Context(), e.grant); err != nil || !wrote {
			t.Fatalf("Rewrap into %s = %v, %v; want a write", tc.layout.String(), wrote, err)
		}
		if wrote, err := a.Rewrap(t.Context(), e.grant); err != nil || wrote {
			t.Errorf("second Rewrap into %s = %v, %v; want nothing to do", tc.layout.String(), wrote, err)
		}
		s := e.snapshot(k)
		if _, ok := s.hash[fAccess]; ok != tc.inHash || (s.pair != "") == tc.inHash {
			t.Errorf("after Rewrap into %s: tokens in the hash %v, pair key %v", tc.layout.String(), ok, s.pair != "")
		}
		got, err := e.manager(Strict, func(o *Options) { o.Sealer = kr }).Token(t.Context(), e.grant)
		if err != nil || got.AccessToken != seeded.AccessToken {
			t.Errorf("reading after Rewrap into %s: %v", tc.layout.String(), err)
		}
	}
}
