package station

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"provision/image"
	"provision/image/golden"
	"provision/internal/testutil"
	"provision/inventory"
)

func goldenImage(tb testing.TB) string {
	tb.Helper()
	return testutil.GoldenImage(tb, golden.Options{})
}

// Two runs on one serial at once: the second is refused while the first holds the unit, naming who holds it; once the
// first is done the serial is free again. (Before: both ran, and both could report SHIPPABLE while one image held a
// superseded certificate.)
func TestOneRunPerUnit(t *testing.T) {
	s := newStation(t)
	d := openDevice(t, "soft")
	img1, img2 := goldenImage(t), goldenImage(t)
	ctx := context.Background()
	inKey, proceed := make(chan struct{}), make(chan struct{})
	first := make(chan error, 1)
	go func() {
		_, err := s.Provision(ctx, d, ProvisionRequest{Serial: "SN-CLAIM-1", Image: img1, Operator: "alice"}, func(e Event) {
			if e.Step == StepKey && e.Status == StatusStarted {
				close(inKey)
				<-proceed
			}
		})
		first <- err
	}()
	<-inKey
	_, err := s.Provision(ctx, d, ProvisionRequest{Serial: "SN-CLAIM-1", Image: img2, Operator: "bob"}, nil)
	close(proceed)
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "is being provisioned by pid") || !strings.Contains(err.Error(), "alice") {
		t.Fatalf("second run: got %v, want ErrRefused naming the holder", err)
	}
	if err := <-first; err != nil {
		t.Fatalf("first run: %v", err)
	}
	if _, err := s.Provision(ctx, d, ProvisionRequest{Serial: "SN-CLAIM-1", Image: img2, Reprovision: true}, nil); err != nil {
		t.Fatalf("after the first run ended the serial must be free: %v", err)
	}
	if n := activeCount(t, s, "SN-CLAIM-1"); n != 1 {
		t.Fatalf("%d active certificates", n)
	}
	// A dead holder's lock file (left by a killed process: the kernel dropped its lock) is taken over.
	os.MkdirAll(s.Layout.claimDir(), 0o700)
	os.WriteFile(filepath.Join(s.Layout.claimDir(), "SN-CLAIM-2.lock"), []byte("pid 1 on gone (operator x, since 00:00:00)"), 0o600)
	if _, err := s.Provision(ctx, d, ProvisionRequest{Serial: "SN-CLAIM-2", Image: img1}, nil); err != nil {
		t.Fatalf("stale claim not taken over: %v", err)
	}
}

// A handshake that times out is a failed handshake, recorded as such (before: the unit stayed "verified", as if the
// run had been interrupted).
func TestHandshakeTimeoutIsRecordedAsFailure(t *testing.T) {
	s := newStation(t)
	d := openDevice(t, "soft")
	img := goldenImage(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() { // accepts and never answers
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	hc, err := s.HandshakeConfig([]string{"tls://" + ln.Addr().String()}, "")
	if err != nil {
		t.Fatal(err)
	}
	hc.Timeout = 300 * time.Millisecond
	_, err = s.Provision(context.Background(), d, ProvisionRequest{Serial: "SN-TIMEOUT-1", Image: img, Handshake: hc}, nil)
	var se *StepError
	if !errors.As(err, &se) || se.Step != StepHandshake {
		t.Fatalf("got %v, want a handshake StepError", err)
	}
	u, err := s.Inv.Unit(context.Background(), "SN-TIMEOUT-1")
	if err != nil || u.State != inventory.StateFailed || u.FailedStep != string(StepHandshake) {
		t.Fatalf("unit %+v (%v), want failed at handshake", u, err)
	}
}

// The unit's fields (batch CSV columns) are stored with it, and a resumed run keeps them and the key fingerprint
// (before: a resume emptied public_sha256, and a run without the CSV rendered different files).
func TestFieldsAndFingerprintSurviveResume(t *testing.T) {
	s := newStation(t)
	d := openDevice(t, "soft")
	img := goldenImage(t)
	ctx := context.Background()
	cfg := *s.Config
	data := strings.Replace(string(cfg.Marshal()), `subject: "CN=device-{serial}, O=Example Devices, OU=Manufacturing"`,
		`subject: "CN=device-{serial}, O=Example Devices, OU={line}"`, 1)
	c, err := ParseConfig("station.yaml", []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	s.Config = c
	// First run: the handshake fails (nothing listens), after the image was written.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	hc, err := s.HandshakeConfig([]string{"tls://" + dead}, "")
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{"line": "L7"}
	res, err := s.Provision(ctx, d, ProvisionRequest{Serial: "SN-FIELDS-1", Fields: fields, Image: img, Handshake: hc}, nil)
	if err == nil {
		t.Fatal("handshake to a closed port passed")
	}
	if got := res.Certificate.Subject.OrganizationalUnit; len(got) != 1 || got[0] != "L7" {
		t.Fatalf("subject OU %v", got)
	}
	u1, _ := s.Inv.Unit(ctx, "SN-FIELDS-1")
	if u1.PublicSHA256 == "" || u1.Fields["line"] != "L7" {
		t.Fatalf("after run 1: %+v", u1)
	}
	// Second run without the CSV: resumes from the image with the stored fields; fingerprint kept.
	res2, err := s.Provision(ctx, d, ProvisionRequest{Serial: "SN-FIELDS-1", Image: img}, nil)
	if err != nil {
		t.Fatalf("resume: %v", err)
	}
	if res2.CertSHA256 != res.CertSHA256 {
		t.Fatalf("resume issued a new certificate")
	}
	u2, _ := s.Inv.Unit(ctx, "SN-FIELDS-1")
	if u2.State != inventory.StateShippable || u2.PublicSHA256 != u1.PublicSHA256 || u2.Fields["line"] != "L7" {
		t.Fatalf("after resume: %+v, want shippable with fingerprint %s and fields kept", u2, u1.PublicSHA256)
	}
}

// Cancelling a run between steps reports the next step cancelled, keeps the unit's last state, records an
// "interrupted" event, and the error is ErrInterrupted and context.Canceled (exit 130). The next run resumes.
func TestInterruptBetweenSteps(t *testing.T) {
	s := newStation(t)
	d := openDevice(t, "soft")
	img := goldenImage(t)
	ctx, cancel := context.WithCancel(context.Background())
	var statuses []string
	res, err := s.Provision(ctx, d, ProvisionRequest{Serial: "SN-INT-1", Image: img}, func(e Event) {
		statuses = append(statuses, string(e.Step)+":"+e.Status)
		if e.Step == StepSign && e.Status == StatusOK {
			cancel()
		}
	})
	if !errors.Is(err, ErrInterrupted) || !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want ErrInterrupted wrapping context.Canceled", err)
	}
	if last := statuses[len(statuses)-1]; last != "image:cancelled" {
		t.Fatalf("events %v, want the image step cancelled last", statuses)
	}
	if res.State != inventory.StateCertified {
		t.Fatalf("result state %q", res.State)
	}
	u, _ := s.Inv.Unit(context.Background(), "SN-INT-1")
	if u.State != inventory.StateCertified {
		t.Fatalf("unit state %q, want certified (the last completed step)", u.State)
	}
	evs, err := s.Inv.Events(context.Background(), "SN-INT-1")
	if err != nil {
		t.Fatal(err)
	}
	if last := evs[len(evs)-1]; last.Outcome != OutcomeInterrupted || last.Step != string(StepImage) {
		t.Fatalf("last event %+v, want interrupted at image", last)
	}
	if _, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: "SN-INT-1", Image: img}, nil); err != nil {
		t.Fatalf("rerun after interruption: %v", err)
	}
	if n := activeCount(t, s, "SN-INT-1"); n != 1 {
		t.Fatalf("%d active certificates", n)
	}
}

// Everything that would make the image step refuse a unit is found in validate, before any key or certificate exists:
// a retry of a bad image issues nothing (before: the key and certificate were made, then the image step failed).
func TestPreflightBeforeKey(t *testing.T) {
	s := newStation(t)
	d := openDevice(t, "soft")
	ctx := context.Background()
	dir := t.TempDir()
	corrupt := filepath.Join(dir, "corrupt.img")
	junk := make([]byte, 4<<20)
	for i := range junk {
		junk[i] = byte(i*7 + i>>9)
	}
	os.WriteFile(corrupt, junk, 0o644)
	testutil.RequireTool(t, golden.Tools...)
	full := filepath.Join(dir, "full.img")
	if err := golden.Build(ctx, full, golden.Options{BootMiB: 33, RootfsMiB: 24, DataMiB: 16, FillData: true}); err != nil {
		t.Fatal(err)
	}
	fillPartition(t, full, 4, 1<<10) // leave 1 KiB: less than the key and certificate files need

	good := goldenImage(t)
	withConfig := func(t *testing.T, from, to string) {
		data := strings.Replace(string(s.Config.Marshal()), from, to, 1)
		c, err := ParseConfig("station.yaml", []byte(data))
		if err != nil {
			t.Fatal(err)
		}
		old := s.Config
		s.Config = c
		t.Cleanup(func() { s.Config = old })
	}
	for _, tc := range []struct {
		name, image, profile, want string
		config                     func(t *testing.T)
	}{
		{name: "missing image", image: filepath.Join(dir, "nope.img"), want: "no such file"},
		{name: "corrupt image", image: corrupt, want: "not a disk image"},
		{name: "full image", image: full, want: "free"},
		{name: "unknown profile", image: good, profile: "nosuch", want: "nosuch"},
		{name: "wrong layout", image: good, profile: "odd", want: "label=nosuch", config: func(t *testing.T) {
			withConfig(t, "\nprofile: ", "\nprofiles:\n  odd:\n    base: mender\n    partitions:\n      data: {select: \"label=nosuch\", mount: /data}\nprofile: ")
		}},
		{name: "unusable server_ca", image: good, want: "server_ca", config: func(t *testing.T) {
			withConfig(t, `server_ca: "ca/root.crt"`, `server_ca: "ca/missing.pem"`)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.config != nil {
				tc.config(t)
			}
			serial := "SN-PRE-" + strings.ReplaceAll(tc.name, " ", "-")
			for try := 0; try < 2; try++ { // the operator's retry issues nothing either
				var steps []string
				_, err := s.Provision(ctx, d, ProvisionRequest{Serial: serial, Image: tc.image, Profile: tc.profile}, func(e Event) {
					steps = append(steps, string(e.Step)+":"+e.Status)
				})
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("got %v, want an error mentioning %q", err, tc.want)
				}
				if last := steps[len(steps)-1]; last != "validate:failed" {
					t.Fatalf("steps %v: want the unit to stop at validate", steps)
				}
			}
			if certs, _ := s.Inv.Certificates(ctx, serial); len(certs) != 0 {
				t.Fatalf("%d certificates issued for a unit that failed validate", len(certs))
			}
		})
	}
	if _, err := s.HandshakeConfig([]string{"mqtts://broker.example"}, ""); !errors.Is(err, ErrEndpoint) || !strings.Contains(err.Error(), "no port") {
		t.Fatalf("endpoint without a port: %v", err)
	}
}

// fillPartition writes a filler file into partition n so that about leave bytes stay free.
func fillPartition(t *testing.T, img string, n int, leave int64) {
	t.Helper()
	ctx := context.Background()
	im, err := image.Open(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	p, err := im.Select(strconv.Itoa(n))
	if err != nil {
		t.Fatal(err)
	}
	fsys, err := im.FS(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	free, _, err := fsys.Free()
	if err != nil {
		t.Fatal(err)
	}
	size := free - leave - 4096 // the filler's own extent blocks
	if err := fsys.WriteFile("/preflight-filler.bin", make([]byte, size), 0o644, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := fsys.Close(); err != nil {
		t.Fatal(err)
	}
}

// verify renders the profile with the unit's stored fields, so a profile whose templates use .Fields verifies (before:
// every such unit failed verify, which rendered without them).
func TestVerifyUsesStoredFields(t *testing.T) {
	s := newStation(t)
	d := openDevice(t, "soft")
	img := goldenImage(t)
	data := strings.Replace(string(s.Config.Marshal()), "\nprofile: ", "\nprofiles:\n  sited:\n    base: mender\n"+
		"    json_merge:\n      - {to: \"rootfs:/etc/site.json\", create: true, set: {Site: \"{{.Fields.site}}\"}}\nprofile: ", 1)
	c, err := ParseConfig("station.yaml", []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	s.Config = c
	ctx := context.Background()
	if _, err := s.Provision(ctx, d, ProvisionRequest{Serial: "SN-SITE-1", Fields: map[string]string{"site": "Lyon"}, Image: img,
		Profile: "sited"}, nil); err != nil {
		t.Fatal(err)
	}
	checks, err := s.VerifyImage(ctx, img, "SN-SITE-1", VerifyOptions{Profile: "sited"})
	if err != nil {
		for _, c := range checks {
			if !c.OK {
				t.Errorf("%s: %s", c.Name, c.Detail)
			}
		}
		t.Fatal(err)
	}
}
