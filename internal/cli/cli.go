// Package cli holds the flags that the refresher and demo-worker share
// (same names, same environment variables), and turns them into a Redis
// client and tokenmgr options.
package cli

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// Environment variables read as defaults for the shared flags.
const (
	EnvRedisURL     = "TOKENMGR_REDIS_URL"
	EnvClientID     = "TOKENMGR_CLIENT_ID"
	EnvClientSecret = "TOKENMGR_CLIENT_SECRET"
	// EnvClientSecretPrevious holds the secret before the current one
	// while a client secret rotates.
	EnvClientSecretPrevious = "TOKENMGR_CLIENT_SECRET_PREVIOUS"
	EnvEncryptionKey        = "TOKENMGR_ENCRYPTION_KEY"
	EnvRedisCAFile          = "TOKENMGR_REDIS_CA_FILE"
	EnvLayout               = "TOKENMGR_LAYOUT"
)

// NoSecretEnv as Common.SecretEnv reads no variable for the client secret.
const NoSecretEnv = "-"

// Atlassian endpoints, for --provider atlassian.
const (
	AtlassianTokenURL = "https://auth.atlassian.com/oauth/token"
	AtlassianAuthURL  = "https://auth.atlassian.com/authorize"
)

// Common are the shared flags. Register them on a FlagSet, parse, then
// call Validate.
type Common struct {
	RedisURL         string
	LockRedisURLs    string
	Grant            string
	Provider         string
	TokenURL         string
	AuthURL          string
	ClientID         string
	ClientSecretFile string
	AuthStyle        string
	HTTPTimeout      time.Duration
	KeyFile          string
	InsecurePlain    bool
	RedisCAFile      string
	// SecretEnv names the environment variable that holds the client
	// secret when there is no ClientSecretFile: EnvClientSecret unless a
	// --config registration names its own (client_secret_env), or
	// NoSecretEnv for one that names none (its caller reports that).
	SecretEnv string
	// PreviousSecretFile (--client-secret-previous-file) and
	// PreviousSecretEnv (EnvClientSecretPrevious unless a --config
	// registration names its own, client_secret_previous_env, or
	// NoSecretEnv) give the client secret before the current one, while it
	// rotates: a refresh refused as invalid_client is tried once with it
	// (tokenmgr.Options.PreviousClientSecret).
	PreviousSecretFile string
	PreviousSecretEnv  string

	// Layout (--layout) is where records keep their sealed tokens:
	// "hash" or "pair" (tokenmgr.Options.Layout).
	Layout string

	clientSecret   string // from the environment or the file, never a flag value
	previousSecret string // likewise
	keyring        *tokenmgr.Keyring
	env            func(string) string
}

// Register adds the shared flags to fs, with defaults from env.
func (c *Common) Register(fs *flag.FlagSet, env func(string) string) {
	c.env = env
	fs.StringVar(&c.RedisURL, "redis", env(EnvRedisURL), "Redis `URL`: redis://[user:pass@]host:port[/db], rediss:// for TLS; "+
		"redis+cluster://host:port?addr=host2:port2 for Cluster; redis+sentinel://host:port?master_name=NAME for Sentinel (env "+EnvRedisURL+")")
	fs.StringVar(&c.RedisCAFile, "redis-ca-file", env(EnvRedisCAFile), "PEM `file` of the CA that signed the Redis servers' TLS certificates, for rediss:// (default: the system roots; env "+EnvRedisCAFile+")")
	fs.StringVar(&c.LockRedisURLs, "lock-redis", "", "comma-separated redis:// `URLs` of independent Redlock masters (default: the --redis server)")
	fs.StringVar(&c.Grant, "grant", "", "grant `name` (1-200 bytes, no braces or spaces, not . or ..)")
	fs.StringVar(&c.Provider, "provider", "atlassian", "provider profile: atlassian, strict, okta, xero, non-rotating, or generic (= strict: rotating, no reuse leeway)")
	fs.StringVar(&c.TokenURL, "token-url", "", "token endpoint `URL` (default for atlassian: "+AtlassianTokenURL+")")
	fs.StringVar(&c.AuthURL, "auth-url", "", "authorization endpoint `URL` (default for atlassian: "+AtlassianAuthURL+")")
	fs.StringVar(&c.ClientID, "client-id", env(EnvClientID), "OAuth client `id` (env "+EnvClientID+")")
	fs.StringVar(&c.ClientSecretFile, "client-secret-file", "", "`file` holding the OAuth client secret (else env "+EnvClientSecret+"; never a flag value)")
	fs.StringVar(&c.PreviousSecretFile, "client-secret-previous-file", "", "`file` holding the previous client secret while the secret rotates: a refresh refused as invalid_client is tried once with it (else env "+EnvClientSecretPrevious+"; optional)")
	fs.StringVar(&c.AuthStyle, "auth-style", "params", "how the client authenticates to the token endpoint: header (HTTP Basic) or params (form fields)")
	fs.DurationVar(&c.HTTPTimeout, "http-timeout", 0, "timeout of one token-endpoint call (default: the provider profile's)")
	fs.StringVar(&c.KeyFile, "encryption-key-file", "", "`file` of AES-256 keys, one \"ID:BASE64\" per line, the last one encrypting (else env "+EnvEncryptionKey+", same format, comma-separated)")
	fs.BoolVar(&c.InsecurePlain, "insecure-plaintext", false, "store tokens in Redis unencrypted (never in production)")
	layout := env(EnvLayout)
	if layout == "" {
		layout = tokenmgr.LayoutHash.String()
	}
	fs.StringVar(&c.Layout, "layout", layout, "where written records keep their sealed tokens: hash (fields of the record, as every release before pair) or pair (a key of their own: about half the memory per grant; set it once no process of an older release is left; env "+EnvLayout+")")
}

// UseEnv sets where Validate reads environment variables (Register does
// it too); for Commons built from a config file.
func (c *Common) UseEnv(env func(string) string) { c.env = env }

// loadKeyring reads the encryption keys. Without keys the services refuse
// to start unless --insecure-plaintext says otherwise.
func (c *Common) loadKeyring() error {
	src, raw := "", ""
	switch {
	case c.KeyFile != "":
		b, err := os.ReadFile(c.KeyFile)
		if err != nil {
			return fmt.Errorf("--encryption-key-file: %w", err)
		}
		src, raw = "--encryption-key-file", string(b)
	case c.env != nil && c.env(EnvEncryptionKey) != "":
		src, raw = EnvEncryptionKey, c.env(EnvEncryptionKey)
	}
	if raw == "" {
		if c.InsecurePlain {
			return nil
		}
		return errors.New("no encryption key: set " + EnvEncryptionKey + " or --encryption-key-file (or --insecure-plaintext to store tokens in clear)")
	}
	if c.InsecurePlain {
		return errors.New("--insecure-plaintext and an encryption key exclude each other")
	}
	kr, err := tokenmgr.ParseKeyring(raw)
	if err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	c.keyring = kr
	return nil
}

// sealer is the configured keyring, or nil for --insecure-plaintext.
func (c *Common) sealer() tokenmgr.Sealer {
	if c.keyring == nil {
		return nil
	}
	return c.keyring
}

// Validate checks the flags and loads the client secret.
func (c *Common) Validate() error {
	var errs []error
	if c.RedisURL == "" {
		errs = append(errs, errors.New("--redis (or "+EnvRedisURL+") is required"))
	}
	if err := tokenmgr.ValidateGrantName(c.Grant); err != nil {
		errs = append(errs, fmt.Errorf("--grant: %w", err))
	}
	if _, err := c.profile(); err != nil {
		errs = append(errs, err)
	}
	if _, err := c.layout(); err != nil {
		errs = append(errs, err)
	}
	if c.Provider == "atlassian" {
		if c.TokenURL == "" {
			c.TokenURL = AtlassianTokenURL
		}
		if c.AuthURL == "" {
			c.AuthURL = AtlassianAuthURL
		}
	}
	if c.TokenURL == "" {
		errs = append(errs, errors.New("--token-url is required for provider "+c.Provider))
	}
	if c.ClientID == "" {
		errs = append(errs, errors.New("--client-id (or "+EnvClientID+") is required"))
	}
	if _, err := c.authStyle(); err != nil {
		errs = append(errs, err)
	}
	secretEnv := c.SecretEnv
	if secretEnv == "" {
		secretEnv = EnvClientSecret
	}
	switch {
	case c.ClientSecretFile != "":
		b, err := os.ReadFile(c.ClientSecretFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("--client-secret-file: %w", err))
		}
		c.clientSecret = strings.TrimSpace(string(b))
	case c.env != nil && secretEnv != NoSecretEnv:
		c.clientSecret = c.env(secretEnv)
	}
	switch {
	case c.clientSecret != "" || len(errs) > 0 || secretEnv == NoSecretEnv:
	case c.SecretEnv != "":
		errs = append(errs, fmt.Errorf("no client secret: %s is unset or empty", c.SecretEnv))
	default:
		errs = append(errs, errors.New("no client secret: set "+EnvClientSecret+" or --client-secret-file"))
	}
	if err := c.loadPrevious(); err != nil {
		errs = append(errs, err)
	}
	if err := c.loadKeyring(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// loadPrevious reads the previous client secret, which is optional. One
// equal to the current secret is dropped: retrying with it would only
// repeat the refused call.
func (c *Common) loadPrevious() error {
	c.previousSecret = ""
	env := c.PreviousSecretEnv
	if env == "" {
		env = EnvClientSecretPrevious
	}
	switch {
	case c.PreviousSecretFile != "":
		b, err := os.ReadFile(c.PreviousSecretFile)
		if err != nil {
			return fmt.Errorf("--client-secret-previous-file: %w", err)
		}
		if c.previousSecret = strings.TrimSpace(string(b)); c.previousSecret == "" {
			return fmt.Errorf("--client-secret-previous-file %s is empty", c.PreviousSecretFile)
		}
	case c.env != nil && env != NoSecretEnv:
		c.previousSecret = c.env(env)
	}
	if c.previousSecret == c.clientSecret {
		c.previousSecret = ""
	}
	return nil
}

// HasPreviousSecret reports whether a previous client secret is
// configured (for a log line that says so, never the value).
func (c *Common) HasPreviousSecret() bool { return c.previousSecret != "" }

func (c *Common) profile() (tokenmgr.Provider, error) {
	var p tokenmgr.Provider
	switch c.Provider {
	case "atlassian":
		p = tokenmgr.Atlassian
	case "strict", "generic":
		p = tokenmgr.Strict
	case "okta":
		p = tokenmgr.Okta
	case "xero":
		p = tokenmgr.Xero
	case "non-rotating":
		p = tokenmgr.NonRotating
	default:
		return p, fmt.Errorf("--provider %q: want atlassian, strict, okta, xero, non-rotating or generic", c.Provider)
	}
	if c.HTTPTimeout > 0 {
		p.HTTPTimeout = c.HTTPTimeout
	}
	return p, nil
}

// layout is --layout as a tokenmgr.Layout.
func (c *Common) layout() (tokenmgr.Layout, error) {
	if c.Layout == "" {
		return tokenmgr.LayoutHash, nil
	}
	for _, l := range []tokenmgr.Layout{tokenmgr.LayoutHash, tokenmgr.LayoutPair} {
		if c.Layout == l.String() {
			return l, nil
		}
	}
	return 0, fmt.Errorf("--layout %s: want hash or pair", Shown(c.Layout))
}

func (c *Common) authStyle() (oauth2.AuthStyle, error) {
	switch c.AuthStyle {
	case "header":
		return oauth2.AuthStyleInHeader, nil
	case "params":
		return oauth2.AuthStyleInParams, nil
	}
	return 0, fmt.Errorf("--auth-style %q: want header or params", c.AuthStyle)
}

// ValidateStore checks only what talking to Redis needs (for operator
// commands that never call the provider): --redis, --grant if needGrant,
// and the encryption key if needKey (reading metadata needs none).
func (c *Common) ValidateStore(needGrant, needKey bool) error {
	var errs []error
	if c.RedisURL == "" {
		errs = append(errs, errors.New("--redis (or "+EnvRedisURL+") is required"))
	}
	if needGrant {
		if err := tokenmgr.ValidateGrantName(c.Grant); err != nil {
			errs = append(errs, fmt.Errorf("--grant: %w", err))
		}
	} else if c.Grant != "" {
		if err := tokenmgr.ValidateGrantName(c.Grant); err != nil {
			errs = append(errs, fmt.Errorf("--grant: %w", err))
		}
	}
	if _, err := c.profile(); err != nil {
		errs = append(errs, err)
	}
	if _, err := c.layout(); err != nil {
		errs = append(errs, err)
	}
	if needKey || c.KeyFile != "" || (c.env != nil && c.env(EnvEncryptionKey) != "") {
		if err := c.loadKeyring(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// AdminOptions are Options with only the Redis client and provider set,
// for tokenmgr.NewAdmin. Close the client with CloseClients.
func (c *Common) AdminOptions() (tokenmgr.Options, error) {
	rdb, err := NewRedisTLS(c.RedisURL, c.RedisCAFile)
	if err != nil {
		return tokenmgr.Options{}, fmt.Errorf("--redis: %w", err)
	}
	p, _ := c.profile()
	layout, _ := c.layout()
	return tokenmgr.Options{Redis: rdb, Provider: p, Sealer: c.sealer(), AllowPlaintext: c.InsecurePlain, Layout: layout}, nil
}

// OAuth2Config is the client registration from the flags.
func (c *Common) OAuth2Config() *oauth2.Config {
	style, _ := c.authStyle()
	return &oauth2.Config{
		ClientID:     c.ClientID,
		ClientSecret: c.clientSecret,
		Endpoint:     oauth2.Endpoint{TokenURL: c.TokenURL, AuthURL: c.AuthURL, AuthStyle: style},
	}
}

// Options returns tokenmgr options with the Redis clients, provider and
// client registration filled in. Close the clients with CloseClients.
func (c *Common) Options() (tokenmgr.Options, error) {
	rdb, err := NewRedisTLS(c.RedisURL, c.RedisCAFile)
	if err != nil {
		return tokenmgr.Options{}, fmt.Errorf("--redis: %w", err)
	}
	o := tokenmgr.Options{Redis: rdb, OAuth2: c.OAuth2Config(), Sealer: c.sealer(), AllowPlaintext: c.InsecurePlain,
		PreviousClientSecret: c.previousSecret}
	o.Provider, _ = c.profile()
	o.Layout, _ = c.layout()
	if c.LockRedisURLs != "" {
		for _, u := range strings.Split(c.LockRedisURLs, ",") {
			lc, err := NewRedisTLS(strings.TrimSpace(u), c.RedisCAFile)
			if err != nil {
				CloseClients(o)
				return tokenmgr.Options{}, fmt.Errorf("--lock-redis: %w", err)
			}
			o.LockRedis = append(o.LockRedis, lc)
		}
	}
	return o, nil
}

// CloseClients closes the Redis clients that Options made.
func CloseClients(o tokenmgr.Options) {
	if o.Redis != nil {
		o.Redis.Close()
	}
	for _, c := range o.LockRedis {
		c.Close()
	}
}

// NewRedis makes a client from a URL: redis:// or rediss:// for one server,
// redis+cluster:// for Cluster, redis+sentinel:// for Sentinel. Errors
// never show a password. TLS always verifies the server: skip_verify is
// refused.
func NewRedis(rawURL string) (redis.UniversalClient, error) { return NewRedisTLS(rawURL, "") }

// NewRedisTLS is NewRedis trusting the CA in caFile (PEM) for rediss://.
func NewRedisTLS(rawURL, caFile string) (redis.UniversalClient, error) {
	if strings.Contains(strings.ToLower(rawURL), "skip_verify") {
		return nil, fmt.Errorf("%s: skip_verify is refused: tokens cross this connection; trust the server's CA with --redis-ca-file", redactURL(rawURL))
	}
	var roots *x509.CertPool
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("--redis-ca-file: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--redis-ca-file %s: no PEM certificate in it", caFile)
		}
	}
	withCA := func(t *tls.Config) *tls.Config {
		if t != nil && roots != nil {
			t.RootCAs = roots
		}
		return t
	}
	scheme, rest, ok := strings.Cut(rawURL, "://")
	if !ok {
		return nil, fmt.Errorf("%s is not a URL (want redis://host:port)", redactURL(rawURL))
	}
	base, mode, _ := strings.Cut(scheme, "+")
	if base != "redis" && base != "rediss" {
		return nil, fmt.Errorf("unsupported scheme %q in %s (want redis, rediss, redis+cluster, redis+sentinel)", scheme, redactURL(rawURL))
	}
	u := base + "://" + rest
	bad := func(err error) error {
		var ue *url.Error
		if errors.As(err, &ue) {
			// url.Parse errors quote parts of the URL, password included.
			return fmt.Errorf("%s://[unparseable URL]: it does not parse as a URL (percent-encode special characters such as / ? # @ in the password)", scheme)
		}
		return fmt.Errorf("%s: %v", redactURL(rawURL), err)
	}
	switch mode {
	case "":
		o, err := redis.ParseURL(u)
		if err != nil {
			return nil, bad(err)
		}
		o.TLSConfig = withCA(o.TLSConfig)
		return redis.NewClient(o), nil
	case "cluster":
		o, err := redis.ParseClusterURL(u)
		if err != nil {
			return nil, bad(err)
		}
		o.TLSConfig = withCA(o.TLSConfig)
		return redis.NewClusterClient(o), nil
	case "sentinel":
		o, err := redis.ParseFailoverURL(u)
		if err != nil {
			return nil, bad(err)
		}
		o.TLSConfig = withCA(o.TLSConfig)
		return redis.NewFailoverClient(o), nil
	}
	return nil, fmt.Errorf("unsupported scheme %q (want redis, rediss, redis+cluster, redis+sentinel)", scheme)
}

// redactURL hides the password of a Redis URL (userinfo, or a password
// query parameter) for messages; a URL that does not parse is not shown.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme == "" || u.Host == "" {
		scheme, _, ok := strings.Cut(raw, "://")
		if !ok || strings.ContainsAny(scheme, "@:/?#") {
			return "the given value"
		}
		return scheme + "://[unparseable URL]"
	}
	q := u.Query()
	for k := range q {
		if strings.Contains(strings.ToLower(k), "password") {
			q.Set(k, "xxxxx")
		}
	}
	u.RawQuery = q.Encode()
	return u.Redacted()
}
