package station

import (
	"context"
	"fmt"
	"strconv"

	"provision/image"
	"provision/station/ca"
	"provision/station/profile"
	"provision/tpm"
)

// Placeholder sizes for the pre-flight: upper bounds of what the key step and the CA produce, so an image that passes
// the pre-flight has room for the real files.
const (
	preflightKeyBytes  = 2048 // PEM: a TSS2 key file of an RSA-2048 key is about 1.3 KiB, an RSA-2048 software key 1.7 KiB
	preflightCertBytes = 2048 // a leaf certificate in PEM is about 1 KiB (the chain is added at its real size)
	preflightMergeGrow = 4096 // what a JSON merge may add to its file
)

// preflight finds, before any key or certificate exists, everything that would make the image step refuse this unit:
// the profile and server_ca are usable, and the image is a disk image with the profile's partitions, clean and
// supported file systems, every merge target present, no key file on FAT unless the profile allows it, the TPM OpenSSL
// form settled, and room for every file (image.Check, read-only). A unit that
// fails here has no new key and no new certificate, so a retry of a bad image issues nothing.
func (r *run) preflight(ctx context.Context) error {
	serverCA, err := r.s.ServerCA()
	if err != nil {
		return err
	}
	kind := r.dev.Kind()
	if kind == "" {
		kind = tpm.KindSoft
	}
	placeholder := func(n int) []byte { return make([]byte, n) }
	m := profile.Material{Serial: r.req.Serial, Fields: r.req.Fields, KeyKind: kind, Cert: placeholder(preflightCertBytes),
		Issuing: ca.EncodeCerts(r.s.CA.Issuing), Root: ca.EncodeCerts(r.s.CA.Root), ServerCA: serverCA,
		Key: placeholder(preflightKeyBytes), AKCert: placeholder(preflightCertBytes), AKKey: placeholder(preflightKeyBytes)}
	if prof, err := r.profile(); err == nil && prof.UsesAK() && kind == tpm.KindTPM && r.s.Config.AttestationPolicy() == AttestOff {
		return fmt.Errorf("profile %s writes the unit's attestation key (from: ak_cert / ak_key), which the attest step makes: "+
			"set attestation: record or required in station.yaml: %w", r.profileName(), ErrProfile)
	}
	plan, err := r.planFor(m)
	if err != nil {
		return err
	}
	im, err := image.Open(ctx, r.req.Image, append(r.s.ImageOptions(r.req.Image), image.ReadOnly())...)
	if err != nil {
		return imageErr(err)
	}
	defer im.Close()
	parts, err := preparePlan(ctx, im, plan) // partitions, the TPM OpenSSL form, no key file on FAT
	if err != nil {
		return imageErr(err)
	}
	var planned []image.Planned
	for _, f := range plan.Files {
		for _, p := range parts[f.Part].parts {
			planned = append(planned, image.Planned{Select: strconv.Itoa(p.Number), Path: f.Path, Size: int64(len(f.Data)), Mode: f.Mode})
		}
	}
	for _, mg := range plan.Merges {
		for _, p := range parts[mg.Part].parts {
			planned = append(planned, image.Planned{Select: strconv.Itoa(p.Number), Path: mg.Path, Size: preflightMergeGrow, MustExist: !mg.Create})
		}
	}
	if err := im.Check(ctx, planned); err != nil {
		return imageErr(fmt.Errorf("pre-flight: %w", err))
	}
	return nil
}
