package tokenmgr

import (
	"fmt"
	"log/slog"
)

// secret holds a token in memory. Every way of printing it prints
// "[redacted]", so a record can go into a log line or an error by mistake
// without leaking the token.
type secret string

const redacted = "[redacted]"

func (secret) String() string               { return redacted }
func (secret) GoString() string             { return redacted }
func (secret) LogValue() slog.Value         { return slog.StringValue(redacted) }
func (secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }

// Format covers %v, %s, %q, %x and the rest, which would otherwise print the
// underlying string for some verbs.
func (secret) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(redacted)) }

// Sealer encrypts token values at rest (invariant 8 in doc.go). grant and
// field are bound into the ciphertext, so a value copied to another grant or
// field does not open. Implementations must be safe for concurrent use.
type Sealer interface {
	Seal(grant, field string, plaintext []byte) (string, error)
	Open(grant, field, stored string) ([]byte, error)
}

const plainPrefix = "plain:"

// plaintext is the Sealer used when none is configured: values are stored
// as "plain:VALUE", so an encrypted value read without a key is a clear error
// rather than a token that the provider rejects.
type plaintext struct{}

func (plaintext) Seal(_, _ string, p []byte) (string, error) { return plainPrefix + string(p), nil }

func (plaintext) Open(grant, field, stored string) ([]byte, error) {
	if len(stored) < len(plainPrefix) || stored[:len(plainPrefix)] != plainPrefix {
		return nil, fmt.Errorf("field %s of grant %q is not a plaintext value (encrypted? configure the Sealer with its key)", field, grant)
	}
	return []byte(stored[len(plainPrefix):]), nil
}
