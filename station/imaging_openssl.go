package station

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strings"

	"provision/image"
	"provision/station/profile"
)

// ErrUnprotectedKey: a profile would write a key file to a file system without modes or owners (FAT).
var ErrUnprotectedKey = errors.New("key file on a file system without modes")

// preparePlan settles a plan against the image it goes to: the TPM OpenSSL form (tpm_openssl auto) from the image's
// package database, then the partitions, then the rule that key files go only where modes protect them.
func preparePlan(ctx context.Context, im *image.Image, plan *profile.Plan) (map[string]resolvedPart, error) {
	if err := settleOpenSSL(ctx, im, plan); err != nil {
		return nil, err
	}
	parts, err := resolvePartitions(im, plan)
	if err != nil {
		return nil, err
	}
	if err := checkKeyTargets(parts, plan); err != nil {
		return nil, err
	}
	return parts, nil
}

// checkKeyTargets refuses a key file aimed at a FAT partition unless its file entry says allow_unprotected_key.
func checkKeyTargets(parts map[string]resolvedPart, plan *profile.Plan) error {
	for _, f := range plan.Files {
		if !profile.IsKey(f.From) || f.AllowUnprotected {
			continue
		}
		for _, p := range parts[f.Part].parts {
			if p.FS == "vfat" {
				return fmt.Errorf("profile %s: %s: partition %d is FAT, which has no modes, so anyone who mounts it could read the key: write the key to an ext partition, or set allow_unprotected_key: true on this file entry if the device protects that partition otherwise: %w",
					plan.Profile, f.DevicePath, p.Number, ErrUnprotectedKey)
			}
		}
	}
	return nil
}

// settleOpenSSL reads the package database of the image's root file system and re-renders a plan whose TPM OpenSSL
// form is still provisional (tpm_openssl auto) with the form the image calls for. Plans with a forced form, software
// keys and plans settled before are left as they are.
func settleOpenSSL(ctx context.Context, im *image.Image, plan *profile.Plan) error {
	if !plan.Provisional() {
		return nil
	}
	c, err := detectOpenSSL(ctx, im, plan)
	if err != nil {
		return err
	}
	return plan.Settle(c)
}

// detectOpenSSL reads /var/lib/dpkg/status in every partition the profile mounts at "/" (both of an A/B pair).
// Partitions without a package database do not count; those that have one must agree.
func detectOpenSSL(ctx context.Context, im *image.Image, plan *profile.Plan) (profile.OpenSSLChoice, error) {
	var roots []string
	for name, spec := range plan.Partitions {
		if spec.Mount == "/" {
			roots = append(roots, name)
		}
	}
	sort.Strings(roots)
	if len(roots) == 0 {
		return profile.OpenSSLUnknown("the profile mounts no partition at /"), nil
	}
	type found struct {
		part   int
		choice profile.OpenSSLChoice
	}
	var known []found
	var missing []string
	for _, name := range roots {
		sels, err := profile.ParseSelect(plan.Partitions[name].Select)
		if err != nil {
			return profile.OpenSSLChoice{}, err
		}
		for _, sel := range sels {
			p, err := im.Select(sel)
			if err != nil {
				return profile.OpenSSLChoice{}, fmt.Errorf("profile %s: partition %s (select %q): %w", plan.Profile, name, sel, err)
			}
			data, err := readImageFile(ctx, im, p, profile.DpkgStatus)
			switch {
			case err == nil:
				known = append(known, found{p.Number, profile.OpenSSLFromDpkg(data, profile.DpkgStatus)})
			case errors.Is(err, fs.ErrNotExist):
				missing = append(missing, fmt.Sprintf("no %s in partition %d", profile.DpkgStatus, p.Number))
			default:
				missing = append(missing, fmt.Sprintf("partition %d: %v", p.Number, err))
			}
		}
	}
	if len(known) == 0 {
		return profile.OpenSSLUnknown(strings.Join(missing, "; ")), nil
	}
	for _, k := range known[1:] {
		if k.choice.Form != known[0].choice.Form {
			return profile.OpenSSLChoice{}, fmt.Errorf("profile %s: the root file systems need different TPM OpenSSL forms (partition %d: %s; partition %d: %s): make them alike or set tpm_openssl in the profile",
				plan.Profile, known[0].part, known[0].choice, k.part, k.choice)
		}
	}
	return known[0].choice, nil
}

func readImageFile(ctx context.Context, im *image.Image, p image.Partition, name string) ([]byte, error) {
	fsys, err := im.FS(ctx, p)
	if err != nil {
		return nil, err
	}
	defer fsys.Close()
	return fsys.ReadFile(name)
}
