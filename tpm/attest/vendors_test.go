package attest

import (
	"fmt"
	"strings"
	"testing"
)

func TestVendorName(t *testing.T) {
	for _, tc := range []struct {
		id   uint32
		want string
	}{
		{0x49424D00, "IBM"}, {0x49465800, "IFX"}, {0x494E5443, "INTC"}, {0x4E544300, "NTC"},
		{0x53544D20, "STM"}, {0x474F4F47, "GOOG"}, {0x4D534654, "MSFT"}, {0x414D4400, "AMD"},
		{0x4E545A00, "NTZ"}, {0x4E534D20, "NSM"}, {0x57454300, "WEC"}, {0x48495349, "HISI"},
		{0x00001014, ""}, {0, ""}, {0x49424D20, ""},
	} {
		if got := VendorName(tc.id); got != tc.want {
			t.Errorf("VendorName(%#08x) = %q, want %q", tc.id, got, tc.want)
		}
	}
	if got := VendorCompany(0x4E544300); got != "Nuvoton Technology" {
		t.Errorf("VendorCompany(NTC) = %q", got)
	}
}

// Every registry ID is its short name in ASCII, padded with NUL (or a space), and appears once.
func TestRegistryIsConsistent(t *testing.T) {
	seen := map[uint32]bool{}
	for _, v := range registry {
		if seen[v.id] {
			t.Errorf("%s: ID %#08x twice", v.short, v.id)
		}
		seen[v.id] = true
		b := []byte{byte(v.id >> 24), byte(v.id >> 16), byte(v.id >> 8), byte(v.id)}
		if got := strings.TrimRight(string(b), "\x00 "); got != v.short {
			t.Errorf("ID %#08x reads %q, registry says %q", v.id, got, v.short)
		}
	}
	if len(registry) != 29 {
		t.Errorf("%d vendors, want the 29 of registry version 1.07", len(registry))
	}
}

func TestManufacturerMatch(t *testing.T) {
	for _, tc := range []struct {
		cert         string
		tpm          uint32
		known, match bool
	}{
		{"id:00001014", 0x49424D00, true, true}, // swtpm's certificate vs its TPM: IBM's PCI ID vs IBM's TCG ID
		{"id:49424D00", 0x49424D00, true, true},
		{"id:49424d00", 0x49424D00, true, true},
		{"ID:49465800", 0x49465800, true, true},
		{"id:49465800", 0x49424D00, true, false}, // an Infineon certificate in an IBM TPM
		{"id:00001014", 0x49465800, true, false},
		{"id:53544D20", 0x53544D20, true, true},
		{"id:49424D00", 0x49424D20, true, true}, // "IBM\0" and "IBM " (the IBM reference simulator)
		{"IFX", 0x49465800, true, true},
		{" id:4E544300 ", 0x4E544300, true, true},
		{"", 0x49424D00, false, false},
		{"id:", 0x49424D00, false, false},
		{"id:xyz", 0x49424D00, false, false},
		{"id:123456789", 0x49424D00, false, false},
		{"Acme", 0x49424D00, false, false},
		{"id:49424D00", 0, false, false}, // the TPM's ID was not read
	} {
		t.Run(fmt.Sprintf("%s/%08x", tc.cert, tc.tpm), func(t *testing.T) {
			known, match := ManufacturerMatch(tc.cert, tc.tpm)
			if known != tc.known || match != tc.match {
				t.Errorf("ManufacturerMatch(%q, %#08x) = %v, %v; want %v, %v", tc.cert, tc.tpm, known, match, tc.known, tc.match)
			}
		})
	}
	if id, ok := ManufacturerID("id:00001014"); !ok || VendorName(id) != "IBM" {
		t.Errorf("ManufacturerID(swtpm) = %#08x, %v; want IBM", id, ok)
	}
}
