package tokenmgr

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
)

// Keyring is a Sealer: AES-256-GCM envelope encryption of token values
// with key ids, so keys can rotate. The newest key (the last given)
// encrypts; every key decrypts. The grant and field names are bound as
// additional data, so a value copied to another grant or field does not
// open. Stored values look like "enc:v1:KEYID:BASE64URL(nonce|ciphertext)";
// the rest of the record stays readable in redis-cli.
//
// Values stored as "plain:..." are refused: anyone able to write to Redis
// could otherwise slip in a token of their choosing. To migrate a store
// written before encryption was on, rewrap it with WithPlaintextReads.
type Keyring struct {
	aeads       map[string]cipher.AEAD
	active      string
	acceptPlain bool
}

// WithPlaintextReads returns a copy of the keyring that also reads
// "plain:" values, for migrating to encryption (refresher rewrap
// --accept-plaintext). Do not give it to workers.
func (kr *Keyring) WithPlaintextReads() *Keyring {
	c := *kr
	c.acceptPlain = true
	return &c
}

// Key is one AES-256 key and its id.
type Key struct {
	ID     string
	Secret []byte // 32 bytes
}

// String never shows key material.
func (k Key) String() string { return "Key(" + k.ID + ", " + redacted + ")" }

// GoString never shows key material.
func (k Key) GoString() string { return k.String() }

var keyIDPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,32}$`)

const encPrefix = "enc:v1:"

// NewKeyring builds a keyring; the last key encrypts.
func NewKeyring(keys ...Key) (*Keyring, error) {
	if len(keys) == 0 {
		return nil, errors.New("tokenmgr: keyring: no keys")
	}
	kr := &Keyring{aeads: map[string]cipher.AEAD{}}
	for i, k := range keys {
		if !keyIDPattern.MatchString(k.ID) {
			// Not quoted: a key written the wrong way round would put
			// its material in the message.
			return nil, fmt.Errorf("tokenmgr: keyring: key %d: the id must be 1-32 of A-Z a-z 0-9 _ - (is the entry ID:BASE64?)", i+1)
		}
		if len(k.Secret) != 32 {
			return nil, fmt.Errorf("tokenmgr: keyring: key %q is %d bytes, want 32 (AES-256)", k.ID, len(k.Secret))
		}
		if weakKey(k.Secret) {
			return nil, fmt.Errorf("tokenmgr: keyring: key %q does not look random (make one with: head -c32 /dev/urandom | base64)", k.ID)
		}
		if _, dup := kr.aeads[k.ID]; dup {
			return nil, fmt.Errorf("tokenmgr: keyring: key id %q given twice", k.ID)
		}
		block, err := aes.NewCipher(k.Secret)
		if err != nil {
			return nil, fmt.Errorf("tokenmgr: keyring: key %q: %w", k.ID, err)
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			return nil, fmt.Errorf("tokenmgr: keyring: key %q: %w", k.ID, err)
		}
		kr.aeads[k.ID] = aead
		kr.active = k.ID
	}
	return kr, nil
}

// ParseKeyring reads keys written as "ID:BASE64" (standard or URL base64 of
// 32 bytes), separated by commas or newlines; blank lines and lines
// starting with # are skipped. The last key encrypts. Errors never quote
// key material.
func ParseKeyring(s string) (*Keyring, error) {
	var entries []string
	for _, line := range strings.Split(s, "\n") {
		if line = strings.TrimSpace(line); line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		for _, e := range strings.Split(line, ",") {
			if e = strings.TrimSpace(e); e != "" {
				entries = append(entries, e)
			}
		}
	}
	var keys []Key
	for i, line := range entries {
		id, b64, ok := strings.Cut(line, ":")
		if !ok {
			return nil, fmt.Errorf("tokenmgr: keyring: entry %d: want ID:BASE64", i+1)
		}
		id = strings.TrimSpace(id)
		if !keyIDPattern.MatchString(id) {
			return nil, fmt.Errorf("tokenmgr: keyring: entry %d: the id must be 1-32 of A-Z a-z 0-9 _ - (is the entry ID:BASE64?)", i+1)
		}
		secret, err := decodeKey(strings.TrimSpace(b64))
		if err != nil {
			return nil, fmt.Errorf("tokenmgr: keyring: key %q: not base64", id)
		}
		keys = append(keys, Key{ID: id, Secret: secret})
	}
	return NewKeyring(keys...)
}

// weakKey catches keys that are not random: all one byte, or so few
// distinct bytes that they must come from a pattern or a short alphabet (32
// random bytes have fewer than 16 distinct values with negligible odds).
func weakKey(b []byte) bool {
	seen := map[byte]bool{}
	for _, c := range b {
		seen[c] = true
	}
	return len(seen) < 16
}

func decodeKey(s string) ([]byte, error) {
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if b, err := enc.DecodeString(s); err == nil {
			return b, nil
		}
	}
	return nil, errors.New("not base64")
}

// GenerateKey makes a random key, e.g. for `refresher` key files or the
// embedded demo's ephemeral key.
func GenerateKey(id string) (Key, error) {
	k := Key{ID: id, Secret: make([]byte, 32)}
	if _, err := rand.Read(k.Secret); err != nil {
		return Key{}, err
	}
	return k, nil
}

// Encode renders a key as "ID:BASE64" for a key file.
func (k Key) Encode() string { return k.ID + ":" + base64.StdEncoding.EncodeToString(k.Secret) }

// ActiveKeyID is the id of the key that encrypts.
func (kr *Keyring) ActiveKeyID() string { return kr.active }

func additionalData(grant, field string) []byte {
	return []byte("tokenmgr:v1\x00" + grant + "\x00" + field)
}

// Seal encrypts plaintext for one field of one grant with the active key.
func (kr *Keyring) Seal(grant, field string, plaintext []byte) (string, error) {
	aead := kr.aeads[kr.active]
	nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(plaintext)+aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return "", err
	}
	sealed := aead.Seal(nonce, nonce, plaintext, additionalData(grant, field))
	return encPrefix + kr.active + ":" + base64.RawURLEncoding.EncodeToString(sealed), nil
}

// Open decrypts a stored value. Its errors say what is wrong without
// quoting the value.
func (kr *Keyring) Open(grant, field, stored string) ([]byte, error) {
	if strings.HasPrefix(stored, plainPrefix) {
		if kr.acceptPlain {
			return []byte(stored[len(plainPrefix):]), nil
		}
		return nil, errors.New("stored in plaintext while encryption is on (an injected value, or data from before encryption: run refresher rewrap --accept-plaintext)")
	}
	rest, ok := strings.CutPrefix(stored, encPrefix)
	if !ok {
		return nil, errors.New("not an encrypted value (want enc:v1:KEYID:...)")
	}
	id, b64, ok := strings.Cut(rest, ":")
	if !ok {
		return nil, errors.New("encrypted value without a key id")
	}
	aead := kr.aeads[id]
	if aead == nil {
		return nil, fmt.Errorf("sealed with key id %q, which is not in the keyring (have %s)", id, strings.Join(kr.ids(), ", "))
	}
	raw, err := base64.RawURLEncoding.DecodeString(b64)
	if err != nil || len(raw) < aead.NonceSize()+aead.Overhead() {
		return nil, fmt.Errorf("encrypted value is truncated or not base64 (key %q)", id)
	}
	pt, err := aead.Open(nil, raw[:aead.NonceSize()], raw[aead.NonceSize():], additionalData(grant, field))
	if err != nil {
		return nil, fmt.Errorf("does not decrypt with key %q: wrong key material, a damaged value, or a value copied from another grant or field", id)
	}
	return pt, nil
}

func (kr *Keyring) ids() []string {
	ids := make([]string, 0, len(kr.aeads))
	for id := range kr.aeads {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}
