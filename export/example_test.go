package export_test

import (
	"crypto/ed25519"
	"crypto/x509"
	"fmt"
	"os"
	"time"

	"provision/export"
)

// Mender preauthorization from a unit whose public key the station knows: one JSON line per unit.
func ExampleMender() {
	pub := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize)).Public()
	der, _ := x509.MarshalPKIXPublicKey(pub)
	units := []export.Unit{{Serial: "SN-0001", State: "shippable", KeyKind: "soft", PublicKey: der}}
	skipped, err := export.Mender(os.Stdout, units)
	fmt.Println(len(skipped), err)
	// Output:
	// {"identity_data":{"serial":"SN-0001"},"pubkey":"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAO2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=\n-----END PUBLIC KEY-----\n"}
	// 0 <nil>
}

// The manifest and its detached signature: FILE and FILE.sig.
func ExampleSign() {
	key := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))
	doc, _ := export.Manifest("line-1", time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC), nil)
	sig, _ := export.Sign(key, doc)
	fmt.Println(len(sig), export.Verify(key.Public().(ed25519.PublicKey), doc, sig))
	// Output: 64 true
}
