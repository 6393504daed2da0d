package cli

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
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
			Logger: slog.New(slog.NewTextHandler(logs, nil))})
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
		if err != nil || st.Version != 4 || st.RefreshesLastHour != -1 {
			t.Errorf("%s's Status under the old ACL: version %d, %d in the last hour, %v; want 4 and unknown (-1)", name, st.Version, st.RefreshesLastHour, err)
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
	if st, _ := refresher.Status(t.Context(), "jira"); st.RefreshesLastHour != 1 {
		t.Errorf("after the ACL update: %d in the last hour, want 1 (counting again)", st.RefreshesLastHour)
	}
}

// The least-privilege ACL rules the README gives for workers and for the
// refresher are enough for their work, and no more.
func TestReadmeACLRules(t *testing.T) {
	srv := redisserver.Start(t)
	admin := loadACLRules(t, srv, nil)
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Strict, AuthStyle: oauth2.AuthStyleInParams})
	defer idp.Close()
	key, _ := tokenmgr.GenerateKey("k1")
	kr, _ := tokenmgr.NewKeyring(key)
	manager := func(user string) (*tokenmgr.Manager, *redis.Client) {
		rdb, err := NewRedis("redis://" + user + ":" + user + "-password@" + srv.Addr() + "/0")
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
}
