package simulator

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	gotpmsim "github.com/google/go-tpm/tpm2/transport/simulator"

	"provision/tpm"
)

// The root is the same on every run, and self-signed.
func TestEKRoot(t *testing.T) {
	r := EKRoot()
	if err := r.CheckSignatureFrom(r); err != nil || !r.IsCA {
		t.Fatalf("root: CA %v, %v", r.IsCA, err)
	}
	blk, _ := pem.Decode(EKRootPEM())
	if blk == nil || !bytes.Equal(blk.Bytes, r.Raw) {
		t.Fatal("EKRootPEM is not EKRoot")
	}
	rootOnce2, err := rootOnce()
	if err != nil || !bytes.Equal(rootOnce2.cert.Raw, r.Raw) {
		t.Fatal(err)
	}
}

// A `sim` TPM holds an EK certificate for its own EK, chaining to EKRoot.
func TestSimulatorEKCertificate(t *testing.T) {
	ctx := context.Background()
	for i := 0; i < 2; i++ { // every Open is a fresh TPM, manufactured anew
		d, err := tpm.Open(ctx, "sim", tpm.WithSimulator(Open))
		if err != nil {
			t.Fatal(err)
		}
		certs, chain, err := d.EKCertificates(ctx)
		if err != nil || len(certs) != 1 || certs[0].Index != EKCertIndex || len(chain) != 0 {
			t.Fatalf("EK certificates %v %v: %v", certs, chain, err)
		}
		cert, err := x509.ParseCertificate(certs[0].Data)
		if err != nil {
			t.Fatal(err)
		}
		// The critical DirectoryName SAN is the TCG form; the caller handles it, as tpm/attest does.
		cert.UnhandledCriticalExtensions = slices.DeleteFunc(cert.UnhandledCriticalExtensions,
			func(o asn1.ObjectIdentifier) bool { return o.Equal(oidSAN) })
		roots := x509.NewCertPool()
		roots.AddCert(EKRoot())
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
			CurrentTime: time.Now()}); err != nil {
			t.Fatal(err)
		}
		if len(cert.Subject.Names) != 0 || len(cert.UnknownExtKeyUsage) != 1 || !cert.UnknownExtKeyUsage[0].Equal(oidEKCertificate) {
			t.Fatalf("subject %v, EKU %v", cert.Subject, cert.UnknownExtKeyUsage)
		}
		info, err := d.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(cert.Raw, []byte(idOf(info.Manufacturer))) {
			t.Fatalf("certificate does not name manufacturer %s", idOf(info.Manufacturer))
		}
		ek, err := d.EndorsementKey(ctx, EKCertIndex, cert.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		if ek.Persistent || !keyEqual(ek.PublicKey, cert.PublicKey) {
			t.Fatalf("EK %s does not hold the certified key", ek.Template)
		}
		ek.Close()
		if hs, err := d.TransientHandles(ctx); err != nil || len(hs) != 0 {
			t.Fatalf("transient handles left: %x, %v", hs, err)
		}
		d.Close()
	}
}

func idOf(m uint32) string { return fmt.Sprintf("id:%08X", m) }

func keyEqual(a, b any) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && e.Equal(b)
}

// How long manufacturing adds to starting the simulator.
func TestManufactureTime(t *testing.T) {
	sim, err := gotpmsim.OpenSimulator()
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	start := time.Now()
	if err := manufacture(sim); err != nil {
		t.Fatal(err)
	}
	t.Logf("manufacture: %s", time.Since(start))
	if _, err := (tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(EKCertIndex)}).Execute(sim); err != nil {
		t.Fatal(err)
	}
}
