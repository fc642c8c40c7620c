package handshake

import (
	"bytes"
	"context"
	"provision/internal/testutil"
	"sync"
	"testing"
	"time"
)

// The built-in server's certificate comes from its own throwaway CA, never the station's: a client that trusts only the
// station root refuses it, and nothing in its chain is the station's issuing CA.
func TestBuiltinServerOwnCA(t *testing.T) {
	ca := testutil.NewCA(t, "station")
	srv := builtin(t, ca)
	c := client(t, ca, testutil.ECKey(), "device-1")
	if _, err := Test(context.Background(), srv.URL(), srv.Roots(), c); err != nil {
		t.Fatal(err)
	}
	_, err := Test(context.Background(), srv.URL(), ca.Pool(), c)
	wantReason(t, err, ErrServerUntrusted)
	leaf, err := srv.certificate()
	if err != nil {
		t.Fatal(err)
	}
	for _, der := range leaf.Certificate {
		if bytes.Equal(der, ca.Issuing.Raw) || bytes.Equal(der, ca.Root.Raw) {
			t.Fatal("the built-in server's chain holds a station CA certificate")
		}
	}
	if bytes.Equal(leaf.Leaf.RawIssuer, ca.Issuing.RawSubject) || bytes.Equal(leaf.Leaf.AuthorityKeyId, ca.Issuing.SubjectKeyId) {
		t.Fatal("the built-in server's certificate is issued by the station's issuing CA")
	}
}

// A server whose certificate is valid for a few seconds keeps passing handshakes after it expired: it was renewed.
func TestBuiltinServerRenews(t *testing.T) {
	ca := testutil.NewCA(t, "station")
	srv, err := NewServer(ca.Pool(), WithLeafValidity(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	c := client(t, ca, testutil.ECKey(), "device-1")
	first, err := srv.certificate()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Test(context.Background(), srv.URL(), srv.Roots(), c); err != nil {
		t.Fatal(err)
	}
	// Wait (bounded) until the first certificate has expired by the client's clock.
	deadline := time.Now().Add(30 * time.Second)
	for !time.Now().After(first.Leaf.NotAfter.Add(time.Second)) {
		if time.Now().After(deadline) {
			t.Fatal("clock did not pass the certificate's expiry")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := Test(context.Background(), srv.URL(), srv.Roots(), c); err != nil {
		t.Fatalf("after the first certificate expired: %v", err)
	}
	second, _ := srv.certificate()
	if second.Leaf.SerialNumber.Cmp(first.Leaf.SerialNumber) == 0 {
		t.Fatal("certificate not renewed")
	}
}

// Renewal follows the server's clock: nothing is renewed while more than half the validity is left, then it is.
func TestBuiltinServerRenewalClock(t *testing.T) {
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	srv, err := NewServer(testutil.NewCA(t, "station").Pool(), WithServerClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	a, _ := srv.certificate()
	advance(20 * time.Minute)
	if b, _ := srv.certificate(); b != a {
		t.Fatal("renewed with 40 minutes left")
	}
	advance(15 * time.Minute)
	b, _ := srv.certificate()
	if b == a {
		t.Fatal("not renewed with 25 minutes left")
	}
	if !b.Leaf.NotAfter.After(a.Leaf.NotAfter) {
		t.Fatalf("renewed certificate expires %v, not after %v", b.Leaf.NotAfter, a.Leaf.NotAfter)
	}
}
