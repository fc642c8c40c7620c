package pemkey

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8 := func(k any) []byte {
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	sec1, err := x509.MarshalECPrivateKey(ec)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name    string
		blk     *pem.Block
		pub     any
		wantErr string
	}{
		{"PKCS#8 EC", &pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8(ec)}, ec.Public(), ""},
		{"PKCS#8 Ed25519", &pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8(ed)}, ed.Public(), ""},
		{"SEC1", &pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1}, ec.Public(), ""},
		{"PKCS#1", &pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rk)}, rk.Public(), ""},
		{"legacy encrypted", &pem.Block{Type: "RSA PRIVATE KEY", Headers: map[string]string{"Proc-Type": "4,ENCRYPTED"}}, nil, "legacy encrypted PEM"},
		{"certificate", &pem.Block{Type: "CERTIFICATE"}, nil, `PEM block "CERTIFICATE" is not a private key`},
		{"bad DER", &pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1, 2, 3}}, nil, "parse key: "},
		{"wrong type for the block", &pem.Block{Type: "EC PRIVATE KEY", Bytes: pkcs8(rk)}, nil, "parse key: "},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Parse(tt.blk)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %v, want an error containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !s.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(tt.pub) {
				t.Fatalf("got public key %v, want %v", s.Public(), tt.pub)
			}
		})
	}
	if _, err := Signer("not a key"); err == nil || !strings.Contains(err.Error(), "key type string cannot sign") {
		t.Fatalf("Signer(string) = %v", err)
	}
}

func FuzzParse(f *testing.F) {
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(ec)
	sec1, _ := x509.MarshalECPrivateKey(ec)
	f.Add("PRIVATE KEY", der)
	f.Add("EC PRIVATE KEY", sec1)
	f.Add("RSA PRIVATE KEY", []byte{0x30, 0x03, 0x02, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, typ string, b []byte) {
		s, err := Parse(&pem.Block{Type: typ, Bytes: b})
		if (s == nil) == (err == nil) {
			t.Fatalf("Parse(%q, %x) = %v, %v", typ, b, s, err)
		}
	})
}
