package station

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"

	"provision/image"
	"provision/inventory"
	"provision/station/ca"
	"provision/station/profile"
	"provision/tpm"
)

// sink is where a unit's identity goes and how it is checked there: the image step delivers it, the verify step checks
// it, a resumed run reloads the key and certificate delivered earlier, and validate's pre-flight finds, before any key
// exists, what would make delivery refuse. unit, tui and batch deliver into the unit's image (imageSink); tests use a
// sink of their own.
type sink interface {
	// refuse says why a unit recorded as u must not run again (ErrRefused), or nil.
	refuse(ctx context.Context, r *run, u inventory.Unit) error
	preflight(ctx context.Context, r *run) error
	deliver(ctx context.Context, r *run) (detail string, err error)
	check(ctx context.Context, r *run) (detail string, err error)
	reload(ctx context.Context, r *run) bool
}

// imageSink delivers into the unit's disk image (raw file or block device) as its profile says.
type imageSink struct{}

func (imageSink) preflight(ctx context.Context, r *run) error { return r.preflight(ctx) }

// refuse: a shippable unit is done; only --reprovision runs it again.
func (imageSink) refuse(ctx context.Context, r *run, u inventory.Unit) error {
	if u.State != inventory.StateShippable || r.req.Reprovision {
		return nil
	}
	return fmt.Errorf("unit %s is already provisioned (shippable since %s, operator %s): use --reprovision to do it again: %w",
		r.req.Serial, u.Updated.Local().Format("2006-01-02 15:04"), u.Operator, ErrRefused)
}

// loadFromImage reuses the key and certificate an earlier run wrote into the image, when the certificate is the unit's
// active one and the key loads on this TPM. Any doubt means starting over.
func (imageSink) reload(ctx context.Context, r *run) bool {
	active, err := r.s.Inv.ActiveCertificate(ctx, r.req.Serial)
	if err != nil {
		return false
	}
	plan, err := r.planFor(profile.Material{Serial: r.req.Serial, Fields: r.req.Fields, KeyKind: tpm.KindSoft})
	if err != nil {
		return false
	}
	keyPEM, certPEM, err := readIdentity(ctx, r.req.Image, plan, r.s.ImageOptions(r.req.Image)...)
	if err != nil {
		return false
	}
	certs, err := ca.ParseCerts(certPEM)
	if err != nil || ca.Fingerprint(certs[0]) != active.SHA256 {
		return false
	}
	switch pemType(keyPEM) {
	case "TSS2 PRIVATE KEY":
		if r.dev.Kind() != tpm.KindTPM {
			return false
		}
		// The key step is skipped on resume: the session its signatures need starts here (a failure starts over,
		// and the key step then reports it).
		if _, err := r.startSession(ctx); err != nil {
			return false
		}
		k, err := tpm.LoadKeyFile(ctx, r.dev, keyPEM)
		if err != nil {
			return false
		}
		r.key, r.closeFn, r.keyKind = k, k.Close, tpm.KindTPM
	default:
		signer, err := ca.ParseKey(keyPEM, nil)
		if err != nil {
			return false
		}
		r.key, r.keyKind = signer, tpm.KindSoft
	}
	if !publicEqual(r.key.Public(), certs[0].PublicKey) {
		r.closeKey()
		r.key = nil
		return false
	}
	if r.pubSHA, err = publicSHA256(r.key.Public()); err != nil {
		r.closeKey()
		r.key = nil
		return false
	}
	r.keyPEM = keyPEM
	r.res.Certificate, r.res.CertSHA256, r.res.KeyKind = certs[0], active.SHA256, r.keyKind
	return true
}

func (r *run) planFor(m profile.Material) (*profile.Plan, error) {
	prof, err := r.profile()
	if err != nil {
		return nil, err
	}
	return prof.Plan(r.profileName(), r.s.Layout, m)
}

func (r *run) profileName() string {
	if r.req.Profile != "" {
		return r.req.Profile
	}
	return r.s.Config.Profile
}

// profile is the unit's profile, resolved.
func (r *run) profile() (*profile.Profile, error) { return r.s.Config.ResolveProfile(r.profileName()) }

func (r *run) material() (profile.Material, error) {
	serverCA, err := r.s.ServerCA()
	if err != nil {
		return profile.Material{}, err
	}
	return profile.Material{Serial: r.req.Serial, Fields: r.req.Fields, KeyKind: r.keyKind, Cert: ca.EncodeCerts(r.res.Certificate),
		Issuing: ca.EncodeCerts(r.s.CA.Issuing), Root: ca.EncodeCerts(r.s.CA.Root), ServerCA: serverCA, Key: r.keyPEM,
		AKCert: r.akCertPEM(), AKKey: r.akKeyPEM()}, nil
}

func (imageSink) deliver(ctx context.Context, r *run) (string, error) {
	m, err := r.material()
	if err != nil {
		return "", err
	}
	plan, err := r.planFor(m)
	if err != nil {
		return "", err
	}
	r.plan = plan
	for _, f := range plan.Files {
		if (f.From == "ak_cert" || f.From == "ak_key") && len(f.Data) == 0 {
			return "", fmt.Errorf("profile %s: %s: the unit has no attestation key (a software key, or attestation: off): "+
				"write it only for TPM units (when: tpm) with attestation: record or required: %w", plan.Profile, f.DevicePath, ErrProfile)
		}
	}
	if err := Inject(ctx, r.req.Image, plan, r.s.ImageOptions(r.req.Image)...); err != nil {
		return "", err
	}
	detail := fmt.Sprintf("%d files, profile %s, synced", len(plan.Files)+len(plan.Merges), plan.Profile)
	if plan.OpenSSL.Form != "" {
		detail += "; TPM OpenSSL " + plan.OpenSSL.String()
	}
	return detail, nil
}

func (imageSink) check(ctx context.Context, r *run) (string, error) {
	checks, err := r.s.VerifyImage(ctx, r.req.Image, r.req.Serial, VerifyOptions{Profile: r.req.Profile})
	if err != nil {
		for _, c := range checks {
			if !c.OK {
				return "", fmt.Errorf("%s: %s: %w", c.Name, c.Detail, err)
			}
		}
		return "", err
	}
	return fmt.Sprintf("%d checks passed", len(checks)), nil
}

// readIdentity reads the key file and certificate file a plan writes, from the first partition each goes to.
func readIdentity(ctx context.Context, imagePath string, plan *profile.Plan, opts ...image.OpenOption) (keyPEM, certPEM []byte, err error) {
	im, err := image.Open(ctx, imagePath, append(opts, image.ReadOnly())...)
	if err != nil {
		return nil, nil, err
	}
	defer im.Close()
	parts, err := resolvePartitions(im, plan)
	if err != nil {
		return nil, nil, err
	}
	v := &verifier{im: im, ctx: ctx}
	for _, f := range plan.Files {
		switch {
		case f.From == "key" && keyPEM == nil:
			keyPEM, err = v.read(parts[f.Part].parts[0], f.Path)
		case (f.From == "cert" || f.From == "cert+chain") && certPEM == nil:
			certPEM, err = v.read(parts[f.Part].parts[0], f.Path)
		}
		if err != nil {
			return nil, nil, err
		}
	}
	if keyPEM == nil || certPEM == nil {
		return nil, nil, errors.New("profile writes no key or no certificate")
	}
	return keyPEM, certPEM, nil
}

// pemType is the type of the first PEM block.
func pemType(b []byte) string {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return ""
	}
	return blk.Type
}
