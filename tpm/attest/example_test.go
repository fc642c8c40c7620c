package attest_test

import (
	"fmt"

	"provision/tpm/attest"
)

// swtpm's EK certificate names its manufacturer by IBM's PCI vendor ID, while the TPM reports IBM's TCG vendor ID:
// both are IBM.
func ExampleManufacturerMatch() {
	known, match := attest.ManufacturerMatch("id:00001014", 0x49424D00)
	fmt.Println(attest.VendorName(0x49424D00), known, match)
	known, match = attest.ManufacturerMatch("id:49465800", 0x49424D00)
	fmt.Println(attest.VendorName(0x49465800), known, match)
	// Output:
	// IBM true true
	// IFX true false
}
