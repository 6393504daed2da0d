package main

import (
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"strings"
	"time"
)

// What /connect keeps between starting a login and its callback (the
// pending state in Redis) and the note the dashboard shows after it (a
// cookie) are authenticated with a key only refreshers hold. Workers can
// write Redis (the README's ACL keeps them out of tm:connect:*, but a
// store's ACL is not this program's to enforce), and anyone can send a
// cookie; neither holds the operator's credentials.

// loginKeyIterations makes each guess at the operator's credentials from a
// pending state read out of Redis cost a PBKDF2 run.
const loginKeyIterations = 100_000

// loginKey is the key of pending logins. With credentials it is derived
// from them and the redirect URL, so every replica behind one callback URL
// derives the same key and a login may finish on any of them. Without
// credentials the surface is a loopback listener reached through a
// port-forward to one process, where a login starts and finishes: a random
// key of that process serves, and a restart voids pending logins.
func loginKey(creds credentials, redirectURL string) []byte {
	if !creds.none() {
		k, err := pbkdf2.Key(sha256.New, creds.password+"\x00"+creds.token, []byte("tokenmgr connect v1\x00"+redirectURL), loginKeyIterations, 32)
		if err == nil {
			return k
		}
		// Refused parameters (FIPS mode): fall back to a process key.
	}
	k := make([]byte, 32)
	_, _ = rand.Read(k)
	return k
}

// Domains keep a MAC made for one purpose from passing for another.
const (
	domainState = "tokenmgr connect state v1"
	domainFlash = "tokenmgr connected note v1"
)

// mac authenticates parts under domain; each part is length-prefixed, so
// no two lists of parts read alike.
func mac(key []byte, domain string, parts ...string) []byte {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(domain))
	for _, p := range parts {
		h.Write(binary.AppendUvarint(nil, uint64(len(p))))
		h.Write([]byte(p))
	}
	return h.Sum(nil)
}

// sign returns payload with its MAC over domain, binding and payload, as
// stored: "MAC.PAYLOAD" (MAC in base64url).
func sign(key []byte, domain, binding, payload string) string {
	return base64.RawURLEncoding.EncodeToString(mac(key, domain, binding, payload)) + "." + payload
}

var errUnsigned = errors.New("not signed by this refresher")

// verify returns the payload of a value made by sign with the same key,
// domain and binding, or errUnsigned.
func verify(key []byte, domain, binding, signed string) (string, error) {
	tag, payload, ok := strings.Cut(signed, ".")
	got, err := base64.RawURLEncoding.DecodeString(tag)
	if !ok || err != nil || !hmac.Equal(got, mac(key, domain, binding, payload)) {
		return "", errUnsigned
	}
	return payload, nil
}

// connectedNote is the dashboard's note after a login: the grant and its
// new version, until a minute after the callback.
type connectedNote struct {
	Grant   string    `json:"grant"`
	Version int64     `json:"version"`
	Until   time.Time `json:"until"`
}

const noteCookie = "tokenmgr_connected"

// sealNote is the note's cookie value, signed, so that a crafted link or
// cookie cannot put words on the page.
func sealNote(key []byte, n connectedNote) string {
	js, _ := json.Marshal(n)
	return sign(key, domainFlash, "", base64.RawURLEncoding.EncodeToString(js))
}

// openNote reads a note's cookie value; ok is false unless it was made by
// sealNote with key and is still fresh at now.
func openNote(key []byte, value string, now time.Time) (connectedNote, bool) {
	var n connectedNote
	payload, err := verify(key, domainFlash, "", value)
	if err != nil {
		return n, false
	}
	js, err := base64.RawURLEncoding.DecodeString(payload)
	if err != nil || json.Unmarshal(js, &n) != nil || !now.Before(n.Until) {
		return connectedNote{}, false
	}
	return n, true
}
