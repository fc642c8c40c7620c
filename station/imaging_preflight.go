package station

import (
	"context"

	"provision/image"
	"provision/station/profile"
)

// PreflightPlan checks, without writing anything, that a plan fits the image at imagePath as Inject will check it:
// the partitions it selects exist, the TPM OpenSSL form can be settled from the image (tpm_openssl auto: the root
// file systems do not disagree), and no key file goes to a FAT partition unless its file entry says
// allow_unprotected_key. The plan is settled in place as Inject would settle it. Errors wrap ErrImage (and
// ErrUnprotectedKey for a key file on FAT). For the validate step: it runs before any key or certificate exists.
func PreflightPlan(ctx context.Context, imagePath string, plan *profile.Plan, opts ...image.OpenOption) error {
	im, err := image.Open(ctx, imagePath, append(opts, image.ReadOnly())...)
	if err != nil {
		return imageErr(err)
	}
	defer im.Close()
	if _, err := preparePlan(ctx, im, plan); err != nil {
		return imageErr(err)
	}
	return nil
}
