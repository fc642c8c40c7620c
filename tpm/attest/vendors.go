package attest

import (
	"strconv"
	"strings"
)

// vendor is one entry of the TCG TPM Vendor ID Registry (Family 1.2 and 2.0, version 1.07): the 4-byte ID a TPM
// reports as TPM_PT_MANUFACTURER, which is its short name in ASCII, padded with NUL (or a space: "STM ", "NSM ").
type vendor struct {
	id    uint32
	short string
	name  string
}

// registry is the TCG TPM Vendor ID Registry, version 1.07 (the 1.06 list plus Ant Group, HPI, NSING, SecEdge and
// WISeKey).
var registry = []vendor{
	{0x414D4400, "AMD", "AMD"},
	{0x414E5400, "ANT", "Ant Group"},
	{0x41544D4C, "ATML", "Atmel"},
	{0x4252434D, "BRCM", "Broadcom"},
	{0x4353434F, "CSCO", "Cisco"},
	{0x464C5953, "FLYS", "Flyslice Technologies"},
	{0x524F4343, "ROCC", "Fuzhou Rockchip"},
	{0x474F4F47, "GOOG", "Google"},
	{0x48504900, "HPI", "HP Inc."},
	{0x48504500, "HPE", "Hewlett Packard Enterprise"},
	{0x48495349, "HISI", "Huawei"},
	{0x49424D00, "IBM", "IBM"},
	{0x49465800, "IFX", "Infineon"},
	{0x494E5443, "INTC", "Intel"},
	{0x4C454E00, "LEN", "Lenovo"},
	{0x4D534654, "MSFT", "Microsoft"},
	{0x4E534D20, "NSM", "National Semiconductor"},
	{0x4E545A00, "NTZ", "Nationz"},
	{0x4E534700, "NSG", "NSING"},
	{0x4E544300, "NTC", "Nuvoton Technology"},
	{0x51434F4D, "QCOM", "Qualcomm"},
	{0x534D534E, "SMSN", "Samsung"},
	{0x53454345, "SECE", "SecEdge"},
	{0x534E5300, "SNS", "Sinosun"},
	{0x534D5343, "SMSC", "SMSC"},
	{0x53544D20, "STM", "STMicroelectronics"},
	{0x54584E00, "TXN", "Texas Instruments"},
	{0x57454300, "WEC", "Winbond"},
	{0x5345414C, "SEAL", "WISeKey"},
}

// numericAliases maps manufacturer numbers that EK certificates write but the registry does not hold to the registry
// ID of the same company.
//
// 0x00001014: libtpms (IBM's TPM implementation, which swtpm runs) describes itself with TPMLIB_GetInfo as
// {"manufacturer":"id:00001014","model":"swtpm","version":"id:20191023"}; swtpm_setup passes that to swtpm_localca
// as --tpm-manufacturer, so swtpm's EK certificates say id:00001014. 0x1014 is IBM's PCI-SIG vendor ID, not a TCG
// vendor ID, while the same TPM reports TPM_PT_MANUFACTURER "IBM\0" (0x49424D00): both name IBM.
var numericAliases = map[uint32]uint32{
	0x00001014: 0x49424D00,
}

func lookup(id uint32) (vendor, bool) {
	for _, v := range registry {
		if v.id == id {
			return v, true
		}
	}
	return vendor{}, false
}

// VendorName is the TCG vendor-ID registry's short name for a TPM_PT_MANUFACTURER value ("IBM", "IFX", "NTC"), or ""
// when the ID is not registered.
func VendorName(id uint32) string {
	v, _ := lookup(id)
	return v.short
}

// VendorCompany is the company the registry names for a TPM_PT_MANUFACTURER value ("Infineon", "Nuvoton
// Technology"), or "" when the ID is not registered.
func VendorCompany(id uint32) string {
	v, _ := lookup(id)
	return v.name
}

// ManufacturerID reads the TPM manufacturer an EK certificate names: "id:49465800" (hex, as the TCG EK Credential
// Profile writes it), a known numeric alias ("id:00001014", swtpm's IBM), or a registry short name ("IFX"). ok is
// false when it names none of these.
func ManufacturerID(certManufacturer string) (id uint32, ok bool) {
	s := strings.TrimSpace(certManufacturer)
	if len(s) > 3 && strings.EqualFold(s[:3], "id:") {
		n, err := strconv.ParseUint(s[3:], 16, 32)
		if err != nil {
			return 0, false
		}
		id = uint32(n)
		if alias, found := numericAliases[id]; found {
			id = alias
		}
		return id, true
	}
	for _, v := range registry {
		if s != "" && strings.EqualFold(s, v.short) {
			return v.id, true
		}
	}
	return 0, false
}

// ManufacturerMatch compares the certificate's manufacturer ("id:49424D00", as EK certificates write it) with the ID the
// TPM reports, through the registry: known is false when either side cannot be read. IDs whose ASCII differs only in
// its padding ("IBM\0" and "IBM ", the IBM reference simulator) match.
func ManufacturerMatch(certManufacturer string, tpmID uint32) (known, match bool) {
	id, ok := ManufacturerID(certManufacturer)
	if !ok || tpmID == 0 {
		return false, false
	}
	if id == tpmID {
		return true, true
	}
	a, b := asciiID(id), asciiID(tpmID)
	return true, a != "" && a == b
}

// asciiID is a vendor ID as its ASCII letters without the NUL or space padding, or "" when it is not printable.
func asciiID(id uint32) string {
	b := []byte{byte(id >> 24), byte(id >> 16), byte(id >> 8), byte(id)}
	s := strings.TrimRight(string(b), "\x00 ")
	for _, c := range []byte(s) {
		if c < 0x21 || c > 0x7e {
			return ""
		}
	}
	return s
}
