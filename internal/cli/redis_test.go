package cli

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/internal/redisserver"
	"github.com/tokenmgr/tokenmgr/internal/testbin"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// writeCerts makes a CA and a server certificate for 127.0.0.1.
func writeCerts(t *testing.T, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tokenmgr test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	srvTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature}
	caCert, _ := x509.ParseCertificate(caDER)
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(srvKey)
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return write("ca.pem", "CERTIFICATE", caDER), write("server.pem", "CERTIFICATE", srvDER), write("server.key", "EC PRIVATE KEY", keyDER)
}

// rediss:// verifies the server: an untrusted certificate is refused; the
// CA given with --redis-ca-file is trusted; skip_verify is refused.
func TestRedisTLS(t *testing.T) {
	dir := t.TempDir()
	ca, cert, key := writeCerts(t, dir)
	tlsPort, err := redisserver.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	redisserver.Start(t, "--tls-port", strconv.Itoa(tlsPort), "--tls-cert-file", cert, "--tls-key-file", key,
		"--tls-ca-cert-file", ca, "--tls-auth-clients", "no")
	url := "rediss://127.0.0.1:" + strconv.Itoa(tlsPort) + "/0"

	untrusted, err := NewRedis(url)
	if err != nil {
		t.Fatal(err)
	}
	defer untrusted.Close()
	if err := untrusted.Ping(t.Context()).Err(); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("PING with an untrusted certificate = %v, want a certificate error", err)
	}
	trusted, err := NewRedisTLS(url, ca)
	if err != nil {
		t.Fatal(err)
	}
	defer trusted.Close()
	if err := trusted.Ping(t.Context()).Err(); err != nil {
		t.Errorf("PING with the CA trusted: %v", err)
	}
	if _, err := NewRedisTLS(url+"?skip_verify=true", ""); err == nil || !strings.Contains(err.Error(), "skip_verify is refused") {
		t.Errorf("skip_verify accepted: %v", err)
	}
	if _, err := NewRedisTLS(url, filepath.Join(dir, "server.key")); err == nil {
		t.Errorf("a CA file without a certificate accepted")
	}
}

// loadACLRules loads the README's ACL SETUSER lines, each passed through
// edit first when it is set, and returns an admin client.
func loadACLRules(t *testing.T, srv *redisserver.Server, edit func(string) string) *redis.Client {
	t.Helper()
	admin := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { admin.Close() })
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var rules []string
	for _, line := range strings.Split(string(readme), "\n") {
		if strings.HasPrefix(line, "ACL SETUSER ") {
			rules = append(rules, line)
		}
	}
	if len(rules) != 2 {
		t.Fatalf("README has %d ACL SETUSER lines, want 2 (worker, refresher)", len(rules))
	}
	for _, r := range rules {
		if edit != nil {
			r = edit(r)
		}
		args := []any{}
		for _, f := range strings.Fields(r) {
			args = append(args, f)
		}
		if err := admin.Do(t.Context(), args...).Err(); err != nil {
			t.Fatalf("%s: %v", r, err)
		}
	}
	return admin
}

// Users whose ACL predates the rotations set (the worker had neither
// ZCOUNT nor ZREMRANGEBYSCORE, the refresher had ZCOUNT only) keep
// rotating and publishing; the last hour's count reads as unknown, never
// as a confident low number, and the Manager says why once.
func TestACLRulesBeforeRotationsSet(t *testing.T) {
	srv := redisserver.Start(t)
	admin := loadACLRules(t, srv, func(r string) string {
		if strings.HasPrefix(r, "ACL SETUSER worker ") {
			r = strings.Replace(r, " +zcount", "", 1)
		}
		return strings.Replace(r, " +zremrangebyscore", "", 1)
	})
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Strict, AuthStyle: oauth2.AuthStyleInParams})
	defer idp.Close()
	logs := &testbin.Buffer{}
	newManager := func(user string) *tokenmgr.Manager {
		rdb, err := NewRedis("redis://" + user + ":" + user + "-password@" + srv.Addr() + "/0")
		if err != nil {
			t.Fatal(err)
		}
		m, err := tokenmgr.New(t.Context(), tokenmgr.Options{Redis: rdb, OAuth2: idp.OAuthConfig(oauth2.AuthStyleInParams), Provider: tokenmgr.Strict,
			AllowPlaintext: true, Logger: slog.New(slog.NewTextHandler(logs, nil))})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = m.Close(context.Background()); rdb.Close() })
		return m
	}
	worker, refresher := newManager("worker"), newManager("refresher")
	if _, err := refresher.Seed(t.Context(), "jira", idp.NewGrant(""), tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := worker.Token(t.Context(), "jira"); err != nil {
		t.Fatal(err)
	}
	for i, m := range []*tokenmgr.Manager{refresher, worker, refresher} {
		v, err := m.Rotate(t.Context(), "jira")
		if err != nil || v != int64(i+2) {
			t.Fatalf("rotation %d under the old ACL: version %d, %v; want %d", i+1, v, err, i+2)
		}
	}
	// The worker hears of the refresher's last rotation (the message went
	// out) and serves its token.
	deadline := time.Now().Add(5 * time.Second)
	for {
		tw, err := worker.Token(t.Context(), "jira")
		tr, _ := refresher.Token(t.Context(), "jira")
		if err == nil && tw.AccessToken == tr.AccessToken {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the worker never picked up the rotation made under the old ACL")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for name, m := range map[string]*tokenmgr.Manager{"worker": worker, "refresher": refresher} {
		st, err := m.Status(t.Context(), "jira")
		if err != nil || st.Version != 4 || st.RefreshesLastHour != nil {
			t.Errorf("%s's Status under the old ACL: version %d, %v in the last hour, %v; want 4 and unknown (nil)", name, st.Version, st.RefreshesLastHour, err)
		}
	}
	if n := admin.Exists(t.Context(), "tm:{jira}:rotations").Val(); n != 0 {
		t.Errorf("the rotations set was written without being trimmed")
	}
	if n := strings.Count(logs.String(), "not counted for operators"); n != 2 {
		t.Errorf("the old-ACL warning was logged %d times, want once per Manager (2)", n)
	}
	// The ACL is brought up to date: the next rotation is counted again.
	loadACLRules(t, srv, nil)
	if _, err := refresher.Rotate(t.Context(), "jira"); err != nil {
		t.Fatal(err)
	}
	if st, _ := refresher.Status(t.Context(), "jira"); st.RefreshesLastHour == nil || *st.RefreshesLastHour != 1 {
		t.Errorf("after the ACL update: %v in the last hour, want 1 (counting again)", st.RefreshesLastHour)
	}
}

// The least-privilege ACL rules the README gives for workers and for the
// refresher are enough for their work, and no more.
func TestReadmeACLRules(t *testing.T) {
	srv := redisserver.Start(t)
	admin := loadACLRules(t, srv, nil)
	admin.Do(t.Context(), "acl", "log", "reset")
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Strict, AuthStyle: oauth2.AuthStyleInParams})
	defer idp.Close()
	key, _ := tokenmgr.GenerateKey("k1")
	kr, _ := tokenmgr.NewKeyring(key)
	manager := func(user string) (*tokenmgr.Manager, *redis.Client) {
		// A database other than 0 and a client name: SELECT and CLIENT
		// SETNAME are part of the traffic checked below.
		rdb, err := NewRedis("redis://" + user + ":" + user + "-password@" + srv.Addr() + "/2?client_name=tm-" + user)
		if err != nil {
			t.Fatal(err)
		}
		m, err := tokenmgr.New(t.Context(), tokenmgr.Options{Redis: rdb, OAuth2: idp.OAuthConfig(oauth2.AuthStyleInParams), Provider: tokenmgr.Strict, Sealer: kr})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = m.Close(context.Background()); rdb.Close() })
		return m, rdb.(*redis.Client)
	}
	refresher, rrdb := manager("refresher")
	worker, wrdb := manager("worker")
	if _, err := refresher.Seed(t.Context(), "jira", idp.NewGrant(""), tokenmgr.SeedOptions{}); err != nil {
		t.Fatalf("refresher seed: %v", err)
	}
	if _, err := worker.Token(t.Context(), "jira"); err != nil {
		t.Fatalf("worker Token: %v", err)
	}
	if _, err := worker.Rotate(t.Context(), "jira"); err != nil {
		t.Fatalf("worker refresh: %v", err)
	}
	if _, err := refresher.RefreshIfDue(t.Context(), "jira"); err != nil {
		t.Fatalf("refresher RefreshIfDue: %v", err)
	}
	if _, err := refresher.DueGrants(t.Context(), time.Now().Add(time.Hour), 10); err != nil {
		t.Fatalf("refresher DueGrants: %v", err)
	}
	if _, err := refresher.DeadGrants(t.Context()); err != nil {
		t.Fatalf("refresher DeadGrants: %v", err)
	}
	if _, errs := refresher.Statuses(t.Context(), []string{"jira"}); errs[0] != nil {
		t.Fatalf("refresher Statuses (the dashboard): %v", errs[0])
	}
	if _, err := refresher.Grants(t.Context()); err != nil {
		t.Fatalf("refresher Grants: %v", err)
	}
	if err := refresher.Postpone(t.Context(), "jira", time.Now().Add(time.Hour)); err != nil {
		t.Fatalf("refresher Postpone: %v", err)
	}
	if _, err := worker.Status(t.Context(), "jira"); err != nil {
		t.Fatalf("worker Status: %v", err)
	}
	if err := rrdb.Set(t.Context(), "tm:connect:x", "1", time.Minute).Err(); err != nil {
		t.Fatalf("refresher connect state: %v", err)
	}
	if err := rrdb.GetDel(t.Context(), "tm:connect:x").Err(); err != nil {
		t.Fatalf("refresher connect state: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !worker.Subscribed() {
		if time.Now().After(deadline) {
			t.Fatal("worker could not subscribe to tm:rotated")
		}
		time.Sleep(10 * time.Millisecond)
	}
	admin.Set(t.Context(), "other:secret", "x", 0)
	for _, c := range []struct {
		rdb *redis.Client
		cmd []any
	}{
		{wrdb, []any{"get", "other:secret"}}, {wrdb, []any{"keys", "*"}}, {wrdb, []any{"flushall"}},
		{wrdb, []any{"config", "get", "*"}}, {wrdb, []any{"zrange", "tm:due", "0", "-1"}},
		{rrdb, []any{"get", "other:secret"}}, {rrdb, []any{"flushall"}}, {rrdb, []any{"acl", "list"}},
	} {
		if err := c.rdb.Do(t.Context(), c.cmd...).Err(); err == nil || !strings.Contains(err.Error(), "NOPERM") {
			t.Errorf("%v allowed: %v", c.cmd, err)
		}
	}
	// Everything the clients sent above was allowed, but for the refusals
	// the README names. (The commands the loop above sends on purpose are
	// left out.)
	for _, e := range aclLog(t, admin) {
		if e["username"] == "worker" && e["reason"] == "key" && e["object"] == "tm:due" {
			continue // the worker's schedule write after its rotation
		}
		if e["context"] == "toplevel" && e["reason"] != "auth" && slices.ContainsFunc(refusedOnPurpose, func(cmd string) bool { return e["object"] == cmd }) {
			continue
		}
		t.Errorf("Redis refused the clients' own traffic: %v", e)
	}
	checkACL(t, admin)
}

// refusedOnPurpose are the ACL LOG objects of the commands TestReadmeACLRules
// sends to see them refused.
var refusedOnPurpose = []string{"other:secret", "keys", "flushall", "config|get", "zrange", "acl|list"}

// aclLog returns Redis's ACL LOG entries as maps.
func aclLog(t *testing.T, admin *redis.Client) []map[string]string {
	t.Helper()
	raw, err := admin.Do(t.Context(), "acl", "log").Slice()
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]string
	for _, r := range raw {
		e := map[string]string{}
		switch r := r.(type) {
		case map[any]any: // RESP3
			for k, v := range r {
				e[fmt.Sprint(k)] = fmt.Sprint(v)
			}
		case []any: // RESP2: key, value, ...
			for i := 0; i+1 < len(r); i += 2 {
				e[fmt.Sprint(r[i])] = fmt.Sprint(r[i+1])
			}
		}
		out = append(out, e)
	}
	return out
}

// aclRules is what each README user may and may not do, one command a
// line: when the library sends a new command (WAIT, SPUBLISH, a heartbeat
// key...), add its line here and its rule to the README.
var aclRules = []struct {
	user    string
	allowed bool
	cmd     string
}{
	// The connection.
	{"worker", true, "HELLO 3"},
	{"worker", true, "PING"},
	{"worker", true, "SELECT 2"},
	{"worker", true, "CLIENT SETNAME tm-worker"},
	{"worker", false, "CLIENT KILL ID 1"},
	{"worker", false, "CLIENT KILL TYPE pubsub"},
	{"worker", false, "CLIENT PAUSE 10000"},
	{"worker", false, "CLIENT LIST"},
	{"worker", false, "CLIENT NO-EVICT on"},
	{"worker", false, "CLIENT TRACKING on"},
	{"refresher", false, "CLIENT KILL ID 1"},
	{"refresher", false, "CLIENT PAUSE 10000"},
	{"refresher", false, "CLIENT LIST"},
	// A grant's keys.
	{"worker", true, "HGETALL tm:{jira}:tok"},
	{"worker", true, "HGET tm:{jira}:tok v"},
	{"worker", true, "EVALSHA 0123456789abcdef0123456789abcdef01234567 3 tm:{jira}:tok tm:{jira}:intent tm:{jira}:rotations"},
	{"worker", true, "SET tm:{jira}:lock holder NX PX 30000"},
	{"worker", true, "EXISTS tm:{jira}:lock"},
	{"worker", true, "ZCOUNT tm:{jira}:rotations 0 +inf"},
	{"worker", true, "PUBLISH tm:rotated jira"},
	{"worker", true, "SUBSCRIBE tm:rotated"},
	{"refresher", true, "HGETALL tm:{jira}:tok"},
	{"refresher", true, "EVALSHA 0123456789abcdef0123456789abcdef01234567 2 tm:{jira}:tok tm:{jira}:intent"},
	// The schedule and the pending logins: the refresher's alone.
	{"worker", false, "ZADD tm:due 1 jira"},
	{"worker", false, "ZRANGE tm:due 0 -1"},
	{"worker", false, "SET tm:connect:x y"},
	{"worker", false, "GET tm:connect:x"},
	{"worker", false, "EVAL return(1) 1 tm:connect:x"},
	{"refresher", true, "ZADD tm:due 1 jira"},
	{"refresher", true, "ZRANGE tm:due 0 -1 BYSCORE LIMIT 0 10"},
	{"refresher", true, "ZCOUNT tm:due 0 +inf"},
	{"refresher", true, "SET tm:connect:x y EX 600"},
	{"refresher", true, "GETDEL tm:connect:x"},
	// Nothing else.
	{"worker", false, "GET other:secret"},
	{"worker", false, "PUBLISH other x"},
	{"worker", false, "SUBSCRIBE other"},
	{"worker", false, "KEYS *"},
	{"worker", false, "SCAN 0"},
	{"worker", false, "FLUSHALL"},
	{"worker", false, "CONFIG GET *"},
	{"worker", false, "MONITOR"},
	{"worker", false, "SCRIPT FLUSH"},
	{"refresher", false, "GET other:secret"},
	{"refresher", false, "KEYS *"},
	{"refresher", false, "FLUSHALL"},
	{"refresher", false, "ACL LIST"},
	{"refresher", false, "DEBUG SLEEP 0"},
}

// checkACL runs each of aclRules through ACL DRYRUN (Redis 7.0+), which
// answers OK or says why not.
func checkACL(t *testing.T, admin *redis.Client) {
	t.Helper()
	for _, r := range aclRules {
		args := []any{"acl", "dryrun", r.user}
		for _, f := range strings.Fields(r.cmd) {
			args = append(args, f)
		}
		res, err := admin.Do(t.Context(), args...).Text()
		if err != nil {
			t.Errorf("ACL DRYRUN %s %s: %v", r.user, r.cmd, err)
			continue
		}
		if allowed := res == "OK"; allowed != r.allowed {
			t.Errorf("%s: %s: allowed %v (%s), want %v", r.user, r.cmd, allowed, res, r.allowed)
		}
	}
}
